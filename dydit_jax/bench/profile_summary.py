"""Where device time goes: a text summary of a `jax.profiler` trace, readable without TensorBoard.

The engine's gap to its ideal speed on a GPU (docs/benchmarks.md) is either idle device time (host
round trips for branch predicates, launch latency) or slow kernels (odd matmul shapes, gathers). A
trace answers which: `summarize` reports the span from the first to the last kernel, the time some
kernel was running (union over streams), the time per kind of kernel (matmul, attention, fusion,
copy: unrolled programs name every layer's fusions apart, so only the kinds add up across layers),
and the kernels with the most total time.

  with jax.profiler.trace(logdir): run()
  print(format_summary(summarize(logdir)))

Device planes ("/device:...") are read when present (GPU, TPU); otherwise the XLA threads of the host
plane (CPU runs), so the same code path is exercised in CPU tests.
"""
from __future__ import annotations

import collections
import dataclasses
import re
from pathlib import Path

# Kinds of kernels, first match wins; names as XLA GPU, cuBLAS and cuDNN print them.
KINDS = (
    ("attention", re.compile(r"sdpa|flash|fmha|attention", re.I)),
    ("matmul", re.compile(r"nvjet|gemm|xmma|cutlass|cublas|\bdot|_dot", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
    ("fusion", re.compile(r"fusion|convert|transpose|broadcast|reduce|select|gather|scatter|slice", re.I)),
)


def kernel_family(name: str) -> str:
  """The name without its instance numbers (`loop_select_fusion.17` -> `loop_select_fusion`): XLA names
  a fusion after the ops it holds, so families add up a layer's passes across layers and programs."""
  return re.sub(r"([._]\d+)+$", "", re.sub(r"\.\d+(?=[._])", "", name))


def kernel_kind(name: str) -> str:
  """matmul | attention | copy | fusion (elementwise, reductions, gathers) | other."""
  return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


@dataclasses.dataclass
class TraceSummary:
  span_ms: float                                  # first kernel start -> last kernel end
  busy_ms: float                                  # union of kernel intervals
  kernels: list[tuple[str, float, int]]           # (name, total ms, count), most time first
  source: str                                     # which plane / lines were read
  kinds: dict[str, float] = dataclasses.field(default_factory=dict)  # kernel_kind -> total ms, all kernels
  families: list[tuple[str, float, int]] = dataclasses.field(default_factory=list)  # kernel_family, ms, count

  @property
  def idle_fraction(self) -> float:
    return 1.0 - self.busy_ms / self.span_ms if self.span_ms else 0.0


def _latest_trace(logdir) -> Path:
  files = sorted(Path(logdir).glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb under {logdir}: was jax.profiler.trace used there?")
  return files[-1]


def _kernel_lines(profile):
  """(source name, lines holding one event per kernel execution)."""
  devices = [p for p in profile.planes if p.name.startswith("/device:")]
  if devices:
    plane = devices[0]
    lines = [l for l in plane.lines if l.name.startswith("Stream")] or list(plane.lines)
    return plane.name, lines
  host = next(p for p in profile.planes if p.name == "/host:CPU")
  return "/host:CPU XLA client threads", [l for l in host.lines if "XLAPjRtCpuClient" in l.name]


def summarize(logdir, top: int = 25) -> TraceSummary:
  """Summary of the newest trace under `logdir`."""
  from jax.profiler import ProfileData  # Lazy: only benchmarks profile.

  profile = ProfileData.from_file(str(_latest_trace(logdir)))
  source, lines = _kernel_lines(profile)
  intervals, totals, counts = [], collections.Counter(), collections.Counter()
  for line in lines:
    for event in line.events:
      if event.duration_ns <= 0 or event.name.startswith("ThreadpoolListener"):
        continue
      intervals.append((event.start_ns, event.start_ns + event.duration_ns))
      totals[event.name] += event.duration_ns
      counts[event.name] += 1
  if not intervals:
    return TraceSummary(0.0, 0.0, [], source)
  intervals.sort()
  busy, (cur_start, cur_end) = 0.0, intervals[0]
  for start, end in intervals[1:]:
    if start > cur_end:
      busy += cur_end - cur_start
      cur_start, cur_end = start, end
    else:
      cur_end = max(cur_end, end)
  busy += cur_end - cur_start
  span = max(e for _, e in intervals) - intervals[0][0]
  kernels = [(name, ns / 1e6, counts[name]) for name, ns in totals.most_common(top)]
  kinds, family_ms, family_n = collections.Counter(), collections.Counter(), collections.Counter()
  for name, ns in totals.items():
    kinds[kernel_kind(name)] += ns / 1e6
    family_ms[kernel_family(name)] += ns / 1e6
    family_n[kernel_family(name)] += counts[name]
  families = [(f, ms, family_n[f]) for f, ms in family_ms.most_common(top)]
  return TraceSummary(span / 1e6, busy / 1e6, kernels, source, dict(kinds.most_common()), families)


def format_summary(s: TraceSummary, title: str = "") -> str:
  lines = [f"profile {title} ({s.source}): span {s.span_ms:.1f} ms, kernels running {s.busy_ms:.1f} ms, "
           f"idle {100 * s.idle_fraction:.1f}%"]
  if s.kinds:
    total = sum(s.kinds.values())
    lines.append("kernel time by kind: " + ", ".join(f"{kind} {ms:.1f} ms ({100 * ms / total:.1f}%)"
                                                      for kind, ms in s.kinds.items()))
  rows = [("family", f) for f in s.families] + [("kernel", k) for k in s.kernels]
  lines += ["| kernel family / kernel | total ms | calls | % of busy |", "|---|---|---|---|"]
  for what, (name, ms, count) in rows:
    name = f"[{what}] {name}"
    share = 100 * ms / s.busy_ms if s.busy_ms else 0.0
    lines.append(f"| {name[:90]} | {ms:.2f} | {count} | {share:.1f} |")
  return "\n".join(lines)
