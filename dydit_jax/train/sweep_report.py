"""The lambda sweep's report (dydit_jax.train.sweep): speedups, the markdown table and the plot.

  results.json        every eval row (with its speedup), the judge, the stages, the config, wall times
  results.md          one table per sampler: model, lambda, measured MACs ratio, Frechet distance and class
                      accuracy with their bootstrap spread, the difference to the dense control in units
                      of the two rows' combined spread, sampling seconds and the speedup over the control
  quality_vs_macs.png FD and accuracy against the measured MACs ratio, per sampler, the dense models marked

Why differences in units of spread: "lambda=0.5 is within reach of the control" is a claim about a
difference of two noisy numbers; sqrt(s_row^2 + s_control^2) is the noise of that difference, so
"+12 (0.8 sigma)" reads as within the noise and "+120 (9 sigma)" does not.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from etils import epath

from dydit_jax.files import atomic_write, atomic_write_json

CONTROL = "control"


def _control(rows: list[dict[str, Any]], sampler: str) -> dict[str, Any] | None:
  return next((r for r in rows if r["model"] == CONTROL and r["sampler"] == sampler), None)


def with_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The rows, each with speedup_vs_control: the control's sampling seconds over the row's at the
  same sampler, batch and sample count (None without a control row)."""
  out = []
  for row in rows:
    control = _control(rows, row["sampler"])
    out.append({**row, "speedup_vs_control": control["seconds"] / row["seconds"] if control else None})
  return out


def difference(row: dict[str, Any], control: dict[str, Any] | None, metric: str, spread: str,
               digits: int) -> str:
  """'+12.3 (0.8σ)': row minus control, in units of sqrt(spread_row^2 + spread_control^2)."""
  if control is None or row is control:
    return "–"
  delta = row[metric] - control[metric]
  sigma = float(np.hypot(row[spread], control[spread]))
  return f"{delta:+.{digits}f} ({abs(delta) / sigma:.1f}σ)" if sigma > 0 else f"{delta:+.{digits}f}"


def table(rows: list[dict[str, Any]], judge: dict[str, Any]) -> str:
  """results.md: a header on how to read it, then one table per sampler (rows in sweep order)."""
  first = rows[0]
  lines = [f"# Lambda sweep: {first['num_samples']} class-conditional samples per model and sampler", "",
           f"CFG {first['options']['cfg_scale']}; the same noise seeds for every model. Judge accuracy on its "
           f"{judge['held_out_digits']} held-out digits: {judge['held_out_accuracy']:.3f}; "
           f"{first['num_samples']} real training digits score FD {judge['real_baseline_fd']:.1f} against "
           "them (the floor at this sample count). ± is the bootstrap std over the samples (the spread over "
           "sampling seeds); Δ is the row minus the dense control, σ the two rows' combined spread. MACs "
           "ratio: block MACs measured over the sampling run. DyDiTs sample with the fast engine, the dense "
           "models densely; speedup = control seconds / row seconds.", ""]
  for sampler in dict.fromkeys(r["sampler"] for r in rows):
    part = [r for r in rows if r["sampler"] == sampler]
    control = _control(rows, sampler)
    lines += [f"## {sampler.upper()} ({part[0]['options']['steps']} steps)", "",
              "| model | λ | MACs ratio | FD | ΔFD | accuracy | Δaccuracy | sampling s | speedup |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in part:
      speedup = r.get("speedup_vs_control")
      lines.append(
          f"| {r['model']} | {'–' if r['lam'] is None else r['lam']} | {r['flops_ratio']:.3f} | "
          f"{r['frechet_distance']:.1f} ± {r['fd_spread']:.1f} | "
          f"{difference(r, control, 'frechet_distance', 'fd_spread', 1)} | "
          f"{r['class_accuracy']:.3f} ± {r['accuracy_spread']:.3f} | "
          f"{difference(r, control, 'class_accuracy', 'accuracy_spread', 3)} | {r['seconds']:.1f} | "
          f"{'–' if speedup is None else f'{speedup:.2f}x'} |")
    lines.append("")
  return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path) -> None:
  """FD and accuracy (with their spread) against the measured MACs ratio; DyDiTs as a line per
  sampler labelled with lambda, the control as a star, the pre-trained DiT as a cross."""
  import matplotlib  # Lazy: slow to import, needed only here.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for (metric, spread, label), ax in zip((("frechet_distance", "fd_spread", "Frechet distance (lower is better)"),
                                         ("class_accuracy", "accuracy_spread", "class accuracy")), axes):
    for k, sampler in enumerate(dict.fromkeys(r["sampler"] for r in rows)):
      color = f"C{k}"
      part = [r for r in rows if r["sampler"] == sampler]
      dy = sorted((r for r in part if r["lam"] is not None), key=lambda r: r["flops_ratio"])
      ax.errorbar([r["flops_ratio"] for r in dy], [r[metric] for r in dy], [r[spread] for r in dy],
                  color=color, marker="o", capsize=3, label=f"DyDiT, {sampler}")
      for r in dy:
        ax.annotate(f"λ={r['lam']:g}", (r["flops_ratio"], r[metric]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8, color=color)
      for r in part:
        if r["lam"] is None:
          marker, name = ("*", "control") if r["model"] == CONTROL else ("x", r["model"])
          ax.errorbar([r["flops_ratio"]], [r[metric]], [r[spread]], color=color, marker=marker,
                      markersize=11, capsize=3, linestyle="none", label=f"{name}, {sampler}")
    ax.set_xlabel("measured MACs ratio over the sampling run")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write(results: dict[str, Any], root) -> None:
  """results.json, results.md (each written atomically) and quality_vs_macs.png into `root`; small
  files, rewritten whole on every run."""
  root = epath.Path(root)
  atomic_write_json(root / "results.json", results)
  text = table(results["rows"], results["judge"])
  atomic_write(root / "results.md", lambda f: f.write(text.encode()))
  plot(results["rows"], root / "quality_vs_macs.png")
