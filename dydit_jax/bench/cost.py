"""Honest compute accounting for a sampling run: analytic MACs from the masks vs XLA's own count.

Three MAC counts per run (all for the executed model calls, CFG rows included):
- `analytic`: exact MACs of what the masks ask for (`WidthPlan.macs` = `models.flops` accounting).
- `padded`: the same formula at the capacities the engine actually computes (head / group counts
  rounded up to their bucket or segment union, routed tokens up to the call's token capacity), plus the
  token router the engine runs on every token (the width routers are planned, not run).
- `xla`: FLOPs that XLA's cost analysis assigns to the compiled programs that ran, / 2 to compare
  as MACs.

Why not one `cost_analysis()` of the whole jitted sampler: XLA counts a while-loop body once (not
times its trip count) and a conditional as its most expensive branch (checked on CPU: a 10-step scan
costs one step; a 3-way switch costs its max). So each piece is compiled alone and costed (embed +
final layer, the block's always-run part, every attention and MLP capacity), and the pieces are
combined with the capacities the run actually took: `engine.width_capacities` per (step, layer) (any
engine: buckets or segments) and the token capacity implied by each call's routed-token total. The dense baseline is costed the same way (one
block x depth + embed/final). Pieces are costed with XLA attention, because a cuDNN custom call
reports 0 FLOPs. `xla` ~ 2 x `padded` (plus elementwise work: softmax, GELU, norms) validates the
accounting; `padded / analytic` is the padding overhead of the capacities.

The same pieces also give XLA's "bytes accessed" (what every top-level op of the compiled program
reads and writes, after fusion), summed the same way for the engine and the dense model. Its ratio is
the memory-traffic counterpart of the MACs ratio: the elementwise passes that do not shrink with the
widths show up there, not in the MACs. Compiled on the backend that runs (on a GPU: the GPU's fusion
decisions), but with XLA attention, whose materialized score matrices a fused (cuDNN) kernel never
writes: at 256 tokens they are a large share of the bytes, for dense and DyDiT alike.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax.engine.blocks import attention_branches, dynamic_block, mlp_branches, mlp_key, mlp_keys
from dydit_jax.engine.buckets import padded_counts
from dydit_jax.engine.engine import EngineBase
from dydit_jax.engine.plan import WidthPlan
from dydit_jax.models import flops
from dydit_jax.models.dit import DiT


class XlaCost(NamedTuple):
  flops: float
  bytes: float       # "bytes accessed"

  def __add__(self, other):
    return XlaCost(self.flops + other.flops, self.bytes + other.bytes)

  def __sub__(self, other):
    return XlaCost(self.flops - other.flops, self.bytes - other.bytes)

  def __mul__(self, k):
    return XlaCost(self.flops * k, self.bytes * k)


def compiled_cost(fn, *args) -> XlaCost:
  """XLA's FLOP and bytes-accessed counts for fn compiled on abstract `args` (nothing runs)."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per device program
    cost = cost[0]
  return XlaCost(float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)))


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
  """XLA costs of one model call's pieces at a fixed batch, keyed by the capacities they compute."""

  embed_final: XlaCost
  fixed: XlaCost                         # per block: adaLN, norms, token router, compaction, attention residual
  attention: dict[int, XlaCost]          # per head capacity
  mlp: dict                              # per `mlp_keys` entry ("none", "bias" or (groups, tokens)): XlaCost


def _layer_tables(cfg):
  """Abstract tables of one layer and call (the `blocks` layout), for costing any engine."""
  h = cfg.num_heads
  one = {"idx": jax.ShapeDtypeStruct((h,), jnp.int32), "valid": jax.ShapeDtypeStruct((h,), jnp.float32),
         "mask": jax.ShapeDtypeStruct((h,), jnp.float32), "bucket": jax.ShapeDtypeStruct((), jnp.int32)}
  return {"head": one, "group": one}


def engine_branch_costs(engine: EngineBase, batch: int) -> BranchCosts:
  """Compiles and costs every block piece any layer of `engine` can run (XLA attention) at `batch`
  rows: each head capacity, each (group, token) capacity pair, the always-run rest, embed + final."""
  spec = dataclasses.replace(engine.spec, attention_impl="xla")
  cfg = spec.config
  state = engine.arrays["state"]
  block_def, block_state = nnx.split(nnx.merge(engine.graphdef, state).blocks)
  layer_state = _abstract(block_state, drop=1)
  tab = _layer_tables(cfg)
  rows, d = batch * cfg.num_tokens, cfg.hidden_size
  dt = spec.compute_dtype
  h = jax.ShapeDtypeStruct((batch, cfg.num_tokens, d), dt)
  residual = jax.ShapeDtypeStruct((batch, cfg.num_tokens, d), jnp.dtype(cfg.residual_dtype))
  vec = jax.ShapeDtypeStruct((batch, d), jnp.float32)
  index = jax.ShapeDtypeStruct((rows,), jnp.int32)
  mlp_inputs = (residual, jax.ShapeDtypeStruct((rows, d), dt), index, index,
                jax.ShapeDtypeStruct((batch, cfg.num_tokens), jnp.bool_), vec)
  block = lambda s: nnx.merge(block_def, s)

  def attention_cost(cap):
    one = dataclasses.replace(spec, head_caps=(cap,))
    return compiled_cost(lambda s, tb, x: attention_branches(block(s), one, tb["head"])[0](x), layer_state, tab, h)

  def mlp_costs(spec):
    return {key: compiled_cost(lambda s, tb, *a, i=i: mlp_branches(block(s), spec, tb["group"], rows)[i](*a),
                                layer_state, tab, *mlp_inputs) for i, key in enumerate(mlp_keys(spec, rows)[0])}

  attention = {cap: attention_cost(cap) for cap in spec.head_caps}
  mlp = mlp_costs(spec)
  # The always-run rest: a block with no head and no group open, whose MLP switch XLA counts as its
  # costliest branch ("bias": the residual update, which every MLP branch also counts) -- taken out.
  bare = dataclasses.replace(spec, head_caps=(0,), group_caps=(0,))
  fixed = compiled_cost(lambda s, tb, x, c: dynamic_block(block(s), bare, tb, x, c), layer_state, tab,
                         residual, vec) - mlp_costs(bare)["bias"]
  embed_final = compiled_cost(lambda s, *a: _embed_final(engine.graphdef, s, *a), _abstract(state),
                               *_inputs(cfg, batch))
  return BranchCosts(embed_final, fixed, attention, mlp)


