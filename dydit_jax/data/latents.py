"""The on-disk format of prepared latents: array_record shards plus one JSON metadata file.

A prepared folder holds

  latents-00000-of-00064.array_record ... latents-00063-of-00064.array_record
  metadata.json   {"format", "content", "shape", "dtype", "count", "num_classes", "image_size",
                   "scale", "layout", "shards", ...extra}

Each record is the raw little-endian bytes of one latent (`shape`, `dtype`, NHWC, already
multiplied by `scale`) followed by its label as a little-endian int32. Raw bytes need no decoder
library in the training loop and their length is checked on every read. The reader concatenates
the shards in order; how records are dealt over shards is the writer's business (`LatentShardWriter`
deals them round-robin, `encode.encode_to_shards` gives each shard a contiguous range).
`metadata.json` is written last, atomically: a folder without it is an unfinished preparation and
is refused by the reader.

What a record holds (`content`; format v1 folders are "sample"):

  "sample"     one latent: a posterior sample (or the mean) frozen at preparation time, as in
               fast-DiT. Half the bytes of "posterior".
  "posterior"  the VAE posterior's mean, then its std (both scaled, same shape and dtype). The
               reader returns mean + std * noise with noise drawn from (data seed, epoch, record
               index) (`posterior_noise`), so every epoch sees a fresh posterior sample, as DiT's
               train.py does (`latent_dist.sample()` at every step), and a resumed run draws exactly
               the noise it would have drawn.

A horizontal flip, when the preparation applied one, is frozen into the record either way (the
reader applies no augmentation).
"""
from __future__ import annotations

import json
import os
from typing import Any

from array_record.python.array_record_module import ArrayRecordWriter
import grain
import numpy as np

from dydit_jax import files
from dydit_jax.errors import UserError

METADATA_FILE = "metadata.json"
FORMAT = "dydit_jax.latents.v2"
FORMAT_V1 = "dydit_jax.latents.v1"     # before `content`: always one frozen sample per record
CONTENTS = ("sample", "posterior")
DTYPES = ("float32", "float16")
_LABEL = np.dtype("<i4")
_TMP = ".tmp"
# First entropy word of every seeded stream of the latents pipeline, so that no two uses of one seed
# share a stream (numpy's SeedSequence also equates [a, b] and [a, b, 0]: the tag comes first).
STREAM_READ, STREAM_FROZEN, STREAM_FLIP = 1, 2, 3


def shard_name(index: int, num_shards: int) -> str:
  return f"latents-{index:05d}-of-{num_shards:05d}.array_record"


def posterior_noise(shape: tuple[int, ...], *entropy: int) -> np.ndarray:
  """N(0, 1) float32 noise that is a pure function of `entropy` (a STREAM_* tag, then e.g. seed,
  epoch, record index): numpy's SeedSequence hashes the integers, so neighbouring indices give
  independent streams, identical on every host and platform."""
  return np.random.default_rng([int(e) for e in entropy]).standard_normal(shape, dtype=np.float32)


def write_metadata(out_dir: str, metadata: dict[str, Any]) -> None:
  """Writes `metadata.json` atomically (temporary file, then rename): the folder's 'finished' mark."""
  files.atomic_write_json(os.path.join(out_dir, METADATA_FILE), metadata, tmp_suffix=_TMP)


def _record(latent: np.ndarray, label, std: np.ndarray | None = None) -> bytes:
  return latent.tobytes() + (b"" if std is None else std.tobytes()) + np.asarray(label, _LABEL).tobytes()


