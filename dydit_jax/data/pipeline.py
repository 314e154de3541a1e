"""The one batch iterator every data source goes through.

A source is any random-access sequence of examples `{"x": (H,W,C) float32, "y": int32}`
(see `Source`). `BatchIterator` turns it into an infinite stream of host-local batches:

* One GLOBAL stream of examples: epoch e is a permutation of the source drawn from
  (seed, e) by grain's index shuffle, so every epoch is reshuffled and the whole stream
  is a pure function of the seed. Batches are cut from this stream back to back; a
  batch may straddle an epoch boundary (no example is ever dropped).
* Global batch k is examples kB .. (k+1)B - 1 of that stream. Host p of P reads rows
  pL .. (p+1)L - 1 of it (L = B/P), in order: a disjoint block, and the P hosts together
  hold exactly global batch k. These are the rows its devices hold when the mesh lists
  the processes in order along the batch axis (`dydit_jax.train.sharding.host_rows`
  says which block a host owns). Unlike sharding the records per host, this keeps the
  global batches independent of the number of hosts.
* The position is the number of global examples consumed, stored as the JSON-able
  `{"seed", "epoch", "index"}`. Because it counts examples, not batches, a run can
  resume with another host count (or another global batch size) and still continue
  the very same example stream.

* Per-visit randomness: a source may define `draw(example, *, seed, epoch, index)`, called on
  every example read with the stream's seed, the epoch and the record index (prepared posterior
  latents draw their posterior sample there). As these three follow from the position, a resumed
  run draws exactly what the interrupted one would have.

Reading runs in grain threads (`num_threads`) with a small prefetch buffer; sources
held in memory should use 0 threads (the GIL makes threads pure overhead there).
"""
from __future__ import annotations

import sys
from typing import Any, Protocol

import grain
import jax
import numpy as np

from dydit_jax.errors import UserError

Batch = dict[str, np.ndarray]


class Source(Protocol):
  """A finite, random-access set of examples, the input of `BatchIterator`."""

  num_classes: int
  shape: tuple[int, ...]          # per-example (H, W, C)
  read_threads: int               # grain reader threads that suit this source

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, Any]:
    ...

  # Optional: def draw(self, example, *, seed: int, epoch: int, index: int) -> dict[str, Any]
  # (the example as seen in that epoch; see the module docstring).


class BatchIterator:
  """Infinite, shuffled, host-sharded batches `{"x": (B,H,W,C) f32, "y": (B,) i32}`.

  Attributes:
    source: the underlying `Source`.
    num_classes: number of labels (the null class of CFG is NOT counted).
    shape: per-example (H, W, C).
    global_batch_size: examples per step over all hosts.
    local_batch_size: examples per step on this host (`global / process_count`).
  """

  def __init__(self, source: Source, global_batch_size: int, *, seed: int = 0,
               process_index: int | None = None, process_count: int | None = None,
               num_threads: int | None = None):
    """Builds the iterator at the start of epoch 0.

    Args:
      source: random-access examples.
      global_batch_size: batch size summed over all hosts.
      seed: shuffle seed in [0, 2**32); the whole stream is a function of it.
      process_index: which block of each global batch this host reads; default
        `jax.process_index()`.
      process_count: number of blocks (hosts); default `jax.process_count()`.
      num_threads: grain reader threads; default `source.read_threads`.
    """
    self.source = source
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index {self.process_index} outside [0, {self.process_count}).")
    if global_batch_size <= 0 or global_batch_size % self.process_count:
      raise UserError(f"global_batch_size {global_batch_size} must be a positive multiple "
                      f"of process_count {self.process_count}.")
    if not 0 <= seed < 2**32:
      raise UserError(f"seed must lie in [0, 2**32), got {seed}.")
    if len(source) == 0:
      raise UserError(f"Source {source!r} is empty.")
    self.seed = int(seed)
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // self.process_count
    self.num_threads = source.read_threads if num_threads is None else num_threads
    # An epoch-wise reshuffled infinite stream of record indices: grain folds the epoch into the seed.
    # (The same order as shuffling the source itself, so earlier data positions stay valid.)
    self._order = grain.MapDataset.range(len(source)).shuffle(seed=self.seed).repeat(None)
    self._draw = getattr(source, "draw", None)
    self._iterator = None
    self._seek(0)

  @property
  def num_classes(self) -> int:
    return self.source.num_classes

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.source.shape)

  def _example(self, g: int) -> dict[str, Any]:
    """Global example `g` of the stream."""
    index = int(self._order[g])
    example = self.source[index]
    if self._draw is not None:
      example = self._draw(example, seed=self.seed, epoch=g // len(self.source), index=index)
    return example

  def _seek(self, position: int) -> None:
    """Restarts reading at global example `position` of the stream."""
    if self._iterator is not None:
      self._iterator.close()
    rows, first = self.local_batch_size, self.process_index * self.local_batch_size
    host_stream = grain.MapDataset.range(0, sys.maxsize).map(
        lambda i: self._example(position + (i // rows) * self.global_batch_size + first + i % rows))
    read_options = grain.ReadOptions(num_threads=self.num_threads,
                                     prefetch_buffer_size=2 * self.num_threads)
    batches = host_stream.batch(self.local_batch_size).to_iter_dataset(read_options)
    self._iterator = iter(batches)
    self._position = position

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> Batch:
    batch = next(self._iterator)
    self._position += self.global_batch_size
    return {"x": np.asarray(batch["x"], np.float32), "y": np.asarray(batch["y"], np.int32)}

  def get_state(self) -> dict[str, int]:
    """The position after the last returned batch, as a small JSON-able dict."""
    epoch, index = divmod(self._position, len(self.source))
    return {"seed": self.seed, "epoch": epoch, "index": index}

  def set_state(self, state: dict[str, int]) -> None:
    """Continues from a `get_state()` result, possibly saved by another host layout."""
    if int(state["seed"]) != self.seed:
      raise UserError(f"Data state was saved with seed {state['seed']}, but this iterator "
                      f"uses seed {self.seed}; the example streams would differ.")
    if not 0 <= int(state["index"]) < len(self.source):
      raise UserError(f"Data state index {state['index']} is outside this source of "
                      f"{len(self.source)} examples (was it saved for another dataset?).")
    self._seek(int(state["epoch"]) * len(self.source) + int(state["index"]))

  def close(self) -> None:
    """Stops the reader threads."""
    self._iterator.close()

