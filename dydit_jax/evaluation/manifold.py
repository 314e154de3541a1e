"""Improved precision and recall (k = 3) with the ADM evaluator's semantics (its `ManifoldEstimator`
and `DistanceBlock`, from kynkaat/improved-precision-and-recall-metric), distances on the device.

- Distances are squared Euclidean, max(|u|^2 - 2 u.v + |v|^2, 0), computed in blocks of 10,000 x
  10,000 on float16-cast features, each operation's result rounded to float16 (sums and the matmul
  accumulate in float32, as TensorFlow's GPU kernels do). A block with any non-finite float16 value
  is recomputed in float32. The rounding is emulated with `lax.reduce_precision` on float32 values,
  which XLA never elides (plain float16 arithmetic may be kept in float32 by XLA's excess-precision
  rule), so the result is the same on every backend.
- The radius of a point is the 4th smallest distance to its own set (index 3 of the sorted row,
  index 0 being the point itself): its 3rd nearest neighbour.
- precision = fraction of samples within the radius of some reference point; recall = fraction of
  reference points within the radius of some sample.
The fallback decision is per block, so the block size is part of the semantics (ADM's: 10,000).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from dydit_jax.errors import UserError

BLOCK = 10_000
NHOOD = 3


def _f16(x: jax.Array) -> jax.Array:
  """x rounded to the nearest float16 value (overflow to inf), kept in float32."""
  return jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)


def _distances(u: jax.Array, v: jax.Array, half: bool) -> jax.Array:
  hi = jax.lax.Precision.HIGHEST
  r = _f16 if half else (lambda x: x)
  u, v = r(u), r(v)
  nu, nv = r(jnp.sum(r(u * u), axis=1)), r(jnp.sum(r(v * v), axis=1))
  mm = r(jnp.matmul(u, v.T, precision=hi))
  return r(jnp.maximum(r(r(nu[:, None] - r(2 * mm)) + nv[None, :]), 0.0))


@jax.jit
def distance_block(u: jax.Array, v: jax.Array) -> jax.Array:
  """ADM's DistanceBlock: float16 distances, or float32 ones if any float16 value is not finite."""
  d16 = _distances(u, v, half=True)
  return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16, lambda: _distances(u, v, half=False))


@partial(jax.jit, static_argnums=2)
def _smallest(u, v, k):
  return -jax.lax.top_k(-distance_block(u, v), k)[0]


def _blocks(n: int, size: int):
  return [(s, min(s + size, n)) for s in range(0, n, size)]


def manifold_radii(features: np.ndarray, block: int = BLOCK, nhood: int = NHOOD) -> np.ndarray:
  """(N,) float32 distance of each point to its `nhood`-th nearest neighbour in `features`."""
  features = np.asarray(features, np.float32)
  radii = np.zeros(len(features), np.float32)
  k = min(nhood + 1, len(features))
  for r0, r1 in _blocks(len(features), block):
    rows = jnp.asarray(features[r0:r1])
    best = np.concatenate([np.asarray(_smallest(rows, jnp.asarray(features[c0:c1]), min(k, c1 - c0)))
                           for c0, c1 in _blocks(len(features), block)], axis=1)
    radii[r0:r1] = np.partition(best, nhood, axis=1)[:, nhood]
  return radii


@jax.jit
def _within(u, v, radii_u, radii_v):
  d = distance_block(u, v)
  return jnp.any(d <= radii_v[None, :], axis=1), jnp.any(d <= radii_u[:, None], axis=0)


def precision_recall(ref: np.ndarray, samples: np.ndarray, block: int = BLOCK) -> tuple[float, float]:
  """ADM's compute_prec_recall(ref pool features, sample pool features) -> (precision, recall)."""
  ref, samples = np.asarray(ref, np.float32), np.asarray(samples, np.float32)
  if min(len(ref), len(samples)) <= NHOOD:
    raise UserError(f"precision / recall need more than {NHOOD} reference and sample images "
                     f"(got {len(ref)} and {len(samples)})")
  radii_ref, radii_samples = manifold_radii(ref, block), manifold_radii(samples, block)
  ref_in = np.zeros(len(ref), bool)          # reference point within some sample's radius -> recall
  sample_in = np.zeros(len(samples), bool)   # sample within some reference point's radius -> precision
  for r0, r1 in _blocks(len(ref), block):
    for c0, c1 in _blocks(len(samples), block):
      a, b = _within(jnp.asarray(ref[r0:r1]), jnp.asarray(samples[c0:c1]), jnp.asarray(radii_ref[r0:r1]),
                     jnp.asarray(radii_samples[c0:c1]))
      ref_in[r0:r1] |= np.asarray(a)
      sample_in[c0:c1] |= np.asarray(b)
  return float(np.mean(sample_in)), float(np.mean(ref_in))
