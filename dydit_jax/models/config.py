"""Model geometry: the one description of a DiT/DyDiT that every tool passes around.

A `ModelConfig` is what the converter writes next to the params (as JSON) and what
`checkpoints.load_model` reads back, so a checkpoint directory is self-describing.
The registry mirrors the twelve official DiT constructors (`DiT-S/2` ... `DiT-XL/8`).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from dydit_jax.diffusion.gaussian import PREDICTIONS
from dydit_jax.errors import UserError

# name -> (depth, hidden_size, num_heads); patch size comes from the "/p" suffix.
_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
MODEL_NAMES = tuple(f"DiT-{s}/{p}" for s in _SIZES for p in (2, 4, 8))

# How a DyDiT width router maps its outputs to heads / MLP groups.
#   "forced_first": H-1 outputs, a constant 1 is prepended (Mar-2025 official release).
#   "all": H outputs, no forced unit (Dec-2024 official release).
ROUTER_FORMATS = ("forced_first", "all")
RESIDUAL_DTYPES = ("float32", "bfloat16")
# `jax.nn.dot_product_attention` implementations: XLA's (any backend) or cuDNN's fused kernel (GPU,
# bf16 / fp16). The one spelling everywhere; None, "" and "none" (older configs and checkpoints) mean
# "xla".
ATTENTION_IMPLS = ("xla", "cudnn")
# How a model runs, not which weights it holds: checkpoints and width plans ignore them.
RUNTIME_FIELDS = ("dtype", "attention_impl", "remat", "residual_dtype", "row_kernel")
# How the row-wise work at a sub-block boundary (gated add, LayerNorm, adaLN) is computed: composed XLA
# ops, or one Pallas pass per row (`dydit_jax.models.row_kernel`; GPU, or interpreted on the CPU).
ROW_KERNELS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static geometry and numerics of one model. Frozen, hashable: safe as a jit static arg."""

  input_size: int = 32          # latent side (image_size // 8 for the SD VAE)
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  num_classes: int = 1000
  learn_sigma: bool = True
  # What the mean channels predict: "eps" (DiT, every official checkpoint), "x0" or "v" (velocity,
  # which the CPU demo trains from scratch; see dydit_jax.diffusion.gaussian.ModelMeanType).
  prediction: str = "eps"
  # DyDiT: routers present (timestep-wise width + spatial token routers).
  dynamic: bool = False
  router_format: str = "forced_first"
  # Numerics: parameters are stored in param_dtype, matmuls run in dtype.
  dtype: str = "float32"
  param_dtype: str = "float32"
  # The residual stream between blocks: float32 (what PyTorch autocast keeps, the default) or
  # bfloat16, which halves the bytes of the per-layer passes over it (norms, modulation, gated adds)
  # that do not shrink with DyDiT's widths (docs/benchmarks.md §3c). Each add is computed in float32
  # and rounded once.
  residual_dtype: str = "float32"
  # Gumbel-sigmoid temperature of the training-time gates (only scales gradients).
  gate_tau: float = 5.0
  # Runtime choices (not geometry): the attention implementation (ATTENTION_IMPLS) and
  # rematerialization of each block in training.
  attention_impl: str = "xla"
  remat: bool = False
  row_kernel: str = "xla"

  def __post_init__(self):
    object.__setattr__(self, "attention_impl", normalize_attention(self.attention_impl))
    if self.hidden_size % self.num_heads:
      raise UserError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.input_size % self.patch_size:
      raise UserError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
    if self.prediction not in PREDICTIONS:
      raise UserError(f"prediction must be one of {sorted(PREDICTIONS)}, got {self.prediction!r}")
    if self.router_format not in ROUTER_FORMATS:
      raise UserError(f"router_format must be one of {ROUTER_FORMATS}, got {self.router_format!r}")
    if self.residual_dtype not in RESIDUAL_DTYPES:
      raise UserError(f"residual_dtype must be one of {RESIDUAL_DTYPES}, got {self.residual_dtype!r}")
    if self.row_kernel not in ROW_KERNELS:
      raise UserError(f"row_kernel must be one of {ROW_KERNELS}, got {self.row_kernel!r}")
    if self.mlp_hidden % self.num_heads:
      raise UserError(f"MLP width {self.mlp_hidden} does not split into {self.num_heads} groups")

  # Derived geometry -------------------------------------------------------------------------
  @property
  def out_channels(self) -> int:
    return self.in_channels * 2 if self.learn_sigma else self.in_channels

  @property
  def grid_size(self) -> int:
    return self.input_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size ** 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def mlp_hidden(self) -> int:
    return int(self.hidden_size * self.mlp_ratio)

  @property
  def num_groups(self) -> int:
    """MLP channel groups routed by TDW: as many as heads (official DyDiT)."""
    return self.num_heads

  @property
  def group_size(self) -> int:
    return self.mlp_hidden // self.num_groups

  @property
  def router_outputs(self) -> int:
    return self.num_heads - 1 if self.router_format == "forced_first" else self.num_heads

  @property
  def token_router_hidden(self) -> int:
    return self.hidden_size // 16

  # Serialization ----------------------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise UserError(f"unknown model config fields: {sorted(unknown)}")
    return cls(**d)

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    return cls.from_dict(json.loads(text))

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def geometry(self) -> "ModelConfig":
    """This config with the RUNTIME_FIELDS at their defaults: equal for models of the same weights."""
    defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in RUNTIME_FIELDS}
    return self.replace(**defaults)


def normalize_attention(name: str | None) -> str:
  """The one spelling of an attention implementation (see ATTENTION_IMPLS)."""
  value = "xla" if name in (None, "", "none", "None") else str(name).lower()
  if value not in ATTENTION_IMPLS:
    raise UserError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {name!r}")
  return value


def model_config(name: str, image_size: int = 256, **overrides) -> ModelConfig:
  """The official geometry for `name` (e.g. "DiT-XL/2") at `image_size` pixels (latent = /8)."""
  try:
    size, patch = name.removeprefix("DiT-").split("/")
    depth, hidden, heads = _SIZES[size]
    patch = int(patch)
    if patch not in (2, 4, 8):
      raise KeyError(name)
  except (KeyError, ValueError):
    raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}") from None
  if image_size % 8:
    raise UserError(f"image_size must be a multiple of 8, got {image_size}")
  base = dict(input_size=image_size // 8, patch_size=patch, depth=depth, hidden_size=hidden, num_heads=heads)
  base.update(overrides)
  return ModelConfig(**base)
