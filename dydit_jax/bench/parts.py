"""Dense DiT vs dynamic DyDiT sampling speed, measured on the `Sampler` users run.

Parts (`BenchConfig.parts`, each in its own try/except so one failure never hides the others):
  matmul   the device's bf16 matmul rate (n^3, n = matmul_size): the ceiling for "% of matmul".
  forward  one dense forward at forward_batch rows, per attention implementation.
  chain    whole sampling chains (CFG doubles the rows) through `dydit_jax.sampler.Sampler`, dense
           and DyDiT; compile time, ms per model call, s per image, speedup, MACs ratio. steps_limit K
           runs K steps spread over the schedule and extrapolates s/image to the full chain (said in
           the table). `chain:IMPL:SAMPLER[:RESIDUAL]` picks the attention implementation, one sampler
           and optionally the residual dtype (e.g. `chain:cudnn:ddpm250:bfloat16` next to
           `chain:cudnn:ddpm250`: both residual streams in one process, each with its own dense row),
           and optionally its own engines (`chain:cudnn:ddpm250:float32:buckets+buckets-12x10`) and
           row kernel (`chain:cudnn:ddpm250:bfloat16:buckets:pallas`, `ModelConfig.row_kernel`).
  calls    single model calls (dense and DyDiT) per attention implementation, no sampler; with
           `profile`, one call of each is traced (a small trace: see `profile_chains`).
  hlo      what XLA fused: counts of library calls (cuBLAS / cuBLASLt with their epilogues, cuDNN
           fusions and attention, Triton GEMMs) and fusions in the compiled dense and DyDiT calls at
           the chain's rows; with `profile` set, their optimized HLO is written there too (kernel
           names in a trace are the fusion names of that text).
  cost     analytic MACs vs MACs at the compiled capacities vs XLA's cost analysis for the first
           DyDiT chain that ran, either engine, and XLA's bytes accessed per call, dense vs DyDiT (see
           `bench.cost`; compiles every block piece: slow on big models). cost_batch costs the pieces
           at another batch, with the chain's per-image token counts tiled (e.g. the batch a GPU runs,
           costed after a short CPU chain: compile only, nothing runs).

Weights: a converted checkpoint (`ckpt`), else random (`models.random_weights`: the zero-initialized
adaLN / final layers too, so activations and token decisions are non-trivial). Routers: `checkpoint`
(keep the loaded ones) or `synthetic:R` (`bench.synthetic`: masks costing a fraction R of the dense
MACs, with a per-timestep profile). Speed depends on weights only through the masks. Token
capacities (`token_caps`, see `bench.calibration`): fitted per sampler to the routed fractions of a
short real chain (default), or to a calibration batch, or uniform j/T. "MACs" are
multiply-accumulates (DiT's "GFLOPs"); TFLOP/s counts 2 per MAC, from the analytic (useful) work, so
a DyDiT row's rate is useful work per second.
"""
from __future__ import annotations

import collections
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax.bench import cost, profile_summary
from dydit_jax.bench.calibration import token_fraction_fn
from dydit_jax.bench.config import SAMPLER_SPECS, BenchConfig, engine_variant
from dydit_jax.bench.measure import Table, matmul_rate, spread, timed
from dydit_jax.bench.synthetic import set_synthetic_routers
from dydit_jax.diffusion import create_diffusion, sampling_timesteps
from dydit_jax.engine import DynamicEngine, EngineOptions, SegmentEngine, WidthPlan
from dydit_jax.engine.buckets import fit_token_fractions
from dydit_jax.models import DiT, flops, model_config
from dydit_jax.models.compute import compute_model
from dydit_jax.models.dydit_init import dit_from_dydit
from dydit_jax.models.random_weights import randomize
from dydit_jax.sampler import SampleOptions, Sampler


def random_model(name: str, image_size: int, seed: int) -> DiT:
  """DyDiT with the official init, and N(0, 0.02^2) in the zero-initialized adaLN / final layers."""
  model = DiT(model_config(name, image_size, dynamic=True), rngs=nnx.Rngs(seed))
  return randomize(model, seed + 1, 0.02, only=("adaLN_modulation", "final_layer"))


def load(config: BenchConfig) -> DiT:
  if config.ckpt:
    from dydit_jax.checkpoints import load_model  # Lazy: pulls in orbax.
    model = load_model(config.ckpt)
    if not model.config.dynamic:
      raise ValueError(f"{config.ckpt} holds a plain DiT; the benchmark needs a DyDiT checkpoint")
    return model
  return random_model(config.model, config.image_size, config.seed)


