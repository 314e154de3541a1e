"""Run in a subprocess with 8 simulated CPU devices by tests/test_sample_devices.py: prints JSON."""
import json
import os
import sys

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # any working directory
from model_utils import randomize, randomize_routers  # noqa: E402

from dydit_jax import sampler as sample  # noqa: E402
from dydit_jax.models import DiT, ModelConfig  # noqa: E402

cfg = ModelConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=4,
                  num_classes=4, dynamic=True)
model = randomize_routers(randomize(DiT(cfg, rngs=nnx.Rngs(2)), scale=0.05), weight_scale=3.0)
shard_map_calls = []
_shard_map = jax.shard_map
jax.shard_map = lambda *a, **k: (shard_map_calls.append(1), _shard_map(*a, **k))[1]   # spy: was it used?
key = jax.random.PRNGKey(4)
labels = np.arange(8) % 4
one_device = sample.Sampler(model, sample.SampleOptions(steps="10", cfg_scale=3.0))
masked = one_device.generate(labels[:6], key)                          # 6 images: not split
masked_split = one_device.generate(labels, key)                        # 8 images over 8 devices
rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
out = {"devices": jax.local_device_count(), "masked_split_vs_one": rel(masked_split.samples[:6], masked.samples),
       "masked_kept_split_vs_one": int(np.abs(masked_split.kept[..., :6] - masked.kept[..., :6]).max())}
for engine in ("buckets", "segments"):
  options = sample.SampleOptions(steps="10", cfg_scale=3.0, engine=engine, segments=2)
  sampler = sample.Sampler(model, options)
  sharded = sampler.generate(labels, key)                              # 8 images over 8 devices
  first6 = sampler.generate(labels[:6], key)                           # 6: one device
  out[engine] = {"sharded_vs_masked": rel(sharded.samples, masked_split.samples),
                 "one_device_vs_masked": rel(first6.samples, masked.samples),
                 "token_stats": float(np.abs(sharded.token - masked_split.token).max()),
                 "kept": int(np.abs(sharded.kept - masked_split.kept).max())}
out["shard_map_calls"] = len(shard_map_calls)
print(json.dumps(out))
