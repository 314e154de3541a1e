"""Class-conditional samples from a DiT / DyDiT: DDPM or DDIM, classifier-free guidance, PNG grids.

Library (what the trainer and the demo use):

  result = generate(model, labels, key, SampleOptions(sampler="ddpm", steps="250", cfg_scale=4.0))
  result.samples            (N, H, W, C) float32 in model space ([-1, 1] pixels, or latents)
  result.flops_ratio        official block-MACs ratio averaged over every model call of the chain
  save_grid(to_uint8(result.samples), "grid.png", ncols=8)

The whole chain is one jitted `lax.scan` (dydit_jax.engine.sampling.sample) over the model's split
state, and every call runs the model in eval mode with `return_masks=True`: per step it records the
fraction of open heads, MLP groups and MLP-routed tokens per layer (mean over the rows of the call,
CFG's conditional and unconditional rows both counted, as both are computed) and the per-row ratio
of `dydit_jax.models.flops.macs_ratio`. For a plain DiT all of that is 1.

CLI (a converted model directory or a training workdir, whose EMA weights are used):

  python -m dydit_jax.sample --model=WORKDIR_OR_MODEL_DIR --classes=207,360,387,974 --per_class=4 \
      --sampler=ddpm --steps=250 --cfg_scale=4.0 --out=grid.png [--engine=buckets --dtype=bfloat16]

`--engine=buckets|segments` samples a DyDiT through the fast engine (`dydit_jax.engine`; single host);
the statistics then come from the width plan and the routed-token counts, and equal the masked
path's. Many batches through the engine: `EngineSampler(model, options).generate(labels, key)` per
batch plans and compiles once.

This module never imports clu / TensorFlow.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from PIL import Image

from dydit_jax import checkpoints
from dydit_jax.diffusion import create_diffusion
from dydit_jax.diffusion.samplers import SAMPLERS, row_noise, sampling_timesteps
from dydit_jax.engine import DynamicEngine, EngineOptions, SegmentEngine, WidthPlan, compute_model
from dydit_jax.engine.sampling import guided, sample, sample_pieces
from dydit_jax.models import DiT
from dydit_jax.models.flops import dense_macs, dydit_macs, fraction_ratio, macs_ratio, mask_fractions


ENGINES = ("masked", "buckets", "segments")


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """sampler "ddpm" | "ddim"; steps: respacing of the 1000-step chain ("250", "50", "ddim50");
  cfg_scale: guidance scale, 1 = none (no doubled batch); eta: DDIM noise (0 = deterministic).

  engine: "masked" runs the model itself (the official eval forward: masks multiplied into dense
  compute; any DiT or DyDiT); "buckets" / "segments" run a DyDiT through the fast engine
  (`dydit_jax.engine`: only the open heads, groups and routed tokens are computed; same samples up to
  float rounding). segments: ranges of steps of the segment engine.
  """

  sampler: str = "ddpm"
  steps: str = "250"
  cfg_scale: float = 4.0
  eta: float = 0.0
  engine: str = "masked"
  segments: int = 8


class SampleResult(NamedTuple):
  samples: np.ndarray        # (N, H, W, C) float32, model space
  timesteps: np.ndarray      # (S,) original-chain t of each sampling step, sampling order
  head: np.ndarray           # (S, L) fraction of open heads per layer (mean over the call's rows)
  group: np.ndarray          # (S, L) fraction of open MLP groups
  token: np.ndarray          # (S, L) fraction of tokens routed through the MLP
  ratio: np.ndarray          # (S,) block-MACs ratio, mean over the call's rows
  macs: np.ndarray           # (S,) MACs of one forward of one row (flops.dydit_macs), mean over rows
  dense_macs: int            # the same forward with every unit open (flops.dense_macs)

  @property
  def flops_ratio(self) -> float:
    """Official block-MACs ratio over the whole run (every step and row weighs the same)."""
    return float(np.mean(self.ratio))

  @property
  def macs_ratio(self) -> float:
    """Whole-forward MACs (embedders, adaLN, final layer included) relative to the dense model."""
    return float(np.mean(self.macs) / self.dense_macs)


def _noise(key, labels, cfg, guidance, image_ids=None, num_images=None):
  """(x_T, chain key, row ids) for the images `image_ids` (default 0..n-1) of `num_images`.

  Image i's starting noise and its chain noise depend on (key, i) only (`row_noise`), so a batch split
  over devices samples what the whole batch samples. With CFG the rows are [cond; uncond] and the
  unconditional copy of image i is row num_images + i.
  """
  noise_key, chain_key = jax.random.split(key)
  ids = jnp.arange(labels.shape[0], dtype=jnp.int32) if image_ids is None else image_ids
  total = labels.shape[0] if num_images is None else num_images
  noise = row_noise(noise_key, ids, (cfg.input_size, cfg.input_size, cfg.in_channels))
  rows = ids
  if guidance is not None:
    noise, rows = jnp.concatenate([noise, noise], axis=0), jnp.concatenate([ids, total + ids])
  return noise, chain_key, rows


def _guidance(options: SampleOptions):
  return options.cfg_scale if options.cfg_scale != 1.0 else None


@functools.lru_cache(maxsize=16)
def _compiled(graphdef: nnx.GraphDef, learn_sigma: bool, options: SampleOptions):
  """The jitted masked chain for one model structure and option set (cached: compiled once per run)."""
  diffusion = create_diffusion(options.steps, learn_sigma=learn_sigma)
  guidance = _guidance(options)

  def run(state, labels, key):
    model = nnx.merge(graphdef, state)
    cfg = model.config

    def forward(x, t, y, row):
      out, masks = model(x, t, y, return_masks=True)
      h, g, k = mask_fractions(masks)
      return out, {"head": h.mean(0), "group": g.mean(0), "token": k.mean(0),
                   "ratio": macs_ratio(cfg, masks).mean(), "macs": dydit_macs(cfg, masks).mean()}

    step_forward = guided(forward, labels, cfg_scale=guidance, num_classes=cfg.num_classes)
    noise, chain_key, rows = _noise(key, labels, cfg, guidance)
    x, stats = sample(step_forward, diffusion, noise, chain_key, method=options.sampler, eta=options.eta,
                      row_ids=rows)
    return x[:labels.shape[0]], stats

  return jax.jit(run), sampling_timesteps(diffusion)


def _engine_stats(plan: WidthPlan, kept: np.ndarray) -> dict[str, np.ndarray]:
  """The masked path's statistics from the plan and the engine's routed-token counts (S, L, rows)."""
  cfg = plan.config
  h = plan.head_counts / cfg.num_heads
  g = plan.group_counts / cfg.num_heads
  k = kept / cfg.num_tokens                                                     # (S, L, rows)
  ratio = fraction_ratio(cfg, h[..., None], g[..., None], k, axis=1).mean(-1)
  return {"head": h, "group": g, "token": k.mean(-1), "ratio": ratio,
          "macs": plan.macs(kept).mean(-1)}


class EngineSampler:
  """A DyDiT sampled through the fast engine, planned and compiled once for any number of batches.

  Why an object: the width plan, the engine's compute copy of the weights and the compile of its
  chain cost seconds to a minute at full size (35 s for DiT-XL/2 on an H100), and a loop over batches
  (e.g. 50k samples for FID) should pay them once, not per batch as `generate(..., engine=...)` does.
  Each batch size compiles once; `traces` counts the compiles.

  With several local devices and a batch they divide, the images are split over them (data parallel,
  `jax.shard_map`): every device runs the whole chain on its images with the replicated engine arrays
  and compacts its own tokens, and the samples equal a one-device run (per-image noise).
  """

  def __init__(self, model: DiT, options: SampleOptions):
    cfg = model.config
    if not cfg.dynamic:
      raise ValueError(f"engine {options.engine!r} needs a DyDiT; a plain DiT samples with engine 'masked'")
    _check_options(options)
    if options.engine == "masked":
      raise ValueError(f"EngineSampler runs the engines {ENGINES[1:]}; 'masked' samples with generate()")
    self.config, self.options = cfg, options
    self.diffusion = create_diffusion(options.steps, learn_sigma=cfg.learn_sigma)
    self.timesteps = sampling_timesteps(self.diffusion)
    self.plan = WidthPlan.from_model(model, self.timesteps)
    engine_options = EngineOptions(dtype=cfg.dtype, attention_impl=cfg.attention_impl)
    self.engine = (SegmentEngine(model, self.plan, engine_options, num_segments=options.segments)
                   if options.engine == "segments" else DynamicEngine(model, self.plan, engine_options))
    self.traces = 0
    self._runs = {}

  def _run(self, total: int):
    """The jitted chain for batches of `total` images (built once per batch size)."""
    if total in self._runs:
      return self._runs[total]
    cfg, options, engine = self.config, self.options, self.engine
    guidance = _guidance(options)

    def run(arrays, labels, image_ids, key):
      self.traces += 1
      pieces = [(rows, guided(f, labels, cfg_scale=guidance, num_classes=cfg.num_classes))
                for rows, f in engine.forwards(arrays)]
      noise, chain_key, rows = _noise(key, labels, cfg, guidance, image_ids, total)
      x, kept = sample_pieces(pieces, self.diffusion, noise, chain_key, method=options.sampler,
                              eta=options.eta, row_ids=rows)
      return x[:labels.shape[0]], kept

    devices = jax.local_devices()
    if len(devices) > 1 and total % len(devices) == 0:
      mesh = Mesh(np.asarray(devices), ("data",))
      run = jax.shard_map(run, mesh=mesh, in_specs=(P(), P("data"), P("data"), P()),
                          out_specs=(P("data"), P(None, None, "data")), check_vma=False)
    self._runs[total] = jax.jit(run)
    return self._runs[total]

  def generate(self, labels: Sequence[int], key: jax.Array) -> SampleResult:
    """One image per label, as `generate(model, labels, key, options)` samples them."""
    labels = _checked_labels(labels, self.config)
    total = len(labels)
    samples, kept = jax.device_get(self._run(total)(self.engine.arrays, jnp.asarray(labels),
                                                    jnp.arange(total, dtype=jnp.int32), key))
    stats = _engine_stats(self.plan, np.asarray(kept, np.int64))
    return _result(samples, self.timesteps, stats, self.config)


def _check_options(options: SampleOptions):
  if options.sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {options.sampler!r}")
  if options.engine not in ENGINES:
    raise ValueError(f"engine must be one of {ENGINES}, got {options.engine!r}")


def _checked_labels(labels: Sequence[int], cfg) -> np.ndarray:
  labels = np.asarray(labels, np.int32)
  if labels.min() < 0 or labels.max() >= cfg.num_classes:
    raise ValueError(f"labels must lie in [0, {cfg.num_classes}), got {labels.tolist()}")
  return labels


def _result(samples, timesteps, stats, cfg) -> SampleResult:
  return SampleResult(np.asarray(samples, np.float32), timesteps,
                      *(np.asarray(stats[k]) for k in ("head", "group", "token", "ratio", "macs")),
                      dense_macs=dense_macs(cfg))


def generate(model: DiT, labels: Sequence[int], key: jax.Array, options: SampleOptions = SampleOptions()
             ) -> SampleResult:
  """Samples one image per label (eval mode: deterministic gates) and the chain's mask statistics.

  With an engine this plans and compiles per call; loops over batches use `EngineSampler`.
  """
  _check_options(options)
  if options.engine != "masked":
    return EngineSampler(model, options).generate(labels, key)
  labels = _checked_labels(labels, model.config)
  graphdef, state = nnx.split(model)
  run, timesteps = _compiled(graphdef, model.config.learn_sigma, options)
  # With FSDP-sharded params over several hosts the outputs may span hosts: gather them.
  out = jax.tree.map(lambda a: a if a.is_fully_addressable else multihost_utils.process_allgather(a, tiled=True),
                     run(state, labels, key))
  samples, stats = jax.device_get(out)
  return _result(samples, timesteps, stats, model.config)


def to_uint8(samples: np.ndarray) -> np.ndarray:
  """Pixel-space samples in [-1, 1] -> uint8 images (latents must be VAE-decoded first)."""
  if samples.shape[-1] not in (1, 3):
    raise ValueError(f"{samples.shape[-1]}-channel samples are latents: decode them with the VAE "
                     "before making images")
  return np.clip(np.round((np.asarray(samples) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int, pad: int = 2) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, ncols*(W+pad)+pad, C) image, row-major, black gaps."""
  n, h, w, c = images.shape
  rows = -(-n // ncols)
  grid = np.zeros((rows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.uint8)
  for i, image in enumerate(images):
    r, q = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = image
  return grid


def save_grid(images: np.ndarray, path, ncols: int) -> epath.Path:
  """Writes `make_grid(images, ncols)` as a PNG (local path or gs://)."""
  grid = make_grid(images, ncols)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(f, format="PNG")
  return path


def class_labels(classes: Sequence[int], per_class: int) -> np.ndarray:
  """[c0]*per_class + [c1]*per_class + ...: a grid with one row per class when ncols = per_class."""
  return np.repeat(np.asarray(classes, np.int32), per_class)


FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string("model", None, "training workdir or converted model directory", required=True)
  flags.DEFINE_integer("step", None, "workdir checkpoint step (default: the newest)")
  flags.DEFINE_bool("ema", True, "use the EMA weights of a workdir checkpoint")
  flags.DEFINE_list("classes", ["0", "1", "2", "3"], "class ids, one grid row each")
  flags.DEFINE_integer("per_class", 4, "samples per class (grid columns)")
  flags.DEFINE_enum("sampler", "ddpm", ["ddpm", "ddim"], "sampler")
  flags.DEFINE_string("steps", "250", "sampling steps (respacing string, e.g. 250 or ddim50)")
  flags.DEFINE_float("cfg_scale", 4.0, "classifier-free guidance scale (1 = off)")
  flags.DEFINE_integer("seed", 0, "sampling seed")
  flags.DEFINE_enum("engine", "masked", list(ENGINES), "masked: the model's own eval forward (any DiT / "
                    "DyDiT); buckets | segments: the fast DyDiT engine (computes only open units and "
                    "routed tokens)")
  flags.DEFINE_integer("segments", 8, "segment engine: ranges of steps")
  flags.DEFINE_string("dtype", None, "compute dtype, e.g. bfloat16 (default: the checkpoint's)")
  flags.DEFINE_enum("attention", None, ["xla", "cudnn"], "attention implementation (default: the checkpoint's)")
  flags.DEFINE_enum("residual_dtype", None, ["float32", "bfloat16"],
                    "residual stream between blocks (default: the checkpoint's, float32); bfloat16 is faster")
  flags.DEFINE_string("out", "samples.png", "PNG to write; a .json with the FLOPs statistics goes next to it")


def main(argv):
  try:
    run_cli(argv)
  except (ValueError, FileNotFoundError) as err:  # bad input: one line, not a traceback
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def run_cli(argv):
  del argv
  model = checkpoints.load_model(FLAGS.model, step=FLAGS.step, use_ema=FLAGS.ema)
  if FLAGS.dtype or FLAGS.attention or FLAGS.residual_dtype:
    attention = model.config.attention_impl if FLAGS.attention is None else \
        (None if FLAGS.attention == "xla" else FLAGS.attention)
    model = compute_model(model, FLAGS.dtype or model.config.dtype, attention, FLAGS.residual_dtype)
  labels = class_labels([int(c) for c in FLAGS.classes], FLAGS.per_class)
  options = SampleOptions(sampler=FLAGS.sampler, steps=FLAGS.steps, cfg_scale=FLAGS.cfg_scale,
                          engine=FLAGS.engine, segments=FLAGS.segments)
  result = generate(model, labels, jax.random.PRNGKey(FLAGS.seed), options)
  path = save_grid(to_uint8(result.samples), FLAGS.out, ncols=FLAGS.per_class)
  stats = {"flops_ratio": result.flops_ratio, "options": dataclasses.asdict(options),
           "labels": labels.tolist(), "dynamic": model.config.dynamic,
           "numerics": {"dtype": model.config.dtype, "residual_dtype": model.config.residual_dtype,
                        "attention": model.config.attention_impl or "xla"}}
  path.with_suffix(".json").write_text(json.dumps(stats, indent=2))
  logging.info("wrote %s (block-MACs ratio over the run %.4f)", path, result.flops_ratio)
  print(f"{path}  flops_ratio={result.flops_ratio:.4f}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
