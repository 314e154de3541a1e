"""ImageNet -> VAE latent shards, the fast-DiT way (encode once, train on latents).

Pixels are prepared exactly as DiT's `train.py` prepares them: PIL decode, RGB,
ADM center crop (`center_crop_arr`), optional horizontal flip, scale to [-1, 1]. The VAE
encoder then maps them to latents, which are multiplied by 0.18215 and written with
`LatentShardWriter`. Like fast-DiT's `extract_features.py`, each image is encoded ONCE,
so its flip (p = 0.5, drawn from `seed` in dataset order) and its VAE posterior sample are
frozen for all epochs; the training reader applies no further augmentation.

The JPEG bytes stored by tfds are decoded with PIL (tfds `SkipDecoding`), not TensorFlow,
so pixels match the PyTorch ImageFolder pipeline bit for bit (except the 23 files tfds
re-encodes: 22 CMYK JPEGs and one PNG). tfds' imagenet2012 labels follow the sorted
WordNet ids, the same class indices as torchvision's ImageFolder used by DiT. tfds
shuffles the example order when it builds its TFRecords; the order of the latents is
that fixed order.
"""
from __future__ import annotations

import concurrent.futures
import io
import itertools
import logging
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image

from dydit_jax.data.latents import LatentShardWriter, read_metadata
from dydit_jax.errors import UserError

LATENT_SCALE = 0.18215          # SD VAE latent scale used by DiT (multiply after encode)
IMAGENET_CLASSES = 1000

# images (B, S, S, 3) float32 in [-1, 1], NHWC -> unscaled latents (B, S/8, S/8, 4).
Encoder = Callable[[np.ndarray], Any]

NO_ENCODER_MESSAGE = (
    "prepare_imagenet needs a VAE encoder, and dydit_jax does not ship its VAE yet. Pass "
    "encoder=fn where fn maps images (B, S, S, 3) float32 in [-1, 1] (NHWC) to UNSCALED "
    "latents (B, S/8, S/8, 4), e.g. a wrapper that returns the posterior sample of the "
    "stabilityai/sd-vae-ft-ema AutoencoderKL; prepare_imagenet multiplies by 0.18215.")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
  """ADM/DiT center crop of a PIL image to a (image_size, image_size, C) uint8 array.

  While the short side is at least twice the target, halve the image with a BOX filter
  (cheap anti-aliasing); then BICUBIC-resize so the short side equals `image_size`
  (each side rounded); then cut the centred square at offsets ((H-s)//2, (W-s)//2).
  """
  image = pil_image
  while min(image.size) >= 2 * image_size:
    image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
  ratio = image_size / min(image.size)
  image = image.resize((round(image.width * ratio), round(image.height * ratio)),
                       resample=Image.BICUBIC)
  pixels = np.asarray(image)
  top = (pixels.shape[0] - image_size) // 2
  left = (pixels.shape[1] - image_size) // 2
  return pixels[top:top + image_size, left:left + image_size]


def preprocess_image(encoded: bytes, image_size: int, flip: bool) -> np.ndarray:
  """Encoded image file -> (S, S, 3) float32 in [-1, 1], as DiT's transform does it."""
  with Image.open(io.BytesIO(encoded)) as image:
    pixels = center_crop_arr(image.convert("RGB"), image_size)
  if flip:
    pixels = pixels[:, ::-1]
  return pixels.astype(np.float32) / 127.5 - 1.0


def encode_to_shards(examples: Iterable[tuple[bytes, int]], out_dir: str, encoder: Encoder, *,
                     image_size: int, num_shards: int, flip: bool = True, seed: int = 0,
                     batch_size: int = 64, num_workers: int = 8,
                     num_classes: int = IMAGENET_CLASSES, dtype: str = "float32",
                     extra_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
  """Preprocesses, encodes and writes (encoded image bytes, label) pairs; returns metadata.

  Every encoder call sees exactly `batch_size` images (the last batch is zero-padded and
  the padding discarded), so a jitted encoder compiles once.
  """
  flip_rng = np.random.default_rng(seed)
  extra = {"flip": flip, "seed": seed, **(extra_metadata or {})}
  examples = iter(examples)
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool, LatentShardWriter(
      out_dir, num_shards, num_classes=num_classes, image_size=image_size,
      scale=LATENT_SCALE, dtype=dtype, extra_metadata=extra) as writer:
    for step in itertools.count():
      chunk = list(itertools.islice(examples, batch_size))
      if not chunk:
        break
      encoded, labels = zip(*chunk)
      flips = flip_rng.random(len(chunk)) < 0.5 if flip else np.zeros(len(chunk), bool)
      # PIL releases the GIL while decoding and resizing, so threads scale here.
      images = np.stack(list(pool.map(preprocess_image, encoded,
                                      itertools.repeat(image_size), flips)))
      padded = np.zeros((batch_size, *images.shape[1:]), np.float32)
      padded[:len(images)] = images
      latents = np.asarray(encoder(padded), np.float32)[:len(images)]
      writer.write(latents * LATENT_SCALE, np.asarray(labels))
      if step % 100 == 0:
        logging.info("Encoded %d images into %s", writer.count, out_dir)
  return read_metadata(out_dir)


def prepare_imagenet(manual_dir: str, out_dir: str, image_size: int = 256,
                     encoder: Encoder | None = None, num_shards: int = 64, split: str = "train",
                     flip: bool = True, *, data_dir: str | None = None, batch_size: int = 64,
                     seed: int = 0, num_workers: int = 8,
                     dtype: str = "float32") -> dict[str, Any]:
  """Encodes tfds `imagenet2012` (from a manual download) into latent shards.

  Args:
    manual_dir: folder holding ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar.
    out_dir: new folder for the shards and metadata.json.
    image_size: 256 or 512 (latents 32x32x4 or 64x64x4).
    encoder: the VAE encoder, see `Encoder`; required.
    num_shards: array_record files to write.
    split: tfds split ("train", "validation", or a slice like "train[:1%]").
    flip: freeze a random horizontal flip (p = 0.5) into each latent, as fast-DiT does.
    data_dir: where tfds builds its TFRecords (default ~/tensorflow_datasets).
    batch_size: images per encoder call.
    seed: seed of the flips.
    num_workers: threads decoding and cropping JPEGs.
    dtype: latent storage dtype ("float32" or "float16").

  Returns:
    The metadata written to out_dir/metadata.json.
  """
  if encoder is None:
    raise UserError(NO_ENCODER_MESSAGE)
  if image_size not in (256, 512):
    raise UserError(f"image_size must be 256 or 512 (the DiT resolutions), got {image_size}.")
  import tensorflow as tf               # Lazy: TensorFlow is only needed to prepare data.
  import tensorflow_datasets as tfds
  tf.config.set_visible_devices([], "GPU")   # Leave the accelerator to the encoder.
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  dataset = builder.as_dataset(split=split, shuffle_files=False,
                               decoders={"image": tfds.decode.SkipDecoding()})
  examples = ((e["image"], int(e["label"])) for e in tfds.as_numpy(dataset))
  return encode_to_shards(examples, out_dir, encoder, image_size=image_size,
                          num_shards=num_shards, flip=flip, seed=seed, batch_size=batch_size,
                          num_workers=num_workers, dtype=dtype,
                          extra_metadata={"source": "tfds imagenet2012", "split": split})
