"""DyDiT routers and gates (DyDiT paper §3.1-§3.2; the official `DyDiT/models.py`).

TDW: `WidthRouter` maps the timestep embedding (after the t-MLP, never the class) to one gate per
attention head or MLP channel group, so at inference the masks depend on t alone and can be
planned ahead of sampling (see `dydit_jax.engine`). SDT: `TokenRouter` scores every token of the
residual stream right after the attention update; a closed token skips the MLP branch only.

Gates: training draws the official Gumbel-sigmoid with a straight-through estimator (two Gumbel
draws, temperature tau, hard threshold 0.5), per sample and per gate; eval is deterministic
(on <=> logit > 0). Routers compute in float32 whatever the compute dtype, so bf16 inference makes
the same on/off decisions as the fp32 reference; the token router reads the residual stream in its
own dtype (float32 unless `ModelConfig.residual_dtype` is bfloat16: then bf16 products, f32 sums).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dydit_jax.models.layers import linear

# Official init: gates start fully open (sigmoid(15), sigmoid(35) ~ 1), so a fresh DyDiT equals its DiT.
WIDTH_ROUTER_BIAS_INIT = 15.0
TOKEN_ROUTER_BIAS_INIT = 35.0


def gate(logits: jax.Array, *, train: bool, key: jax.Array | None, tau: float) -> jax.Array:
  """0/1 gates in float32; in training, straight-through Gumbel-sigmoid (P(open) = sigmoid(logit)).

  tau only scales the surrogate gradient; the forward value is the hard decision in both modes.
  """
  logits = logits.astype(jnp.float32)
  if not train:
    return (logits > 0).astype(jnp.float32)
  if key is None:
    raise ValueError("training-mode gates need a PRNG key")
  k1, k2 = jax.random.split(key)
  noise = jax.random.gumbel(k1, logits.shape) - jax.random.gumbel(k2, logits.shape)
  soft = jax.nn.sigmoid((logits + noise) / tau)
  hard = (soft > 0.5).astype(jnp.float32)
  return hard - jax.lax.stop_gradient(soft) + soft


class WidthRouter(nnx.Module):
  """Timestep embedding -> one gate per head (or MLP group). `attn_rate.router` / `mlp_rate.router`.

  With `forced_first` (Mar-2025 release) the router has H-1 outputs and unit 0 is always on; with
  `all` (Dec-2024 release) all H units are routed.
  """

  def __init__(self, hidden_size: int, num_units: int, forced_first: bool, *, rngs: nnx.Rngs):
    self.forced_first = forced_first
    outputs = num_units - 1 if forced_first else num_units
    self.router = linear(hidden_size, outputs, rngs=rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                         bias_init=nnx.initializers.constant(WIDTH_ROUTER_BIAS_INIT))

  def logits(self, t_emb: jax.Array) -> jax.Array:
    return self.router(t_emb.astype(jnp.float32))

  def __call__(self, t_emb: jax.Array, *, train: bool, key, tau: float) -> jax.Array:
    g = gate(self.logits(t_emb), train=train, key=key, tau=tau)
    if self.forced_first:
      g = jnp.concatenate([jnp.ones_like(g[:, :1]), g], axis=-1)
    return g


class TokenRouter(nnx.Module):
  """Residual stream -> one gate per token: Linear(D, D/16), ReLU, Linear(D/16, 1).

  `mlp_head` is an `nnx.Sequential` so its state paths read `mlp_head.layers.0/2`, mirroring the
  PyTorch `token_selection.mlp_head.0/2` keys.
  """

  def __init__(self, hidden_size: int, *, rngs: nnx.Rngs):
    f32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)
    self.mlp_head = nnx.Sequential(
        linear(hidden_size, hidden_size // 16, rngs=rngs, **f32),
        jax.nn.relu,
        linear(hidden_size // 16, 1, rngs=rngs, bias_init=nnx.initializers.constant(TOKEN_ROUTER_BIAS_INIT),
               **f32),
    )

  def logits(self, x: jax.Array) -> jax.Array:
    """Why the first layer is spelled out: a bfloat16 residual stream is multiplied as it is (float32
    sums) rather than widened first, which would write and read a float32 copy of the stream in every
    layer; a float32 stream computes exactly what `mlp_head(x)` computes."""
    first, activation, second = self.mlp_head.layers
    hidden = jnp.dot(x, first.kernel[...].astype(x.dtype), preferred_element_type=jnp.float32)
    return second(activation(hidden + first.bias[...]))[..., 0]

  def __call__(self, x: jax.Array, *, train: bool, key, tau: float) -> jax.Array:
    return gate(self.logits(x), train=train, key=key, tau=tau)
