"""The Stable Diffusion VAE (diffusers `AutoencoderKL`, sd-vae-ft-ema / -mse) in Flax NNX, NHWC.

DiT never trains the VAE: it encodes images into latents once (`encode_latents`, x scaling_factor)
and decodes samples at the end (`decode_latents`). This module is the inference network only, with
attribute names that mirror the diffusers module tree (`encoder.down_blocks[i].resnets[j].conv1`,
`decoder.up_blocks[i].upsamplers[0].conv`, `encoder.mid_block.attentions[0].to_q`, ...) so the
converter's key table is a mechanical one (`vae.convert`). The only renames are the PyTorch leaf
names (weight -> kernel / scale) and `to_out.0` -> `to_out` (diffusers wraps the output projection
in a ModuleList with a dropout).

Numerics follow diffusers exactly where it matters for parity: GroupNorm eps 1e-6 with the
two-pass variance, the stride-2 downsampling conv padded on the right and bottom only (0, 1, 0, 1),
nearest-neighbour x2 upsampling, one attention head as wide as the channels, and the posterior's
log-variance clamped to [-30, 20]. With `VAEConfig.dtype == "bfloat16"` the convolutions and
matmuls run in bfloat16 but GroupNorm statistics and the attention softmax stay in float32 (the
two places where bfloat16 loses real accuracy), and outputs come back in float32.
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from dydit_jax.vae.config import VAEConfig

GROUP_NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)
_PAD_1 = ((1, 1), (1, 1))
# Downsample2D pads (left 0, right 1, top 0, bottom 1) and then convolves with padding 0: the
# asymmetric padding is folded into the convolution (identical result, no padded copy).
_PAD_RIGHT_BOTTOM = ((0, 1), (0, 1))


def _conv(cin: int, cout: int, cfg: VAEConfig, rngs: nnx.Rngs, *, kernel: int = 3, stride: int = 1,
          padding=_PAD_1) -> nnx.Conv:
  return nnx.Conv(cin, cout, kernel_size=(kernel, kernel), strides=(stride, stride),
                  padding=padding if kernel > 1 else "VALID", rngs=rngs,
                  dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32)


def _linear(cin: int, cout: int, cfg: VAEConfig, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(cin, cout, rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32)


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm(groups, C, eps=1e-6) on NHWC, with the statistics always in float32.

  Written out rather than nnx.GroupNorm so that the precision is explicit: the mean and the
  two-pass variance are computed in float32 whatever the activation dtype, and the result is cast
  back to the compute dtype after the affine map.
  """

  def __init__(self, channels: int, cfg: VAEConfig):
    self.num_groups = cfg.norm_num_groups
    self.dtype = jnp.dtype(cfg.dtype)
    self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, c = x.shape[0], x.shape[-1]
    g = x.astype(jnp.float32).reshape(b, -1, self.num_groups, c // self.num_groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + GROUP_NORM_EPS)).reshape(x.shape)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class ResnetBlock2D(nnx.Module):
  """GN -> SiLU -> conv1 -> GN -> SiLU -> conv2, plus the input (through a 1x1 conv when the width
  changes). Dropout is 0 and the output scale 1 in every SD VAE, so neither exists here."""

  def __init__(self, cin: int, cout: int, cfg: VAEConfig, rngs: nnx.Rngs):
    self.norm1 = GroupNorm(cin, cfg)
    self.conv1 = _conv(cin, cout, cfg, rngs)
    self.norm2 = GroupNorm(cout, cfg)
    self.conv2 = _conv(cout, cout, cfg, rngs)
    self.conv_shortcut = _conv(cin, cout, cfg, rngs, kernel=1) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class Attention(nnx.Module):
  """The mid-block self-attention: one head as wide as the channels over the H*W positions, with a
  GroupNorm in front and the residual added back (diffusers `Attention(..., residual_connection=True)`
  as built for the VAE, or the LDM `AttnBlock`)."""

  def __init__(self, channels: int, cfg: VAEConfig, rngs: nnx.Rngs):
    self.group_norm = GroupNorm(channels, cfg)
    self.to_q = _linear(channels, channels, cfg, rngs)
    self.to_k = _linear(channels, channels, cfg, rngs)
    self.to_v = _linear(channels, channels, cfg, rngs)
    self.to_out = _linear(channels, channels, cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    tokens = self.group_norm(x).reshape(b, h * w, c)
    q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
    # Scores accumulate and the softmax runs in float32 (torch upcasts the softmax too); the weights
    # are rounded to the compute dtype only for the product with v.
    scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = self.to_out(jnp.einsum("bqk,bkc->bqc", probs, v))
    return x + out.reshape(x.shape).astype(x.dtype)


class UNetMidBlock2D(nnx.Module):
  """resnet, attention, resnet at the bottleneck width (encoder and decoder alike)."""

  def __init__(self, channels: int, cfg: VAEConfig, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, cfg, rngs) for _ in range(2)])
    self.attentions = nnx.List([Attention(channels, cfg, rngs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    x = self.attentions[0](x)
    return self.resnets[1](x)


class Downsample2D(nnx.Module):
  def __init__(self, channels: int, cfg: VAEConfig, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, cfg, rngs, stride=2, padding=_PAD_RIGHT_BOTTOM)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample2D(nnx.Module):
  def __init__(self, channels: int, cfg: VAEConfig, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape   # nearest x2: every pixel becomes a 2x2 square
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return self.conv(x)


class DownEncoderBlock2D(nnx.Module):
  def __init__(self, cin: int, cout: int, downsample: bool, cfg: VAEConfig, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(cin if j == 0 else cout, cout, cfg, rngs)
                             for j in range(cfg.layers_per_block)])
    self.downsamplers = nnx.List([Downsample2D(cout, cfg, rngs)] if downsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in (*self.resnets, *self.downsamplers):
      x = layer(x)
    return x


class UpDecoderBlock2D(nnx.Module):
  """layers_per_block + 1 resnets (one more than the encoder block), then the upsampler."""

  def __init__(self, cin: int, cout: int, upsample: bool, cfg: VAEConfig, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(cin if j == 0 else cout, cout, cfg, rngs)
                             for j in range(cfg.layers_per_block + 1)])
    self.upsamplers = nnx.List([Upsample2D(cout, cfg, rngs)] if upsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in (*self.resnets, *self.upsamplers):
      x = layer(x)
    return x


class Encoder(nnx.Module):
  """(B,H,W,in) images -> (B,H/f,W/f,2*latent) moments [mean | logvar], before quant_conv."""

  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
    widths = cfg.block_out_channels
    self.conv_in = _conv(cfg.in_channels, widths[0], cfg, rngs)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(widths[max(i - 1, 0)], widths[i], i < len(widths) - 1, cfg, rngs)
        for i in range(len(widths))])
    self.mid_block = UNetMidBlock2D(widths[-1], cfg, rngs)
    self.conv_norm_out = GroupNorm(widths[-1], cfg)
    self.conv_out = _conv(widths[-1], 2 * cfg.latent_channels, cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """(B,h,w,latent) latents (after post_quant_conv) -> (B,h*f,w*f,out) images. No final tanh."""

  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
    widths = cfg.block_out_channels[::-1]
    self.conv_in = _conv(cfg.latent_channels, widths[0], cfg, rngs)
    self.mid_block = UNetMidBlock2D(widths[0], cfg, rngs)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(widths[max(i - 1, 0)], widths[i], i < len(widths) - 1, cfg, rngs)
        for i in range(len(widths))])
    self.conv_norm_out = GroupNorm(widths[-1], cfg)
    self.conv_out = _conv(widths[-1], cfg.out_channels, cfg, rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


@flax.struct.dataclass
class Posterior:
  """The encoder's diagonal Gaussian over latents (NHWC, float32); a pytree, so jit can return it.

  `logvar` is already clamped to [-30, 20], as in diffusers' DiagonalGaussianDistribution.
  """

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "Posterior":
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, *LOGVAR_RANGE))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def mode(self) -> jax.Array:
    return self.mean

  def sample(self, key: jax.Array | None = None, *, noise: jax.Array | None = None) -> jax.Array:
    """mean + std * noise, the noise N(0, 1) drawn from `key` or given (e.g. to match PyTorch)."""
    if noise is None:
      if key is None:
        raise ValueError("Posterior.sample needs a PRNG key or the noise")
      noise = jax.random.normal(key, self.mean.shape, jnp.float32)
    return self.mean + self.std * noise


