"""Class-conditional sampling from a DiT / DyDiT: one `Sampler`, compiled once, for every engine.

  sampler = Sampler(model, SampleOptions(sampler="ddpm", steps="250", cfg_scale=4.0, engine="buckets"))
  result = sampler.generate(labels, key)           # per batch; each batch size compiles once
  result = generate(model, labels, key, options)   # one batch: Sampler(model, options).generate(...)
  result.samples            (N, H, W, C) float32 in model space ([-1, 1] pixels, or latents)
  result.flops_ratio        official block-MACs ratio averaged over every model call of the chain

Engines (`SampleOptions.engine`): "masked" runs the model's own eval forward (masks multiplied into
dense compute, as the official code samples; any DiT or DyDiT); "buckets" / "segments" run a DyDiT
through the fast engine (`dydit_jax.engine`), which computes only the open heads, groups and routed
tokens, and samples the same images up to float rounding. Every engine runs as the same chain
(`diffusion.samplers.run_chain`, one `lax.scan` per piece of the chain: one piece, or one per segment)
and reports the same statistics: per step and layer the fractions of open heads, MLP groups and
routed tokens (CFG's conditional and unconditional rows both counted, as both are computed), the
official block-MACs ratio and the whole-forward MACs per row. For a plain DiT all of that is 1.

Why an object: building an engine (width plan, compute copy of the weights) and compiling a chain
are costly at full size (docs/benchmarks.md), and a loop over batches (e.g. 50k samples for FID)
pays them once. The compiled programs are cached per batch size on the instance (`traces` counts the traces).

Where a batch runs is decided in one place (`Sampler._mesh`): with several local devices that divide
the batch and a model held whole on one device (a loaded or converted model), the images are split
over the devices (`jax.shard_map`, weights replicated once); a model whose weights are already
sharded over devices (the trainer's FSDP state) runs as one program under its shardings. Image i's
noise depends on (key, i) only (`row_noise`), so every split samples the same images.

No clu / TensorFlow import on this path.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dydit_jax.diffusion import create_diffusion, guided, row_noise, run_chain, sampling_timesteps
from dydit_jax.diffusion.samplers import SAMPLERS, piece_positions
from dydit_jax.engine import DynamicEngine, EngineOptions, SegmentEngine, WidthPlan
from dydit_jax.engine.engine import EngineBase
from dydit_jax.errors import UserError
from dydit_jax.models import DiT, ModelConfig
from dydit_jax.models.flops import dense_macs, fraction_macs, fraction_ratio, mask_fractions

ENGINES = ("masked", "buckets", "segments")


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """sampler "ddpm" | "ddim"; steps: respacing of the 1000-step chain ("250", "50", "ddim50");
  cfg_scale: guidance scale, 1 = none (no doubled batch); eta: DDIM noise (0 = deterministic);
  engine: one of ENGINES (module docstring); segments: ranges of steps of the segment engine.
  """

  sampler: str = "ddpm"
  steps: str = "250"
  cfg_scale: float = 4.0
  eta: float = 0.0
  engine: str = "masked"
  segments: int = 8

  def __post_init__(self):
    if self.sampler not in SAMPLERS:
      raise UserError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
    if self.engine not in ENGINES:
      raise UserError(f"engine must be one of {ENGINES}, got {self.engine!r}")

  @property
  def guidance(self) -> float | None:
    """The CFG scale, or None without guidance (scale 1: no doubled batch)."""
    return None if self.cfg_scale == 1.0 else self.cfg_scale


class SampleResult(NamedTuple):
  samples: np.ndarray        # (N, H, W, C) float32, model space
  timesteps: np.ndarray      # (S,) original-chain t of each executed step, sampling order
  head: np.ndarray           # (S, L) fraction of open heads per layer
  group: np.ndarray          # (S, L) fraction of open MLP groups
  token: np.ndarray          # (S, L) fraction of tokens routed through the MLP (mean over the call's rows)
  ratio: np.ndarray          # (S,) block-MACs ratio, mean over the call's rows
  macs: np.ndarray           # (S,) MACs of one forward of one row (flops.dydit_macs), mean over rows
  dense_macs: int            # the same forward with every unit open (flops.dense_macs)
  kept: np.ndarray           # (S, L, rows) MLP-routed tokens of every row of every call ([cond; uncond])

  @property
  def flops_ratio(self) -> float:
    """Official block-MACs ratio over the whole run (every step and row weighs the same)."""
    return float(np.mean(self.ratio))

  @property
  def macs_ratio(self) -> float:
    """Whole-forward MACs (embedders, adaLN, final layer included) relative to the dense model."""
    return float(np.mean(self.macs) / self.dense_macs)


def build_engine(model: DiT, options: SampleOptions, timesteps: np.ndarray) -> EngineBase:
  """The fast engine `options.engine` names for a DyDiT, planned at `timesteps`, computing in the
  model's dtype and attention implementation."""
  if not model.config.dynamic:
    raise UserError(f"engine {options.engine!r} needs a DyDiT; a plain DiT samples with engine 'masked'")
  plan = WidthPlan.from_model(model, timesteps)
  engine_options = EngineOptions(dtype=model.config.dtype, attention_impl=model.config.attention_impl)
  if options.engine == "segments":
    return SegmentEngine(model, plan, engine_options, num_segments=options.segments)
  return DynamicEngine(model, plan, engine_options)


