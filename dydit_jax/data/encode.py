"""Images -> latent shards: batched encoding that resumes where it stopped and splits over hosts.

  metadata = encode_to_shards(source, out_dir, encoder, image_size=256, num_shards=64, num_classes=1000)

`source` lists the images (`ImageSource`: a length and contiguous reads), `encoder` maps a fixed
batch of [-1, 1] images to the VAE posterior (`Encoder`: `vae.batched.BatchedVAE.encode`).

How the work is cut, and why:

* Shard s holds the contiguous examples [s N / S, (s+1) N / S) of the source. Contiguous ranges are
  what a sequential source (tfds TFRecords) reads cheaply; the trainer reshuffles globally anyway.
* Host h of P encodes shards h, h + P, ... (`jax.process_index()` / `process_count()`) into an
  out_dir they all see (a shared file system); nothing is exchanged between hosts but a barrier at
  the end, after which host 0 checks every shard and writes `metadata.json`. (A host that fails
  leaves the others waiting at that barrier until jax's coordination service gives up.)
* Each shard is written whole or not at all (`latents.ShardFile`: a temporary name, renamed when
  complete), so a shard under its final name is the completion record. A run that stops (killed,
  preempted, `max_shards`, bad input) leaves only complete shards; rerunning the same command
  encodes the missing ones and produces the same bytes as an uninterrupted run: every random
  choice is a function of (seed, example index), never of the order of work.
* `prepare_plan.json`, written before the first shard, is the metadata-to-be (source, geometry,
  encoder fingerprint, seed, ...). A rerun with other settings would mix two datasets in one folder,
  so it is refused with the fields that differ. It becomes `metadata.json` when every shard exists.

Every encoder call gets exactly `batch_size` images (the last batch zero-padded, the padding
dropped), so a jitted encoder compiles once; the encoder is first called on a zero batch, before
anything is created, to learn (and check) the latent shape. The next batch is decoded and cropped
by a thread pool (PIL releases the GIL) while the current one is encoded.

Frozen randomness: the horizontal flip of example i (p = 0.5 when `flip`) and, for content "sample",
its posterior noise come from (seed, i). Content "posterior" stores the scaled mean and std and leaves
the sampling to the reader, at every visit (`latents.LatentShardSource.draw`).
"""
from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import shutil
import time
from typing import Any, Callable, Iterator, Protocol

import jax
import numpy as np
from absl import logging
from PIL import Image

from dydit_jax import files
from dydit_jax.data import latents as fmt
from dydit_jax.errors import UserError

PLAN_FILE = "prepare_plan.json"
# Plan fields that describe where things came from, not what the shards hold: they may change
# between an interrupted run and its resumption (e.g. the VAE directory was moved).
INFORMATIONAL = ("vae_dir", "image_folder", "manual_dir")

# images (B, S, S, 3) float32 in [-1, 1], NHWC -> the posterior (mean, std), UNSCALED, (B, h, w, C) each.
Encoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class ImageSource(Protocol):
  """A fixed, ordered list of labelled images. `read(start, stop)` yields (name, data, label) for
  examples start .. stop - 1 in order: name for error messages, data the encoded file's bytes or its
  path."""

  def __len__(self) -> int:
    ...

  def read(self, start: int, stop: int) -> Iterator[tuple[str, bytes | str, int]]:
    ...


