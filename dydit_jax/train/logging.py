"""Training logs: clu metric writers (TensorBoard + console), progress with ETA, parameter overview.

This is the ONLY module that imports clu, and it does so lazily: clu's writers import TensorFlow
(seconds to load, and absent on the GPU machines), so models, diffusion, the engine and the sampler
never pull it in, and `config.tensorboard=False` runs without it (console + JSONL only). Either way
the primary host appends every logged scalar to WORKDIR/metrics.jsonl, a record readable without
TensorFlow (tests, the demo summary, quick plots).
"""
from __future__ import annotations

import json
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from etils import epath

METRICS_FILE = "metrics.jsonl"


def flatten_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Scalars as they are; per-layer vectors (e.g. head_rate (L,)) as name/layer_00, name/layer_01..."""
  out = {}
  for name, value in metrics.items():
    value = np.asarray(value)
    if value.ndim == 0:
      out[name] = float(value)
    else:
      out.update({f"{name}/layer_{i:02d}": float(v) for i, v in enumerate(value.ravel())})
  return out


class MetricLogger:
  """Writes scalars and images of the primary host; reports steps/s and ETA every step call."""

  def __init__(self, workdir: str, *, total_steps: int, tensorboard: bool, is_primary: bool):
    self.is_primary = is_primary
    self.jsonl = epath.Path(workdir) / METRICS_FILE if is_primary else None
    self.writer = self.progress = None
    if tensorboard:
      from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
      self.writer = metric_writers.create_default_writer(workdir, just_logging=not is_primary)
      self.progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=self.writer)
    self._last = None

  def step(self, step: int) -> None:
    """Call once per finished iteration: clu's ReportProgress (steps/s, ETA) when enabled."""
    if self.progress is not None:
      self.progress(step, time.time())

  def write_scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
    scalars = flatten_scalars(metrics)
    now = time.time()
    if self.progress is None and (self._last is None or step > self._last[0]):
      # Without clu: our own steps/s over the logging window.
      if self._last is not None:
        scalars["steps_per_sec"] = (step - self._last[0]) / max(now - self._last[1], 1e-9)
      self._last = (step, now)
    if self.writer is not None:
      self.writer.write_scalars(step, scalars)
    else:
      head = {k: v for k, v in scalars.items() if "/layer_" not in k}
      logging.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in sorted(head.items())))
    if self.jsonl is not None:
      with self.jsonl.open("a") as f:
        f.write(json.dumps({"step": step, **scalars}) + "\n")

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Image summaries (uint8 HWC each) for TensorBoard; a no-op without clu."""
    if self.writer is not None:
      self.writer.write_images(step, {k: np.asarray(v)[None] for k, v in images.items()})

  def parameter_overview(self, params: Mapping[str, Any]) -> None:
    """clu's table of parameter shapes, sizes and statistics (or just the total without clu)."""
    if self.writer is not None:
      from clu import parameter_overview  # pylint: disable=g-import-not-at-top
      # Statistics need every shard on this host: only single-process runs compute them.
      parameter_overview.log_parameter_overview(params, include_stats=jax.process_count() == 1)
    else:
      total = sum(int(np.prod(np.shape(p))) for p in jax.tree.leaves(params))
      logging.info("%d parameters", total)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The rows of WORKDIR/metrics.jsonl (one per logged step)."""
  path = epath.Path(workdir) / METRICS_FILE
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
