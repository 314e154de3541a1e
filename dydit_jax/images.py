"""Images out of model space: uint8 conversion, grids and PNG files (local paths or gs://)."""
from __future__ import annotations

import numpy as np
from etils import epath
from PIL import Image

from dydit_jax.errors import UserError


def to_uint8(samples: np.ndarray) -> np.ndarray:
  """Pixel-space samples in [-1, 1] -> uint8 images (latents must be VAE-decoded first)."""
  if samples.shape[-1] not in (1, 3):
    raise UserError(f"{samples.shape[-1]}-channel samples are latents: decode them with the VAE "
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