def shard_ranges(count: int, num_shards: int) -> list[tuple[int, int]]:
  """[start, stop) of each shard: contiguous, sizes differing by at most one."""
  return [(s * count // num_shards, (s + 1) * count // num_shards) for s in range(num_shards)]


def load_pixels(name: str, data: bytes | str, image_size: int, flip: bool) -> np.ndarray:
  """One image file -> (S, S, 3) float32 in [-1, 1] (`imagenet.preprocess_image`); an unreadable
  file (truncated, corrupt, not an image) is a UserError that names it."""
  from dydit_jax.data.imagenet import preprocess_image  # pylint: disable=g-import-not-at-top
  try:
    return preprocess_image(data, image_size, flip)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise UserError(f"cannot read image {name}: {type(e).__name__}: {e}") from e


def _probe(encoder: Encoder, batch_size: int, image_size: int) -> tuple[int, ...]:
  """The latent shape the encoder gives for image_size images (also its one compile)."""
  mean, std = (np.asarray(a) for a in encoder(np.zeros((batch_size, image_size, image_size, 3), np.float32)))
  if mean.shape != std.shape or mean.ndim != 4 or len(mean) != batch_size:
    raise UserError(f"the encoder maps a batch {(batch_size, image_size, image_size, 3)} to mean {mean.shape} "
                    f"and std {std.shape}; expected two equal (B, h, w, C) arrays")
  return tuple(int(d) for d in mean.shape[1:])


def _check_plan(out_dir: str, plan: dict[str, Any]) -> None:
  """Refuse a finished folder, or one started with other settings; write the plan if new."""
  if os.path.exists(os.path.join(out_dir, fmt.METADATA_FILE)):
    raise UserError(f"{out_dir} already holds prepared latents ({fmt.METADATA_FILE}); choose a new folder.")
  path = os.path.join(out_dir, PLAN_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    new = json.loads(json.dumps(plan))
    differ = sorted(k for k in set(old) | set(new) if k not in INFORMATIONAL and old.get(k) != new.get(k))
    if differ:
      raise UserError(f"{out_dir} holds an unfinished preparation with other settings (different: "
                      f"{', '.join(differ)}; see {PLAN_FILE}); rerun it with its settings or choose a new folder.")
    return
  if os.path.isdir(out_dir) and any(name.startswith("latents-") for name in os.listdir(out_dir)):
    raise UserError(f"{out_dir} holds latent shards but no {PLAN_FILE}; choose a new folder.")
  os.makedirs(out_dir, exist_ok=True)
  files.atomic_write_json(path, plan, tmp_suffix=f".tmp-{jax.process_index()}")


class _Progress:
  """Images/s and ETA of this host's share, logged every `every` batches."""

  def __init__(self, total: int, every: int):
    self.total, self.every, self.done, self.batches = total, max(every, 1), 0, 0
    self.start = time.perf_counter()

  def add(self, n: int, shard: int) -> None:
    self.done, self.batches = self.done + n, self.batches + 1
    if self.batches % self.every == 0 or self.done == self.total:
      rate = self.done / max(time.perf_counter() - self.start, 1e-9)
      eta = int((self.total - self.done) / max(rate, 1e-9))
      logging.info("shard %d: %d / %d images of this host, %.1f images/s, ETA %d:%02d:%02d", shard, self.done,
                   self.total, rate, eta // 3600, eta // 60 % 60, eta % 60)


def encode_to_shards(source: ImageSource, out_dir: str, encoder: Encoder, *, image_size: int, num_shards: int,
                     num_classes: int, content: str = "posterior", flip: bool = True, seed: int = 0,
                     scale: float = 0.18215, dtype: str = "float32", batch_size: int = 64, num_workers: int = 8,
                     max_shards: int = 0, log_every: int = 100, extra_metadata: dict[str, Any] | None = None,
                     process_index: int | None = None, process_count: int | None = None) -> dict[str, Any] | None:
  """Encodes `source` into `num_shards` shards under `out_dir`; see the module docstring.

  content: "posterior" (scaled mean and std; the reader samples at every visit) or "sample" (one
    frozen sample per image, half the bytes). scale: multiplies the latents (the VAE's 0.18215).
  max_shards: encode at most this many shards in this run (0 = all), e.g. to fit a time slot.
  Returns the metadata once every shard exists, None when this run stopped early.
  """
  host = jax.process_index() if process_index is None else process_index
  hosts = jax.process_count() if process_count is None else process_count
  count = len(source)
  if content not in fmt.CONTENTS:
    raise UserError(f"content must be one of {fmt.CONTENTS}, got {content!r}")
  if dtype not in fmt.DTYPES:
    raise UserError(f"latent dtype must be one of {fmt.DTYPES}, got {dtype!r}")
  if not 0 < num_shards <= count:
    raise UserError(f"num_shards must lie in [1, {count}] (the number of images), got {num_shards}")
  if batch_size <= 0:
    raise UserError(f"batch_size must be positive, got {batch_size}")
  shape = _probe(encoder, batch_size, image_size)
  ranges = shard_ranges(count, num_shards)
  plan = {"format": fmt.FORMAT, "content": content, "shape": list(shape), "dtype": dtype, "count": count,
          "num_classes": int(num_classes), "image_size": int(image_size), "scale": float(scale), "layout": "NHWC",
          "shards": [fmt.shard_name(i, num_shards) for i in range(num_shards)],
          "shard_counts": [b - a for a, b in ranges], "flip": flip, "seed": seed, **(extra_metadata or {})}
  created = not os.path.exists(out_dir)
  _check_plan(out_dir, plan)

  def done(s: int) -> bool:
    return os.path.exists(os.path.join(out_dir, plan["shards"][s]))

  mine = [s for s in range(host, num_shards, hosts) if not done(s)]
  if max_shards > 0:
    mine = mine[:max_shards]
  flips = (np.random.default_rng([fmt.STREAM_FLIP, seed]).random(count) < 0.5) if flip else np.zeros(count, bool)
  progress = _Progress(sum(ranges[s][1] - ranges[s][0] for s in mine), log_every)
  logging.info("host %d of %d: %d shards to encode into %s (%d images)", host, hosts, len(mine), out_dir,
               progress.total)
  try:
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
      for s in mine:
        _encode_shard(s, ranges[s], source, encoder, pool, plan, flips, out_dir, batch_size, progress)
  except BaseException:
    if created and hosts == 1 and not any(done(s) for s in range(num_shards)):
      shutil.rmtree(out_dir, ignore_errors=True)   # nothing finished: leave nothing behind
    raise
  _barrier(hosts, "shards written")   # every host reaches it, finished or stopped by max_shards
  if not all(done(s) for s in range(num_shards)):
    logging.info("stopped with %d of %d shards written; rerun the same command to continue",
                 sum(map(done, range(num_shards))), num_shards)
    return None
  return _finish(out_dir, plan, host, hosts)


def _barrier(hosts: int, name: str) -> None:
  if hosts > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"dydit_jax.prepare: {name}")


def _encode_shard(s, bounds, source, encoder, pool, plan, flips, out_dir, batch_size, progress) -> None:
  """Shard `s` (examples bounds[0] .. bounds[1] - 1) encoded and written whole."""
  start, stop = bounds
  size, shape, posterior = plan["image_size"], tuple(plan["shape"]), plan["content"] == "posterior"
  examples = source.read(start, stop)

  def submit(first: int):
    """The next batch (starting at example `first`) read and preprocessed in the pool."""
    chunk = list(itertools.islice(examples, min(batch_size, stop - first)))
    if not chunk:
      raise UserError(f"the source ended at example {first}; it claims {len(source)} examples")
    jobs = [pool.submit(load_pixels, name, data, size, bool(flips[first + k]))
            for k, (name, data, _) in enumerate(chunk)]
    return first, jobs, np.asarray([label for _, _, label in chunk], np.int64)

  with fmt.ShardFile(os.path.join(out_dir, plan["shards"][s]), plan["dtype"]) as shard:
    pending = submit(start) if start < stop else None
    while pending is not None:
      first, jobs, labels = pending
      pixels = np.stack([job.result() for job in jobs])
      n = len(pixels)
      pending = submit(first + n) if first + n < stop else None   # prefetch while encoding
      if labels.min() < 0 or labels.max() >= plan["num_classes"]:
        raise UserError(f"labels of examples {first}..{first + n - 1} fall outside [0, {plan['num_classes']})")
      batch = np.zeros((batch_size, *pixels.shape[1:]), np.float32)
      batch[:n] = pixels
      mean, std = (np.asarray(a, np.float32)[:n] * plan["scale"] for a in encoder(batch))
      if posterior:
        shard.write(mean, labels, std)
      else:
        noise = np.stack([fmt.posterior_noise(shape, fmt.STREAM_FROZEN, plan["seed"], i)
                          for i in range(first, first + n)])
        shard.write(mean + std * noise, labels)
      progress.add(n, s)
  logging.info("shard %d done: %s (%d images)", s, plan["shards"][s], stop - start)


def _finish(out_dir: str, plan: dict[str, Any], host: int, hosts: int) -> dict[str, Any]:
  """Every shard exists: host 0 checks their record counts and writes metadata.json."""
  if host == 0:
    from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top
    for name, want in zip(plan["shards"], plan["shard_counts"]):
      reader = ArrayRecordReader(os.path.join(out_dir, name))
      got = reader.num_records()
      reader.close()
      if got != want:
        raise UserError(f"{os.path.join(out_dir, name)} holds {got} records, the plan says {want}; delete it "
                        "and rerun the same command")
    fmt.write_metadata(out_dir, plan)
    os.remove(os.path.join(out_dir, PLAN_FILE))
  _barrier(hosts, "metadata written")
  return fmt.read_metadata(out_dir)
