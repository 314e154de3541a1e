"""The VAE applied to many images: fixed batches, one compile, split over the host's devices.

  runner = BatchedVAE(vae, batch_size=16)
  pixels = runner.decode(latents)          # DiT latents (N, h, w, 4) -> float32 [-1, 1] (N, H, W, 3)
  mean, std = runner.encode(images)        # [-1, 1] images -> the posterior, UNSCALED (vae.encode)
  grid = decode_to_images(vae, latents, batch_size=16)   # -> uint8, DiT's pixel mapping

Why fixed batches: every call runs `batch_size` rows (the last chunk zero-padded, the padding
dropped), so each direction compiles exactly once whatever the number of images. Why a mesh: with
several local devices that divide the batch, the rows are split over them (`NamedSharding` of the
batch axis, weights replicated once), like the sampler splits its images; otherwise the first
device runs everything. Every row is computed independently (GroupNorm is per image), so the split
does not change the result beyond float rounding.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dydit_jax.vae.model import AutoencoderKL


def dit_uint8(pixels: np.ndarray) -> np.ndarray:
  """[-1, 1] pixels -> uint8 exactly as DiT's sample_ddp.py (and torchvision's save_image) do it:
  clamp(127.5 x + 128, 0, 255) truncated, i.e. round half UP of 127.5 (x + 1).

  `dydit_jax.images.to_uint8` rounds half to even instead; the two differ only on exact ties, but
  FID reference statistics are computed on DiT's mapping, so decoded samples use this one.
  """
  return np.clip(127.5 * np.asarray(pixels, np.float32) + 128.0, 0, 255).astype(np.uint8)


def local_mesh(batch_size: int) -> Mesh | None:
  """The host's devices as a ("data",) mesh when there are several and they divide `batch_size`."""
  devices = jax.local_devices()
  if len(devices) > 1 and batch_size % len(devices) == 0:
    return Mesh(np.asarray(devices), ("data",))
  return None


class BatchedVAE:
  """`vae`'s encode and decode over arrays of any length, in jitted chunks of `batch_size` rows."""

  def __init__(self, vae: AutoencoderKL, batch_size: int = 16):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self.config = vae.config
    self.batch_size = batch_size
    self.mesh = local_mesh(batch_size)
    self.graphdef, state = nnx.split(vae)
    # Placement follows the arguments: replicated weights and batch-sharded rows make jit split the
    # work over the mesh (no explicit shardings needed); on one device everything stays there.
    self.state = state if self.mesh is None else jax.device_put(state, NamedSharding(self.mesh, P()))
    self._rows = None if self.mesh is None else NamedSharding(self.mesh, P("data"))
    self._decode = jax.jit(lambda s, z: nnx.merge(self.graphdef, s).decode_latents(z))
    self._encode = jax.jit(lambda s, x: _moments(nnx.merge(self.graphdef, s).encode(x)))

  def _chunks(self, fn, x: np.ndarray):
    """fn over `x` in padded chunks of batch_size rows; the outputs concatenated on the host."""
    x = np.asarray(x, np.float32)
    outs = []
    for start in range(0, len(x), self.batch_size):
      chunk = x[start:start + self.batch_size]
      n = len(chunk)
      if n < self.batch_size:
        chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]), np.float32)])
      if self._rows is not None:
        chunk = jax.device_put(chunk, self._rows)
      outs.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], fn(self.state, chunk)))
    return jax.tree.map(lambda *a: np.concatenate(a), *outs)

  def decode(self, latents: np.ndarray) -> np.ndarray:
    """DiT's scaled latents (N, h, w, latent_channels) -> float32 pixels (N, h*f, w*f, 3), ~[-1, 1]."""
    return self._chunks(self._decode, latents)

  def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[-1, 1] images (N, H, W, 3) -> the posterior's (mean, std), unscaled, float32 (N, H/f, W/f, C)."""
    return self._chunks(self._encode, images)


def _moments(posterior):
  return posterior.mean, posterior.std


def decode_to_images(vae: AutoencoderKL | BatchedVAE, latents: np.ndarray, batch_size: int = 16) -> np.ndarray:
  """Sampled DiT latents -> uint8 NHWC images: `decode_latents` in jitted batches of at most
  `batch_size` rows (fewer for fewer latents: a small grid pads nothing), then `dit_uint8`."""
  runner = vae if isinstance(vae, BatchedVAE) else BatchedVAE(vae, max(1, min(batch_size, len(latents))))
  return dit_uint8(runner.decode(latents))
