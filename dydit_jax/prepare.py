"""Prepare the trainer's latents: images -> SD VAE -> array_record shards + metadata.json.

  python -m dydit_jax.prepare --vae VAE_DIR --manual_dir IMAGENET_TARS_DIR --out_dir OUT [--image_size 256]
  python -m dydit_jax.prepare --vae VAE_DIR --image_folder ROOT --out_dir OUT     # ROOT/CLASS/IMAGE.JPEG

--vae is a VAE directory from `python -m dydit_jax.vae.convert` (stabilityai/sd-vae-ft-ema for DiT).
Images come either from tfds `imagenet2012` built from the manual download (ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar) or from an ImageFolder tree (sorted class folders -> ids 0..K-1, recorded as
metadata["class_names"]). Each image gets DiT's ADM center crop and a frozen random flip, then the
VAE's posterior is stored: mean and std by default (the trainer samples it at every visit, as DiT
does), or one frozen sample (--latents=sample, fast-DiT's format). See dydit_jax.data.imagenet.

The run is resumable: shards are written whole, one at a time, under a temporary name; rerunning the
same command after an interruption (or after --max_shards) encodes only the missing shards, with
the same bytes as one uninterrupted run. On several hosts (DYDIT_COORDINATOR / DYDIT_NUM_PROCESSES /
DYDIT_PROCESS_ID, or a detected cluster) host h encodes shards h, h+P, ... and host 0 writes
metadata.json at the end (dydit_jax.data.encode). Progress (images/s, ETA) is logged every
--log_every batches.

Bad input (no or wrong VAE, a missing folder, an unreadable image) is one `error: ...` line on stderr
and exit status 1 (dydit_jax.cli); no partial shard is left behind.
"""
from __future__ import annotations

import json

from absl import flags

from dydit_jax import cli
from dydit_jax.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("vae", None, "VAE directory (python -m dydit_jax.vae.convert) that encodes the images")
  flags.DEFINE_string("manual_dir", None, "folder with the ImageNet tar files (tfds manual download)")
  flags.DEFINE_string("image_folder", None, "ImageFolder tree ROOT/CLASS/IMAGE (.JPEG .jpg .jpeg .png)")
  flags.DEFINE_string("out_dir", None, "folder for the latent shards (new, or an unfinished one to resume)",
                      required=True)
  flags.DEFINE_integer("image_size", 256, "pixel side after the center crop (DiT: 256 or 512)")
  flags.DEFINE_integer("num_shards", 64, "array_record files to write")
  flags.DEFINE_enum("latents", "posterior", ["posterior", "sample"], "store the posterior mean and std "
                    "(sampled by the trainer at every visit) or one frozen sample per image")
  flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "latent storage dtype")
  flags.DEFINE_bool("flip", True, "freeze a random horizontal flip into each image (p = 0.5)")
  flags.DEFINE_integer("seed", 0, "seed of the flips (and of the frozen samples)")
  flags.DEFINE_string("split", "train", "tfds split, e.g. train or train[:1%] (--manual_dir only)")
  flags.DEFINE_string("data_dir", None, "where tfds builds imagenet2012 (--manual_dir only)")
  flags.DEFINE_integer("num_classes", None, "check: the number of class folders (--image_folder only)")
  flags.DEFINE_integer("batch_size", 64, "images per VAE call (one compile; split over local devices)")
  flags.DEFINE_integer("num_workers", 8, "threads decoding and cropping images")
  flags.DEFINE_integer("max_shards", 0, "encode at most this many shards in this run, 0 = all (rerun continues)")
  flags.DEFINE_integer("log_every", 100, "batches between progress lines")


def main(argv):
  del argv  # positional words: refused by cli.guarded
  from dydit_jax.data import imagenet  # pylint: disable=g-import-not-at-top
  from dydit_jax.train.sharding import initialize_distributed  # pylint: disable=g-import-not-at-top
  if bool(FLAGS.manual_dir) == bool(FLAGS.image_folder):
    raise UserError("pass exactly one image source: --manual_dir (tfds imagenet2012) or --image_folder")
  if not FLAGS.vae:
    raise UserError(imagenet.no_vae_message())
  initialize_distributed()
  encoder, scale, facts = imagenet.vae_encoder(FLAGS.vae, FLAGS.image_size, FLAGS.batch_size)
  options = dict(num_shards=FLAGS.num_shards, content=FLAGS.latents, dtype=FLAGS.dtype, flip=FLAGS.flip,
                 seed=FLAGS.seed, scale=scale, batch_size=FLAGS.batch_size, num_workers=FLAGS.num_workers,
                 max_shards=FLAGS.max_shards, log_every=FLAGS.log_every, extra_metadata=facts)
  if FLAGS.image_folder:
    metadata = imagenet.prepare_image_folder(FLAGS.image_folder, FLAGS.out_dir, FLAGS.image_size, encoder.encode,
                                             num_classes=FLAGS.num_classes, **options)
  else:
    metadata = imagenet.prepare_imagenet(FLAGS.manual_dir, FLAGS.out_dir, FLAGS.image_size, encoder.encode,
                                         FLAGS.split, data_dir=FLAGS.data_dir, **options)
  if metadata is None:
    print(f"{FLAGS.out_dir}: stopped after --max_shards={FLAGS.max_shards}; rerun the same command to continue")
  else:
    print(json.dumps({k: v for k, v in metadata.items() if k not in ("shards", "class_names")}, indent=2))


if __name__ == "__main__":
  cli.run(main, define_flags)