class AutoencoderKL(nnx.Module):
  """`encode(x) -> Posterior`, `decode(z) -> x`, NHWC; images in [-1, 1], outputs float32.

  `encode_latents` / `decode_latents` apply DiT's latent scale (`config.scaling_factor`).
  """

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    self.config = config
    moments, latent = 2 * config.latent_channels, config.latent_channels
    self.encoder = Encoder(config, rngs)
    self.decoder = Decoder(config, rngs)
    self.quant_conv = _conv(moments, moments, config, rngs, kernel=1)
    self.post_quant_conv = _conv(latent, latent, config, rngs, kernel=1)

  def encode(self, x: jax.Array) -> Posterior:
    return Posterior.from_moments(self.quant_conv(self.encoder(x)))

  def decode(self, z: jax.Array) -> jax.Array:
    return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

  def encode_latents(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """DiT's training latents: a posterior sample (with `key`) or its mode (without), times the
    scaling factor."""
    posterior = self.encode(x)
    z = posterior.mode() if key is None else posterior.sample(key)
    return z * self.config.scaling_factor

  def decode_latents(self, z: jax.Array) -> jax.Array:
    """Images from DiT's scaled latents: decode(z / scaling_factor)."""
    return self.decode(z / self.config.scaling_factor)

  def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
    """Reconstruction: decode(sample) with `key`, decode(mode) without (diffusers' forward)."""
    posterior = self.encode(x)
    return self.decode(posterior.mode() if key is None else posterior.sample(key))