def dense_call_cost(model: DiT, batch: int) -> XlaCost:
  """XLA cost of one dense forward at `batch` rows: embed/final + depth x one block."""
  cfg = model.config
  graphdef, state = nnx.split(model)
  block_def, block_state = nnx.split(model.blocks)
  d = cfg.hidden_size
  vec = jax.ShapeDtypeStruct((batch, d), jnp.float32)
  blk = compiled_cost(lambda s, x, c, te: nnx.merge(block_def, s)(x, c, te, complete=True)[0],
                       _abstract(block_state, drop=1),
                       jax.ShapeDtypeStruct((batch, cfg.num_tokens, d), jnp.dtype(cfg.residual_dtype)),
                       vec, vec)
  outer = compiled_cost(lambda s, *a: _embed_final(graphdef, s, *a), _abstract(state), *_inputs(cfg, batch))
  return outer + blk * cfg.depth


def analytic_macs(plan: WidthPlan, kept: np.ndarray, rows: np.ndarray) -> float:
  """Exact MACs of the calls at plan `rows`: kept (len(rows), L, B) routed tokens per sample."""
  kept = np.asarray(kept, np.int64)
  full = np.zeros((plan.num_steps,) + kept.shape[1:], np.int64)
  full[rows] = kept
  return float(plan.macs(full)[rows].sum())


def padded_macs(engine: EngineBase, kept: np.ndarray, rows: np.ndarray, *, include_router: bool = True) -> float:
  """MACs at the compiled capacities (+ by default the token router, which the engine runs on every
  token; without it the ratio to `analytic_macs` is the pure padding overhead). Any engine: widths
  from `engine.width_capacities`, token capacities from its `spec`."""
  cfg = engine.config
  kept, rows = np.asarray(kept), np.asarray(rows)
  batch = kept.shape[-1]
  token_cap = _token_caps(engine, kept)
  heads, groups = (c.astype(np.int64) for c in engine.width_capacities(rows))
  attn, mlp = flops.layer_macs(cfg)
  n, h = cfg.num_tokens, cfg.num_heads
  mod = flops.modulation_macs(cfg)
  router = flops.router_macs(cfg)["token"] if include_router else 0
  static = len(rows) * batch * (cfg.depth * (flops.block_adaln_macs(cfg) + mod + router) + flops.embed_macs(cfg))
  attention = (batch * heads * (attn // h)).sum()
  mlp_part = (token_cap * (groups * (mlp // (h * n)) + mod // n)).sum()
  return float(attention + mlp_part + static)


def _token_caps(engine: EngineBase, kept: np.ndarray) -> np.ndarray:
  """(R, L) token capacity each executed call and layer computed (kept: (R, L, B))."""
  tcaps = mlp_keys(engine.spec, kept.shape[-1] * engine.config.num_tokens)[2]
  return padded_counts(kept.sum(-1), tcaps).astype(np.int64)


def xla_cost(engine: EngineBase, costs: BranchCosts, kept: np.ndarray, rows: np.ndarray) -> XlaCost:
  """XLA's cost of the pieces that ran (see the module docstring), summed over the calls."""
  kept, rows = np.asarray(kept), np.asarray(rows)
  heads, groups = engine.width_capacities(rows)
  tokens = _token_caps(engine, kept)
  total = (costs.embed_final + costs.fixed * engine.config.depth) * len(rows)
  for h, g, t in zip(heads.ravel(), groups.ravel(), tokens.ravel()):
    total = total + costs.attention[int(h)] + costs.mlp[mlp_key(g, t)]
  return total


@dataclasses.dataclass
class RunMacs:
  """Totals over the executed calls of one run (MACs; `xla` is XLA FLOPs / 2; `*_bytes` XLA's bytes
  accessed)."""

  analytic: float
  padded: float
  xla: float
  dense_analytic: float
  dense_xla: float
  xla_bytes: float             # XLA attention (see the module docstring)
  dense_xla_bytes: float


def run_macs(engine: EngineBase, costs: BranchCosts, dense: XlaCost, kept: np.ndarray,
             rows: np.ndarray) -> RunMacs:
  """All of the above for a run: kept (S_run, L, B) routed tokens; rows = the plan rows that ran;
  dense = `dense_call_cost` at the same batch."""
  kept, rows = np.asarray(kept), np.asarray(rows)
  calls, batch = len(rows), kept.shape[-1]
  xla = xla_cost(engine, costs, kept, rows)
  return RunMacs(analytic=analytic_macs(engine.plan, kept, rows), padded=padded_macs(engine, kept, rows),
                 xla=xla.flops / 2, dense_analytic=float(calls * batch * flops.dense_macs(engine.config)),
                 dense_xla=calls * dense.flops / 2, xla_bytes=xla.bytes, dense_xla_bytes=calls * dense.bytes)
