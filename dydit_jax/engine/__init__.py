"""Fast dynamic inference for DyDiT: plan the widths per timestep, compute only what the masks keep.

  plan = WidthPlan.from_model(model, sampling_timesteps(diffusion))   # heads / groups per step, layer
  engine = DynamicEngine(model, plan, EngineOptions(dtype="bfloat16", attention_impl="cudnn"))
  out, kept = engine.apply(engine.arrays, x, t, y, row)               # traceable; jit the caller

Modules: `plan` (the width plan: save, summary, plot, MACs), `buckets` (static capacities),
`blocks` (the sliced / gathered block), `engine` (the bucket engine: one program, per-layer
`lax.switch`), `segments` (static widths per range of steps: one unrolled program per range).
Sampling chains through an engine: `dydit_jax.sampler.Sampler`; costing and synthetic routers for
benchmarks: `dydit_jax.bench`.
"""
from dydit_jax.engine.engine import DynamicEngine, EngineOptions
from dydit_jax.engine.plan import WidthPlan
from dydit_jax.engine.segments import SegmentEngine

__all__ = ["DynamicEngine", "EngineOptions", "SegmentEngine", "WidthPlan"]
