"""What a benchmark run measures: one frozen `BenchConfig`, checked once, also the CLI's flag table.

Every field is a flag of `python -m dydit_jax.bench` with the same name (`--steps_limit 25`); lists
are comma separated (`--samplers ddpm250,ddim50`). The defaults are a quick run; `launch/gpu_bench.sh`
sets the GPU protocol.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from absl import flags

from dydit_jax.errors import UserError
from dydit_jax.models.config import normalize_attention

# Sampler names of the table -> (method, respacing).
SAMPLER_SPECS = {"ddpm250": ("ddpm", "250"), "ddim50": ("ddim", "ddim50")}
PARTS = ("matmul", "forward", "chain", "calls", "hlo", "cost")
ENGINES = ("buckets", "segments")
TOKEN_CAPS = ("chain", "calibrated", "uniform")


def engine_variant(name: str) -> tuple[str, int | None, int | None]:
  """"buckets" -> ("buckets", None, None); "buckets-12x10" -> ("buckets", 12, 10) (head / group
  capacities of that engine, overriding --head_buckets / --group_buckets)."""
  kind, _, caps = name.partition("-")
  try:
    if kind not in ENGINES:
      raise ValueError
    if not caps:
      return kind, None, None
    if kind != "buckets":
      raise ValueError
    heads, groups = (int(v) for v in caps.split("x"))
    if heads < 1 or groups < 1:
      raise ValueError
    return kind, heads, groups
  except ValueError:
    raise UserError(f"--engines takes {' and/or '.join(ENGINES)} (buckets optionally as buckets-HxG, "
                    f"e.g. buckets-12x10), got {name!r}") from None


def _field(default, help_text: str, kind: type | None = None):
  return dataclasses.field(default=default, metadata={"help": help_text, "kind": kind or type(default)})


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """See the help texts; `parts` entries are "name" or "name:arg:arg" (module `parts`)."""

  model: str = _field("DiT-XL/2", "registry name of the model to build (random weights without --ckpt)")
  image_size: int = _field(256, "image side in pixels")
  ckpt: str | None = _field(None, "converted DyDiT checkpoint dir (default: random weights)", str)
  routers: str | None = _field(None, "checkpoint | synthetic:R (default synthetic:0.5 without --ckpt, "
                               "checkpoint with it)", str)
  token_keep: float = _field(0.85, "synthetic routers: fraction of MLP-routed tokens")
  tilt: float = _field(0.4, "synthetic routers: width(t=0) - width(t=999)")
  seed: int = _field(0, "weights, routers and sampling seed")
  batch: int = _field(8, "images per batch (rows per call = 2x with CFG)")
  cfg_scale: float = _field(1.5, "classifier-free guidance scale; 0 disables it")
  samplers: tuple[str, ...] = _field(("ddpm250", "ddim50"), f"samplers to time: {sorted(SAMPLER_SPECS)}")
  dtype: str = _field("bfloat16", "compute dtype of dense and DyDiT")
  residual_dtype: str = _field("float32", "residual stream between blocks, dense and DyDiT alike "
                               "(ModelConfig.residual_dtype): float32 | bfloat16")
  attention: str = _field("xla", "attention for the chains: xla | cudnn")
  forward_attention: tuple[str, ...] = _field(("xla",), "attention implementations of parts forward / calls")
  forward_batch: int = _field(256, "rows of the dense forward part")
  iters: int = _field(5, "timed repetitions in the forward part")
  steps_limit: int | None = _field(None, "run only K steps spread over each chain", int)
  profile: str | None = _field(None, "chain part: also trace one run of each chain into this folder and "
                               "print device busy / idle time and the top kernels", str)
  profile_chains: bool = _field(True, "with --profile: trace whole chains in the chain part; false: only "
                                "the calls part traces (one model call each: a much smaller trace)")
  warmup: int = _field(1, "chain part: run each chain once untimed first (0: no)")
  calls: int = _field(8, "model calls timed in the calls part")
  head_buckets: int = _field(8, "bucket engine: most head capacities")
  group_buckets: int = _field(6, "bucket engine: most MLP-group capacities")
  token_buckets: int = _field(8, "token capacities")
  engines: tuple[str, ...] = _field(("buckets",), "DyDiT engines to time: buckets (one program, per-layer "
                                    "lax.switch) and/or segments (one program per range of steps); "
                                    "buckets-HxG overrides the head / group capacities of that row (e.g. "
                                    "buckets,buckets-12x10 times both in one process)")
  segments: int = _field(8, "segment engine: ranges of steps (programs)")
  width_multiple: int = _field(1, "segment engine: round each layer's head / group count up to this multiple")
  token_caps: str = _field("chain", "token capacities fitted to the routed fractions of a short real chain "
                           "of each sampler (4 images: chain), to a calibration batch (calibrated), or j/T "
                           "(uniform)")
  matmul_size: int | None = _field(None, "matmul part: n of n^3 (default 8192 on GPU, 1024 on CPU)", int)
  cost_batch: int | None = _field(None, "cost part: images to cost the pieces at (default --batch; token "
                                  "counts of the chain's images tiled)", int)
  parts: tuple[str, ...] = _field(("matmul", "forward", "chain"), f"parts to run, in order: {PARTS}, "
                                  "each optionally with ':arg' (e.g. chain:cudnn:ddpm250:bfloat16, or "
                                  "chain:cudnn:ddpm250:float32:buckets+buckets-12x10 for other engines than --engines)")
  json: str | None = _field(None, "also write the rows (and run info) to this file", str)
  verbose: bool = _field(False, "print tracebacks of failed parts")

  def __post_init__(self):
    unknown = set(self.samplers) - set(SAMPLER_SPECS)
    if unknown:
      raise UserError(f"unknown samplers {sorted(unknown)}; choose from {sorted(SAMPLER_SPECS)}")
    for engine in self.engines:
      engine_variant(engine)
    for part in self.parts:
      if part.split(":")[0] not in PARTS:
        raise UserError(f"unknown part {part!r}; parts are {PARTS} (optionally with ':args')")
    if self.token_caps not in TOKEN_CAPS:
      raise UserError(f"--token_caps takes one of {TOKEN_CAPS}, got {self.token_caps!r}")
    for impl in (self.attention, *self.forward_attention):
      normalize_attention(impl)
    if self.batch <= 0:
      raise UserError(f"--batch must be positive, got {self.batch}")
    router = self.router_spec
    if router != "checkpoint" and not router.startswith("synthetic:"):
      raise UserError(f"--routers takes checkpoint or synthetic:R, got {router!r}")

  @property
  def router_spec(self) -> str:
    return self.routers or ("checkpoint" if self.ckpt else "synthetic:0.5")

  @property
  def rows(self) -> int:
    """Rows of one model call: CFG doubles the images."""
    return 2 * self.batch if self.cfg_scale else self.batch

  @classmethod
  def define_flags(cls) -> None:
    """One absl flag per field (the CLI's flags)."""
    for f in dataclasses.fields(cls):
      kind, help_text = f.metadata["kind"], f.metadata["help"]
      if kind is bool:
        flags.DEFINE_bool(f.name, f.default, help_text)
      elif kind is tuple:
        flags.DEFINE_list(f.name, list(f.default), help_text)
      elif kind is int:
        flags.DEFINE_integer(f.name, f.default, help_text)
      elif kind is float:
        flags.DEFINE_float(f.name, f.default, help_text)
      else:
        flags.DEFINE_string(f.name, f.default, help_text)

  @classmethod
  def from_flags(cls, values: Any = None) -> "BenchConfig":
    values = values or flags.FLAGS
    kwargs = {}
    for f in dataclasses.fields(cls):
      v = getattr(values, f.name)
      kwargs[f.name] = tuple(s for s in v if s) if f.metadata["kind"] is tuple else v
    return cls(**kwargs)
