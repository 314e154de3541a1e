"""Run in a subprocess with 8 simulated CPU devices by tests/test_sample_devices.py: prints JSON."""
import json
import sys

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, "tests")
from model_utils import randomize, randomize_routers  # noqa: E402

from dydit_jax import sample  # noqa: E402
from dydit_jax.models import DiT, ModelConfig  # noqa: E402

cfg = ModelConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=4,
                  num_classes=4, dynamic=True)
model = randomize_routers(randomize(DiT(cfg, rngs=nnx.Rngs(2)), scale=0.05), weight_scale=3.0)
shard_map_calls = []
_shard_map = jax.shard_map
jax.shard_map = lambda *a, **k: (shard_map_calls.append(1), _shard_map(*a, **k))[1]   # spy: was it used?
key = jax.random.PRNGKey(4)
labels = np.arange(8) % 4
masked = sample.generate(model, labels, key, sample.SampleOptions(steps="10", cfg_scale=3.0))
rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
out = {"devices": jax.local_device_count()}
for engine in ("buckets", "segments"):
  options = sample.SampleOptions(steps="10", cfg_scale=3.0, engine=engine, segments=2)
  sharded = sample.generate(model, labels, key, options)                # 8 images over 8 devices
  first6 = sample.generate(model, labels[:6], key, options)             # 6: one device
  out[engine] = {"sharded_vs_masked": rel(sharded.samples, masked.samples),
                 "one_device_vs_masked": rel(first6.samples, masked.samples[:6]),
                 "token_stats": float(np.abs(sharded.token - masked.token).max())}
out["shard_map_calls"] = len(shard_map_calls)
print(json.dumps(out))
