"""DiT (Peebles & Xie) in Flax NNX, extended in place into DyDiT when `config.dynamic`.

Attribute names mirror the official PyTorch state-dict keys (`x_embedder.proj`, `t_embedder.mlp`,
`y_embedder.embedding_table`, `blocks.attn.qkv`, `blocks.adaLN_modulation`, `final_layer.linear`,
`blocks.attn_rate.router`, `blocks.token_selection.mlp_head`) so the converter is a short table.

The `depth` blocks are stored stacked (every block parameter has a leading depth axis) and run with
one `lax.scan`: the depth-28 XL compiles one block instead of 28. DyDiT is not a second model: the
same block gains routers and multiplies their masks where the official code does (head mask on the
attention output before `proj`, group mask on the fc1 output before the GELU, token mask on the gated
MLP branch). This masked dense compute is the training path and the exactness reference; the fast
path lives in `dydit_jax.engine`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dydit_jax.models import layers
from dydit_jax.models.config import ModelConfig
from dydit_jax.models.routers import TokenRouter, WidthRouter
from dydit_jax.models.row_kernel import norm_modulate


def _dtypes(cfg: ModelConfig):
  return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


class PatchEmbed(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    p, c, d = cfg.patch_size, cfg.in_channels, cfg.hidden_size
    # Official init: xavier on the conv weight viewed as a [D, C*p*p] linear.
    bound = layers.xavier_bound(c * p * p, d)
    self.proj = nnx.Conv(c, d, kernel_size=(p, p), strides=(p, p), padding="VALID", rngs=rngs,
                         kernel_init=layers.uniform_init(bound), bias_init=nnx.initializers.zeros_init(),
                         **_dtypes(cfg))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.proj(x)
    return x.reshape(x.shape[0], -1, x.shape[-1])


class TimestepEmbedder(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    normal = nnx.initializers.normal(0.02)
    f32 = dict(dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype))
    self.mlp = nnx.Sequential(
        layers.linear(layers.TIMESTEP_FREQ_DIM, d, rngs=rngs, kernel_init=normal, **f32),
        jax.nn.silu,
        layers.linear(d, d, rngs=rngs, kernel_init=normal, **f32),
    )

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.mlp(layers.timestep_frequencies(t))


class LabelEmbedder(nnx.Module):
  """Class table with a trailing null row (index num_classes) used for label dropout and CFG."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.num_classes = cfg.num_classes
    self.dropout_prob = cfg.class_dropout_prob
    rows = cfg.num_classes + int(cfg.class_dropout_prob > 0)
    self.embedding_table = nnx.Embed(rows, cfg.hidden_size, rngs=rngs, param_dtype=jnp.dtype(cfg.param_dtype),
                                     embedding_init=nnx.initializers.normal(0.02))

  def __call__(self, y: jax.Array, *, train: bool, key, force_drop_ids=None) -> jax.Array:
    drop = None
    if train and self.dropout_prob > 0:
      if key is None:
        raise ValueError("label dropout in training needs a PRNG key")
      drop = jax.random.uniform(key, y.shape) < self.dropout_prob
    if force_drop_ids is not None:
      drop = force_drop_ids == 1
    if drop is not None:
      y = jnp.where(drop, self.num_classes, y)
    # An out-of-range label (e.g. the CFG null class of a model trained without label dropout, which
    # has no null row) becomes NaN instead of being silently clamped to the last row by the gather.
    table = self.embedding_table.embedding[...]
    return jnp.take(table, y, axis=0, mode="fill", fill_value=jnp.nan).astype(jnp.float32)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.num_heads = cfg.num_heads
    self.implementation = cfg.attention_impl
    self.qkv = layers.linear(d, 3 * d, rngs=rngs, **_dtypes(cfg))
    self.proj = layers.linear(d, d, rngs=rngs, **_dtypes(cfg))

  def heads(self, x: jax.Array):
    """q, k, v as (B, N, H, head_dim); the fused output axis is [q | k | v] x heads x head_dim,
    computed as three matmuls (`layers.split_linear`)."""
    b, n, d = x.shape
    return [part.reshape(b, n, self.num_heads, d // self.num_heads)
            for part in layers.split_linear(self.qkv, x, 3)]

  def __call__(self, x: jax.Array, head_mask: jax.Array | None = None) -> jax.Array:
    q, k, v = self.heads(x)
    o = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    if head_mask is not None:
      o = o * head_mask[:, None, :, None].astype(o.dtype)
    return self.proj(o.reshape(x.shape[0], x.shape[1], -1))


class Mlp(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.num_groups = cfg.num_groups
    self.fc1 = layers.linear(cfg.hidden_size, cfg.mlp_hidden, rngs=rngs, **_dtypes(cfg))
    self.fc2 = layers.linear(cfg.mlp_hidden, cfg.hidden_size, rngs=rngs, **_dtypes(cfg))

  def __call__(self, x: jax.Array, group_mask: jax.Array | None = None) -> jax.Array:
    h = self.fc1(x)
    if group_mask is not None:
      b, n, f = h.shape
      h = h.reshape(b, n, self.num_groups, f // self.num_groups) * group_mask[:, None, :, None].astype(h.dtype)
      h = h.reshape(b, n, f)
    return self.fc2(layers.gelu_tanh(h))


class DiTBlock(nnx.Module):
  """adaLN-Zero block; with `cfg.dynamic`, also the DyDiT head, group and token routers."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.dynamic = cfg.dynamic
    self.tau = cfg.gate_tau
    self.compute_dtype, self.row_kernel = jnp.dtype(cfg.dtype), cfg.row_kernel
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp = Mlp(cfg, rngs=rngs)
    self.adaLN_modulation = layers.zero_linear(d, 6 * d, rngs=rngs, **_dtypes(cfg))
    if cfg.dynamic:
      forced = cfg.router_format == "forced_first"
      self.attn_rate = WidthRouter(d, cfg.num_heads, forced, rngs=rngs)
      self.mlp_rate = WidthRouter(d, cfg.num_groups, forced, rngs=rngs)
      self.token_selection = TokenRouter(d, rngs=rngs)

  def __call__(self, x, c, t_emb, *, train: bool = False, complete: bool = False, key=None):
    """Returns (x, (head_mask (B,H), group_mask (B,H), token_mask (B,N)))."""
    b, n, _ = x.shape
    mods = self.adaLN_modulation(jax.nn.silu(c)).astype(jnp.float32)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods, 6, axis=-1)
    routed = self.dynamic and not complete
    keys = jax.random.split(key, 3) if (routed and train) else (None, None, None)

    head_mask = self.attn_rate(t_emb, train=train, key=keys[0], tau=self.tau) if routed else None
    h = norm_modulate(x, shift_msa, scale_msa, self.compute_dtype, impl=self.row_kernel)
    x, h = norm_modulate(x, shift_mlp, scale_mlp, self.compute_dtype, update=self.attn(h, head_mask),
                         gate=gate_msa, impl=self.row_kernel)

    token_mask = self.token_selection(x, train=train, key=keys[1], tau=self.tau) if routed else None
    group_mask = self.mlp_rate(t_emb, train=train, key=keys[2], tau=self.tau) if routed else None
    branch = gate_mlp[:, None] * self.mlp(h, group_mask).astype(jnp.float32)
    if token_mask is not None:
      branch = branch * token_mask[..., None]
    x = layers.residual_add(x, branch)

    ones_h = jnp.ones((b, self.attn.num_heads), jnp.float32)
    masks = (ones_h if head_mask is None else head_mask,
             ones_h if group_mask is None else group_mask,
             jnp.ones((b, n), jnp.float32) if token_mask is None else token_mask)
    return x, masks


class FinalLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    out = cfg.patch_size ** 2 * cfg.out_channels
    self.adaLN_modulation = layers.zero_linear(d, 2 * d, rngs=rngs, **_dtypes(cfg))
    self.linear = layers.zero_linear(d, out, rngs=rngs, **_dtypes(cfg))

  def __call__(self, x, c):
    shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(c)).astype(jnp.float32), 2, axis=-1)
    return self.linear(layers.modulate(layers.layer_norm(x), shift, scale)).astype(jnp.float32)


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> DiTBlock:
  """`depth` independently initialized blocks merged into one module with stacked parameters."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: DiTBlock(cfg, rngs=nnx.Rngs(0))))
  keys = jax.random.split(rngs.params(), cfg.depth)
  # One jitted program builds every block (eager init would dispatch and compile op by op).
  state = jax.jit(jax.vmap(lambda k: nnx.state(DiTBlock(cfg, rngs=nnx.Rngs(k)))))(keys)
  return nnx.merge(graphdef, state)


class DiT(nnx.Module):
  """`model(x, t, y)` with x (B,H,W,C) NHWC, integer t (B,) in 0..999, integer y (B,) -> (B,H,W,2C).

  Keyword options: `train` (label dropout; DyDiT Gumbel gates), `complete` (DyDiT routers bypassed),
  `key` (PRNG key, required with train), `force_drop_ids` (1 = use the null class), `return_masks`
  (also return {"head","group","token"} masks of shape (B,L,H), (B,L,H), (B,L,N)).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.x_embedder = PatchEmbed(config, rngs=rngs)
    self.t_embedder = TimestepEmbedder(config, rngs=rngs)
    self.y_embedder = LabelEmbedder(config, rngs=rngs)
    table = layers.sincos_pos_embed_2d(config.hidden_size, config.grid_size)
    self.pos_embed = layers.FixedEmbedding(jnp.asarray(table)[None].astype(jnp.dtype(config.param_dtype)))
    self.blocks = _stacked_blocks(config, rngs)
    self.final_layer = FinalLayer(config, rngs=rngs)

  def embed(self, x, t, y, *, train=False, key=None, force_drop_ids=None):
    """Tokens (B,N,D) in the residual dtype, conditioning c = t_emb + y_emb, and t_emb (the width
    routers' input)."""
    tokens = self.x_embedder(x).astype(jnp.float32) + self.pos_embed[...].astype(jnp.float32)
    tokens = tokens.astype(self.config.residual_dtype)
    t_emb = self.t_embedder(t)
    y_emb = self.y_embedder(y, train=train, key=key, force_drop_ids=force_drop_ids)
    return tokens, t_emb + y_emb, t_emb

  def unpatchify(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    p, g, c = cfg.patch_size, cfg.grid_size, cfg.out_channels
    x = x.reshape(x.shape[0], g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(x.shape[0], g * p, g * p, c)

  def __call__(self, x, t, y, *, train: bool = False, complete: bool = False, key=None,
               force_drop_ids=None, return_masks: bool = False):
    if train and key is None:
      raise ValueError("DiT(train=True) needs `key` for label dropout and gates")
    label_key, gate_key = jax.random.split(key) if train else (None, None)
    tokens, c, t_emb = self.embed(x, t, y, train=train, key=label_key, force_drop_ids=force_drop_ids)

    graphdef, block_state = nnx.split(self.blocks)
    layer_keys = jax.random.split(gate_key, self.config.depth) if train else None

    def run_block(h, layer):
      state, k = layer
      return nnx.merge(graphdef, state)(h, c, t_emb, train=train, complete=complete, key=k)

    if self.config.remat:
      run_block = jax.checkpoint(run_block)
    tokens, (heads, groups, kept) = jax.lax.scan(run_block, tokens, (block_state, layer_keys))
    out = self.unpatchify(self.final_layer(tokens, c))
    if not return_masks:
      return out
    masks = {"head": heads.swapaxes(0, 1), "group": groups.swapaxes(0, 1), "token": kept.swapaxes(0, 1)}
    return out, masks
