"""SegmentEngine: static widths per range of sampling steps, one unrolled program per range.

The bucket engine (`engine.DynamicEngine`) keeps one program for the whole chain and picks every
layer's width at run time with `lax.switch`, short of what static half-width slicing reaches
(docs/benchmarks.md). The widths, however, depend on the timestep only, so they are known on the host
before sampling starts. This engine uses that:

- the chain's steps are cut into K contiguous segments (`partition_steps`: an exact dynamic program
  minimising the MACs computed, since a segment computes the union of its steps' open units);
- per segment and layer the width is a compile-time constant: the union's heads / groups, gathered
  once per call from the stacked weights; each step zeroes the union's units it does not open on the
  out-projection side (exact, as in `blocks`);
- each segment is one program with its layers unrolled (different widths per layer), and a chain is
  K consecutive scans (`diffusion.samplers.run_pieces`), dispatched without host syncs between them;
- token counts stay data dependent: the MLP keeps the `lax.switch` over token capacities.

Trade-offs: no width switches and matmul shapes fixed per layer, against K unrolled programs to
compile and the padding of a union over a segment's steps. On an H100 removing the width switches
gained nothing and doubled the compile time (docs/benchmarks.md §3c), so the bucket engine is the
default; this one stays an option (`--engine segments`) for backends where branches cost more.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax.engine.blocks import dynamic_block, mlp_keys
from dydit_jax.engine.engine import EngineBase, EngineOptions
from dydit_jax.engine.plan import WidthPlan
from dydit_jax.models import flops
from dydit_jax.models.dit import DiT


def _round_up(counts: np.ndarray, multiple: int, limit: int) -> np.ndarray:
  return np.minimum(limit, -(-counts // multiple) * multiple)


def union_widths(mask: np.ndarray, start: int, multiple: int = 1) -> np.ndarray:
  """(S - start, L): units of each layer open at some step of start..j (rounded up to `multiple`)."""
  unions = np.logical_or.accumulate(mask[start:], axis=0).sum(-1)
  return _round_up(unions, multiple, mask.shape[-1])


def partition_steps(plan: WidthPlan, num_segments: int, multiple: int = 1) -> list[tuple[int, int]]:
  """Cuts the plan's steps into at most `num_segments` ranges [start, stop) with least computed MACs.

  A segment runs every step at its union widths, so its cost is (steps) x sum_l (heads_l A/H +
  groups_l M/H) over the union. Optimal contiguous partition by dynamic programming, O(K S^2).
  """
  cfg, num = plan.config, plan.num_steps
  attn, mlp = flops.layer_macs(cfg)
  cost = np.full((num, num), np.inf)
  for i in range(num):
    per_step = (union_widths(plan.head, i, multiple) * attn + union_widths(plan.group, i, multiple) * mlp).sum(-1)
    cost[i, i:] = per_step * np.arange(1, num - i + 1)
  k = max(1, min(num_segments, num))
  best = np.full((k + 1, num), np.inf)       # best[s, j]: steps 0..j in s segments
  start = np.zeros((k + 1, num), int)
  best[1] = cost[0]
  for s in range(2, k + 1):
    for j in range(s - 1, num):
      options = best[s - 1, s - 2:j] + cost[s - 1:j + 1, j]
      i = int(np.argmin(options))
      best[s, j], start[s, j] = options[i], i + s - 1
  s = int(np.argmin(best[1:, num - 1])) + 1
  bounds, stop = [], num
  while s >= 1:
    first = start[s, stop - 1] if s > 1 else 0
    bounds.append((int(first), int(stop)))
    stop, s = first, s - 1
  return bounds[::-1]


def _segment_tables(mask: np.ndarray, cap: np.ndarray):
  """Tables (the `blocks` layout) for one segment's (S_k, L, H) mask at per-layer capacities.

  idx (L, H): the union's units first (ascending), then the others; valid (S_k, L, H): slot j of
  layer l is an open unit at that step (slots beyond the union are never valid); mask: natural order.
  """
  union = mask.any(0)
  idx = np.argsort(~union, axis=-1, kind="stable").astype(np.int32)
  valid = np.take_along_axis(mask, idx[None], axis=-1)
  assert np.all(union.sum(-1) <= cap)
  return {"idx": idx, "valid": valid.astype(np.float32), "mask": mask.astype(np.float32)}


class SegmentEngine(EngineBase):
  """Eval-mode DyDiT with static per-layer widths per segment of steps (see the module docstring)."""

  def __init__(self, model: DiT, plan: WidthPlan, options: EngineOptions = EngineOptions(), *,
               num_segments: int = 8, width_multiple: int = 1):
    super().__init__(model, plan, options)
    self.bounds = partition_steps(plan, num_segments, width_multiple)
    head_caps, group_caps, self.specs, segments = [], [], [], []
    for start, stop in self.bounds:
      head, group = plan.head[start:stop], plan.group[start:stop]
      hcap, gcap = union_widths(head, 0, width_multiple)[-1], union_widths(group, 0, width_multiple)[-1]
      head_caps.append(hcap)
      group_caps.append(gcap)
      self.specs.append([self.block_spec((int(h),), (int(g),)) for h, g in zip(hcap, gcap)])
      segments.append(jax.tree.map(jnp.asarray, {"head": _segment_tables(head, hcap),
                                                 "group": _segment_tables(group, gcap)}))
    self.head_caps, self.group_caps = np.stack(head_caps), np.stack(group_caps)   # (K, L)
    self.spec = self.block_spec(np.unique(self.head_caps).tolist(), np.unique(self.group_caps).tolist())
    self.arrays = {"state": self.state, "segments": segments, "row_of_t": jnp.asarray(plan.row_of_t())}
    self.label = f"segments x{len(self.bounds)}"
    self._segment_of_row = np.concatenate([np.full(stop - start, k) for k, (start, stop) in
                                           enumerate(self.bounds)]).astype(np.int32)

  def variants(self, batch: int) -> dict[str, int]:
    """Programs (segments) and the block bodies compiled into them (one per unrolled layer)."""
    rows = batch * self.config.num_tokens
    mlp = sum(len(mlp_keys(spec, rows)[0]) for layers in self.specs for spec in layers)
    return {"programs": len(self.bounds), "attention": sum(len(layers) for layers in self.specs), "mlp": mlp}

  def width_capacities(self, rows) -> tuple[np.ndarray, np.ndarray]:
    """(head, group) capacities computed at plan `rows`, each (R, L): the segment's union widths."""
    seg = self._segment_of_row[np.asarray(rows)]
    return self.head_caps[seg], self.group_caps[seg]

  def apply_segment(self, k: int, arrays, x, t, y, row):
    """Forward for plan rows of segment k only (row: traced int, global plan row)."""
    start, _ = self.bounds[k]
    model = nnx.merge(self.graphdef, arrays["state"])
    tables = arrays["segments"][k]
    local = row - start
    tokens, c, _ = model.embed(x, t, y)
    block_def, block_state = nnx.split(model.blocks)
    kept = []
    for layer, spec in enumerate(self.specs[k]):
      block = nnx.merge(block_def, jax.tree.map(lambda a: a[layer], block_state))
      tab = {kind: {"idx": tables[kind]["idx"][layer], "valid": tables[kind]["valid"][local, layer],
                    "mask": tables[kind]["mask"][local, layer], "bucket": jnp.int32(0)}
             for kind in ("head", "group")}
      tokens, layer_kept = dynamic_block(block, spec, tab, tokens, c)
      kept.append(layer_kept)
    return model.unpatchify(model.final_layer(tokens, c)), jnp.stack(kept)

  def forwards(self, arrays):
    return [(np.arange(start, stop), lambda x, t, y, row, k=k: self.apply_segment(k, arrays, x, t, y, row))
            for k, (start, stop) in enumerate(self.bounds)]

  def apply(self, arrays, x: jax.Array, t: jax.Array, y: jax.Array, row=None):
    """One call at any plan row: a `lax.switch` over the segment programs (for single calls and
    tests; chains run the segments as pieces and never switch)."""
    row, valid = self._row(arrays, t, row)
    segment = jnp.asarray(self._segment_of_row)[row]
    branches = [lambda x, t, y, row, k=k: self.apply_segment(k, arrays, x, t, y, row)
                for k in range(len(self.bounds))]
    out, kept = jax.lax.switch(segment, branches, x, t, y, row)
    return jnp.where(valid, out, jnp.nan), kept
