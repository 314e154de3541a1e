"""Dense DiT vs dynamic DyDiT sampling speed, in one process and one table.

  python -m dydit_jax.bench --model DiT-XL/2 --batch 128 --routers synthetic:0.5 \
      --samplers ddpm250,ddim50 --steps-limit 50 --json bench.json

Parts (`--parts`, each in its own try/except so one failure never hides the others):
  matmul   the device's bf16 matmul rate (n^3, n = --matmul-size): the ceiling for "% of matmul".
  forward  one dense forward at --forward-batch rows, per attention implementation.
  chain    whole sampling chains (CFG doubles the rows) under one jit, dense and DyDiT; compile time,
           ms per model call, s per image, speedup, MACs ratio. --steps-limit K runs K steps spread
           over the schedule and extrapolates s/image to the full chain (said in the table).
           `chain:IMPL:SAMPLER[:RESIDUAL]` picks the attention implementation, one sampler and
           optionally the residual dtype (e.g. `chain:cudnn:ddpm250:bfloat16` next to
           `chain:cudnn:ddpm250`: both residual streams in one process, each with its own dense row).
  calls    --calls N single model calls (dense and DyDiT) per attention implementation, no sampler.
  cost     analytic MACs vs MACs at the compiled capacities vs XLA's cost analysis for the first
           DyDiT chain that ran, either engine, and XLA's bytes accessed per call, dense vs DyDiT (see
           `dydit_jax.engine.cost`; compiles every block piece: slow on big models). --cost-batch
           costs the pieces at another batch, with the chain's per-image token counts tiled (e.g.
           the batch a GPU runs, costed after a short CPU chain: compile only, nothing runs).

Weights: --ckpt DIR (a converted checkpoint, `dydit_jax.checkpoints.load_model`), else random (the
zero-initialized adaLN / final layers too, so activations and token decisions are non-trivial).
Routers: `checkpoint` (keep the loaded ones) or `synthetic:R` (`engine.synthetic`: masks costing a
fraction R of the dense MACs, with a per-timestep profile). Speed depends on weights only through
the masks. Token capacities (`--token-caps`, see `engine.calibration`): fitted per sampler to the
routed fractions of a short real chain (default), or to a calibration batch, or uniform j/T.
"MACs" are multiply-accumulates (DiT's "GFLOPs"); TFLOP/s counts 2 per MAC, from the analytic
(useful) work, so a DyDiT row's rate is useful work per second.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import time
import traceback
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax import profile_summary
from dydit_jax.diffusion import create_diffusion, run_chain, sampling_timesteps
from dydit_jax.engine import cost, sampling
from dydit_jax.engine.buckets import fit_token_fractions
from dydit_jax.engine.calibration import token_fraction_fn
from dydit_jax.engine.engine import DynamicEngine, EngineOptions, compute_model
from dydit_jax.engine.plan import WidthPlan
from dydit_jax.engine.segments import SegmentEngine
from dydit_jax.engine.synthetic import set_synthetic_routers
from dydit_jax.models import DiT, flops, model_config
from dydit_jax.models.dydit_init import dit_from_dydit
from dydit_jax.sample import SampleOptions, generate

SAMPLER_SPECS = {"ddpm250": ("ddpm", "250"), "ddim50": ("ddim", "ddim50")}
COLUMNS = ("part", "sampler", "model", "attn", "rows", "steps", "compile s", "ms/call", "s/image",
           "speedup", "MACs ratio", "TFLOP/s", "% matmul", "note", "at s")


def _impl(name: str) -> str | None:
  return None if name in ("xla", "none", "None") else name


def _timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


class Table:
  """Markdown rows printed as they complete (a timed-out run still shows what it measured).

  "at s" is the time since the table started: what each part costs of a device-time budget.
  """

  def __init__(self):
    self.rows: list[dict] = []
    self.start = time.perf_counter()
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)

  def add(self, **row):
    row.setdefault("at s", round(time.perf_counter() - self.start))
    self.rows.append(row)
    cells = []
    for c in COLUMNS:
      v = row.get(c, "")
      cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
    print("| " + " | ".join(cells) + " |", flush=True)


def matmul_rate(n: int, iters: int = 10) -> float:
  """bf16 n^3 matmul TFLOP/s (jit of a chain of `iters` dependent products, timed after warm-up)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16) / n ** 0.5

  @jax.jit
  def chain(a, b):
    return jax.lax.fori_loop(0, iters, lambda _, x: x @ b, a)

  jax.block_until_ready(chain(a, b))
  _, seconds = _timed(chain, a, b)
  return 2 * n ** 3 * iters / seconds / 1e12


