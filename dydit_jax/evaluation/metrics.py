"""FID, sFID and Inception Score with the ADM evaluator's exact semantics (guided-diffusion
`evaluations/evaluator.py`), on host NumPy / SciPy.

- statistics: mu = mean over images (in the activations' dtype, float32), sigma = np.cov (N - 1,
  float64); a reference .npz that carries `mu, sigma, mu_s, sigma_s` supplies them instead.
- Frechet distance: sqrtm(sigma1 @ sigma2); if the root is not finite, eps * I is added to both
  covariances and the root retried; a complex root must have a diagonal imaginary part within 1e-3
  of 0 (else ValueError) and its real part is kept; FID = |mu1 - mu2|^2 + tr s1 + tr s2 - 2 tr root.
  ADM calls `sqrtm(..., disp=False)`, which SciPy 1.18 removes: the root is taken with the plain
  call and its finiteness tested here, which is what disp=False left to the caller.
- sFID: the same distance on the 2023-d spatial features.
- IS: softmax of the unbiased logits; contiguous splits of 5,000 images (the last one shorter, no
  shuffling); exp(mean_i KL(p_i || mean p)) per split; the mean over the splits.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
from scipy import linalg

FID_EPS = 1e-6
IS_SPLIT = 5000


class Statistics(NamedTuple):
  mu: np.ndarray
  sigma: np.ndarray


def statistics(activations: np.ndarray) -> Statistics:
  """(mean, covariance with N - 1) of (N, D) activations, as ADM's compute_statistics."""
  return Statistics(np.mean(activations, axis=0), np.cov(activations, rowvar=False))


def frechet_distance(a: Statistics, b: Statistics, eps: float = FID_EPS) -> float:
  """ADM's FIDStatistics.frechet_distance(a, b)."""
  mu1, mu2 = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
  sigma1, sigma2 = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape}")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def softmax(logits: np.ndarray) -> np.ndarray:
  """float32 softmax over the last axis."""
  z = np.asarray(logits, np.float32)
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT) -> float:
  """ADM's compute_inception_score on the unbiased logits (pool_3 @ softmax/weights)."""
  preds = softmax(logits)
  scores = []
  for start in range(0, len(preds), split_size):
    part = preds[start:start + split_size]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))
