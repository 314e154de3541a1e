"""The compute copy of a model: one dtype for its block matmuls, chosen attention and residual stream.

A model is stored with float32 parameters; sampling fast wants its block matmul weights in the compute
dtype once, not re-cast at every call of a chain. `compute_model` rebuilds the model with a new
runtime config and casts exactly those weights. The engine and the dense baselines it is compared with
both start from it, so they read weights of the same width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dydit_jax.models.dit import DiT

# Block linears whose weights are pre-cast to the compute dtype (>99% of the parameters).
BLOCK_MATMULS = (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2"), ("adaLN_modulation",))


def compute_model(model: DiT, dtype: str = "bfloat16", attention_impl: str | None = None,
                  residual_dtype: str | None = None, row_kernel: str | None = None) -> DiT:
  """The model rebuilt to compute in `dtype` with its block matmul weights stored in `dtype`.

  attention_impl / residual_dtype / row_kernel: see `ModelConfig` (None keeps the model's). Routers and
  embedders keep their stored dtype (routers always run in float32). Arrays already in `dtype` are
  reused, not copied.
  """
  cfg = model.config.replace(dtype=jnp.dtype(dtype).name,
                             attention_impl=attention_impl or model.config.attention_impl,
                             residual_dtype=residual_dtype or model.config.residual_dtype,
                             row_kernel=row_kernel or model.config.row_kernel)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))))

  def cast(path, value):
    names = tuple(str(getattr(k, "key", k)) for k in path)
    matmul = names[0] == "blocks" and any(names[1:1 + len(p)] == p for p in BLOCK_MATMULS)
    return value.astype(dtype) if matmul else value

  nnx.replace_by_pure_dict(abstract, jax.tree_util.tree_map_with_path(cast, nnx.state(model).to_pure_dict()))
  return nnx.merge(graphdef, abstract)