class ShardFile:
  """One shard written whole or not at all: records go to `<name>.tmp`, renamed to `<name>` by
  `commit()`; `abort()` (or leaving the `with` block by an exception) removes the temporary file.
  So a shard under its final name is always complete: the name is the completion record."""

  def __init__(self, path: str, dtype: str = "float32"):
    self.path, self.tmp = path, path + _TMP
    self.dtype = np.dtype(dtype).newbyteorder("<")
    self.count = 0
    if os.path.exists(self.tmp):       # left by a killed run: its records are not trusted
      os.remove(self.tmp)
    # group_size:1 makes every record individually addressable (grain's random access).
    self._writer = ArrayRecordWriter(self.tmp, "group_size:1")

  def write(self, latents: np.ndarray, labels: np.ndarray, std: np.ndarray | None = None) -> None:
    """Appends a batch: latents (B, ...) already scaled, labels (B,), std like latents or None."""
    latents = np.asarray(latents).astype(self.dtype)
    std = None if std is None else np.asarray(std).astype(self.dtype)
    for i, label in enumerate(np.asarray(labels)):
      self._writer.write(_record(latents[i], label, None if std is None else std[i]))
    self.count += len(latents)

  def commit(self) -> None:
    self._writer.close()
    os.replace(self.tmp, self.path)

  def abort(self) -> None:
    self._writer.close()
    if os.path.exists(self.tmp):
      os.remove(self.tmp)

  def __enter__(self) -> "ShardFile":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.commit()
    else:
      self.abort()


class LatentShardWriter:
  """Writes frozen (latent, label) records round-robin into `num_shards` array_record files, all
  open at once (content "sample"; the resumable, per-shard writer is `encode.encode_to_shards`).

  Use as a context manager (or call `close()`), which writes `metadata.json`.
  """

  def __init__(self, out_dir: str, num_shards: int, *, num_classes: int, image_size: int,
               scale: float = 0.18215, dtype: str = "float32",
               extra_metadata: dict[str, Any] | None = None):
    """Creates the shard files.

    Args:
      out_dir: folder to create; must not already hold a finished preparation.
      num_shards: number of array_record files (a multiple of the reader hosts is tidy).
      num_classes: label count recorded for the reader (1000 for ImageNet).
      image_size: pixel side the latents were encoded from (recorded only).
      scale: factor already applied to the latents (recorded only; 0.18215 for SD VAE).
      dtype: storage dtype, "float32" (exact) or "float16" (half the disk).
      extra_metadata: more JSON-able facts to record (split, flip, seed, encoder ...).
    """
    if os.path.exists(os.path.join(out_dir, METADATA_FILE)):
      raise UserError(f"{out_dir} already holds prepared latents ({METADATA_FILE}); choose a new folder.")
    if num_shards <= 0:
      raise UserError(f"num_shards must be positive, got {num_shards}.")
    self.out_dir = out_dir
    self.dtype = np.dtype(dtype).newbyteorder("<")
    self.count = 0
    self.shape: tuple[int, ...] | None = None
    self._metadata = {"format": FORMAT, "content": "sample", "dtype": np.dtype(dtype).name,
                      "num_classes": int(num_classes), "image_size": int(image_size),
                      "scale": float(scale), "layout": "NHWC",
                      "shards": [shard_name(i, num_shards) for i in range(num_shards)],
                      **(extra_metadata or {})}
    os.makedirs(out_dir, exist_ok=True)
    # group_size:1 makes every record individually addressable (grain's random access).
    self._writers = [ArrayRecordWriter(os.path.join(out_dir, name), "group_size:1")
                     for name in self._metadata["shards"]]

  def write(self, latents: np.ndarray, labels: np.ndarray) -> None:
    """Appends a batch: latents (B, H, W, C) already scaled, labels (B,) ints."""
    latents = np.asarray(latents)
    labels = np.asarray(labels)
    if latents.ndim < 2 or labels.shape != latents.shape[:1]:
      raise ValueError(f"Expected latents (B, ...) and labels (B,), got {latents.shape} "
                       f"and {labels.shape}.")
    if self.shape is None:
      self.shape = latents.shape[1:]
    elif latents.shape[1:] != self.shape:
      raise ValueError(f"Latent shape changed from {self.shape} to {latents.shape[1:]}.")
    stored = latents.astype(self.dtype)
    for latent, label in zip(stored, labels.astype(_LABEL)):
      self._writers[self.count % len(self._writers)].write(latent.tobytes() + label.tobytes())
      self.count += 1

  def close(self) -> dict[str, Any]:
    """Closes the shards and writes `metadata.json`; returns the metadata."""
    for writer in self._writers:
      writer.close()
    if self.shape is None:
      raise ValueError(f"No latents were written to {self.out_dir}.")
    metadata = {**self._metadata, "shape": list(self.shape), "count": self.count}
    write_metadata(self.out_dir, metadata)
    return metadata

  def __enter__(self) -> LatentShardWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:   # Leave no metadata behind: the folder stays visibly unfinished.
      for writer in self._writers:
        writer.close()


