"""Shared pieces of the VAE tests: random diffusers reference VAEs, the other key schemas, the CLI."""
from __future__ import annotations

import contextlib
import io
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")     # nothing here may reach the Hub

import diffusers  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from dydit_jax import cli  # noqa: E402
from dydit_jax.vae import VAEConfig  # noqa: E402
from dydit_jax.vae import convert as vae_convert  # noqa: E402

# fp32 parity bound on the relative L2 error of whole-network outputs.
PARITY_RTOL = 1e-4


def diffusers_vae(cfg: VAEConfig) -> diffusers.AutoencoderKL:
  """A diffusers AutoencoderKL of `cfg`'s geometry at diffusers' init (works on the meta device)."""
  n = len(cfg.block_out_channels)
  return diffusers.AutoencoderKL(
      in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
      down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
      block_out_channels=list(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
      norm_num_groups=cfg.norm_num_groups, scaling_factor=cfg.scaling_factor)


def torch_vae(cfg: VAEConfig, seed: int = 0) -> diffusers.AutoencoderKL:
  """`diffusers_vae(cfg)` in eval mode with every parameter random (see randomize_)."""
  return randomize_(diffusers_vae(cfg).eval(), seed)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Weights N(0, gain^2 / fan_in) (activations stay O(1) at any width; gain 2 on q and k so the
  attention is far from uniform), biases N(0, 0.02^2), GroupNorm affine 1 + N(0, 0.1^2) / N(0, 0.1^2)."""
  gen = torch.Generator().manual_seed(seed)
  for name, module in model.named_modules():
    if isinstance(module, torch.nn.GroupNorm):
      module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=gen))
      module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
    elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
      fan_in = module.weight[0].numel()
      gain = 2.0 if name.endswith(("to_q", "to_k")) else 1.0
      module.weight.copy_(gain / fan_in ** 0.5 * torch.randn(module.weight.shape, generator=gen))
      module.bias.copy_(0.02 * torch.randn(module.bias.shape, generator=gen))
  return model


# The two other key schemas, written from the diffusers names -----------------------------------------
_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
_LDM_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def legacy_names(sd: dict) -> dict:
  """The pre-0.14 diffusers attention names (what the sd-vae-ft-* files on the Hub use)."""
  out = {}
  for key, value in sd.items():
    for new, old in _LEGACY.items():
      key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
    out[key] = value
  return out


def ldm_name(key: str, num_blocks: int) -> str:
  """One diffusers key under its CompVis / LDM name (decoder up blocks in reverse order)."""
  parts = key.split(".")
  if parts[1] == "down_blocks":          # encoder.down_blocks.i.{resnets.j | downsamplers.0}.*
    tail = (["block", parts[4]] if parts[3] == "resnets" else ["downsample"]) + parts[5:]
    parts = [parts[0], "down", parts[2], *tail]
  elif parts[1] == "up_blocks":
    tail = (["block", parts[4]] if parts[3] == "resnets" else ["upsample"]) + parts[5:]
    parts = [parts[0], "up", str(num_blocks - 1 - int(parts[2])), *tail]
  elif parts[1] == "mid_block" and parts[2] == "resnets":
    parts = [parts[0], "mid", f"block_{int(parts[3]) + 1}", *parts[4:]]
  elif parts[1] == "mid_block":          # attentions.0.<layer>.<leaf>
    layer = ".".join(parts[4:-1])
    parts = [parts[0], "mid", "attn_1", _LDM_ATTN[layer], parts[-1]]
  elif parts[1:2] == ["conv_norm_out"]:
    parts[1] = "norm_out"
  return ".".join("nin_shortcut" if p == "conv_shortcut" else p for p in parts)


def ldm_names(sd: dict, num_blocks: int) -> dict:
  """The LDM state dict: renamed, and the attention projections as (C, C, 1, 1) conv weights."""
  out = {}
  for key, value in sd.items():
    if re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key):
      value = value[:, :, None, None]
    out[ldm_name(key, num_blocks)] = value
  return out


# Conversion and comparison --------------------------------------------------------------------------
def convert_main(src, dst, *args: str) -> tuple[int, str, str]:
  """The converter's CLI (its flags, its error guard), in-process: (exit status, stdout, stderr)."""
  values = flags.FlagValues()
  vae_convert.define_flags(values)
  values(["convert", f"--src={src}", f"--dst={dst}", *args])
  out, err, code = io.StringIO(), io.StringIO(), 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      cli.guarded(vae_convert.main)(["convert"], values)
    except SystemExit as e:
      code = e.code
  return code, out.getvalue(), err.getvalue()


def jitted(model, method: str):
  """`model.<method>` as one jitted function of its arguments (the state passed as an argument)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, *args: getattr(nnx.merge(graphdef, s), method)(*args))
  return lambda *args: fn(state, *args)


def params(model) -> dict:
  return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))}


def nhwc(x: torch.Tensor) -> np.ndarray:
  return x.permute(0, 2, 3, 1).numpy()


def nchw(x) -> np.ndarray:
  return np.asarray(x).transpose(0, 3, 1, 2)


def rel_l2(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))
