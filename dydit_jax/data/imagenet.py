"""ImageNet (or any ImageFolder) -> VAE latent shards for the trainer: pixels, image lists, front doors.

  prepare_image_folder(folder, out_dir, 256, encoder=runner.encode, scale=...)   # ROOT/CLASS/IMAGE.JPEG
  prepare_imagenet(manual_dir, out_dir, 256, encoder=runner.encode, scale=...)   # tfds imagenet2012
  runner, scale, facts = vae_encoder(vae_dir, image_size, batch_size)            # the SD VAE, checked

Pixels are prepared exactly as DiT's `train.py` prepares them: PIL decode, RGB, ADM center crop
(`center_crop_arr`), optional horizontal flip, scale to [-1, 1]. The VAE encoder maps them to its
posterior; `encode.encode_to_shards` writes the shards (resumable, split over hosts).

Mean + std or a frozen sample (`content`): DiT's train.py encodes every image at every step and
trains on `latent_dist.sample()`, a fresh posterior sample each time; fast-DiT encodes once and
freezes one sample. The default here, "posterior", stores the scaled mean and std (2x the disk of a
frozen sample) and the trainer's reader draws the sample at every visit from (data seed, epoch,
record index), so training sees DiT's distribution of latents and a resumed run stays exact. The
fast-DiT format ("sample", seeded by (seed, image index)) remains available and readable. The flip,
like fast-DiT's, is frozen per image (p = 0.5 from the seed): flipping at read time would need a
second encoding of every image.

Image lists. `ImageFolder`: one sub-folder per class, sorted names -> class ids 0..K-1 (torchvision's
ImageFolder, which DiT uses), files walked in sorted order; .JPEG / .jpg / .jpeg / .png. `TfdsImageNet`:
tfds `imagenet2012` from the user's manual download (ILSVRC2012_img_train.tar / _val.tar); its JPEG
bytes are decoded by PIL (tfds `SkipDecoding`), not TensorFlow, so pixels match the PyTorch
pipeline bit for bit (except the 23 files tfds re-encodes: 22 CMYK JPEGs and one PNG). Its labels
follow the sorted WordNet ids, the class indices of torchvision's ImageFolder; its example order is
the fixed order tfds wrote its TFRecords in.
"""
from __future__ import annotations

import io
import os
from typing import Any, Iterator

import numpy as np
from PIL import Image

from dydit_jax.data.encode import Encoder, encode_to_shards
from dydit_jax.errors import UserError

LATENT_SCALE = 0.18215          # SD VAE latent scale used by DiT (multiply after encode)
LATENT_CHANNELS = 4             # what every DiT takes
IMAGENET_CLASSES = 1000
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")

NO_ENCODER_MESSAGE = (
    "preparing latents needs a VAE encoder: pass encoder=fn, where fn maps images (B, S, S, 3) float32 "
    "in [-1, 1] (NHWC) to the UNSCALED posterior (mean, std), e.g. vae_encoder(DIR, ...)[0].encode for "
    "a VAE converted with python -m dydit_jax.vae.convert --src sd-vae-ft-ema --dst DIR")


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


def preprocess_image(encoded: bytes | str, image_size: int, flip: bool) -> np.ndarray:
  """An image file (its bytes or its path) -> (S, S, 3) float32 in [-1, 1], as DiT's transform does it."""
  with Image.open(io.BytesIO(encoded) if isinstance(encoded, bytes) else encoded) as image:
    pixels = center_crop_arr(image.convert("RGB"), image_size)
  if flip:
    pixels = pixels[:, ::-1]
  return pixels.astype(np.float32) / 127.5 - 1.0


# Image lists (encode.ImageSource) ---------------------------------------------------------------------
class ImageFolder:
  """ROOT/CLASS/.../IMAGE files in torchvision ImageFolder order: (path, path, class id) examples."""

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root} does not exist (expected ROOT/CLASS/IMAGE.JPEG)")
    self.root = os.path.abspath(root)
    self.class_names = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not self.class_names:
      raise UserError(f"image folder {root} has no class sub-folders (expected ROOT/CLASS/IMAGE.JPEG)")
    self.files: list[tuple[str, int]] = []
    for label, name in enumerate(self.class_names):
      found = [os.path.join(d, f) for d, _, names in sorted(os.walk(os.path.join(self.root, name), followlinks=True))
               for f in sorted(names) if f.lower().endswith(IMAGE_EXTENSIONS)]
      if not found:
        raise UserError(f"class folder {os.path.join(root, name)} holds no image (.JPEG, .jpg, .jpeg, .png)")
      self.files += [(path, label) for path in found]

  def __len__(self) -> int:
    return len(self.files)

  def read(self, start: int, stop: int) -> Iterator[tuple[str, str, int]]:
    for path, label in self.files[start:stop]:
      yield path, path, label

  def describe(self) -> dict[str, Any]:
    return {"source": "image_folder", "image_folder": self.root, "class_names": self.class_names}


