"""Sample a PNG grid from a converted model directory or a training workdir (its EMA weights).

  python -m dydit_jax.sample --model=WORKDIR_OR_MODEL_DIR --classes=207,360,387,974 --per_class=4 \
      --sampler=ddpm --steps=250 --cfg_scale=4.0 --out=grid.png [--engine=buckets --dtype=bfloat16] \
      [--vae=VAE_DIR]

One row per class. A latent model (4 channels, e.g. every ImageNet DiT) needs --vae, a VAE directory
from `python -m dydit_jax.vae.convert`: its samples are decoded in jitted batches split over the local
devices (`dydit_jax.vae.batched.decode_to_images`, DiT's uint8 mapping); a pixel model takes no VAE.
Both mistakes stop the tool before any sampling. A .json next to the PNG records the options and the
measured block-MACs ratio of the run. The sampling itself is `dydit_jax.sampler.Sampler` (library
users call it directly).

With --out=FILE.npz it samples --num_samples images for FID instead: labels uniform over the classes,
written in chunks of --chunk images that an interrupted run resumes (rerun the same command), then
assembled into ADM's format (`arr_0` uint8 NHWC) with a .json summary (MACs ratio, images/s) next to
it (`dydit_jax.fid_sampling`). Several hosts (DYDIT_COORDINATOR / DYDIT_NUM_PROCESSES /
DYDIT_PROCESS_ID, or a Cloud TPU slice) split the chunks between them:

  python -m dydit_jax.sample --model=MODEL_DIR --vae=VAE_DIR --num_samples=50000 --chunk=256 \
      --sampler=ddpm --steps=250 --cfg_scale=1.5 --out=samples.npz [--engine=buckets]
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
from absl import flags, logging

from dydit_jax import checkpoints, cli, fid_sampling, images
from dydit_jax.models.compute import compute_model
from dydit_jax.sampler import ENGINES, SampleOptions, Sampler, class_labels
from dydit_jax.vae.batched import BatchedVAE
from dydit_jax.vae.checkpoints import fingerprint, vae_for_model

FLAGS = flags.FLAGS


def define_flags():
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
  flags.DEFINE_string("vae", None, "VAE directory (python -m dydit_jax.vae.convert) decoding a latent model's samples")
  flags.DEFINE_integer("decode_batch", 16, "latents per VAE decode call (one compile; split over local devices)")
  flags.DEFINE_string("out", "samples.png", "PNG grid to write, or FILE.npz for --num_samples FID samples; a .json "
                      "with the FLOPs statistics goes next to it")
  flags.DEFINE_integer("num_samples", None, "with --out=FILE.npz: the number of samples (labels uniform)")
  flags.DEFINE_integer("chunk", 256, "with --out=FILE.npz: images per sampler call and per resumable chunk file "
                       "(a multiple of the local device count splits each call over the devices)")


def main(argv):
  del argv  # positional words: refused by cli.guarded
  fid = FLAGS.out.endswith(".npz")
  if fid != (FLAGS.num_samples is not None):
    raise cli.UserError("--num_samples and --out=FILE.npz go together (FID samples); a PNG grid takes "
                        "--classes and --per_class")
  if fid and (FLAGS["classes"].present or FLAGS["per_class"].present):
    raise cli.UserError("--classes / --per_class make a grid; FID samples draw their labels uniformly")
  labels = class_labels([_class_id(c) for c in FLAGS.classes], FLAGS.per_class)
  options = SampleOptions(sampler=FLAGS.sampler, steps=FLAGS.steps, cfg_scale=FLAGS.cfg_scale,
                          engine=FLAGS.engine, segments=FLAGS.segments)
  if FLAGS.decode_batch <= 0:
    raise cli.UserError(f"--decode_batch must be positive, got {FLAGS.decode_batch}")
  if fid:   # the refusals that need no model (bad sizes, an existing output) before loading one
    fid_sampling.check_output(FLAGS.out, FLAGS.num_samples, FLAGS.chunk)
    from dydit_jax.train.sharding import initialize_distributed  # pylint: disable=g-import-not-at-top
    initialize_distributed()   # hosts split the chunks (DYDIT_COORDINATOR ..., or JAX's cluster detection)
  model = checkpoints.load_model(FLAGS.model, step=FLAGS.step, use_ema=FLAGS.ema)
  if FLAGS.dtype or FLAGS.attention or FLAGS.residual_dtype:
    model = compute_model(model, FLAGS.dtype or model.config.dtype, FLAGS.attention, FLAGS.residual_dtype)
  vae = vae_for_model(FLAGS.model, model.config.in_channels, FLAGS.vae)   # before any sampling work
  if fid:
    return _fid(model, vae, options)
  result = Sampler(model, options).generate(labels, jax.random.PRNGKey(FLAGS.seed))
  decoder = None if vae is None else BatchedVAE(vae, max(1, min(FLAGS.decode_batch, len(labels))))
  path = images.save_grid(fid_sampling.to_images(result.samples, decoder), FLAGS.out, ncols=FLAGS.per_class)
  stats = {"vae": FLAGS.vae, "flops_ratio": result.flops_ratio, "options": dataclasses.asdict(options),
           "labels": labels.tolist(), "dynamic": model.config.dynamic,
           "numerics": {"dtype": model.config.dtype, "residual_dtype": model.config.residual_dtype,
                        "attention": model.config.attention_impl}}
  path.with_suffix(".json").write_text(json.dumps(stats, indent=2))
  logging.info("wrote %s (block-MACs ratio over the run %.4f)", path, result.flops_ratio)
  print(f"{path}  flops_ratio={result.flops_ratio:.4f}")


def _fid(model, vae, options: SampleOptions) -> None:
  """--num_samples for FID into --out=FILE.npz (module docstring)."""
  sampler = Sampler(model, options)
  latent = vae is not None
  sources = {"model": os.path.abspath(FLAGS.model), "step": FLAGS.step, "ema": FLAGS.ema,
             "vae": os.path.abspath(FLAGS.vae) if latent else None}
  plan = fid_sampling.run_plan(num_samples=FLAGS.num_samples, chunk=FLAGS.chunk, seed=FLAGS.seed, sampler=sampler,
                               model_id=fingerprint(model), vae_id=fingerprint(vae) if latent else None,
                               decode_batch=FLAGS.decode_batch if latent else None, sources=sources)
  fid_sampling.check_run(FLAGS.out, plan)          # a run with other settings: refused before sampling
  decoder = BatchedVAE(vae, FLAGS.decode_batch) if latent else None
  summary = fid_sampling.sample_run(sampler, FLAGS.out, plan, decoder=decoder)
  print(f"{FLAGS.out}  {summary['num_samples']} samples  flops_ratio={summary['flops_ratio']:.4f}  "
        f"images/s={summary['images_per_s']:.2f}")


def _class_id(text: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise cli.UserError(f"--classes takes integer class ids, got {text!r}") from None


if __name__ == "__main__":
  cli.run(main, define_flags)
