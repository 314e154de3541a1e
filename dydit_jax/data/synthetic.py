"""Synthetic examples for tests and benchmarks: Gaussian "latents" with random labels.

Example i is drawn from a generator keyed by (seed, i), so it is the same whatever
the read order, thread count or host layout, and nothing is held in memory: a
benchmark can ask for a large `num_examples` at no cost.
"""
from __future__ import annotations

import numpy as np


class SyntheticSource:
  """`Source` of `num_examples` standard-normal arrays of `shape` with uniform labels."""

  read_threads = 4

  def __init__(self, num_examples: int = 1024, shape: tuple[int, ...] = (32, 32, 4),
               num_classes: int = 1000, seed: int = 0):
    self.num_examples = int(num_examples)
    self.shape = tuple(int(s) for s in shape)
    self.num_classes = int(num_classes)
    self.seed = int(seed)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"Synthetic index {index} outside [0, {self.num_examples}).")
    rng = np.random.default_rng((self.seed, int(index)))
    return {"x": rng.standard_normal(self.shape, dtype=np.float32),
            "y": np.int32(rng.integers(self.num_classes))}

  def __repr__(self) -> str:
    return (f"SyntheticSource(num_examples={self.num_examples}, shape={self.shape}, "
            f"num_classes={self.num_classes}, seed={self.seed})")
