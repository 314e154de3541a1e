"""Inception-v3 as the ADM evaluator runs it (the 2015-12-05 TensorFlow graph, "FID Inception"), NHWC.

  net = InceptionV3(rngs=nnx.Rngs(0))          # or evaluation.load_inception(dir) for real weights
  out = net(images)                            # images (N, H, W, 3), 0..255 (uint8 or float), any H, W
  out.pool (N, 2048), out.logits (N, 1008), out.spatial (N, 2023)

What makes this the ADM network rather than torchvision's Inception (each changes FID):
- the graph resizes to 299x299 itself with TF1's legacy bilinear resize (`resize_tf1`: source
  coordinate = dst * in / out, no half-pixel offset, no antialiasing), then maps 0..255 to
  (x - 128) / 128;
- BatchNorm eps is 1e-3 and uses the stored moving statistics;
- the pooling branches of Mixed_5b-d, 6b-e and 7b average over the 3x3 window without the zero
  padding (count_include_pad=False), and Mixed_7c's pooling branch is a max pool;
- the logits are the unbiased `pool @ softmax/weights` (1008 classes; ADM's IS ignores the bias);
- the sFID features are the first 7 channels of `mixed_6/conv` (= Mixed_6d.branch1x1 after its
  ReLU), 17x17x7 flattened in NHWC order (h, w, c) = 2023 numbers, whatever the input size.

Attribute names are torchvision's / torch-fidelity's (`Mixed_6d.branch7x7dbl_3.bn`), so the .pth
converter is a table of renames (`evaluation.convert`). Convolutions and the final matmul run at
`Precision.HIGHEST`: float32 throughout, never TF32 / bfloat16 passes on accelerators.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SIZE = 299                 # the graph's input resolution
BN_EPS = 1e-3
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7       # ADM keeps mixed_6/conv[..., :7]
POOL_DIM = 2048
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
HIGHEST = jax.lax.Precision.HIGHEST


class Features(NamedTuple):
  pool: jax.Array      # (N, 2048) pool_3
  logits: jax.Array    # (N, 1008) pool_3 @ softmax/weights, no bias
  spatial: jax.Array   # (N, 2023) mixed_6/conv[..., :7], NHWC-flattened


# Resize ------------------------------------------------------------------------------------------
def _tf1_axis(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(lower index, upper index, float32 weight of the upper) along one axis, as TF1's legacy
  ResizeBilinear (align_corners=False, half_pixel_centers=False) computes them in float32."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lo = np.floor(src).astype(np.int32)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)


def resize_tf1(x: jax.Array, size: int = SIZE) -> jax.Array:
  """TF1-legacy bilinear resize of NHWC float images to (size, size): interpolate along x, then y,
  each as `a + (b - a) * w` (TF's order of operations)."""
  lo_y, hi_y, wy = _tf1_axis(x.shape[1], size)
  lo_x, hi_x, wx = _tf1_axis(x.shape[2], size)
  wx, wy = jnp.asarray(wx)[:, None], jnp.asarray(wy)[:, None, None]

  def along_x(rows):
    left, right = jnp.take(rows, lo_x, axis=2), jnp.take(rows, hi_x, axis=2)
    return left + (right - left) * wx

  top, bottom = along_x(jnp.take(x, lo_y, axis=1)), along_x(jnp.take(x, hi_y, axis=1))
  return top + (bottom - top) * wy


# Layers ------------------------------------------------------------------------------------------
def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
  """conv (no bias) -> BatchNorm (eps 1e-3, moving statistics) -> ReLU; padding as torch's (symmetric)."""

  def __init__(self, cin: int, cout: int, kernel, *, stride: int = 1, padding=0, rngs: nnx.Rngs):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(cin, cout, kernel_size=_pair(kernel), strides=(stride, stride),
                         padding=((ph, ph), (pw, pw)), use_bias=False, precision=HIGHEST, rngs=rngs)
    self.bn = nnx.BatchNorm(cout, epsilon=BN_EPS, use_running_average=True, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool(x):   # TF's SAME average pool: the padding is not counted
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride: int = 2, padding: int = 0):
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((padding, padding),) * 2)


class InceptionA(nnx.Module):
  """Mixed_5b-d: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1."""

  def __init__(self, cin: int, pool_features: int, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(_avg_pool(x))], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a (35 -> 17): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool/2."""

  def __init__(self, cin: int, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        _max_pool(x)], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b-e: 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7 | avg pool -> 1x1."""

  def __init__(self, cin: int, c7: int, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x, first: jax.Array | None = None):
    """`first`: branch1x1(x) when the caller already has it (Mixed_6d, whose branch1x1 is sFID's)."""
    dbl = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      dbl = layer(dbl)
    return jnp.concatenate([
        self.branch1x1(x) if first is None else first,
        self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
        dbl,
        self.branch_pool(_avg_pool(x))], axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a (17 -> 8): 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool/2."""

  def __init__(self, cin: int, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b, _max_pool(x)], axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b / 7c: 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1; the pool is an
  average without padding in 7b and a max pool in 7c (the TF graph's quirk)."""

  def __init__(self, cin: int, max_pool: bool, rngs: nnx.Rngs):
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    t = self.branch3x3_1(x)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = _max_pool(x, stride=1, padding=1) if self.max_pool else _avg_pool(x)
    return jnp.concatenate([
        self.branch1x1(x), self.branch3x3_2a(t), self.branch3x3_2b(t),
        self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], axis=-1)


# The network -------------------------------------------------------------------------------------
class InceptionV3(nnx.Module):
  """The FID Inception (TF 2015-12-05 graph): images 0..255 of any size -> `Features`."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs)
    self.Mixed_6a = InceptionB(288, rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs)
    self.Mixed_7a = InceptionD(768, rngs)
    self.Mixed_7b = InceptionE(1280, max_pool=False, rngs=rngs)
    self.Mixed_7c = InceptionE(2048, max_pool=True, rngs=rngs)
    self.fc = nnx.Linear(POOL_DIM, NUM_CLASSES, precision=HIGHEST, rngs=rngs)   # bias kept, unused

  def __call__(self, images: jax.Array) -> Features:
    x = resize_tf1(jnp.asarray(images, jnp.float32))
    x = (x - 128.0) / 128.0
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool(x)))
    x = _max_pool(x)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
      x = block(x)
    first = self.Mixed_6d.branch1x1(x)
    spatial = first[..., :SPATIAL_CHANNELS].reshape(len(x), -1)
    x = self.Mixed_6e(self.Mixed_6d(x, first))
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
    pool = x.mean(axis=(1, 2))
    logits = jnp.matmul(pool, self.fc.kernel[...], precision=HIGHEST)
    return Features(pool, logits, spatial)
