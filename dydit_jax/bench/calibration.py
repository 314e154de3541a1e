"""Token-routing observations, for the synthetic routers and the engines' token capacities.

The SDT router's decisions depend on the activations, so the only way to know what fraction of tokens
a model routes is to run it. Two ways:

- `token_fraction_fn`: a calibration batch of Gaussian latents at `batch` timesteps spread over
  999..0 (one per sample) with labels 0, 1, ...: one forward, cheap and deterministic; close to the
  real inputs at high noise only (real x_t near t = 0 are clean latents). The synthetic routers are
  calibrated on it.
- a real sampling chain of the eval-mode model on a few images: `dydit_jax.sampler.Sampler` records
  per call and layer the fraction the call routes (`SampleResult.token`). The inputs are then the
  sampler's own x_t, whose routed fractions drift away from the calibration batch's (measured in
  docs/benchmarks.md, "token capacities"), so the benchmark fits its capacities to this by default.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax.models.dit import DiT


def calibration_batch(cfg, batch: int = 8, seed: int = 0):
  """(x, t, y) of the module docstring."""
  t = jnp.asarray(np.linspace(999, 0, batch).round().astype(np.int32))
  x = jax.random.normal(jax.random.key(seed), (batch, cfg.input_size, cfg.input_size, cfg.in_channels))
  y = jnp.arange(batch, dtype=jnp.int32) % cfg.num_classes
  return x, t, y


def token_fraction_fn(model: DiT, batch: int = 8, seed: int = 0):
  """A jitted state -> (B, L) routed-token fractions of the eval-mode model on the calibration batch
  (a function of the state so repeated calls with edited routers reuse one compile)."""
  graphdef, _ = nnx.split(model)
  x, t, y = calibration_batch(model.config, batch, seed)

  @jax.jit
  def fractions(state):
    _, masks = nnx.merge(graphdef, state)(x, t, y, return_masks=True)
    return masks["token"].mean(axis=-1)

  return fractions
