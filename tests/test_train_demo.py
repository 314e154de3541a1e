"""The reduced demo (configs/demo.py:quick=1) end to end: outputs, the DyDiT's measured FLOPs ratio
over its sampling run within +-0.05 of lambda, and the judge's report (the full demo, same code, gets
more steps; its sample accuracies are measured in docs/benchmarks.md §5, not here: CI's few steps
draw no digits)."""
import json

import numpy as np
import pytest
from PIL import Image

import train_helpers as th

pytestmark = pytest.mark.slow   # end to end: subprocesses / whole runs (`-m "not slow"` skips)


def test_quick_demo(tmp_path_factory):
  wd = tmp_path_factory.mktemp("demo")
  th.run_main(wd, "quick=1", config="configs/demo.py", cache_dir=tmp_path_factory.getbasetemp() / "jax_cache",
              timeout=600)
  summary = json.loads((wd / "summary.json").read_text())
  assert abs(summary["dydit"]["sampling_flops_ratio"] - 0.5) <= 0.05, summary
  assert summary["flops_ratio_within_tolerance"]
  assert summary["dit"]["sampling_flops_ratio"] == 1.0
  assert summary["dit"]["steps"] > 0 and summary["dydit"]["steps"] > 0
  assert np.isfinite(summary["dydit"]["final_metrics"]["loss"]) and summary["wall_time_s"] > 0
  for name in ("samples_dit.png", "samples_dydit.png"):
    grid = np.asarray(Image.open(wd / name))
    assert grid.shape == (10 * 34 + 2, 1 * 34 + 2) and grid.std() > 0   # 10 classes x 1, 32 px + 2 px gaps
  judge = summary["judge"]
  assert judge["held_out_digits"] == 500 and 0.5 < judge["held_out_accuracy"] <= 1.0   # 100 steps: learns
  assert (wd / "judge" / "weights.npz").is_file() and judge["real_baseline_fd"] > 0
  for name in ("dit", "dydit"):
    assert 0.0 <= summary[name]["class_accuracy"] <= 1.0 and summary[name]["frechet_distance"] > 0
  assert Image.open(wd / "active_widths.png").size[0] > 100
  assert (wd / "dit" / "checkpoints").is_dir() and (wd / "dydit" / "checkpoints").is_dir()
  assert any(p.name.startswith("events.out.tfevents") for p in (wd / "dydit").iterdir())
