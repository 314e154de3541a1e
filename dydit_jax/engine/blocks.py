"""One DyDiT block computed sparsely: sliced heads, sliced MLP groups, compacted MLP tokens.

Equal, up to float rounding, to the masked eval-mode block of `dydit_jax.models.dit.DiTBlock`:

- attention: only the open heads' q/k/v columns (with bias) and `proj` rows are used. A masked head's
  output is zero before `proj`, so dropping it changes nothing; with no open head the branch is `proj`'s
  bias alone.
- MLP: only the open groups' fc1 columns (with bias) and fc2 rows. The official mask multiplies the fc1
  output before GELU and GELU(0) = 0, so a closed group contributes nothing to fc2.
- tokens: the token router (on the residual after attention, in the stream's dtype) picks rows; they
  are compacted into a buffer of static capacity (one cumsum for destinations, one small int scatter
  to list the sources, then gathers), the MLP runs on the buffer, and each routed token gathers its
  row back inside the residual update. Skipped tokens keep the residual. Gathers instead of
  activation scatters: measured faster on GPU (docs/benchmarks.md). The MLP's LayerNorm and adaLN
  modulation run on every token before the gather: normalizing only the gathered rows (each row with
  its sample's gathered shift / scale) was measured 7.5 ms per call slower on an H200 (§3e there).

Widths come from the plan tables (bucket id = which compiled capacity); the token capacity is chosen
from the routed count at run time. Both choices are `lax.switch` branches of static shape, built here
by `attention_branches` / `mlp_branches` (also used by `bench.cost` to cost each branch alone).
Padded slots (capacity > open units) hold closed units and are zeroed on the weight side (their
`proj` / fc2 rows), which costs weights-sized work, not activations-sized.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dydit_jax.engine.buckets import token_caps
from dydit_jax.models import layers
from dydit_jax.models.config import ModelConfig
from dydit_jax.models.row_kernel import norm_modulate


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Static description of the compiled block variants (hashable: part of the jit cache key)."""

  config: ModelConfig
  dtype: str
  attention_impl: str | None
  head_caps: tuple[int, ...]
  group_caps: tuple[int, ...]
  token_buckets: int
  token_fractions: tuple[float, ...] | None = None

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


def _dot(x, w, b):
  return jnp.dot(x, w) + b


def _params(linear, dt):
  """(kernel, bias) of an nnx.Linear in the compute dtype (no-op casts: the engine pre-casts them)."""
  return linear.kernel[...].astype(dt), linear.bias[...].astype(dt)


def _unit_slice(w_in, b_in, w_out, parts: int, unit_size: int, tables, cap: int, num_units: int, dt):
  """The planned units of an in-projection / out-projection pair, as weights for `cap` units.

  The in-projection's outputs are [parts] x units x unit_size (qkv: 3 x heads x head_dim; fc1:
  1 x groups x group_size); the out-projection's rows are units x unit_size. Below full capacity the
  first `cap` units of the plan's open-first order are gathered; out rows of closed or padded units
  are zeroed (the plan mask at full capacity, the padded validity below it). Returns w_in (parts, D,
  cap * unit_size), b_in (parts, cap * unit_size), w_out (cap * unit_size, D_out): one matmul per part
  (see `layers.split_linear`).
  """
  d = w_in.shape[0]
  w_in = w_in.reshape(d, parts, num_units, unit_size)
  b_in = b_in.reshape(parts, num_units, unit_size)
  w_out = w_out.reshape(num_units, unit_size, -1)
  if cap < num_units:
    idx = tables["idx"][:cap]
    w_in, b_in, w_out = jnp.take(w_in, idx, axis=2), jnp.take(b_in, idx, axis=1), jnp.take(w_out, idx, axis=0)
  weight = tables["mask"] if cap == num_units else tables["valid"][:cap]
  w_out = w_out * weight.astype(dt)[:, None, None]
  w_in = jnp.moveaxis(w_in, 1, 0).reshape(parts, d, cap * unit_size)
  return w_in, b_in.reshape(parts, -1), w_out.reshape(cap * unit_size, -1)


def attention_branches(block, spec: BlockSpec, tables) -> list[Callable]:
  """One branch per head capacity: h (B,N,D) compute dtype -> attention output (B,N,D) after proj."""
  cfg, dt = spec.config, spec.compute_dtype
  d, heads, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
  (qkv_k, qkv_b), (proj_k, proj_b) = _params(block.attn.qkv, dt), _params(block.attn.proj, dt)

  def make(cap):
    def branch(h):
      b, n, _ = h.shape
      if cap == 0:
        return jnp.broadcast_to(proj_b, (b, n, d))
      w_qkv, b_qkv, wp = _unit_slice(qkv_k, qkv_b, proj_k, 3, hd, tables, cap, heads, dt)
      q, k, v = (_dot(h, w_qkv[i], b_qkv[i]).reshape(b, n, cap, hd) for i in range(3))
      o = jax.nn.dot_product_attention(q, k, v, implementation=spec.attention_impl)
      return _dot(o.reshape(b, n, cap * hd), wp, proj_b)
    return branch

  return [make(c) for c in spec.head_caps]


def mlp_key(group_cap: int, token_cap: int):
  """Name of the MLP computation at these capacities: "none" (no routed token), "bias" (no open group:
  the output is fc2's bias) or (group capacity, token capacity)."""
  return "none" if token_cap == 0 else "bias" if group_cap == 0 else (int(group_cap), int(token_cap))


