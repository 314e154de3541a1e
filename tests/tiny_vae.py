"""Tiny random VAEs (and DiTs) for the sample and prepare tests, made fast: no torch / diffusers import
(unlike vae_helpers), and no per-shape jax program: the parameters are drawn with numpy into an
abstract (`nnx.eval_shape`) model, where eager jax init + noise compiles one program per shape
(~20 s for a VAE on a busy CPU).

`tiny_vae_config` has two blocks (downsampling factor 2); `FACTOR8` has four like the SD VAE, so 8x8
latents decode to 64x64 pixels and 32 px images encode to 4x4 latents, the real geometry at toy width.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax.models import DiT, ModelConfig
from dydit_jax.vae import AutoencoderKL, save_vae, tiny_vae_config

FACTOR8 = dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=4)


def numpy_random(factory: Callable[[], nnx.Module], seed: int, draw) -> nnx.Module:
  """`factory()` built abstractly, every parameter set to `draw(rng, path names, shape)` (float32)."""
  graphdef, state = nnx.split(nnx.eval_shape(factory))
  rng = np.random.default_rng(seed)
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    var.set_value(jnp.asarray(draw(rng, [str(p) for p in path], var.shape), jnp.float32))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _vae_draw(rng, names, shape):
  """Kernels N(0, 1 / fan_in), biases N(0, 0.02^2), GroupNorm scale 1 + N(0, 0.1^2), bias N(0, 0.1^2)."""
  if names[-1] == "scale":
    return 1 + 0.1 * rng.standard_normal(shape)
  if len(shape) == 1:
    return (0.1 if "norm" in "".join(names) else 0.02) * rng.standard_normal(shape)
  return rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))


def random_vae(seed: int = 0, **overrides) -> AutoencoderKL:
  """A tiny AutoencoderKL (FACTOR8 geometry unless overridden) with every parameter random."""
  config = tiny_vae_config(**{**FACTOR8, **overrides})
  return numpy_random(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)), seed, _vae_draw)


def vae_dir(path, seed: int = 0, **overrides) -> AutoencoderKL:
  """`random_vae(seed, **overrides)` saved as a VAE directory at `path`; returns the model."""
  vae = random_vae(seed, **overrides)
  save_vae(vae, path)
  return vae


def random_dit(config: ModelConfig, seed: int = 0, scale: float = 0.05) -> DiT:
  """A DiT with every parameter N(0, scale^2) (as models.random_weights.randomize, drawn by numpy)."""
  return numpy_random(lambda: DiT(config, rngs=nnx.Rngs(0)), seed,
                      lambda rng, names, shape: scale * rng.standard_normal(shape))