class Sampler:
  """Samples one image per label with `options`; see the module docstring.

  engine: a prebuilt engine (e.g. with tuned `EngineOptions`) instead of the one `options.engine`
    names; its plan must cover this chain's timesteps.
  positions: run only these sampling-order positions of the chain (0 = the noisiest step), each with
    its true timestep and coefficients. For timing on a budget: the samples are then not images.
  """

  def __init__(self, model: DiT, options: SampleOptions = SampleOptions(), *, engine: EngineBase | None = None,
               positions: Sequence[int] | None = None):
    self.config: ModelConfig = model.config
    self.options = options
    self.diffusion = create_diffusion(options.steps, learn_sigma=self.config.learn_sigma,
                                      prediction=self.config.prediction)
    chain = sampling_timesteps(self.diffusion)
    self.positions = np.arange(len(chain)) if positions is None else np.unique(np.asarray(positions, np.int32))
    if self.positions.min() < 0 or self.positions.max() >= len(chain):
      raise UserError(f"positions must lie in [0, {len(chain)}) for a {options.steps!r} chain")
    self.timesteps = chain[self.positions]
    if options.engine == "masked":
      if engine is not None:
        raise UserError("a prebuilt engine needs SampleOptions.engine 'buckets' or 'segments'")
      self.engine = None
      self.graphdef, self.arrays = nnx.split(model)
    else:
      self.engine = engine or build_engine(model, options, chain)
      if not np.array_equal(self.engine.plan.timesteps, chain):
        raise UserError("the engine's width plan was made for another chain than SampleOptions.steps")
      self.arrays = self.engine.arrays
    self.traces = 0
    self._programs: dict[int, list] = {}
    self._replicated = None

  # The model's pieces of the chain ----------------------------------------------------------------
  def _pieces(self, arrays):
    """[(plan rows, forward(x, t, y, row) -> (out, aux))]: aux holds "kept" (L, rows) routed tokens,
    and for the masked model also the open head / group fractions per layer."""
    if self.engine is not None:
      return [(rows, lambda x, t, y, row, f=f: (lambda out, kept: (out, {"kept": kept}))(*f(x, t, y, row)))
              for rows, f in self.engine.forwards(arrays)]

    def masked(x, t, y, row):
      del row
      model = nnx.merge(self.graphdef, arrays)
      cfg = self.config
      if not cfg.dynamic:   # everything open: no masks to record (the dense baseline stays dense)
        ones = jnp.ones((cfg.depth,), jnp.float32)
        return model(x, t, y), {"head": ones, "group": ones,
                                "kept": jnp.full((cfg.depth, x.shape[0]), cfg.num_tokens, jnp.int32)}
      out, masks = model(x, t, y, return_masks=True)
      heads, groups, _ = mask_fractions(masks)          # (rows, L); equal over rows: t is shared
      kept = jnp.sum(masks["token"] > 0.5, axis=-1, dtype=jnp.int32).T
      return out, {"head": heads.mean(0), "group": groups.mean(0), "kept": kept}

    return [(np.arange(self.diffusion.num_timesteps), masked)]

  # Placement --------------------------------------------------------------------------------------
  def _mesh(self, num_images: int) -> Mesh | None:
    """The local devices to split `num_images` over, or None to run as one program (module docstring)."""
    devices = jax.local_devices()
    held_whole = all(a.is_fully_addressable and (len(a.sharding.device_set) == 1 or a.sharding.is_fully_replicated)
                     for a in jax.tree.leaves(self.arrays) if isinstance(a, jax.Array))
    if len(devices) > 1 and num_images % len(devices) == 0 and held_whole:
      return Mesh(np.asarray(devices), ("data",))
    return None

  def _arrays_on(self, mesh: Mesh | None):
    if mesh is None:
      return self.arrays
    if self._replicated is None:   # replicated once, kept for every later batch
      self._replicated = jax.device_put(self.arrays, NamedSharding(mesh, P()))
    return self._replicated

  # Compilation ------------------------------------------------------------------------------------
  def _program(self, k: int, positions: np.ndarray, num_images: int, mesh: Mesh | None, first: bool):
    """Piece k of the chain as one function (arrays, x, labels, image_ids, key) -> (x, aux); the first
    piece draws x_T itself (x is None)."""
    cfg, options = self.config, self.options
    guidance = options.guidance

    def run(arrays, x, labels, image_ids, key):
      self.traces += 1
      noise_key, chain_key = jax.random.split(key)
      rows = image_ids if guidance is None else jnp.concatenate([image_ids, num_images + image_ids])
      if first:
        x = row_noise(noise_key, rows, (cfg.input_size, cfg.input_size, cfg.in_channels))
      step = guided(self._pieces(arrays)[k][1], labels, cfg_scale=guidance, num_classes=cfg.num_classes)
      return run_chain(step, self.diffusion, x, chain_key, method=options.sampler, eta=options.eta,
                       positions=positions, row_ids=rows)

    if mesh is not None:
      aux_spec = {"kept": P(None, None, "data")}
      if self.engine is None:
        aux_spec.update(head=P(), group=P())
      run = jax.shard_map(run, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data"), P()),
                          out_specs=(P("data"), aux_spec), check_vma=False)
    return jax.jit(run)

  def _inputs(self, labels: np.ndarray, mesh: Mesh | None, first_id: int = 0):
    """(labels, image ids) as device arrays, split over `mesh` when there is one."""
    labels, ids = jnp.asarray(labels, jnp.int32), first_id + jnp.arange(len(labels), dtype=jnp.int32)
    if mesh is not None:
      labels, ids = jax.device_put((labels, ids), NamedSharding(mesh, P("data")))
    return labels, ids

  def compile(self, num_images: int) -> float:
    """Compiles the chain for batches of `num_images` (every piece, in parallel threads: XLA releases
    the GIL); returns the wall seconds, 0 when already compiled."""
    if num_images in self._programs:
      return 0.0
    start = time.perf_counter()
    mesh = self._mesh(num_images)
    arrays = self._arrays_on(mesh)
    labels, ids = self._inputs(np.zeros(num_images, np.int32), mesh)
    key = jax.random.PRNGKey(0)
    cfg = self.config
    rows = num_images * (1 if self.options.guidance is None else 2)
    x = jax.ShapeDtypeStruct((rows, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32,
                             sharding=None if mesh is None else NamedSharding(mesh, P("data")))
    owned = piece_positions(self._pieces(arrays), self.positions)
    jobs = [(k, own) for k, own in enumerate(owned) if own.size]

    def build(job):
      k, own = job
      first = k == jobs[0][0]
      return self._program(k, own, num_images, mesh, first).lower(
          arrays, None if first else x, labels, ids, key).compile()

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(jobs))) as pool:
      self._programs[num_images] = (mesh, list(pool.map(build, jobs)))
    return time.perf_counter() - start

  # Sampling ---------------------------------------------------------------------------------------
  def update(self, model: DiT) -> None:
    """Samples with `model`'s weights from now on, keeping the compiled programs (masked engine only:
    an engine's plan and compute copy come from the weights). The trainer's periodic samples use it."""
    if self.engine is not None:
      raise UserError("update() swaps weights of the masked model; build a new Sampler for an engine")
    graphdef, self.arrays = nnx.split(model)
    if graphdef != self.graphdef:
      raise UserError("update() needs a model of the same structure as the one the Sampler was built for")
    self._replicated = None

  def generate(self, labels: Sequence[int], key: jax.Array, *, first_id: int = 0) -> SampleResult:
    """One image per label (eval mode: deterministic gates) and the chain's statistics.

    first_id: the id of labels[0] in a longer run (image j draws its noise from (key, first_id + j)),
    so a run cut into batches samples what one batch of all its images would (`dydit_jax.fid_sampling`).
    """
    labels = np.asarray(labels, np.int32).reshape(-1)
    if labels.size == 0 or labels.min() < 0 or labels.max() >= self.config.num_classes:
      raise UserError(f"labels must lie in [0, {self.config.num_classes}), got {labels.tolist()}")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.key_data(key)
    num = len(labels)
    self.compile(num)
    mesh, programs = self._programs[num]
    arrays = self._arrays_on(mesh)
    device_labels, ids = self._inputs(labels, mesh, first_id)
    x, auxes = None, []
    for program in programs:
      x, aux = program(arrays, x, device_labels, ids, key)
      auxes.append(aux)
    # FSDP-sharded params over several hosts may leave outputs spanning hosts: gather them.
    gather = lambda a: a if a.is_fully_addressable else multihost_utils.process_allgather(a, tiled=True)
    x, auxes = jax.device_get(jax.tree.map(gather, (x, auxes)))
    aux = jax.tree.map(lambda *a: np.concatenate(a), *auxes)
    parts = 1 if mesh is None else mesh.size
    samples = _global_rows(np.asarray(x), parts, self.options.guidance is not None, axis=0)[:num]
    kept = _global_rows(np.asarray(aux["kept"], np.int64), parts, self.options.guidance is not None, axis=-1)
    if self.engine is None:
      head, group = aux["head"], aux["group"]
    else:
      rows = self.positions
      head = self.engine.plan.head_counts[rows] / self.config.num_heads
      group = self.engine.plan.group_counts[rows] / self.config.num_heads
    return _result(self.config, samples, self.timesteps, head, group, kept)


