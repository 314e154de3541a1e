"""Gaussian divergences and likelihoods behind the variational-bound (VB) loss term.

These are the IDDPM formulas DiT trains its variance head with. They are kept apart
from the diffusion class because they are pure array math with no schedule state, and
the tests check them in isolation. All functions broadcast and keep the input dtype.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

# The decoder likelihood treats data as 8-bit pixels rescaled to [-1, 1]: each value
# owns a bin of half-width 1/255, and the two outermost bins extend to +-infinity.
_BIN_HALF_WIDTH = 1.0 / 255.0
_EDGE = 0.999
_LOG_FLOOR = 1e-12


def mean_flat(x: jnp.ndarray) -> jnp.ndarray:
  """Mean over every axis but the batch axis: per-sample losses of shape (B,)."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """Tanh approximation of the standard normal CDF.

  IDDPM uses this approximation rather than the exact erf; using the same one keeps
  the t = 0 VB term numerically comparable with the PyTorch reference.
  """
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """Log-probability (nats) of data `x` under a Gaussian discretized to 8-bit bins.

  Args:
    x: targets, assumed to be in [-1, 1] (DiT applies it to latents as well).
    means: Gaussian means, same shape as `x`.
    log_scales: log standard deviations, same shape as `x`.

  Returns:
    Elementwise log-probabilities, shape of `x`.
  """
  if not x.shape == means.shape == log_scales.shape:
    raise ValueError(f"shape mismatch: {x.shape}, {means.shape}, {log_scales.shape}")
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + _BIN_HALF_WIDTH))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - _BIN_HALF_WIDTH))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, _LOG_FLOOR))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, _LOG_FLOOR))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, _LOG_FLOOR))
  return jnp.where(x < -_EDGE, log_cdf_plus,
                   jnp.where(x > _EDGE, log_one_minus_cdf_min, log_cdf_delta))