def random_model(name: str, image_size: int, seed: int) -> DiT:
  """DyDiT with random weights; the zero-initialized adaLN / final layers get N(0, 0.02^2) too."""
  model = DiT(model_config(name, image_size, dynamic=True), rngs=nnx.Rngs(seed))
  key = jax.random.key(seed + 1)
  for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
    if "adaLN_modulation" in map(str, path) or path[0] == "final_layer":
      var[...] = 0.02 * jax.random.normal(jax.random.fold_in(key, i), var.shape, var.dtype)
  return model


def load(args) -> DiT:
  if args.ckpt:
    from dydit_jax.checkpoints import load_model  # Lazy: pulls in orbax.
    model = load_model(args.ckpt)
    if not model.config.dynamic:
      raise ValueError(f"{args.ckpt} holds a plain DiT; the benchmark needs a DyDiT checkpoint")
    return model
  return random_model(args.model, args.image_size, args.seed)


def spread(num: int, limit: int | None) -> np.ndarray:
  """`limit` positions spread evenly over 0..num-1 (all of them without a limit)."""
  if not limit or limit >= num:
    return np.arange(num)
  return np.unique(np.linspace(0, num - 1, limit).round().astype(np.int32))


class Bench:
  """Holds the models and per-sampler engines; each part method adds table rows."""

  def __init__(self, args, table: Table):
    self.args, self.table = args, table
    self.rate = None
    model = load(args)
    self.cfg = model.config
    self.diffusions = {s: create_diffusion(SAMPLER_SPECS[s][1]) for s in args.samplers}
    if args.routers.startswith("synthetic:"):
      stamps = np.concatenate([sampling_timesteps(d) for d in self.diffusions.values()])
      report = set_synthetic_routers(model, float(args.routers.split(":")[1]), stamps, seed=args.seed,
                                     token_keep=args.token_keep, tilt=args.tilt)
      print(f"synthetic routers: mu {report['mu']:.3f}, width misses {report['width_misses']}, "
            f"calibrated token fraction {np.mean(report['token_fraction']):.3f}", flush=True)
      observed = report["token_fraction"]
    elif args.token_caps == "calibrated":
      observed = np.asarray(token_fraction_fn(model, seed=args.seed)(nnx.state(model)))
    # One compute copy (block weights cast once); every dense model and engine shares its arrays.
    self.model = compute_model(model, args.dtype, residual_dtype=args.residual_dtype)
    self._residual_models = {args.residual_dtype: self.model}
    self.token_fractions = {}
    for s in self.diffusions:
      if args.token_caps == "chain":  # the sampler's own trajectory, in the compute dtype
        method, steps = SAMPLER_SPECS[s]
        observed = generate(self.model, np.arange(min(4, args.batch)) % self.cfg.num_classes,
                            jax.random.PRNGKey(args.seed),
                            SampleOptions(method, steps, cfg_scale=args.cfg_scale or 1.0)).token
      fitted = None if args.token_caps == "uniform" else fit_token_fractions(observed, args.token_buckets)
      self.token_fractions[s] = fitted
      if fitted:
        print(f"[{s}] token capacities (fractions of a call's rows, fitted to the {args.token_caps} "
              f"observations): {', '.join(f'{f:.3f}' for f in fitted)}", flush=True)
    self.plans = {s: WidthPlan.from_model(model, sampling_timesteps(d)) for s, d in self.diffusions.items()}
    for s, plan in self.plans.items():
      print(f"[{s}] {plan.summary()}", flush=True)
    self.labels = jnp.arange(args.batch, dtype=jnp.int32) % self.cfg.num_classes
    self.rows = 2 * args.batch if args.cfg_scale else args.batch
    self.chain_runs = []
    self.dense_ms = {}

  # Models for one attention implementation (and residual dtype) ---------------------------------
  def compute(self, residual: str | None = None) -> DiT:
    """The compute copy with `residual` as its residual stream (same weight arrays, no copy)."""
    residual = residual or self.args.residual_dtype
    if residual not in self._residual_models:
      self._residual_models[residual] = compute_model(self.model, self.args.dtype, residual_dtype=residual)
    return self._residual_models[residual]

  def dense(self, impl, residual: str | None = None):
    return compute_model(dit_from_dydit(self.compute(residual)), self.args.dtype, _impl(impl))

  def engine(self, sampler: str, impl, kind: str = "buckets", residual: str | None = None):
    opts = EngineOptions(self.args.dtype, _impl(impl), self.args.head_buckets, self.args.group_buckets,
                         self.args.token_buckets, self.token_fractions[sampler])
    model = self.compute(residual)
    if kind == "segments":
      return SegmentEngine(model, self.plans[sampler], opts, num_segments=self.args.segments,
                           width_multiple=self.args.width_multiple)
    return DynamicEngine(model, self.plans[sampler], opts)

  def pct(self, tflops):
    return 100 * tflops / self.rate if self.rate else ""

  # Parts -----------------------------------------------------------------------------------------
  def part_matmul(self):
    n = self.args.matmul_size or (8192 if jax.default_backend() == "gpu" else 1024)
    self.rate = matmul_rate(n)
    self.table.add(part="matmul", model=f"{n}^3 bf16", **{"TFLOP/s": self.rate, "% matmul": 100.0})

  def part_forward(self, impl: str | None = None):
    """One dense forward at --forward-batch rows (t = 500), per attention implementation."""
    rows = self.args.forward_batch
    side = self.cfg.input_size
    x = jax.random.normal(jax.random.key(0), (rows, side, side, self.cfg.in_channels))
    t = jnp.full((rows,), 500, jnp.int32)
    y = jnp.arange(rows, dtype=jnp.int32) % self.cfg.num_classes
    macs = flops.dense_macs(self.cfg) * rows
    for impl in [impl] if impl else self.args.forward_attention:
      try:
        graphdef, state = nnx.split(self.dense(impl))
        fwd = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y))
        start = time.perf_counter()
        fwd = fwd.lower(state, x, t, y).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(fwd(state, x, t, y))
        _, seconds = _timed(lambda: [fwd(state, x, t, y) for _ in range(self.args.iters)][-1])
        ms = 1e3 * seconds / self.args.iters
        tf = 2 * macs / (ms / 1e3) / 1e12
        self.table.add(part="forward", model="dense", attn=impl, rows=rows, **{
            "compile s": compile_s, "ms/call": ms, "TFLOP/s": tf, "% matmul": self.pct(tf)})
      except Exception as e:  # noqa: BLE001 - report and continue with the next variant
        self.error(f"forward {impl}", e)

  def _chain_programs(self, sampler, pieces_of):
    """(compile_all, steps): compile_all(arrays) -> ([(program(arrays, x, key) -> (x, kept), positions)],
    compile wall seconds); steps = the chain positions that run.

    pieces_of(arrays) -> [(plan rows, forward(x, t, y, row))]: one piece for the dense model and the
    bucket engine, one per segment for the segment engine. Pieces compile in parallel threads (XLA
    releases the GIL) and run back to back without host syncs.
    """
    method = SAMPLER_SPECS[sampler][0]
    diffusion = self.diffusions[sampler]
    steps = spread(diffusion.num_timesteps, self.args.steps_limit)
    scale = self.args.cfg_scale or None
    side = self.cfg.input_size
    noise = jax.ShapeDtypeStruct((self.rows, side, side, self.cfg.in_channels), jnp.float32)

    def make(k, positions):
      def run(arrays, x, key):
        forward = pieces_of(arrays)[k][1]
        step = sampling.guided(forward, self.labels, cfg_scale=scale, num_classes=self.cfg.num_classes)
        return run_chain(step, diffusion, x, key, method=method, positions=positions)
      return jax.jit(run)

    def compile_piece(args):
      k, positions, arrays = args
      return make(k, positions).lower(arrays, noise, jax.random.key(0)).compile(), positions

    def compile_all(arrays):
      rows = [np.intersect1d(r, steps) for r, _ in pieces_of(arrays)]
      jobs = [(k, p, arrays) for k, p in enumerate(rows) if p.size]
      start = time.perf_counter()
      with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(jobs))) as pool:
        programs = list(pool.map(compile_piece, jobs))
      return programs, time.perf_counter() - start

    return compile_all, steps

  def _noise(self):
    side = self.cfg.input_size
    return jax.random.normal(jax.random.key(self.args.seed), (self.rows, side, side, self.cfg.in_channels))

  @staticmethod
  def _run_programs(programs, arrays, x, key):
    kept = []
    for program, _ in programs:
      x, aux = program(arrays, x, key)
      kept.append(aux)
    return x, kept

  def part_chain(self, impl: str | None = None, sampler: str | None = None, residual: str | None = None):
    """Dense and DyDiT chains (one row per engine of --engines) for `sampler` (default: all of
    --samplers) with attention `impl` and residual stream `residual` (default --residual-dtype)."""
    impl = impl or self.args.attention
    residual = residual or self.args.residual_dtype
    suffix = "" if residual == self.args.residual_dtype else f", {residual} residual"
    noise = self._noise()
    key = jax.random.key(self.args.seed + 1)
    dgraph, dstate = nnx.split(self.dense(impl, residual))
    for sampler in [sampler] if sampler else self.args.samplers:
      total = self.diffusions[sampler].num_timesteps
      dense_pieces = lambda s: [(np.arange(total), lambda x, t, y, row: (nnx.merge(dgraph, s)(x, t, y), ()))]
      for name in ("dense",) + tuple(self.args.engines):
        try:
          if name == "dense":
            arrays, pieces_of, engine = dstate, dense_pieces, None
          else:
            engine = self.engine(sampler, impl, name, residual)
            arrays, pieces_of = engine.arrays, engine.forwards
          compile_all, steps = self._chain_programs(sampler, pieces_of)
          programs, compile_s = compile_all(arrays)
          if self.args.warmup:  # first executions (allocations, library handles) stay out of the timing
            _timed(self._run_programs, programs, arrays, noise, key)
          (x0, kept), seconds = _timed(self._run_programs, programs, arrays, noise, key)
          ms = 1e3 * seconds / len(steps)
          dense_call = flops.dense_macs(self.cfg) * self.rows
          notes = [f"{len(steps)}/{total} steps spread over the chain, s/image extrapolated"] \
              if len(steps) < total else []
          if not np.isfinite(np.asarray(x0)).all():  # timing stands; token decisions may not
            notes.append("WARNING non-finite samples")
          if engine is None:
            self.dense_ms[(sampler, impl, residual)] = ms
            macs, ratio, speedup = dense_call * len(steps), 1.0, 1.0
          else:
            kept = np.concatenate([np.asarray(k) for k in kept])
            macs = cost.analytic_macs(engine.plan, kept, steps)
            ratio = macs / (dense_call * len(steps))
            dense_ms = self.dense_ms.get((sampler, impl, residual))
            speedup = dense_ms / ms if dense_ms else ""
            xla_dense = self.dense_ms.get((sampler, "xla", residual))
            if impl != "xla" and xla_dense:
              notes.append(f"x{xla_dense / ms:.2f} vs XLA-attention dense")
            var = engine.variants(self.rows)
            notes.append(f"{var['programs']} program(s), {var['attention']} attn + {var['mlp']} MLP block "
                         f"bodies; compiled capacities cost "
                         f"x{cost.padded_macs(engine, kept, steps, include_router=False) / macs:.3f} "
                         "the analytic MACs")
            if not self.chain_runs:  # the cost part costs the first DyDiT chain
              self.chain_runs.append((sampler, engine, kept, steps))
          tf = 2 * macs / seconds / 1e12
          label = (name if engine is None else f"DyDiT {engine.label}") + suffix
          self.table.add(part="chain", sampler=sampler, model=label, attn=impl, rows=self.rows,
                         steps=len(steps), note="; ".join(notes), **{
                             "compile s": compile_s, "ms/call": ms,
                             "s/image": ms / 1e3 * total / self.args.batch, "speedup": speedup,
                             "MACs ratio": ratio, "TFLOP/s": tf, "% matmul": self.pct(tf)})
          if self.args.profile:  # one more, untimed run under the profiler
            self._profile(f"{sampler}_{impl}_{label}", self._run_programs, programs, arrays, noise, key)
        except Exception as e:  # noqa: BLE001
          self.error(f"chain {sampler} {name} {impl}", e)

  def _profile(self, title: str, fn, *args):
    logdir = f"{self.args.profile}/{title.replace(' ', '_')}"
    with jax.profiler.trace(logdir):
      jax.block_until_ready(fn(*args))
    print(profile_summary.format_summary(profile_summary.summarize(logdir), title), flush=True)

  def part_calls(self, impl: str | None = None):
    """--calls single model calls at plan rows spread over the first sampler (no sampler loop)."""
    sampler = self.args.samplers[0]
    plan = self.plans[sampler]
    side = self.cfg.input_size
    x = jax.random.normal(jax.random.key(0), (self.rows, side, side, self.cfg.in_channels))
    y = jnp.arange(self.rows, dtype=jnp.int32) % self.cfg.num_classes
    positions = spread(plan.num_steps, self.args.calls)
    ts = [jnp.full((self.rows,), plan.timesteps[p], jnp.int32) for p in positions]
    for impl in [impl] if impl else self.args.forward_attention:
      dense_ms = None
      for name in ("dense",) + tuple(self.args.engines):
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
          outs, seconds = _timed(lambda: [fwd(arrays, x, t, y, jnp.int32(p)) for t, p in zip(ts, positions)])
          ms = 1e3 * seconds / len(positions)
          dense_call = flops.dense_macs(self.cfg) * self.rows * len(positions)
          if name == "dense":
            dense_ms, ratio, speedup = ms, 1.0, 1.0
          else:
            kept = np.stack([np.asarray(o[1]) for o in outs])
            ratio = cost.analytic_macs(plan, kept, positions) / dense_call
            speedup = dense_ms / ms if dense_ms else ""
          self.table.add(part="calls", sampler=sampler, model=name, attn=impl, rows=self.rows,
                         steps=len(positions), note="fixed Gaussian input at each call's t",
                         **{"compile s": compile_s, "ms/call": ms, "speedup": speedup, "MACs ratio": ratio})
        except Exception as e:  # noqa: BLE001
          self.error(f"calls {impl} {name}", e)

  def part_cost(self):
    if not self.chain_runs:
      raise RuntimeError("the cost part needs a DyDiT chain (part 'chain') that ran")
    sampler, engine, kept, steps = self.chain_runs[0]
    rows = self.rows
    if self.args.cost_batch:  # the chain's per-row token counts, tiled to the costed rows
      rows = self.rows // self.args.batch * self.args.cost_batch
      kept = np.resize(np.moveaxis(kept, -1, 0), (rows,) + kept.shape[:-1])
      kept = np.moveaxis(kept, 0, -1)
    start = time.perf_counter()
    branch = cost.engine_branch_costs(engine, rows)
    dense = cost.dense_call_cost(self.dense(None, engine.config.residual_dtype), rows)
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
    if self.args.verbose:
      traceback.print_exc()
    self.table.add(part=what, note=f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")


def parse(argv: Sequence[str] | None = None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="DiT-XL/2")
  p.add_argument("--image-size", type=int, default=256)
  p.add_argument("--ckpt", default=None, help="converted DyDiT checkpoint dir (default: random weights)")
  p.add_argument("--routers", default=None, help="checkpoint | synthetic:R (default synthetic:0.5 "
                 "without --ckpt, checkpoint with it)")
  p.add_argument("--token-keep", type=float, default=0.85, help="synthetic: fraction of MLP-routed tokens")
  p.add_argument("--tilt", type=float, default=0.4, help="synthetic: width(t=0) - width(t=999)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch", type=int, default=8, help="images per batch (rows per call = 2x with CFG)")
  p.add_argument("--cfg-scale", type=float, default=1.5, help="0 disables classifier-free guidance")
  p.add_argument("--samplers", default="ddpm250,ddim50")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--residual-dtype", default="float32", choices=("float32", "bfloat16"),
                 help="residual stream between blocks, dense and DyDiT alike (ModelConfig.residual_dtype)")
  p.add_argument("--attention", default="xla", help="attention for the chains: xla | cudnn")
  p.add_argument("--forward-attention", default="xla", help="comma list for parts forward / calls")
  p.add_argument("--forward-batch", type=int, default=256, help="rows of the dense forward part")
  p.add_argument("--iters", type=int, default=5, help="timed repetitions in the forward part")
  p.add_argument("--steps-limit", type=int, default=None, help="run only K steps spread over each chain")
  p.add_argument("--profile", default=None, help="chain part: also trace one run of each chain into "
                 "this folder and print device busy / idle time and the top kernels")
  p.add_argument("--warmup", type=int, default=1, help="chain part: run each chain once untimed first (0: no)")
  p.add_argument("--calls", type=int, default=8, help="model calls timed in the calls part")
  defaults = EngineOptions()
  p.add_argument("--head-buckets", type=int, default=defaults.head_buckets)
  p.add_argument("--group-buckets", type=int, default=defaults.group_buckets)
  p.add_argument("--token-buckets", type=int, default=defaults.token_buckets)
  p.add_argument("--engines", default="buckets", help="DyDiT engines to time in the chain part: "
                 "buckets (one program, per-layer lax.switch) and/or segments (one program per range of steps)")
  p.add_argument("--segments", type=int, default=8, help="segment engine: ranges of steps (programs)")
  p.add_argument("--width-multiple", type=int, default=1,
                 help="segment engine: round each layer's head / group count up to a multiple of this")
  p.add_argument("--token-caps", default="chain", choices=("chain", "calibrated", "uniform"),
                 help="token capacities fitted to the routed fractions of a short real chain of each "
                 "sampler (4 images), to a calibration batch of Gaussian latents, or uniform j/T")
  p.add_argument("--matmul-size", type=int, default=None, help="default 8192 on GPU, 1024 on CPU")
  p.add_argument("--cost-batch", type=int, default=None, help="cost part: images to cost the pieces at "
                 "(default --batch; token counts of the chain's images tiled)")
  p.add_argument("--parts", default="matmul,forward,chain")
  p.add_argument("--json", default=None, help="also write the rows (and run info) to this file")
  p.add_argument("--verbose", action="store_true", help="print tracebacks of failed parts")
  args = p.parse_args(argv)
  args.samplers = [s for s in args.samplers.split(",") if s]
  unknown = set(args.samplers) - set(SAMPLER_SPECS)
  if unknown:
    p.error(f"unknown samplers {sorted(unknown)}; choose from {sorted(SAMPLER_SPECS)}")
  args.forward_attention = [s for s in args.forward_attention.split(",") if s]
  args.engines = [s for s in args.engines.split(",") if s]
  if set(args.engines) - {"buckets", "segments"}:
    p.error(f"--engines takes buckets and/or segments, got {args.engines}")
  args.parts = [s for s in args.parts.split(",") if s]
  args.routers = args.routers or ("checkpoint" if args.ckpt else "synthetic:0.5")
  return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
  args = parse(argv)
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; model "
        f"{args.ckpt or args.model} {args.image_size}px, {args.dtype} (residual {args.residual_dtype}), "
        f"batch {args.batch} images, cfg {args.cfg_scale or 'off'}, routers {args.routers}", flush=True)
  table = Table()
  try:
    bench = Bench(args, table)
  except Exception as e:  # noqa: BLE001 - nothing else can run without models
    print(f"ERROR building models: {type(e).__name__}: {e}", flush=True)
    traceback.print_exc()
    return table.rows
  for part in args.parts:  # "name" or "name:arg:arg", e.g. chain:cudnn:ddpm250
    name, *part_args = part.split(":")
    try:
      getattr(bench, f"part_{name}")(*part_args)
    except Exception as e:  # noqa: BLE001
      bench.error(part, e)
  print("\n## summary\n")
  printed = Table()
  for row in table.rows:
    printed.add(**row)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": device.device_kind, "args": vars(args), "rows": table.rows}, f, indent=1, default=str)
  return table.rows


if __name__ == "__main__":
  main()