def _global_rows(a: np.ndarray, parts: int, guided_rows: bool, axis: int) -> np.ndarray:
  """Rows gathered from `parts` devices, each holding [cond; uncond] of its own images, reordered to
  the global [cond of all images; uncond of all images]."""
  if parts == 1 or not guided_rows:
    return a
  a = np.moveaxis(a, axis, 0)
  a = a.reshape((parts, 2, -1) + a.shape[1:]).swapaxes(0, 1).reshape(a.shape)
  return np.moveaxis(a, 0, axis)


def _result(cfg: ModelConfig, samples, timesteps, head, group, kept) -> SampleResult:
  """The statistics of a run from open head / group fractions (S, L) and routed tokens (S, L, rows)."""
  head, group = np.asarray(head, np.float64), np.asarray(group, np.float64)
  k = kept / cfg.num_tokens
  ratio = fraction_ratio(cfg, head[..., None], group[..., None], k, axis=1)           # (S, rows)
  macs = fraction_macs(cfg, head[..., None], group[..., None], k, axis=1)
  return SampleResult(np.asarray(samples, np.float32), np.asarray(timesteps), head, group, k.mean(-1),
                      ratio.mean(-1), macs.mean(-1), dense_macs(cfg), kept)


def generate(model: DiT, labels: Sequence[int], key: jax.Array, options: SampleOptions = SampleOptions()
             ) -> SampleResult:
  """One batch: `Sampler(model, options).generate(labels, key)` (loops over batches keep a Sampler)."""
  return Sampler(model, options).generate(labels, key)


def class_labels(classes: Sequence[int], per_class: int) -> np.ndarray:
  """[c0]*per_class + [c1]*per_class + ...: a grid with one row per class when ncols = per_class."""
  return np.repeat(np.asarray(classes, np.int32), per_class)