def mlp_keys(spec: BlockSpec, rows: int):
  """The distinct MLP computations for `rows` flattened tokens, and which one each bucket pair runs.

  Returns (keys, ids (G, T) int32, tcaps): keys as `mlp_key`; pairs computing the same thing share one.
  """
  tcaps = token_caps(rows, spec.token_buckets, spec.token_fractions)
  keys, ids = [], np.zeros((len(spec.group_caps), len(tcaps)), np.int32)
  for i, gcap in enumerate(spec.group_caps):
    for j, tcap in enumerate(tcaps):
      key = mlp_key(gcap, tcap)
      if key not in keys:
        keys.append(key)
      ids[i, j] = keys.index(key)
  return keys, ids, tcaps


def _add_mlp_branch(x, keep, gate, y):
  """The residual after the MLP: x + gate * y on routed tokens; skipped tokens keep x.
  x (B,N,D), keep (B,N) bool, gate (B,D), y (B,N,D) or (D,)."""
  return layers.residual_add(x, jnp.where(keep[..., None], gate[:, None] * y.astype(jnp.float32), 0.0))


def mlp_branches(block, spec: BlockSpec, tables, rows: int) -> list[Callable]:
  """One branch per `mlp_keys` entry: (x (B,N,D) residual, h_flat (R,D) compute dtype, src (R,),
  dest (R,), keep (B,N) bool, gate (B,D) float32) -> the residual after the MLP (B,N,D).

  The residual update lives inside the branch so that the compacted MLP output is read back through
  `dest` inside the same fusion as the add: a branch output of `lax.switch` is materialized, and
  returning the MLP output at full size would write and read one more (B,N,D) array per layer.
  """
  cfg, dt = spec.config, spec.compute_dtype
  groups, gs = cfg.num_groups, cfg.group_size
  (fc1_k, fc1_b), (fc2_k, fc2_b) = _params(block.mlp.fc1, dt), _params(block.mlp.fc2, dt)

  def make(key):
    def branch(x, h_flat, src, dest, keep, gate):
      if key == "none":                      # no routed token: every token keeps the residual
        return x
      if key == "bias":                      # no open group: the MLP output is fc2's bias
        return _add_mlp_branch(x, keep, gate, fc2_b)
      gcap, tcap = key
      (w1,), (b1,), w2 = _unit_slice(fc1_k, fc1_b, fc2_k, 1, gs, tables, gcap, groups, dt)
      h = h_flat if tcap == rows else jnp.take(h_flat, src[:tcap], axis=0)
      y = _dot(layers.gelu_tanh(_dot(h, w1, b1)), w2, fc2_b)
      if tcap < rows:                        # routed row r finds its result at buffer slot dest[r]
        y = jnp.take(y, jnp.clip(dest, 0, tcap - 1), axis=0)
      return _add_mlp_branch(x, keep, gate, y.reshape(x.shape))
    return branch

  return [make(key) for key in mlp_keys(spec, rows)[0]]


def compact(keep: jax.Array):
  """Flattened routing: (src, dest, count). src[:count] lists routed rows in order; a routed row r
  finds its MLP result at buffer position dest[r]. One int cumsum and one int scatter."""
  flat = keep.reshape(-1)
  rows = flat.shape[0]
  dest = jnp.cumsum(flat, dtype=jnp.int32) - 1
  src = jnp.zeros((rows,), jnp.int32).at[jnp.where(flat, dest, rows)].set(
      jnp.arange(rows, dtype=jnp.int32), mode="drop")
  return src, dest, dest[-1] + 1


def dynamic_block(block, spec: BlockSpec, tables, x: jax.Array, c: jax.Array):
  """x (B,N,D) residual (ModelConfig.residual_dtype), c (B,D) conditioning; tables = this layer's plan row.

  Returns (x, kept (B,) int32 MLP-routed tokens per sample).
  """
  dt = spec.compute_dtype
  b, n, d = x.shape
  mods = block.adaLN_modulation(jax.nn.silu(c)).astype(jnp.float32)
  shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods, 6, axis=-1)

  h = norm_modulate(x, shift_msa, scale_msa, dt, impl=spec.config.row_kernel)
  attn = jax.lax.switch(tables["head"]["bucket"], attention_branches(block, spec, tables["head"]), h)
  x = layers.residual_add(x, gate_msa[:, None] * attn.astype(jnp.float32))

  keep = block.token_selection(x, train=False, key=None, tau=1.0) > 0.5      # (B, N), float32 router
  src, dest, count = compact(keep)
  h = norm_modulate(x, shift_mlp, scale_mlp, dt, impl=spec.config.row_kernel).reshape(b * n, d)
  _, ids, tcaps = mlp_keys(spec, b * n)
  branches = mlp_branches(block, spec, tables["group"], b * n)
  # Smallest capacity >= count, as a count of smaller capacities: `jnp.searchsorted` would lower to a
  # while loop, i.e. on a GPU a host round trip per iteration, several per layer and call.
  token_bucket = jnp.sum(jnp.asarray(tcaps, jnp.int32) < count, dtype=jnp.int32)
  branch = jnp.asarray(ids)[tables["group"]["bucket"], token_bucket]
  x = jax.lax.switch(branch, branches, x, h, src, dest, keep, gate_mlp)
  return x, keep.sum(-1, dtype=jnp.int32)