def sample_options(config: BenchConfig, sampler: str, engine: str = "masked") -> SampleOptions:
  method, steps = SAMPLER_SPECS[sampler]
  return SampleOptions(method, steps, cfg_scale=config.cfg_scale or 1.0, engine=engine,
                       segments=config.segments)


HLO_TARGETS = {  # what the census counts in an optimized HLO text
    "cublasLt": r'custom_call_target="__cublas\$lt\$matmul"',
    "cublas": r'custom_call_target="__cublas\$gemm"',
    "cudnn fusion": r'"kind":"__cudnn\$fusion"',
    "cudnn attention": r'custom_call_target="__cudnn\$fmha',
    "triton gemm": r'"kind":"__triton_gemm"',
    "fusions": r" fusion\(",
    "while loops": r" while\(",
    "conditionals": r" conditional\(",
}


def hlo_census(text: str) -> str:
  """"cublasLt 4 (GELU 1, BIAS 2), fusions 97, ..." for an optimized HLO text; zero counts left out."""
  import re
  out = []
  for what, pattern in HLO_TARGETS.items():
    n = len(re.findall(pattern, text))
    if n:
      out.append(f"{what} {n}")
  epilogues = collections.Counter(re.findall(r'"epilogue":"(\w+)"', text))
  if epilogues:
    out.append("epilogues " + ", ".join(f"{k} {v}" for k, v in sorted(epilogues.items())))
  return ", ".join(out)