def read_metadata(path: str) -> dict[str, Any]:
  """Loads `metadata.json`, or raises one error that names the folder and the fix."""
  meta_path = os.path.join(path, METADATA_FILE)
  if not os.path.isfile(meta_path):
    state = "does not exist" if not os.path.isdir(path) else (
        "is empty" if not os.listdir(path) else f"has no {METADATA_FILE} (unfinished?)")
    raise FileNotFoundError(
        f"Latent folder {path!r} {state}: expected array_record shards and {METADATA_FILE} "
        "written by `python -m dydit_jax.prepare` (dydit_jax.data.prepare_imagenet or LatentShardWriter).")
  with open(meta_path) as f:
    metadata = json.load(f)
  if metadata.get("format") == FORMAT_V1:
    metadata = {**metadata, "content": "sample"}
  elif metadata.get("format") != FORMAT:
    raise UserError(f"{meta_path} has format {metadata.get('format')!r}, expected {FORMAT!r} "
                    f"(or {FORMAT_V1!r}).")
  if metadata.get("content") not in CONTENTS:
    raise UserError(f"{meta_path} has content {metadata.get('content')!r}, expected one of {CONTENTS}.")
  return metadata


class LatentShardSource:
  """`Source` over a prepared folder, read with grain's `ArrayRecordDataSource`.

  A "posterior" folder's examples carry the mean as "x" and the std as "std" until `draw` (called
  by `BatchIterator` with the stream position) turns them into one posterior sample.
  """

  read_threads = 16

  def __init__(self, path: str):
    self.path = path
    self.metadata = read_metadata(path)
    self.shape = tuple(self.metadata["shape"])
    self.num_classes = int(self.metadata["num_classes"])
    self.scale = float(self.metadata["scale"])
    self._dtype = np.dtype(self.metadata["dtype"]).newbyteorder("<")
    self.posterior = self.metadata["content"] == "posterior"
    self._num_values = int(np.prod(self.shape))
    self._latent_bytes = self._num_values * self._dtype.itemsize
    self._record_bytes = self._latent_bytes * (2 if self.posterior else 1) + _LABEL.itemsize
    shards = [os.path.join(path, name) for name in self.metadata["shards"]]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
      raise FileNotFoundError(f"Latent folder {path!r} lacks shards listed in its metadata: "
                              f"{missing[:3]}{' ...' if len(missing) > 3 else ''}")
    self._records = grain.sources.ArrayRecordDataSource(shards)
    if len(self._records) != self.metadata["count"]:
      raise UserError(f"Latent folder {path!r} holds {len(self._records)} records, "
                      f"its metadata says {self.metadata['count']}.")

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self._records[index]
    if len(record) != self._record_bytes:
      raise ValueError(f"Record {index} in {self.path!r} has {len(record)} bytes, expected "
                       f"{self._record_bytes}.")
    latent = np.frombuffer(record, self._dtype, count=self._num_values).reshape(self.shape)
    label = np.frombuffer(record, _LABEL, count=1, offset=self._record_bytes - _LABEL.itemsize)[0]
    example = {"x": latent.astype(np.float32), "y": label.astype(np.int32)}
    if self.posterior:
      std = np.frombuffer(record, self._dtype, count=self._num_values, offset=self._latent_bytes)
      example["std"] = std.reshape(self.shape).astype(np.float32)
    return example

  def draw(self, example: dict[str, np.ndarray], *, seed: int, epoch: int, index: int
           ) -> dict[str, np.ndarray]:
    """Record `index` as trained on in epoch `epoch` of the stream of `seed`: for a "posterior"
    folder the sample mean + std * posterior_noise(STREAM_READ, seed, epoch, index), else unchanged."""
    if not self.posterior:
      return example
    noise = posterior_noise(self.shape, STREAM_READ, seed, epoch, index)
    return {"x": example["x"] + example["std"] * noise, "y": example["y"]}

  def __repr__(self) -> str:
    return f"LatentShardSource({self.path!r}, {len(self)} x {self.shape})"
