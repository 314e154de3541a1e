"""Fast-engine sampling split over 8 simulated devices equals the one-device masked sampler.

Image i's noise depends on (seed, i) only, so 8 images on 8 devices (`jax.shard_map`, each device
compacting its own tokens), 6 images on one device and the masked path all sample the same images.
Tolerance: relative L2 <= 1e-5 (fp32; shapes of the compacted matmuls differ, so rounding does).
"""
import json
import subprocess
import sys

import train_helpers as th


def test_engine_sampling_over_devices_equals_one_device():
  proc = subprocess.run([sys.executable, "tests/sample_devices_check.py"], cwd=th.REPO, env=th.env(devices=8),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  assert out["shard_map_calls"] == 2, out      # the 8-image runs were split; the 6-image runs were not
  for engine in ("buckets", "segments"):
    assert out[engine]["sharded_vs_masked"] <= 1e-5, out
    assert out[engine]["one_device_vs_masked"] <= 1e-5, out
    assert out[engine]["token_stats"] <= 1e-6, out
