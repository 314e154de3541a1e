"""Geometry of the Stable Diffusion VAE (diffusers `AutoencoderKL`), the latent space DiT works in.

A `VAEConfig` is what the VAE converter writes next to the params (as `vae_config.json`) and what
`load_vae` reads back. It holds only what the weights cannot say by themselves in a convenient form
(the GroupNorm group count is not in any tensor shape) plus DiT's latent scale. The block types are
fixed (DownEncoderBlock2D / UpDecoderBlock2D, SiLU, mid-block attention, quant convs): that is the
only family this package implements, and the converter refuses configs outside it.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from dydit_jax.errors import UserError

DTYPES = ("float32", "bfloat16")
# How the VAE runs, not which weights it holds (same role as models.config.RUNTIME_FIELDS).
RUNTIME_FIELDS = ("dtype",)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Static geometry of one AutoencoderKL. Frozen, hashable: safe as a jit static argument.

  dtype: the activation / matmul dtype. "bfloat16" is for decoding on accelerators; GroupNorm
  statistics and the attention softmax stay in float32 either way, and parameters are stored in
  float32.
  """

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  # DiT (and Stable Diffusion v1) multiply encoder latents by this and divide by it before decoding,
  # so that the latents have roughly unit variance.
  scaling_factor: float = 0.18215
  dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    widths = self.block_out_channels
    if not widths or min(widths) <= 0:
      raise UserError(f"block_out_channels must be a non-empty list of positive widths, got {list(widths)}")
    for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
      if getattr(self, name) <= 0:
        raise UserError(f"{name} must be positive, got {getattr(self, name)}")
    bad = [c for c in widths if c % self.norm_num_groups]
    if bad:
      raise UserError(f"norm_num_groups {self.norm_num_groups} does not divide the block width(s) "
                      f"{', '.join(map(str, bad))} of block_out_channels {list(widths)}")
    if self.dtype not in DTYPES:
      raise UserError(f"VAE dtype must be one of {DTYPES}, got {self.dtype!r}")

  # Derived geometry -------------------------------------------------------------------------
  @property
  def downsample_factor(self) -> int:
    """Pixels per latent along each side (8 for the SD VAE: one stride-2 conv per block but the last)."""
    return 2 ** (len(self.block_out_channels) - 1)

  def latent_size(self, image_size: int) -> int:
    if image_size % self.downsample_factor:
      raise UserError(f"image size {image_size} is not a multiple of the VAE's downsampling factor "
                      f"{self.downsample_factor}")
    return image_size // self.downsample_factor

  # Serialization ----------------------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["block_out_channels"] = list(self.block_out_channels)
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "VAEConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise UserError(f"unknown VAE config fields: {sorted(unknown)}")
    return cls(**d)

  @classmethod
  def from_json(cls, text: str) -> "VAEConfig":
    return cls.from_dict(json.loads(text))

  def replace(self, **changes) -> "VAEConfig":
    return dataclasses.replace(self, **changes)

  def geometry(self) -> "VAEConfig":
    """This config with the RUNTIME_FIELDS at their defaults: equal for VAEs of the same weights."""
    defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in RUNTIME_FIELDS}
    return self.replace(**defaults)


# stabilityai/sd-vae-ft-ema and sd-vae-ft-mse (and the VAE inside Stable Diffusion v1): 83,653,863
# parameters in 248 tensors.
SD_VAE = VAEConfig()


def tiny_vae_config(**overrides) -> VAEConfig:
  """A VAE small enough for unit tests (two blocks of 32 and 64 channels, one resnet per encoder
  block, 8 groups: downsampling factor 2); any field can be overridden."""
  base = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
  return VAEConfig(**{**base, **overrides})
