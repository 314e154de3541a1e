"""Image batches to evaluate: ADM .npz files (reference or samples) and directories of PNGs.

An ADM batch is `np.savez(arr_0=uint8 (N, H, W, 3))`; a reference batch (e.g.
VIRTUAL_imagenet256_labeled.npz) also carries the whole-dataset statistics `mu, sigma` (pool) and
`mu_s, sigma_s` (spatial), which the ADM evaluator uses instead of the statistics of its 10,000
images. 50,000 samples at 256 px are 9.8 GB, so images are streamed from the zip member in chunks
(as ADM's NpzArrayReader does) and never held whole.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from dydit_jax.errors import UserError
from dydit_jax.evaluation.metrics import Statistics

IMAGES_KEY = "arr_0"
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def _header(f) -> tuple[tuple, bool, np.dtype]:
  """(shape, fortran_order, dtype) of an open .npy stream, leaving it at the first data byte."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  return np.lib.format.read_array_header_2_0(f)


class ImageBatch:
  """N uint8 RGB images of one size, read in chunks; `stats` holds the file's (pool, spatial)
  statistics when it carries `mu` (else None). `what` names the input for messages."""

  def __init__(self, path: Path | str, what: str):
    self.path, self.what = Path(path), what
    if not self.path.exists():
      raise FileNotFoundError(f"{what} {self.path} does not exist")
    self.stats: tuple[Statistics, Statistics] | None = None
    if self.path.is_dir():
      self._pngs = sorted(p for p in self.path.iterdir() if p.suffix.lower() == ".png")
      if not self._pngs:
        raise UserError(f"{what} {self.path} is a directory without .png files")
      first = self._png(self._pngs[0])
      self.count, self.shape = len(self._pngs), first.shape
    else:
      self._pngs = None
      self._open_npz()

  def _open_npz(self) -> None:
    try:
      with zipfile.ZipFile(self.path) as z:
        names = {n.removesuffix(".npy") for n in z.namelist()}
        if IMAGES_KEY not in names:
          raise UserError(f"{self.what} {self.path} has no {IMAGES_KEY} (images) array: it holds {sorted(names)}")
        with z.open(f"{IMAGES_KEY}.npy") as f:
          shape, fortran, dtype = _header(f)
    except zipfile.BadZipFile:
      raise UserError(f"{self.what} {self.path} is not an .npz file (nor a directory of PNGs)") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
      raise UserError(f"{self.what} {self.path}: {IMAGES_KEY} must be uint8 (N, H, W, 3) images, got {dtype} {shape}")
    self.count, self.shape = shape[0], tuple(shape[1:])
    if "mu" in names:
      missing = [k for k in STAT_KEYS if k not in names]
      if missing:
        raise UserError(f"{self.what} {self.path} carries mu but not {', '.join(missing)}")
      with np.load(self.path) as data:
        self.stats = (Statistics(data["mu"], data["sigma"]), Statistics(data["mu_s"], data["sigma_s"]))

  def _png(self, path: Path) -> np.ndarray:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))

  def chunks(self, size: int) -> Iterator[np.ndarray]:
    """The images in order, `size` at a time (the last chunk shorter)."""
    if self._pngs is not None:
      for start in range(0, self.count, size):
        images = [self._png(p) for p in self._pngs[start:start + size]]
        odd = [p.name for p, im in zip(self._pngs[start:], images) if im.shape != self.shape]
        if odd:
          raise UserError(f"{self.what} {self.path}: {odd[0]} is not {self.shape[1]}x{self.shape[0]} like the others")
        yield np.stack(images)
      return
    row = int(np.prod(self.shape))
    with zipfile.ZipFile(self.path) as z, z.open(f"{IMAGES_KEY}.npy") as f:
      _header(f)
      for start in range(0, self.count, size):
        n = min(size, self.count - start)
        data = f.read(n * row)
        if len(data) != n * row:
          raise UserError(f"{self.what} {self.path} is truncated ({start + len(data) // row} of {self.count} images)")
        yield np.frombuffer(data, np.uint8).reshape(n, *self.shape)
