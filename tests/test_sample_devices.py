"""Sampling split over 8 simulated devices equals one device, for every engine.

Image i's noise depends on (seed, i) only, so 8 images on 8 devices (`jax.shard_map`, each device
compacting its own tokens) and 6 images on one device sample the same images, through the masked
model and both engines. Tolerance: relative L2 <= 1e-5 (fp32; shapes of the compacted matmuls differ,
so rounding does); routed-token counts (CFG rows in global order) exactly equal.
"""
import json
import subprocess
import sys

import pytest

import train_helpers as th

pytestmark = pytest.mark.slow   # end to end: subprocesses / whole runs (`-m "not slow"` skips)


def test_engine_sampling_over_devices_equals_one_device():
  proc = subprocess.run([sys.executable, str(th.REPO / "tests" / "sample_devices_check.py")], cwd="/",
                        env=th.env(devices=8), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  # The 8-image runs were split (one program for masked and buckets, two segments); the 6-image ones not.
  assert out["shard_map_calls"] == 4, out
  assert out["masked_split_vs_one"] <= 1e-5 and out["masked_kept_split_vs_one"] == 0, out
  for engine in ("buckets", "segments"):
    assert out[engine]["sharded_vs_masked"] <= 1e-5, out
    assert out[engine]["one_device_vs_masked"] <= 1e-5, out
    assert out[engine]["token_stats"] <= 1e-6 and out[engine]["kept"] == 0, out
