"""DynamicEngine: a DyDiT forward that computes only what the masks keep, under jit.

The engine owns three things: a compute copy of the model (config dtype / attention implementation
replaced, block matmul weights cast once to the compute dtype so no step re-casts them), the plan's
index tables (device arrays, passed as jit arguments rather than baked-in constants), and a static
`BlockSpec` naming the compiled capacities. `apply` is a pure function of (arrays, x, t, y, row):
embed, a `lax.scan` over the stacked blocks where each block runs `blocks.dynamic_block`, final layer.

Why buckets + `lax.switch` and not one program per width signature: a trained plan changes width at
nearly every step (`WidthPlan.summary` counts the distinct signatures; up to one per step), and the
token counts are data dependent, so per-signature programs would mean hundreds of unrolled depth-L
compiles and still no answer for tokens. Branch counts stay small instead: |head caps| attention
branches and <= |group caps| x |token caps| MLP branches per block, compiled once inside the scan.
The middle ground, a few programs each covering a range of steps with static widths, is
`engine.segments.SegmentEngine`; both share `EngineBase`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax.engine.blocks import BlockSpec, dynamic_block, mlp_keys
from dydit_jax.engine.buckets import choose_caps, padded_counts, plan_tables
from dydit_jax.engine.plan import WidthPlan
from dydit_jax.models.compute import compute_model
from dydit_jax.models.dit import DiT


@dataclasses.dataclass(frozen=True)
class EngineOptions:
  """How the engine compiles.

  dtype: matmul dtype (bf16 for speed; float32 for exactness tests). attention_impl: "xla" or
  "cudnn" (`ModelConfig.attention_impl`; None keeps the model's). head_buckets / group_buckets: max
  head / MLP-group capacities (fitted to the plan; more = less padding, more branches). token_buckets: T in the token capacities j/T of the flattened batch,
  unless token_fractions gives the capacities (e.g. `buckets.fit_token_fractions` of calibration
  observations; 1.0 is implied). Branches per block: head_buckets attention + about
  group_buckets x (number of token capacities + 1) MLP.
  """

  dtype: str = "bfloat16"
  attention_impl: str | None = None
  head_buckets: int = 8
  group_buckets: int = 6
  token_buckets: int = 8
  token_fractions: tuple[float, ...] | None = None


class EngineBase:
  """What every engine shares: the plan, the compute copy of the model, and the call interface.

  engine.apply(engine.arrays, x, t, y, row) -> (out (B,H,W,2C) float32, kept (L,B) int32 MLP-routed
  tokens per layer and sample). `row` is the plan row (the sampling step); with row=None it is looked
  up from t, and a t outside the plan (or a batch whose t differ) yields NaN output instead of a
  host-side error inside jit. `forwards(arrays)` lists the pieces a sampling chain runs
  (`diffusion.samplers.run_pieces`); `width_capacities(rows)` the head / group counts computed.
  """

  def __init__(self, model: DiT, plan: WidthPlan, options: EngineOptions):
    if plan.config.geometry() != model.config.geometry():
      raise ValueError("the plan was computed for a different model geometry")
    self.plan = plan
    self.options = options
    cmodel = compute_model(model, options.dtype, options.attention_impl)
    self.graphdef, self.state = nnx.split(cmodel)
    self.config = cmodel.config

  def block_spec(self, head_caps, group_caps) -> BlockSpec:
    o = self.options
    return BlockSpec(self.config, jnp.dtype(o.dtype).name, self.config.attention_impl, tuple(head_caps),
                     tuple(group_caps), o.token_buckets, o.token_fractions)

  def _row(self, arrays, t, row):
    """(row, valid): the plan row, looked up from t when None (valid False off the plan)."""
    if row is not None:
      return row, True
    looked_up = arrays["row_of_t"][t[0]]
    return jnp.maximum(looked_up, 0), (looked_up >= 0) & jnp.all(t == t[0])

  def __call__(self, x, t, y):
    """model(x, t, y)-style call on the engine's own arrays (output only)."""
    return self.apply(self.arrays, x, t, y)[0]


class DynamicEngine(EngineBase):
  """Fast eval-mode DyDiT: one program, per-layer widths picked by `lax.switch` over buckets."""

  label = "buckets"

  def __init__(self, model: DiT, plan: WidthPlan, options: EngineOptions = EngineOptions()):
    super().__init__(model, plan, options)
    self.spec = self.block_spec(choose_caps(plan.head_counts, options.head_buckets),
                                choose_caps(plan.group_counts, options.group_buckets))
    tables = jax.tree.map(jnp.asarray, plan_tables(plan, self.spec.head_caps, self.spec.group_caps))
    self.arrays = {"state": self.state, "tables": tables, "row_of_t": jnp.asarray(plan.row_of_t())}

  def variants(self, batch: int) -> dict[str, int]:
    """Static block variants compiled into one program for `batch` rows (all in one scan body)."""
    return {"programs": 1, "attention": len(self.spec.head_caps),
            "mlp": len(mlp_keys(self.spec, batch * self.config.num_tokens)[0])}

  def width_capacities(self, rows) -> tuple[np.ndarray, np.ndarray]:
    """(head, group) capacities computed at plan `rows`, each (R, L)."""
    rows = np.asarray(rows)
    return (padded_counts(self.plan.head_counts[rows], self.spec.head_caps),
            padded_counts(self.plan.group_counts[rows], self.spec.group_caps))

  def forwards(self, arrays):
    return [(np.arange(self.plan.num_steps), lambda x, t, y, row: self.apply(arrays, x, t, y, row))]

  def apply(self, arrays, x: jax.Array, t: jax.Array, y: jax.Array, row=None):
    """Pure forward (traceable); see `EngineBase`."""
    model = nnx.merge(self.graphdef, arrays["state"])
    row, valid = self._row(arrays, t, row)
    tables = jax.tree.map(lambda a: a[row], arrays["tables"])
    tokens, c, _ = model.embed(x, t, y)
    block_def, block_state = nnx.split(model.blocks)

    def layer(h, xs):
      state, tab = xs
      return dynamic_block(nnx.merge(block_def, state), self.spec, tab, h, c)

    tokens, kept = jax.lax.scan(layer, tokens, (block_state, tables))
    out = model.unpatchify(model.final_layer(tokens, c))
    return jnp.where(valid, out, jnp.nan), kept
