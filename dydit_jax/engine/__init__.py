"""Fast dynamic inference for DyDiT: plan the widths per timestep, compute only what the masks keep.

  plan = WidthPlan.from_model(model, sampling_timesteps(diffusion))   # heads / groups per step, layer
  engine = DynamicEngine(model, plan, EngineOptions(dtype="bfloat16", attention_impl="cudnn"))
  out, kept = engine.apply(engine.arrays, x, t, y, row)               # traceable; jit the caller

Modules: `plan` (the width plan: save, summary, plot, MACs), `buckets` (static capacities),
`blocks` (the sliced / gathered block), `engine` (the forward), `sampling` (whole chains with
stats under one jit), `cost` (analytic vs XLA-counted MACs), `calibration` and `synthetic`
(routers with a chosen MACs ratio, for benchmarks).
"""
from dydit_jax.engine.engine import DynamicEngine, EngineOptions, compute_model
from dydit_jax.engine.plan import WidthPlan

__all__ = ["DynamicEngine", "EngineOptions", "WidthPlan", "compute_model"]