class Bench:
  """The models and per-sampler plans of one run (built by `setup`, not the constructor); each part
  method adds table rows."""

  def __init__(self, config: BenchConfig, table: Table):
    self.config, self.table = config, table
    self.rate = None
    self.chain_runs = []
    self.dense_ms = {}

  def setup(self) -> None:
    """Loads or builds the model, sets its routers, fits the token capacities and plans the widths."""
    c = self.config
    model = load(c)
    self.cfg = model.config
    self.diffusions = {s: create_diffusion(SAMPLER_SPECS[s][1]) for s in c.samplers}
    if c.router_spec.startswith("synthetic:"):
      stamps = np.concatenate([sampling_timesteps(d) for d in self.diffusions.values()])
      report = set_synthetic_routers(model, float(c.router_spec.split(":")[1]), stamps, seed=c.seed,
                                     token_keep=c.token_keep, tilt=c.tilt)
      print(f"synthetic routers: mu {report['mu']:.3f}, width misses {report['width_misses']}, "
            f"calibrated token fraction {np.mean(report['token_fraction']):.3f}", flush=True)
      observed = report["token_fraction"]
    elif c.token_caps == "calibrated":
      observed = np.asarray(token_fraction_fn(model, seed=c.seed)(nnx.state(model)))
    # One compute copy (block weights cast once); every dense model and engine shares its arrays.
    self.model = compute_model(model, c.dtype, residual_dtype=c.residual_dtype)
    self._numerics_models = {(c.residual_dtype, "xla"): self.model}
    self.token_fractions = {}
    for s in self.diffusions:
      if c.token_caps == "chain":  # the sampler's own trajectory, in the compute dtype
        observed = Sampler(self.model, sample_options(c, s)).generate(
            np.arange(min(4, c.batch)) % self.cfg.num_classes, jax.random.PRNGKey(c.seed)).token
      fitted = None if c.token_caps == "uniform" else fit_token_fractions(observed, c.token_buckets)
      self.token_fractions[s] = fitted
      if fitted:
        print(f"[{s}] token capacities (fractions of a call's rows, fitted to the {c.token_caps} "
              f"observations): {', '.join(f'{f:.3f}' for f in fitted)}", flush=True)
    self.plans = {s: WidthPlan.from_model(model, sampling_timesteps(d)) for s, d in self.diffusions.items()}
    for s, plan in self.plans.items():
      print(f"[{s}] {plan.summary()}", flush=True)
    self.labels = np.arange(c.batch, dtype=np.int32) % self.cfg.num_classes

  # Models for one attention implementation (residual dtype, row kernel) ---------------------------
  def compute(self, residual: str | None = None, rows: str = "xla") -> DiT:
    """The compute copy with `residual` as its residual stream and `rows` as its row kernel
    (`ModelConfig.row_kernel`); same weight arrays, no copy."""
    key = (residual or self.config.residual_dtype, rows)
    if key not in self._numerics_models:
      self._numerics_models[key] = compute_model(self.model, self.config.dtype, residual_dtype=key[0],
                                                 row_kernel=rows)
    return self._numerics_models[key]

  def dense(self, impl, residual: str | None = None, rows: str = "xla"):
    return compute_model(dit_from_dydit(self.compute(residual, rows)), self.config.dtype, impl)

  def engine(self, sampler: str, impl, name: str = "buckets", residual: str | None = None, rows: str = "xla"):
    """The DyDiT engine `name` (`config.engine_variant`) for `sampler`'s plan."""
    c = self.config
    kind, heads, groups = engine_variant(name)
    opts = EngineOptions(c.dtype, impl, heads or c.head_buckets, groups or c.group_buckets, c.token_buckets,
                         self.token_fractions[sampler])
    model = self.compute(residual, rows)
    if kind == "segments":
      return SegmentEngine(model, self.plans[sampler], opts, num_segments=c.segments,
                           width_multiple=c.width_multiple)
    engine = DynamicEngine(model, self.plans[sampler], opts)
    if heads:
      engine.label = f"buckets {heads}x{groups}"
    return engine

  def pct(self, tflops):
    return 100 * tflops / self.rate if self.rate else ""

  # Parts -----------------------------------------------------------------------------------------
  def part_matmul(self):
    n = self.config.matmul_size or (8192 if jax.default_backend() == "gpu" else 1024)
    self.rate = matmul_rate(n)
    self.table.add(part="matmul", model=f"{n}^3 bf16", **{"TFLOP/s": self.rate, "% matmul": 100.0})

  def part_forward(self, impl: str | None = None):
    """One dense forward at forward_batch rows (t = 500), per attention implementation."""
    c = self.config
    rows = c.forward_batch
    side = self.cfg.input_size
    x = jax.random.normal(jax.random.key(0), (rows, side, side, self.cfg.in_channels))
    t = jnp.full((rows,), 500, jnp.int32)
    y = jnp.arange(rows, dtype=jnp.int32) % self.cfg.num_classes
    macs = flops.dense_macs(self.cfg) * rows
    for impl in [impl] if impl else c.forward_attention:
      try:
        graphdef, state = nnx.split(self.dense(impl))
        fwd = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y))
        start = time.perf_counter()
        fwd = fwd.lower(state, x, t, y).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(fwd(state, x, t, y))
        _, seconds = timed(lambda: [fwd(state, x, t, y) for _ in range(c.iters)][-1])
        ms = 1e3 * seconds / c.iters
        tf = 2 * macs / (ms / 1e3) / 1e12
        self.table.add(part="forward", model="dense", attn=impl, rows=rows, **{
            "compile s": compile_s, "ms/call": ms, "TFLOP/s": tf, "% matmul": self.pct(tf)})
      except Exception as e:  # noqa: BLE001 - report and continue with the next variant
        self.error(f"forward {impl}", e)

  def part_chain(self, impl: str | None = None, sampler: str | None = None, residual: str | None = None,
                 engines: str | None = None, rows: str = "xla"):
    """Dense and DyDiT chains (one row per engine of `engines`, "+"-separated, default --engines) for
    `sampler` (default: all of `samplers`) with attention `impl`, residual stream `residual` (default
    `residual_dtype`) and row kernel `rows` (xla | pallas, `ModelConfig.row_kernel`)."""
    c = self.config
    engines = tuple(engines.split("+")) if engines else c.engines
    for name in engines:
      engine_variant(name)
    impl = impl or c.attention
    residual = residual or c.residual_dtype
    suffix = ("" if residual == c.residual_dtype else f", {residual} residual") + (
        "" if rows == "xla" else f", {rows} row kernel")
    residual_key = residual + suffix
    key = jax.random.PRNGKey(c.seed + 1)
    dense_model = self.dense(impl, residual, rows)
    for sampler in [sampler] if sampler else c.samplers:
      total = self.diffusions[sampler].num_timesteps
      steps = spread(total, c.steps_limit)
      for name in ("dense",) + engines:
        try:
          if name == "dense":
            engine, run = None, Sampler(dense_model, sample_options(c, sampler), positions=steps)
          else:
            engine = self.engine(sampler, impl, name, residual, rows)
            run = Sampler(self.compute(residual, rows), sample_options(c, sampler, engine_variant(name)[0]), engine=engine,
                          positions=steps)
          compile_s = run.compile(c.batch)
          if c.warmup:  # first executions (allocations, library handles) stay out of the timing
            run.generate(self.labels, key)
          result, seconds = timed(run.generate, self.labels, key)
          self._chain_row(sampler, impl, residual_key, suffix, total, steps, engine, result, seconds, compile_s)
          if c.profile and c.profile_chains:  # one more, untimed run under the profiler
            label = name if engine is None else f"DyDiT {engine.label}"
            self._profile(f"{sampler}_{impl}_{label}{suffix}", run.generate, self.labels, key)
        except Exception as e:  # noqa: BLE001
          self.error(f"chain {sampler} {name} {impl}", e)

  def _chain_row(self, sampler, impl, residual, suffix, total, steps, engine, result, seconds, compile_s):
    c = self.config
    ms = 1e3 * seconds / len(steps)
    rows = c.rows
    dense_call = flops.dense_macs(self.cfg) * rows
    notes = [f"{len(steps)}/{total} steps spread over the chain, s/image extrapolated"] if len(steps) < total else []
    if not np.isfinite(result.samples).all():  # timing stands; token decisions may not
      notes.append("WARNING non-finite samples")
    if engine is None:
      self.dense_ms[(sampler, impl, residual)] = ms
      macs, ratio, speedup = dense_call * len(steps), 1.0, 1.0
      label = "dense"
    else:
      kept = result.kept
      macs = cost.analytic_macs(engine.plan, kept, steps)
      ratio = macs / (dense_call * len(steps))
      dense_ms = self.dense_ms.get((sampler, impl, residual))
      speedup = dense_ms / ms if dense_ms else ""
      xla_dense = self.dense_ms.get((sampler, "xla", residual))
      if impl != "xla" and xla_dense:
        notes.append(f"x{xla_dense / ms:.2f} vs XLA-attention dense")
      var = engine.variants(rows)
      notes.append(f"{var['programs']} program(s), {var['attention']} attn + {var['mlp']} MLP block bodies; "
                   f"compiled capacities cost x{cost.padded_macs(engine, kept, steps, include_router=False) / macs:.3f} "
                   "the analytic MACs")
      if not self.chain_runs:  # the cost part costs the first DyDiT chain
        self.chain_runs.append((sampler, engine, kept, steps))
      label = f"DyDiT {engine.label}"
    tf = 2 * macs / seconds / 1e12
    self.table.add(part="chain", sampler=sampler, model=label + suffix, attn=impl, rows=rows, steps=len(steps),
                   note="; ".join(notes), **{
                       "compile s": compile_s, "ms/call": ms, "s/image": ms / 1e3 * total / c.batch,
                       "speedup": speedup, "MACs ratio": ratio, "TFLOP/s": tf, "% matmul": self.pct(tf)})

  def _profile(self, title: str, fn, *args):
    logdir = f"{self.config.profile}/{title.replace(' ', '_')}"
    with jax.profiler.trace(logdir):
      jax.block_until_ready(fn(*args))
    print(profile_summary.format_summary(profile_summary.summarize(logdir), title), flush=True)

  def part_calls(self, impl: str | None = None):
    """--calls single model calls at plan rows spread over the first sampler (no sampler loop)."""
    sampler = self.config.samplers[0]
    plan = self.plans[sampler]
    side = self.cfg.input_size
    rows = self.config.rows
    x = jax.random.normal(jax.random.key(0), (rows, side, side, self.cfg.in_channels))
    y = jnp.arange(rows, dtype=jnp.int32) % self.cfg.num_classes
    positions = spread(plan.num_steps, self.config.calls)
    ts = [jnp.full((rows,), plan.timesteps[p], jnp.int32) for p in positions]
    for impl in [impl] if impl else self.config.forward_attention:
      dense_ms = None
      for name in ("dense",) + tuple(self.config.engines):
        try:
          if name == "dense":
            graphdef, arrays = nnx.split(self.dense(impl))
            fwd = jax.jit(lambda s, x, t, y, row: (nnx.merge(graphdef, s)(x, t, y), ()))
          else:
            engine = self.engine(sampler, impl, name)
            arrays, fwd = engine.arrays, jax.jit(engine.apply)
            name = f"DyDiT {engine.label}"
          start = time.perf_counter()
          fwd = fwd.lower(arrays, x, ts[0], y, jnp.int32(0)).compile()
          compile_s = time.perf_counter() - start
          jax.block_until_ready(fwd(arrays, x, ts[0], y, jnp.int32(positions[0])))
          outs, seconds = timed(lambda: [fwd(arrays, x, t, y, jnp.int32(p)) for t, p in zip(ts, positions)])
          if self.config.profile:  # one call at the middle plan row, under the profiler
            mid = len(positions) // 2
            self._profile(f"call_{sampler}_{impl}_{name}", fwd, arrays, x, ts[mid], y, jnp.int32(positions[mid]))
          ms = 1e3 * seconds / len(positions)
          dense_call = flops.dense_macs(self.cfg) * rows * len(positions)
          if name == "dense":
            dense_ms, ratio, speedup = ms, 1.0, 1.0
          else:
            kept = np.stack([np.asarray(o[1]) for o in outs])
            ratio = cost.analytic_macs(plan, kept, positions) / dense_call
            speedup = dense_ms / ms if dense_ms else ""
          self.table.add(part="calls", sampler=sampler, model=name, attn=impl, rows=rows,
                         steps=len(positions), note="fixed Gaussian input at each call's t",
                         **{"compile s": compile_s, "ms/call": ms, "speedup": speedup, "MACs ratio": ratio})
        except Exception as e:  # noqa: BLE001
          self.error(f"calls {impl} {name}", e)

  def part_hlo(self, impl: str | None = None, only: str | None = None):
    """One compiled dense call and one DyDiT call (first engine, first sampler) at the chain's rows;
    `only` = "dense" skips the DyDiT call (its compile is the slow one)."""
    c = self.config
    impl = impl or c.attention
    sampler, rows, side = c.samplers[0], c.rows, self.cfg.input_size
    x = jax.ShapeDtypeStruct((rows, side, side, self.cfg.in_channels), jnp.float32)
    t = y = jax.ShapeDtypeStruct((rows,), jnp.int32)
    for name in ("dense",) + (() if only == "dense" else tuple(c.engines[:1])):
      try:
        if name == "dense":
          graphdef, arrays = nnx.split(self.dense(impl))
          fwd, args = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y)), (arrays, x, t, y)
        else:
          engine = self.engine(sampler, impl, name)
          fwd, args = jax.jit(engine.apply), (engine.arrays, x, t, y, jnp.int32(0))
          name = f"DyDiT {engine.label}"
        start = time.perf_counter()
        text = fwd.lower(*args).compile().as_text()
        compile_s = time.perf_counter() - start
        if c.profile:
          with open(f"{c.profile}/hlo_{name.replace(' ', '_')}_{impl}.txt", "w") as f:
            f.write(text)
        self.table.add(part="hlo", model=name, attn=impl, rows=rows, note=hlo_census(text),
                       **{"compile s": compile_s})
      except Exception as e:  # noqa: BLE001
        self.error(f"hlo {impl} {name}", e)

  def part_cost(self):
    if not self.chain_runs:
      raise RuntimeError("the cost part needs a DyDiT chain (part 'chain') that ran")
    sampler, engine, kept, steps = self.chain_runs[0]
    rows = self.config.rows
    if self.config.cost_batch:  # the chain's per-row token counts, tiled to the costed rows
      rows = self.config.rows // self.config.batch * self.config.cost_batch
      kept = np.resize(np.moveaxis(kept, -1, 0), (rows,) + kept.shape[:-1])
      kept = np.moveaxis(kept, 0, -1)
    start = time.perf_counter()
    branch = cost.engine_branch_costs(engine, rows)
    dense = cost.dense_call_cost(self.dense("xla", engine.config.residual_dtype), rows)
    r = cost.run_macs(engine, branch, dense, kept, steps)
    seconds = time.perf_counter() - start
    note = (f"analytic {r.analytic:.4g}, at capacities {r.padded:.4g} (x{r.padded / r.analytic:.3f}), "
            f"XLA {r.xla:.4g} MACs (XLA/capacities {r.xla / r.padded:.3f}); dense analytic "
            f"{r.dense_analytic:.4g}, XLA {r.dense_xla:.4g} (x{r.dense_xla / r.dense_analytic:.3f}); "
            f"XLA MACs ratio {r.xla / r.dense_xla:.3f}; XLA bytes accessed per call: dense "
            f"{r.dense_xla_bytes / len(steps):.4g}, DyDiT {r.xla_bytes / len(steps):.4g} "
            f"(ratio {r.xla_bytes / r.dense_xla_bytes:.3f})")
    self.table.add(part="cost", sampler=sampler, model="dydit", rows=rows, steps=len(steps),
                   note=note, **{"compile s": seconds, "MACs ratio": r.analytic / r.dense_analytic})
    return r

  def error(self, what, e):
    print(f"ERROR in {what}: {type(e).__name__}: {e}", flush=True)
    if self.config.verbose:
      traceback.print_exc()
    self.table.add(part=what, note=f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
