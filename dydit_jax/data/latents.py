"""The on-disk format of prepared latents: array_record shards plus one JSON metadata file.

A prepared folder holds

  latents-00000-of-00064.array_record ... latents-00063-of-00064.array_record
  metadata.json   {"format", "shape", "dtype", "count", "num_classes", "image_size",
                   "scale", "layout", "shards", ...extra}

Each record is the raw little-endian bytes of one latent (`shape`, `dtype`, NHWC, already
multiplied by `scale`) followed by its label as a little-endian int32. Raw bytes need no
decoder library in the training loop and their length is checked on every read. Records
are dealt round-robin over the shards (record i -> shard i % num_shards), so shards stay
balanced whatever the total. `metadata.json` is written last, atomically, on `close()`:
a folder without it is an unfinished preparation and is refused by the reader.

As in fast-DiT, the random horizontal flip (and the VAE posterior sample) are frozen into
the latents at preparation time; the reader applies no augmentation.
"""
from __future__ import annotations

import json
import os
from typing import Any

from array_record.python.array_record_module import ArrayRecordWriter
import grain
import numpy as np

from dydit_jax.errors import UserError

METADATA_FILE = "metadata.json"
FORMAT = "dydit_jax.latents.v1"
_LABEL = np.dtype("<i4")


def _shard_name(index: int, num_shards: int) -> str:
  return f"latents-{index:05d}-of-{num_shards:05d}.array_record"


class LatentShardWriter:
  """Writes (latent, label) records round-robin into `num_shards` array_record files.

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
    self._metadata = {"format": FORMAT, "dtype": np.dtype(dtype).name,
                      "num_classes": int(num_classes), "image_size": int(image_size),
                      "scale": float(scale), "layout": "NHWC",
                      "shards": [_shard_name(i, num_shards) for i in range(num_shards)],
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
    tmp = os.path.join(self.out_dir, METADATA_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump(metadata, f, indent=2)
    os.replace(tmp, os.path.join(self.out_dir, METADATA_FILE))
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
  if metadata.get("format") != FORMAT:
    raise UserError(f"{meta_path} has format {metadata.get('format')!r}, expected {FORMAT!r}.")
  return metadata


class LatentShardSource:
  """`Source` over a prepared folder, read with grain's `ArrayRecordDataSource`."""

  read_threads = 16

  def __init__(self, path: str):
    self.path = path
    self.metadata = read_metadata(path)
    self.shape = tuple(self.metadata["shape"])
    self.num_classes = int(self.metadata["num_classes"])
    self.scale = float(self.metadata["scale"])
    self._dtype = np.dtype(self.metadata["dtype"]).newbyteorder("<")
    self._num_values = int(np.prod(self.shape))
    self._record_bytes = self._num_values * self._dtype.itemsize + _LABEL.itemsize
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
    return {"x": latent.astype(np.float32), "y": label.astype(np.int32)}

  def __repr__(self) -> str:
    return f"LatentShardSource({self.path!r}, {len(self)} x {self.shape})"
