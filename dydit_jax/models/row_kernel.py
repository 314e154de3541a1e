"""One pass over the residual stream at a sub-block boundary: gated residual add, LayerNorm, adaLN.

Between two matmuls a DiT block does only row-wise work on its (B, N, D) residual stream:

    x = x + gate * branch        (rounded once to the stream's dtype, `layers.residual_add`)
    h = LN(x) * (1 + scale) + shift

XLA compiles this into separate fusions (an elementwise add, then a reduction and an elementwise pass
for the norm), which read and write the stream several times; on an H200 these width-independent passes
cost about as much per call as a fifth of the GEMMs and do not shrink with DyDiT's widths
(docs/benchmarks.md §3c, §3e). `norm_modulate` does it in one read of x (and of the branch output) and
one write of x and h per row.

Two implementations with one contract, chosen by `ModelConfig.row_kernel`:
- "xla": the composed `layers` formulas (the reference, and the path for CPU, TPU and tests);
- "pallas": a Pallas kernel, one program per row with the whole row in registers (D padded to a power
  of two by masked loads, as Triton requires); the same per-row arithmetic (float32 sum, two-pass
  mean / variance, eps 1e-6). On the CPU it runs in Pallas' interpret mode, which is how the tests check
  it against "xla"; compiled, it targets the GPU (Triton backend).
Results agree to float32 rounding (the sums run in another order), and the bfloat16 outputs within one
bf16 ulp.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dydit_jax.models import layers
from dydit_jax.models.config import ROW_KERNELS


def norm_modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, out_dtype, *, update: jax.Array | None = None,
                  gate: jax.Array | None = None, impl: str = "xla"):
  """h = modulate(LN(x'), shift, scale) in `out_dtype`, with x' = residual_add(x, gate * update) when an
  update is given (then returns (x', h)), else x' = x (returns h).

  x (B, N, D) in the stream's dtype; update (B, N, D) any float dtype; gate, shift, scale (B, D) float32.
  """
  if impl == "xla":
    if update is not None:
      x = layers.residual_add(x, gate[:, None] * update.astype(jnp.float32))
    h = layers.modulate(layers.layer_norm(x), shift, scale).astype(out_dtype)
    return h if update is None else (x, h)
  if impl != "pallas":
    raise ValueError(f"row kernel must be one of {ROW_KERNELS}, got {impl!r}")
  return _pallas(x, shift, scale, jnp.dtype(out_dtype), update, gate, interpret=jax.default_backend() == "cpu")


def _pallas(x, shift, scale, out_dtype, update, gate, *, interpret: bool):
  from jax.experimental import pallas as pl  # Lazy: only this path needs Pallas.

  width = x.shape[-1]
  block = pl.next_power_of_2(width)
  has_update = update is not None
  kernel = functools.partial(_row, width=width, block=block, has_update=has_update)
  outs = [jax.ShapeDtypeStruct((width,), out_dtype)]
  if has_update:
    outs = [jax.ShapeDtypeStruct((width,), x.dtype)] + outs
  call = pl.pallas_call(kernel, out_shape=outs, grid=(), interpret=interpret, name="norm_modulate",
                        **_compiler_params(width, block, interpret))
  # One program per row: vmap over tokens (per-sample vectors shared), then over samples.
  if has_update:
    args, axes = (x, update, gate, shift, scale), (0, 0, None, None, None)
  else:
    args, axes = (x, shift, scale), (0, None, None)
  per_sample = jax.vmap(call, in_axes=axes)
  result = jax.vmap(per_sample)(*args)
  return tuple(result) if has_update else result[0]


def _compiler_params(width: int, block: int, interpret: bool) -> dict:
  if interpret:
    return {}
  from jax.experimental.pallas import triton as pl_triton  # Lazy: GPU only.
  return {"compiler_params": pl_triton.CompilerParams(num_warps=min(max(block // 256, 1), 8))}


def _load(ref, idx, mask):
  from jax.experimental.pallas import triton as pl_triton
  return pl_triton.load(ref.at[idx], mask=mask, other=0).astype(jnp.float32)


def _store(ref, idx, mask, value):
  from jax.experimental.pallas import triton as pl_triton
  pl_triton.store(ref.at[idx], value.astype(ref.dtype), mask=mask)


def _row(*refs, width: int, block: int, has_update: bool):
  """One row: refs = (x, [update, gate,] shift, scale, [x_out,] h_out), each a (D,) ref."""
  if has_update:
    x_ref, u_ref, g_ref, shift_ref, scale_ref, x_out, h_out = refs
  else:
    x_ref, shift_ref, scale_ref, h_out = refs
  idx = jnp.arange(block)
  mask = idx < width
  x = _load(x_ref, idx, mask)
  if has_update:
    x = x + _load(g_ref, idx, mask) * _load(u_ref, idx, mask)
    x = x.astype(x_out.dtype)            # the stream's rounding, as layers.residual_add
    _store(x_out, idx, mask, x)
    x = x.astype(jnp.float32)
  mean = jnp.sum(jnp.where(mask, x, 0.0)) / width
  centered = jnp.where(mask, x - mean, 0.0)
  var = jnp.sum(centered * centered) / width
  normed = centered * jax.lax.rsqrt(var + layers.LAYER_NORM_EPS)
  _store(h_out, idx, mask, normed * (1 + _load(scale_ref, idx, mask)) + _load(shift_ref, idx, mask))
