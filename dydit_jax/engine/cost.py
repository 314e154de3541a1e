"""Honest compute accounting for a sampling run: analytic MACs from the masks vs XLA's own count.

Three numbers per run (all for the executed model calls, CFG rows included):
- `analytic`: exact MACs of what the masks ask for (`WidthPlan.macs` = `models.flops` accounting).
- `padded`: the same formula at the capacities the engine actually computes (head / group counts
  rounded up to their bucket, routed tokens rounded up to the token capacity of the call), plus the
  token router the engine runs on every token (the width routers are planned, not run).
- `xla`: FLOPs that XLA's cost analysis assigns to the compiled programs that ran, / 2 to compare
  as MACs.

Why not one `cost_analysis()` of the whole jitted sampler: XLA counts a while-loop body once (not
times its trip count) and a conditional as its most expensive branch (checked on CPU: a 10-step scan
costs one step; a 3-way switch costs its max). So each piece is compiled alone and costed (embed +
final layer, the block's always-run part, every attention and MLP branch), and the pieces are
combined with the counts the run actually took: the plan's buckets per (step, layer) and the token
capacity implied by each call's routed-token total. The dense baseline is costed the same way (one
block x depth + embed/final). Pieces are costed with XLA attention, because a cuDNN custom call
reports 0 FLOPs. `xla` ~ 2 x `padded` (plus elementwise work: softmax, GELU, norms) validates the
accounting; `padded / analytic` is the bucket padding overhead.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax.engine.blocks import attention_branches, dynamic_block, mlp_branches, mlp_keys
from dydit_jax.engine.engine import DynamicEngine, EngineBase
from dydit_jax.engine.plan import WidthPlan
from dydit_jax.models import flops
from dydit_jax.models.dit import DiT


def compiled_flops(fn, *args) -> float:
  """XLA's FLOP count for fn compiled on abstract `args` (nothing runs)."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per device program
    cost = cost[0]
  return float(cost.get("flops", 0.0))


def _abstract(tree, drop: int = 0):
  """ShapeDtypeStructs of `tree`'s arrays with `drop` leading axes removed."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[drop:], a.dtype), tree)


def _embed_final(model_def, state, x, t, y):
  model = nnx.merge(model_def, state)
  tokens, c, _ = model.embed(x, t, y)
  return model.unpatchify(model.final_layer(tokens, c))


def _inputs(cfg, batch: int):
  side = cfg.input_size
  return (jax.ShapeDtypeStruct((batch, side, side, cfg.in_channels), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32))


@dataclasses.dataclass
class BranchCosts:
  """XLA FLOPs of one model call's pieces at a fixed batch."""

  embed_final: float
  fixed: float                 # per block: adaLN, norms, token router, compaction, residuals
  attention: list[float]       # per head capacity
  mlp: list[float]             # per `mlp_keys` entry


def engine_branch_costs(engine: DynamicEngine, batch: int) -> BranchCosts:
  """Compiles and costs every piece of the engine's block (XLA attention) at `batch` rows."""
  spec = dataclasses.replace(engine.spec, attention_impl=None)
  cfg = spec.config
  state = engine.arrays["state"]
  block_def, block_state = nnx.split(nnx.merge(engine.graphdef, state).blocks)
  layer_state = _abstract(block_state, drop=1)
  tab = _abstract(engine.arrays["tables"], drop=2)
  rows, d = batch * cfg.num_tokens, cfg.hidden_size
  dt = spec.compute_dtype
  h = jax.ShapeDtypeStruct((batch, cfg.num_tokens, d), dt)
  flat = (jax.ShapeDtypeStruct((rows, d), dt), jax.ShapeDtypeStruct((rows,), jnp.int32),
          jax.ShapeDtypeStruct((rows,), jnp.int32))
  block = lambda s: nnx.merge(block_def, s)

  attention = [compiled_flops(lambda s, tb, x, i=i: attention_branches(block(s), spec, tb["head"])[i](x),
                              layer_state, tab, h) for i in range(len(spec.head_caps))]
  mlp = [compiled_flops(lambda s, tb, *a, i=i: mlp_branches(block(s), spec, tb["group"], rows)[i](*a),
                        layer_state, tab, *flat) for i in range(len(mlp_keys(spec, rows)[0]))]
  bare = dataclasses.replace(spec, head_caps=(0,), group_caps=(0,))

  def fixed_fn(s, tb, x, c):
    tb = {kind: {**tb[kind], "bucket": jnp.int32(0)} for kind in tb}
    return dynamic_block(block(s), bare, tb, x, c)

  fixed = compiled_flops(fixed_fn, layer_state, tab, jax.ShapeDtypeStruct((batch, cfg.num_tokens, d), jnp.float32),
                         jax.ShapeDtypeStruct((batch, d), jnp.float32))
  embed_final = compiled_flops(lambda s, *a: _embed_final(engine.graphdef, s, *a), _abstract(state),
                               *_inputs(cfg, batch))
  return BranchCosts(embed_final, fixed, attention, mlp)


