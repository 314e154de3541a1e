"""VAE directories: the on-disk form of a converted AutoencoderKL, and `load_vae`, their one loader.

  vae_config.json   `VAEConfig.to_json()`: the geometry, so the directory describes itself
  params/           an orbax (StandardCheckpointer) tree: the full NNX state as a pure dict

The layout is the DiT model directory's (`dydit_jax.checkpoints`) with the config under another
name, on purpose: `checkpoints.load_model` refuses a VAE directory instead of misreading it, and
`load_vae` names the mix-up the other way round. Writing is `checkpoints.write_model_dir` (atomic: a temporary
directory next to the destination, renamed at the end).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from dydit_jax import checkpoints
from dydit_jax.errors import UserError
from dydit_jax.vae.config import VAEConfig
from dydit_jax.vae.model import AutoencoderKL

VAE_CONFIG_FILE = checkpoints.VAE_CONFIG_FILE
PARAMS_DIR = checkpoints.PARAMS_DIR
# How to get the VAE every latent tool needs, said the same way by each of them.
CONVERT_HINT = ("a VAE converted with python -m dydit_jax.vae.convert --src sd-vae-ft-ema --dst DIR "
                "(a download of stabilityai/sd-vae-ft-ema, the VAE DiT encodes and samples with)")


def write_vae_dir(dst: os.PathLike | str, params: dict[str, Any], config: VAEConfig, *,
                  overwrite: bool = False) -> Path:
  """Atomically write `params` (a pure dict of arrays, NNX state layout) and `config` to `dst`."""
  return checkpoints.write_model_dir(dst, params, config, overwrite=overwrite, config_file=VAE_CONFIG_FILE)


def save_vae(model: AutoencoderKL, dst: os.PathLike | str, *, overwrite: bool = False) -> Path:
  """Write `model` as a VAE directory that `load_vae` reads back (the runtime dtype is not stored)."""
  return write_vae_dir(dst, nnx.state(model).to_pure_dict(), model.config.geometry(), overwrite=overwrite)


def fingerprint(vae: AutoencoderKL) -> str:
  """sha256 over every parameter's path and float32 bytes: equal exactly for the same weights, whatever
  directory they were loaded from (prepared latents record it, so a resumed preparation cannot switch VAE)."""
  digest = hashlib.sha256()
  for path, var in sorted(nnx.to_flat_state(nnx.state(vae, nnx.Param)), key=lambda item: str(item[0])):
    digest.update(str(path).encode())
    digest.update(np.ascontiguousarray(np.asarray(var.get_value(), np.float32)).tobytes())
  return digest.hexdigest()


def read_vae_config(path: os.PathLike | str) -> VAEConfig:
  """The VAEConfig of the VAE directory at `path`, read alone (no array is touched)."""
  path = epath.Path(path)
  config_file = path / VAE_CONFIG_FILE
  if not config_file.is_file():
    if (path / checkpoints.CONFIG_FILE).is_file():
      raise FileNotFoundError(f"{path} holds a DiT model ({checkpoints.CONFIG_FILE}), not a VAE ({VAE_CONFIG_FILE}); "
                              "load it with checkpoints.load_model")
    raise FileNotFoundError(f"{path} is not a VAE directory ({VAE_CONFIG_FILE} and {PARAMS_DIR}/); write one with "
                            "`python -m dydit_jax.vae.convert`")
  return VAEConfig.from_json(config_file.read_text())


def load_vae(path: os.PathLike | str, *, dtype: Any = None,
             sharding: checkpoints.ShardingSpec | None = None) -> AutoencoderKL:
  """The AutoencoderKL stored at `path` (a directory written by the VAE converter or `save_vae`).

  dtype: compute dtype override ("bfloat16" to decode on accelerators); parameters stay float32.
  sharding: where the arrays land (`checkpoints.ShardingSpec`); default: the first local device.
  Restores straight into `nnx.eval_shape` abstract targets, like `checkpoints.load_model`.
  """
  path = epath.Path(path)
  path = path if "://" in str(path) else epath.Path(os.path.abspath(path))
  config = read_vae_config(path)
  if not (path / PARAMS_DIR).is_dir():
    raise FileNotFoundError(f"{path} has {VAE_CONFIG_FILE} but no {PARAMS_DIR}/ directory")
  if dtype is not None:
    config = config.replace(dtype=jnp.dtype(dtype).name)
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0))))
  target = checkpoints.abstract_target(abstract_state, sharding)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(path / PARAMS_DIR, target)
  nnx.replace_by_pure_dict(abstract_state, restored)
  return nnx.merge(graphdef, abstract_state)


def vae_for_model(model_path: str, in_channels: int, vae_dir: str | None, *,
                  flag: str = "--vae") -> AutoencoderKL | None:
  """The VAE that turns the samples of a model with `in_channels` into images, or None for a pixel model.

  Checked before any sampling work: a latent model (not 1 or 3 channels) needs `vae_dir`, whose
  latent_channels must equal `in_channels`; a pixel model's samples are images already, so a VAE
  given for it is a mistake (it would be silently ignored) rather than something to skip.
  """
  if in_channels in (1, 3):
    if vae_dir:
      raise UserError(f"{model_path} holds a pixel model ({in_channels} channels): its samples are images "
                      f"already and need no VAE; drop {flag}")
    return None
  if not vae_dir:
    raise UserError(f"{model_path} holds a latent model ({in_channels} channels): pass {flag}=DIR, {CONVERT_HINT}")
  config = read_vae_config(vae_dir)
  if config.latent_channels != in_channels:
    raise UserError(f"the VAE {vae_dir} has {config.latent_channels} latent channels but the model {model_path} "
                    f"samples {in_channels}: they do not belong together; {flag} wants {CONVERT_HINT}")
  return load_vae(vae_dir)
