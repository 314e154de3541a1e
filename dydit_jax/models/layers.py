"""Small numerical pieces of DiT whose exact definitions matter for PyTorch parity.

Each function pins one convention of the official code (facebookresearch/DiT `models.py`): the
float64 2-D sin-cos table with the column index first, the cos-then-sin timestep frequencies, the
`(1 + scale)` modulation, affine-free LayerNorm at eps 1e-6, and the initializers computed on the
PyTorch (fused / flattened) shapes so a fresh model has the official statistics.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYER_NORM_EPS = 1e-6
TIMESTEP_FREQ_DIM = 256
TIMESTEP_MAX_PERIOD = 10000.0


class FixedEmbedding(nnx.Variable):
  """A stored, never-trained array (the sin-cos position table): not an `nnx.Param`, so the
  optimizer and EMA skip it, yet it lives in the state and checkpoints like the PyTorch buffer."""


def _sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000 ** omega
  out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
  """(grid_size**2, embed_dim) float32 table; tokens row-major; first half encodes the column.

  Built in float64 like the official MAE-derived helper, then cast, so it matches bit-for-bit what
  a converted checkpoint stores.
  """
  rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                           indexing="ij")
  emb_col = _sincos_1d(embed_dim // 2, cols)
  emb_row = _sincos_1d(embed_dim // 2, rows)
  return np.concatenate([emb_col, emb_row], axis=1).astype(np.float32)


def timestep_frequencies(t: jax.Array, dim: int = TIMESTEP_FREQ_DIM,
                         max_period: float = TIMESTEP_MAX_PERIOD) -> jax.Array:
  """GLIDE-style embedding of integer timesteps, [cos | sin], float32 (odd dims zero-padded)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def layer_norm(x: jax.Array) -> jax.Array:
  """Affine-free LayerNorm (eps 1e-6), computed in float32 whatever the activation dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return (x32 - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale[:, None]) + shift[:, None]


def residual_add(x: jax.Array, update: jax.Array) -> jax.Array:
  """x + update (update in float32), computed in float32 and rounded once to the residual stream's
  dtype (`ModelConfig.residual_dtype`): the one rule for every residual add, dense and engine alike,
  so that a bfloat16 stream rounds at the same points in both."""
  return (x + update).astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


def split_linear(layer: nnx.Linear, x: jax.Array, parts: int) -> list[jax.Array]:
  """`layer(x)` cut into `parts` equal chunks of its output axis, computed as `parts` matmuls.

  Why not slice one fused product: attention reads q, k and v as separate (B, N, H, hd) arrays, and
  slices of a fused (..., 3D) output are strided, so XLA copies each one (a full pass over the
  activations; docs/benchmarks.md §3c). One matmul per chunk writes each
  chunk where attention reads it. Same weights (the stored layout stays fused, as in PyTorch) and the
  same per-element dot products as `layer(x)`.
  """
  kernel, bias = layer.kernel[...], layer.bias[...]
  x, kernel, bias = layer.promote_dtype((x, kernel, bias), dtype=layer.dtype)
  width = kernel.shape[-1] // parts
  return [jnp.dot(x, kernel[:, i * width:(i + 1) * width], precision=layer.precision)
          + bias[i * width:(i + 1) * width] for i in range(parts)]


def uniform_init(bound: float):
  """Uniform(-bound, bound): xavier computed on the PyTorch weight shape, not Flax's."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def xavier_bound(fan_in: int, fan_out: int) -> float:
  return math.sqrt(6.0 / (fan_in + fan_out))


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype, param_dtype,
           kernel_init=None, bias_init=None) -> nnx.Linear:
  """nnx.Linear with DiT's default init (xavier on the [out, in] weight, zero bias)."""
  return nnx.Linear(
      in_features, out_features, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
      kernel_init=kernel_init or nnx.initializers.xavier_uniform(),
      bias_init=bias_init or nnx.initializers.zeros_init())


def zero_linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype, param_dtype) -> nnx.Linear:
  """The adaLN-Zero layers: start at zero so every block begins as the identity."""
  zeros = nnx.initializers.zeros_init()
  return linear(in_features, out_features, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                kernel_init=zeros, bias_init=zeros)