def dense_call_flops(model: DiT, batch: int) -> float:
  """XLA FLOPs of one dense forward at `batch` rows: embed/final + depth x one block."""
  cfg = model.config
  graphdef, state = nnx.split(model)
  block_def, block_state = nnx.split(model.blocks)
  d = cfg.hidden_size
  vec = jax.ShapeDtypeStruct((batch, d), jnp.float32)
  blk = compiled_flops(lambda s, x, c, te: nnx.merge(block_def, s)(x, c, te, complete=True)[0],
                       _abstract(block_state, drop=1),
                       jax.ShapeDtypeStruct((batch, cfg.num_tokens, d), jnp.float32), vec, vec)
  outer = compiled_flops(lambda s, *a: _embed_final(graphdef, s, *a), _abstract(state), *_inputs(cfg, batch))
  return outer + cfg.depth * blk


def analytic_macs(plan: WidthPlan, kept: np.ndarray, rows: np.ndarray) -> float:
  """Exact MACs of the calls at plan `rows`: kept (len(rows), L, B) routed tokens per sample."""
  kept = np.asarray(kept, np.int64)
  full = np.zeros((plan.num_steps,) + kept.shape[1:], np.int64)
  full[rows] = kept
  return float(plan.macs(full)[rows].sum())


def _call_buckets(engine: DynamicEngine, kept: np.ndarray, rows: np.ndarray):
  """Per executed (call, layer): head capacity id, group capacity id, token capacity id."""
  batch = kept.shape[-1]
  tcaps = mlp_keys(engine.spec, batch * engine.config.num_tokens)[2]
  tables = engine.arrays["tables"]
  token_bucket = np.searchsorted(np.asarray(tcaps), np.asarray(kept).sum(-1), side="left")
  return (np.asarray(tables["head"]["bucket"])[rows], np.asarray(tables["group"]["bucket"])[rows],
          token_bucket)


def padded_macs(engine: EngineBase, kept: np.ndarray, rows: np.ndarray, *, include_router: bool = True) -> float:
  """MACs at the compiled capacities (+ by default the token router, which the engine runs on every
  token; without it the ratio to `analytic_macs` is the pure padding overhead). Any engine: widths
  from `engine.width_capacities`, token capacities from its `spec`."""
  cfg = engine.config
  kept, rows = np.asarray(kept), np.asarray(rows)
  batch = kept.shape[-1]
  tcaps = np.asarray(mlp_keys(engine.spec, batch * cfg.num_tokens)[2], np.int64)
  token_cap = tcaps[np.searchsorted(tcaps, kept.sum(-1), side="left")]
  heads, groups = (c.astype(np.int64) for c in engine.width_capacities(rows))
  attn, mlp = flops.layer_macs(cfg)
  n, h = cfg.num_tokens, cfg.num_heads
  mod = flops.modulation_macs(cfg)
  router = flops.router_macs(cfg)["token"] if include_router else 0
  static = len(rows) * batch * (cfg.depth * (flops.block_adaln_macs(cfg) + mod + router) + flops.embed_macs(cfg))
  attention = (batch * heads * (attn // h)).sum()
  mlp_part = (token_cap * (groups * (mlp // (h * n)) + mod // n)).sum()
  return float(attention + mlp_part + static)


def xla_macs(engine: DynamicEngine, costs: BranchCosts, kept: np.ndarray, rows: np.ndarray) -> float:
  """XLA's FLOPs of the pieces that ran (see the module docstring), / 2."""
  kept, rows = np.asarray(kept), np.asarray(rows)
  head_bucket, group_bucket, token_bucket = _call_buckets(engine, kept, rows)
  ids = mlp_keys(engine.spec, kept.shape[-1] * engine.config.num_tokens)[1]
  total = len(rows) * (costs.embed_final + engine.config.depth * costs.fixed)
  total += np.asarray(costs.attention)[head_bucket].sum() + np.asarray(costs.mlp)[ids[group_bucket, token_bucket]].sum()
  return float(total) / 2


@dataclasses.dataclass
class RunMacs:
  """Totals over the executed calls of one run (MACs; `xla` is XLA FLOPs / 2)."""

  analytic: float
  padded: float
  xla: float
  dense_analytic: float
  dense_xla: float


def run_macs(engine: DynamicEngine, costs: BranchCosts, dense_flops: float, kept: np.ndarray,
             rows: np.ndarray) -> RunMacs:
  """All of the above for a run: kept (S_run, L, B) routed tokens; rows = the plan rows that ran."""
  kept, rows = np.asarray(kept), np.asarray(rows)
  calls, batch = len(rows), kept.shape[-1]
  return RunMacs(analytic=analytic_macs(engine.plan, kept, rows), padded=padded_macs(engine, kept, rows),
                 xla=xla_macs(engine, costs, kept, rows),
                 dense_analytic=float(calls * batch * flops.dense_macs(engine.config)),
                 dense_xla=calls * dense_flops / 2)