class TfdsImageNet:
  """tfds `imagenet2012` (built from `manual_dir` on first use) as (file name, JPEG bytes, label)
  examples of `split` (a name or a slice such as "train[:1%]"), read range by range."""

  def __init__(self, manual_dir: str, split: str = "train", data_dir: str | None = None):
    if not os.path.isdir(manual_dir):
      raise FileNotFoundError(f"--manual_dir {manual_dir} does not exist (it holds ILSVRC2012_img_train.tar)")
    import tensorflow as tf               # Lazy: TensorFlow is only needed to read tfds.
    import tensorflow_datasets as tfds
    tf.config.set_visible_devices([], "GPU")   # Leave the accelerator to the encoder.
    self._tfds, self.split, self.manual_dir = tfds, split, os.path.abspath(manual_dir)
    self._builder = tfds.builder("imagenet2012", data_dir=data_dir)
    self._builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    splits = self._builder.info.splits
    self._ranges = [(i.splitname, i.from_ or 0, splits[i.splitname].num_examples if i.to is None else i.to)
                    for i in tfds.core.ReadInstruction.from_spec(split).to_absolute(splits)]

  def __len__(self) -> int:
    return sum(stop - start for _, start, stop in self._ranges)

  def read(self, start: int, stop: int) -> Iterator[tuple[str, bytes, int]]:
    parts, offset = [], 0
    for name, a, b in self._ranges:    # examples [start, stop) of the concatenated ranges
      lo, hi = max(start - offset, 0), min(stop - offset, b - a)
      if lo < hi:
        parts.append(f"{name}[{a + lo}:{a + hi}]")
      offset += b - a
    dataset = self._builder.as_dataset(split="+".join(parts), shuffle_files=False,
                                       decoders={"image": self._tfds.decode.SkipDecoding()})
    for e in self._tfds.as_numpy(dataset):
      yield e["file_name"].decode(), e["image"], int(e["label"])

  def describe(self) -> dict[str, Any]:
    return {"source": "tfds imagenet2012", "split": self.split, "manual_dir": self.manual_dir}


# The VAE ------------------------------------------------------------------------------------------
def no_vae_message() -> str:
  """What `prepare` says without --vae (the VAE package is imported only when needed)."""
  from dydit_jax.vae.checkpoints import CONVERT_HINT  # pylint: disable=g-import-not-at-top
  return f"--vae is required: the VAE that encodes the images, {CONVERT_HINT}"


def vae_encoder(vae_dir: str | None, image_size: int, batch_size: int) -> tuple[Any, float, dict[str, Any]]:
  """(BatchedVAE, latent scale, facts for the metadata) of the VAE directory `vae_dir`, checked against
  what DiT needs before any work: RGB in, LATENT_CHANNELS out, image_size a multiple of its factor."""
  # pylint: disable=g-import-not-at-top  (the VAE, flax and orbax load only when a VAE is used)
  from dydit_jax.vae.batched import BatchedVAE
  from dydit_jax.vae.checkpoints import CONVERT_HINT, fingerprint, load_vae, read_vae_config
  if not vae_dir:
    raise UserError(no_vae_message())
  config = read_vae_config(vae_dir)
  if config.in_channels != 3:
    raise UserError(f"the VAE {vae_dir} encodes {config.in_channels}-channel images, not RGB; "
                    f"--vae wants {CONVERT_HINT}")
  if config.latent_channels != LATENT_CHANNELS:
    raise UserError(f"the VAE {vae_dir} has {config.latent_channels} latent channels, DiT latents have "
                    f"{LATENT_CHANNELS}; --vae wants {CONVERT_HINT}")
  if image_size <= 0 or image_size % config.downsample_factor:
    raise UserError(f"--image_size {image_size} is not a positive multiple of the VAE's downsampling factor "
                    f"{config.downsample_factor}")
  vae = load_vae(vae_dir)
  facts = {"vae_dir": os.path.abspath(vae_dir), "vae": config.geometry().to_dict(),
           "vae_fingerprint": fingerprint(vae)}
  return BatchedVAE(vae, batch_size), config.scaling_factor, facts


# Front doors --------------------------------------------------------------------------------------
def _prepare(source, out_dir: str, image_size: int, encoder: Encoder | None, num_classes: int,
             extra_metadata: dict[str, Any] | None, options: dict[str, Any]) -> dict[str, Any] | None:
  return encode_to_shards(source, out_dir, encoder, image_size=image_size, num_classes=num_classes,
                          extra_metadata={**source.describe(), **(extra_metadata or {})}, **options)


def prepare_image_folder(folder: str, out_dir: str, image_size: int = 256, encoder: Encoder | None = None, *,
                         num_classes: int | None = None, extra_metadata: dict[str, Any] | None = None,
                         **options) -> dict[str, Any] | None:
  """Encodes an ImageFolder tree (see `ImageFolder`) into latent shards; `options` are those of
  `encode.encode_to_shards` (num_shards, content, flip, seed, scale, dtype, batch_size, max_shards, ...).
  num_classes: when given, the number of class folders must equal it. Returns the metadata (None when
  the run stopped early)."""
  if encoder is None:
    raise UserError(NO_ENCODER_MESSAGE)
  source = ImageFolder(folder)
  found = len(source.class_names)
  if num_classes is not None and num_classes != found:
    raise UserError(f"image folder {folder} has {found} class folders, not the {num_classes} of --num_classes")
  return _prepare(source, out_dir, image_size, encoder, found, extra_metadata, options)


def prepare_imagenet(manual_dir: str, out_dir: str, image_size: int = 256, encoder: Encoder | None = None,
                     split: str = "train", *, data_dir: str | None = None,
                     extra_metadata: dict[str, Any] | None = None, **options) -> dict[str, Any] | None:
  """Encodes tfds `imagenet2012` (from a manual download, see `TfdsImageNet`) into latent shards.

  data_dir: where tfds builds its TFRecords (default ~/tensorflow_datasets; on several hosts, each
  needs it built, e.g. on shared storage by one host first). `options`: as `prepare_image_folder`.
  """
  if encoder is None:
    raise UserError(NO_ENCODER_MESSAGE)
  source = TfdsImageNet(manual_dir, split, data_dir)
  return _prepare(source, out_dir, image_size, encoder, IMAGENET_CLASSES, extra_metadata, options)

