"""FID / sFID, IS and precision / recall against brute-force NumPy / SciPy computations on small fixed
feature sets, including ADM's corner cases: the sqrtm retry, the imaginary-part check, IS splits,
the float16 distance rule and its per-block float32 fallback."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import special, stats

from dydit_jax.evaluation import manifold, metrics


def _features(seed: int, n: int, d: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return (shift + scale * rng.standard_normal((n, d))).astype(np.float32)


# FID ---------------------------------------------------------------------------------------------
def _fid_by_eigenvalues(a: np.ndarray, b: np.ndarray, offset: float = 0.0) -> float:
  """|mu_a - mu_b|^2 + tr Sa + tr Sb - 2 sum sqrt(eig(Sa Sb)): the trace of the square root of a
  product of two PSD matrices is the sum of the roots of its (real, non-negative) eigenvalues."""
  def moments(x):
    x = x.astype(np.float64)
    centred = x - x.mean(0)
    return x.mean(0), centred.T @ centred / (len(x) - 1)

  (mu_a, s_a), (mu_b, s_b) = moments(a), moments(b)
  s_a, s_b = s_a + offset * np.eye(len(s_a)), s_b + offset * np.eye(len(s_b))
  roots = np.sqrt(np.clip(np.linalg.eigvals(s_a @ s_b).real, 0, None))
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * roots.sum())


def test_statistics_are_mean_and_unbiased_covariance():
  x = _features(0, 30, 5)
  st = metrics.statistics(x)
  centred = x.astype(np.float64) - x.mean(0)
  np.testing.assert_allclose(st.mu, x.mean(0), rtol=1e-6)
  np.testing.assert_allclose(st.sigma, centred.T @ centred / 29, rtol=1e-5)


def test_fid_equals_brute_force():
  a, b = _features(1, 200, 16), _features(2, 150, 16, shift=0.3, scale=1.4)
  fid = metrics.frechet_distance(metrics.statistics(a), metrics.statistics(b))
  assert fid == pytest.approx(_fid_by_eigenvalues(a, b), rel=1e-6)
  assert fid > 1.0
  assert metrics.frechet_distance(metrics.statistics(a), metrics.statistics(a)) == pytest.approx(0.0, abs=1e-6)


def test_fid_retries_with_eps_when_the_root_is_not_finite(monkeypatch):
  a, b = _features(3, 100, 8), _features(4, 100, 8, shift=0.5)
  calls = []
  sqrtm = metrics.linalg.sqrtm

  def first_call_fails(m):
    calls.append(m)
    return np.full_like(m, np.nan) if len(calls) == 1 else sqrtm(m)

  monkeypatch.setattr(metrics.linalg, "sqrtm", first_call_fails)
  with pytest.warns(UserWarning, match="adding 1e-06 to diagonal"):
    fid = metrics.frechet_distance(metrics.statistics(a), metrics.statistics(b))
  assert len(calls) == 2
  # The retry adds eps to the covariances inside the root only (ADM keeps the traces unshifted).
  shifted = _fid_by_eigenvalues(a, b, offset=1e-6) - 2 * 8 * 1e-6
  assert fid == pytest.approx(shifted, rel=1e-7)


def test_fid_imaginary_part_check():
  mu = np.zeros(3)
  neg = metrics.Statistics(mu, np.diag([-1.0, 1.0, 1.0]))   # sqrtm has an imaginary diagonal of 1
  with pytest.raises(ValueError, match="Imaginary component"):
    metrics.frechet_distance(neg, metrics.Statistics(mu, np.eye(3)))
  tiny = metrics.Statistics(mu, np.diag([-1e-8, 1.0, 2.0]))  # imaginary part 1e-4 < 1e-3: real part kept
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fid = metrics.frechet_distance(tiny, metrics.Statistics(mu, np.eye(3)))
  assert fid == pytest.approx(-1e-8 + 3.0 + 3.0 - 2 * (1 + np.sqrt(2)), rel=1e-6)


# IS ----------------------------------------------------------------------------------------------
def test_inception_score_equals_brute_force():
  logits = _features(5, 12_000, 20, scale=3.0)
  p = special.softmax(logits.astype(np.float64), axis=1)
  splits = [p[0:5000], p[5000:10000], p[10000:12000]]      # contiguous, the last one shorter
  want = np.mean([np.exp(np.mean(stats.entropy(part, part.mean(0)[None], axis=1))) for part in splits])
  assert metrics.inception_score(logits) == pytest.approx(want, rel=1e-5)
  assert metrics.inception_score(logits, split_size=4000) != pytest.approx(want, rel=1e-5)


# Precision / recall ------------------------------------------------------------------------------
def _adm_distances(u: np.ndarray, v: np.ndarray, block: int) -> np.ndarray:
  """ADM's DistanceBlock in NumPy over (block x block) tiles: float16 features and float16 results of
  every operation (float32 sums and matmul), float32 for a tile with any non-finite float16 value."""
  out = np.zeros((len(u), len(v)), np.float32)
  for r in range(0, len(u), block):
    for c in range(0, len(v), block):
      a, b = u[r:r + block], v[c:c + block]
      a16, b16 = a.astype(np.float16), b.astype(np.float16)
      with np.errstate(over="ignore", invalid="ignore"):
        na = np.sum((a16 * a16).astype(np.float32), 1).astype(np.float16)
        nb = np.sum((b16 * b16).astype(np.float32), 1).astype(np.float16)
        mm = (a16.astype(np.float32) @ b16.astype(np.float32).T).astype(np.float16)
        d = np.maximum((na[:, None] - np.float16(2) * mm) + nb[None, :], np.float16(0))
      if not np.isfinite(d).all():
        d = np.maximum(np.sum(a * a, 1)[:, None] - 2 * a @ b.T + np.sum(b * b, 1)[None, :], 0)
      out[r:r + block, c:c + block] = d
  return out


def _brute_precision_recall(ref, samples, block):
  radii = [np.sort(_adm_distances(x, x, block), axis=1)[:, 3] for x in (ref, samples)]
  d = _adm_distances(ref, samples, block)
  precision = np.mean(np.any(d <= radii[0][:, None], axis=0))
  recall = np.mean(np.any(d <= radii[1][None, :], axis=1))
  return radii, precision, recall


def test_precision_recall_equal_adm_float16_rule():
  ref, samples = _features(6, 70, 32), _features(7, 50, 32, shift=0.3, scale=0.8)
  radii, precision, recall = _brute_precision_recall(ref, samples, block=16)
  np.testing.assert_array_equal(manifold.manifold_radii(ref, block=16), radii[0])
  np.testing.assert_array_equal(manifold.manifold_radii(samples, block=16), radii[1])
  assert manifold.precision_recall(ref, samples, block=16) == (precision, recall)
  assert 0 < precision < 1 and 0 < recall < 1, (precision, recall)
  # float16 matters: float32 radii are different numbers.
  exact = np.sort(np.sum((ref[:, None] - ref[None]) ** 2, -1), axis=1)[:, 3]
  assert not np.array_equal(radii[0], exact)
  np.testing.assert_allclose(radii[0], exact, rtol=5e-3)


def test_float32_fallback_is_per_block():
  ref = _features(8, 40, 16)
  ref[:8] *= 300.0            # squared norms overflow float16 in the tiles touching rows 0..7 only
  d = np.asarray(manifold.distance_block(ref[:16], ref[:16]))
  exact = np.maximum(np.sum(ref[:16] ** 2, 1)[:, None] - 2 * ref[:16] @ ref[:16].T + np.sum(ref[:16] ** 2, 1), 0)
  np.testing.assert_allclose(d, exact, rtol=1e-5, atol=1e-6 * exact.max())   # float32 cancellation noise
  samples = _features(9, 30, 16, shift=0.2)
  radii, precision, recall = _brute_precision_recall(ref, samples, block=16)
  ours = manifold.manifold_radii(ref, block=16)
  # Radii from float16 tiles are float16 numbers and equal exactly; float32 tiles agree to rounding
  # (summation order). Both kinds occur: the fallback is decided per tile, not for the whole set.
  half = radii[0] == radii[0].astype(np.float16)
  assert half.sum() >= 10 and (~half).sum() >= 10, half
  np.testing.assert_array_equal(ours[half], radii[0][half])
  np.testing.assert_allclose(ours, radii[0], rtol=1e-6)
  assert manifold.precision_recall(ref, samples, block=16) == (precision, recall)
