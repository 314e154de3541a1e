"""Evaluator cost: `python -m dydit_jax.bench.inception --image_size 256 --batch 16`.

Times the parts of one ADM evaluation (random weights and features: the cost does not depend on
them) and projects a whole one, 10,000 reference + 50,000 sample images:
- the Inception (`evaluation.inception`) per image: XLA's MAC count of the compiled program
  (FLOPs / 2), compile seconds, wall time of one batch after a warm-up call;
- precision / recall: one `manifold.distance_block` of --pr_block x --pr_block 2048-d features,
  scaled to the 3.1e9 pairs of the full protocol (10k^2 + 50k^2 radii, 10k x 50k comparisons);
- FID and sFID: one ADM Frechet distance each (SciPy sqrtm of 2048^2 / 2023^2, on the host).
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from dydit_jax import cli
from dydit_jax.evaluation import manifold, metrics
from dydit_jax.evaluation.inception import POOL_DIM, SPATIAL_DIM, InceptionV3

FLAGS = flags.FLAGS
REF_IMAGES, SAMPLE_IMAGES = 10_000, 50_000
PAIRS = REF_IMAGES ** 2 + SAMPLE_IMAGES ** 2 + REF_IMAGES * SAMPLE_IMAGES


def _timed(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def measure(image_size: int = 256, batch: int = 16, pr_block: int = 2000) -> dict[str, float]:
  graphdef, state = nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0))))
  state = jax.tree.map(lambda a: jnp.full(a.shape, 0.01, a.dtype), state)   # cost does not depend on values
  images = jnp.zeros((batch, image_size, image_size, 3), jnp.uint8)
  start = time.perf_counter()
  compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, images).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  _timed(compiled, state, images)
  inception_s = _timed(compiled, state, images) / batch

  feats = jnp.asarray(np.random.default_rng(0).standard_normal((pr_block, POOL_DIM)), jnp.float32)
  _timed(manifold.distance_block, feats, feats)
  block_s = _timed(manifold.distance_block, feats, feats)

  fid_s = {}
  for name, dim in (("fid", POOL_DIM), ("sfid", SPATIAL_DIM)):
    acts = np.random.default_rng(1).standard_normal((dim + 500, dim)).astype(np.float32)
    stats = metrics.statistics(acts)
    start = time.perf_counter()
    metrics.frechet_distance(stats, metrics.Statistics(stats.mu + 0.1, stats.sigma))
    fid_s[name] = time.perf_counter() - start

  out = {"inception_gmacs_per_image": cost["flops"] / 2 / batch / 1e9, "inception_compile_s": compile_s,
         "inception_s_per_image": inception_s, "pr_block_s": block_s,
         "pr_s_projected": block_s * PAIRS / pr_block ** 2, "fid_s": fid_s["fid"], "sfid_s": fid_s["sfid"]}
  out["inception_s_projected"] = inception_s * (REF_IMAGES + SAMPLE_IMAGES)
  out["total_s_projected"] = out["inception_s_projected"] + out["pr_s_projected"] + out["fid_s"] + out["sfid_s"]
  return out


def define_flags():
  flags.DEFINE_integer("image_size", 256, "pixels per side of the evaluated images (resized to 299 inside)")
  flags.DEFINE_integer("batch", 16, "images per Inception call")
  flags.DEFINE_integer("pr_block", 2000, "rows = columns of the timed distance block")


def main(argv):
  del argv  # positional words: refused by cli.guarded
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(json.dumps(measure(FLAGS.image_size, FLAGS.batch, FLAGS.pr_block), indent=1))


if __name__ == "__main__":
  cli.run(main, define_flags)
