"""Prepare ImageNet latents: `python -m dydit_jax.prepare --manual_dir DIR --out_dir OUT [--image_size 256]`.

Reads tfds `imagenet2012` from the user's manual-download folder (ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar), applies the ADM center crop and a frozen random flip, encodes with the SD VAE
and writes array_record latent shards plus metadata.json (`dydit_jax.data.imagenet`). The VAE is a
separate piece of work: until it lands, this command stops with one clear message before reading
anything. Library users can pass their own encoder to `dydit_jax.data.prepare_imagenet`.

Bad input is one `error: ...` line on stderr and exit status 1 (dydit_jax.cli).
"""
from __future__ import annotations

import json

from absl import flags

from dydit_jax import cli
from dydit_jax.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("manual_dir", None, "folder with the ImageNet tar files (tfds manual download)",
                      required=True)
  flags.DEFINE_string("out_dir", None, "new folder for the latent shards", required=True)
  flags.DEFINE_integer("image_size", 256, "256 or 512")
  flags.DEFINE_integer("num_shards", 64, "array_record files to write")
  flags.DEFINE_string("split", "train", "tfds split, e.g. train or train[:1%]")
  flags.DEFINE_bool("flip", True, "freeze a random horizontal flip into each latent (fast-DiT style)")


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {' '.join(argv[1:])!r} (flags are written --name=value)")
  from dydit_jax.data.imagenet import prepare_imagenet  # pylint: disable=g-import-not-at-top
  metadata = prepare_imagenet(FLAGS.manual_dir, FLAGS.out_dir, FLAGS.image_size, encoder=None,
                              num_shards=FLAGS.num_shards, split=FLAGS.split, flip=FLAGS.flip)
  print(json.dumps(metadata, indent=2))


if __name__ == "__main__":
  cli.run(main, define_flags)
