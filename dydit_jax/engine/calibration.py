"""Token-routing observations, for the synthetic routers and the engines' token capacities.

The SDT router's decisions depend on the activations, so the only way to know what fraction of tokens
a model routes is to run it. Two ways:

- `token_fraction_fn`: a calibration batch of Gaussian latents at `batch` timesteps spread over
  999..0 (one per sample) with labels 0, 1, ...: one forward, cheap and deterministic; close to the
  real inputs at high noise only (real x_t near t = 0 are clean latents). The synthetic routers are
  calibrated on it.
- `chain_token_fractions`: a real sampling chain of the eval-mode model on a few images, recording per
  call and layer the fraction the call routes. The inputs are then the sampler's own x_t: on a DDIM-50
  chain of DiT-S/2 with random weights the routed fraction drifted from 0.85 (calibration batch) to
  ~0.7, and capacities fitted to the calibration batch computed 1.23x the analytic MACs (DDPM-250
  with 50 of its steps: 1.09x).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax.diffusion.samplers import run_chain
from dydit_jax.engine.sampling import guided
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


def chain_token_fractions(model: DiT, diffusion, *, method: str = "ddpm", images: int = 4,
                          cfg_scale: float | None = 1.5, seed: int = 0) -> np.ndarray:
  """(S, L) fraction of tokens each call of a real chain routes through each layer's MLP.

  The chain is the sampler's own (`diffusion`, `method`), on `images` images with labels 0, 1, ...
  (doubled rows with CFG, as the engine sees them); the fraction of a call is over all its rows, like
  the engine's per-call token capacity.
  """
  cfg = model.config
  graphdef, state = nnx.split(model)
  labels = jnp.arange(images, dtype=jnp.int32) % cfg.num_classes
  rows = 2 * images if cfg_scale else images

  @jax.jit
  def run(state):
    m = nnx.merge(graphdef, state)

    def forward(x, t, y, row):
      out, masks = m(x, t, y, return_masks=True)
      return out, masks["token"].mean(axis=(0, 2))

    step = guided(forward, labels, cfg_scale=cfg_scale or None, num_classes=cfg.num_classes)
    noise = jax.random.normal(jax.random.key(seed), (rows, cfg.input_size, cfg.input_size, cfg.in_channels))
    return run_chain(step, diffusion, noise, jax.random.key(seed + 1), method=method)[1]

  return np.asarray(run(state))
