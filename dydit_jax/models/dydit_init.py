"""Moving weights between DiT and DyDiT, and the optional importance reordering before fine-tuning.

`dydit_from_dit` is how fine-tuning starts (DyDiT paper §3.3, official router init): every DiT weight is
copied and the routers get the official init (xavier weights, biases 15 for the width routers and 35
for the token router's output), so every gate is open and the fresh DyDiT computes exactly what the
DiT computes. `dit_from_dydit` drops the routers (the DyDiT's `complete` mode as a plain DiT).

`reorder_by_magnitude` implements what the paper describes and the official code omits: before
fine-tuning, heads and MLP hidden units are sorted by weight magnitude so that unit 0 - the one the
`forced_first` router format keeps on at every timestep - is the most important. Criterion (our
choice; the paper does not pin it down): head h scores ||W_qkv[:, cols of h in q, k and v]||_1 +
||W_proj[rows of h, :]||_1, hidden unit u scores ||W_fc1[:, u]||_1 + ||W_fc2[u, :]||_1, both summed
with the matching biases of qkv / fc1. Units are sorted in decreasing score, so the MLP groups (H
contiguous chunks) become groups of decreasing importance. A permutation of heads or hidden units
leaves a dense block's function unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dydit_jax.models.config import ModelConfig
from dydit_jax.models.dit import DiT


def _copy_shared(src: DiT, dst: DiT) -> DiT:
  """Write every variable of `src` whose path also exists in `dst` (shapes must agree)."""
  dst_flat = dict(nnx.to_flat_state(nnx.state(dst)))
  for path, var in nnx.to_flat_state(nnx.state(src)):
    if path not in dst_flat:
      continue
    target = dst_flat[path]
    if target.shape != var.shape:
      raise ValueError(f"shape mismatch at {'.'.join(map(str, path))}: {var.shape} vs {target.shape}")
    target[...] = var[...]
  return dst


def dydit_from_dit(dit: DiT, *, router_format: str = "forced_first", seed: int = 0) -> DiT:
  """A DyDiT with the DiT's weights and freshly initialized (fully open) routers."""
  cfg = dit.config
  if cfg.dynamic:
    raise ValueError("dydit_from_dit expects a plain DiT; this model already has routers")
  return _copy_shared(dit, DiT(cfg.replace(dynamic=True, router_format=router_format), rngs=nnx.Rngs(seed)))


def dit_from_dydit(model: DiT) -> DiT:
  """The plain DiT inside a DyDiT (routers dropped): equals the DyDiT's `complete=True` forward."""
  cfg = model.config
  if not cfg.dynamic:
    raise ValueError("dit_from_dydit expects a DyDiT (a model with routers)")
  target = nnx.eval_shape(lambda: DiT(cfg.replace(dynamic=False), rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(target)
  source = dict(nnx.to_flat_state(nnx.state(model)))
  leaves = [(path, source[path]) for path, _ in nnx.to_flat_state(abstract)]
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _head_scores(cfg: ModelConfig, blocks) -> jax.Array:
  L, H, hd = cfg.depth, cfg.num_heads, cfg.head_dim
  qkv_w = jnp.abs(blocks.attn.qkv.kernel[...]).reshape(L, cfg.hidden_size, 3, H, hd).sum(axis=(1, 2, 4))
  qkv_b = jnp.abs(blocks.attn.qkv.bias[...]).reshape(L, 3, H, hd).sum(axis=(1, 3))
  proj_w = jnp.abs(blocks.attn.proj.kernel[...]).reshape(L, H, hd, cfg.hidden_size).sum(axis=(2, 3))
  return qkv_w + qkv_b + proj_w


def _unit_scores(blocks) -> jax.Array:
  fc1 = jnp.abs(blocks.mlp.fc1.kernel[...]).sum(axis=1) + jnp.abs(blocks.mlp.fc1.bias[...])
  return fc1 + jnp.abs(blocks.mlp.fc2.kernel[...]).sum(axis=2)


def _permute(var: nnx.Variable, perm: jax.Array, shape: tuple[int, ...], axis: int) -> None:
  """Reorder `var` (viewed as `shape`) along `axis` by the per-layer permutation `perm` (L, n)."""
  value = var[...].reshape(shape)
  index_shape = [1] * len(shape)
  index_shape[0], index_shape[axis] = perm.shape
  var[...] = jnp.take_along_axis(value, perm.reshape(index_shape), axis=axis).reshape(var.shape)


def reorder_by_magnitude(model: DiT) -> DiT:
  """Sort heads and MLP units of every block by decreasing magnitude score (in place; returned)."""
  cfg = model.config
  if cfg.dynamic:
    raise ValueError("reorder a DiT before dydit_from_dit: trained routers are tied to the unit order")
  L, D, H, hd, F = cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_hidden
  blocks = model.blocks
  head_perm = jnp.argsort(-_head_scores(cfg, blocks), axis=1, stable=True)
  unit_perm = jnp.argsort(-_unit_scores(blocks), axis=1, stable=True)
  _permute(blocks.attn.qkv.kernel, head_perm, (L, D, 3, H, hd), axis=3)
  _permute(blocks.attn.qkv.bias, head_perm, (L, 3, H, hd), axis=2)
  _permute(blocks.attn.proj.kernel, head_perm, (L, H, hd, D), axis=1)
  _permute(blocks.mlp.fc1.kernel, unit_perm, (L, D, F), axis=2)
  _permute(blocks.mlp.fc1.bias, unit_perm, (L, F), axis=1)
  _permute(blocks.mlp.fc2.kernel, unit_perm, (L, F, D), axis=1)
  return model
