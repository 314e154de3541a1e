"""Inception activations of many images: fixed jitted batches, split over the host's devices.

  runner = InceptionRunner(load_inception(dir), batch_size=64)
  acts = runner.activations(ImageBatch(path, "samples"), progress=print_progress)
  acts.pool (N, 2048), acts.logits (N, 1008), acts.spatial (N, 2023): float32 numpy

Every call runs `batch_size` images (the last chunk zero-padded, the padding dropped), so the network
compiles once per image size; uint8 images travel to the devices (4x less than float32), split over
them along the batch (`vae.batched.local_mesh`: several local devices that divide the batch), the
weights replicated. The next chunk is read from disk while the devices work on the current one.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dydit_jax.evaluation.inception import Features, InceptionV3
from dydit_jax.vae.batched import local_mesh

Progress = Callable[[int, int, float], None]   # (images done, total, seconds so far)


class InceptionRunner:
  """`net` over image arrays or `ImageBatch`es of any length, in jitted chunks of `batch_size`."""

  def __init__(self, net: InceptionV3, batch_size: int = 64):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self.batch_size = batch_size
    self.mesh = local_mesh(batch_size)
    graphdef, state = nnx.split(net)
    self.state = state if self.mesh is None else jax.device_put(state, NamedSharding(self.mesh, P()))
    self._rows = None if self.mesh is None else NamedSharding(self.mesh, P("data"))
    self._forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))

  def _dispatch(self, images: np.ndarray):
    n = len(images)
    if n < self.batch_size:
      images = np.concatenate([images, np.zeros((self.batch_size - n, *images.shape[1:]), images.dtype)])
    if self._rows is not None:
      images = jax.device_put(images, self._rows)
    return n, self._forward(self.state, images)    # asynchronous: returns before the devices finish

  def activations(self, images, progress: Progress | None = None) -> Features:
    """Features of every image of `images` (a uint8 (N, H, W, 3) array or an `ImageBatch`), in order."""
    chunks: Iterable[np.ndarray]
    if isinstance(images, np.ndarray):
      total = len(images)
      chunks = (images[s:s + self.batch_size] for s in range(0, total, self.batch_size))
    else:
      total, chunks = images.count, images.chunks(self.batch_size)
    outs, pending, done, start = [], None, 0, time.perf_counter()

    def collect(item):
      n, out = item
      outs.append(jax.tree.map(lambda a: np.asarray(a)[:n], out))
      return n

    for chunk in chunks:
      item = self._dispatch(chunk)
      if pending is not None:
        done += collect(pending)
        if progress:
          progress(done, total, time.perf_counter() - start)
      pending = item
    if pending is not None:
      done += collect(pending)
      if progress:
        progress(done, total, time.perf_counter() - start)
    if not outs:
      raise ValueError("no images to evaluate")
    return Features(*(np.concatenate(parts) for parts in zip(*outs)))
