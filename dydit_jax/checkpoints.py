"""Every on-disk layout of the project, read side: model directories and training workdirs.

A model directory (the one on-disk form of a DiT / DyDiT that every tool loads) holds

  config.json   `ModelConfig.to_json()`: the geometry, so the directory describes itself
  params/       an orbax (StandardCheckpointer) tree: the full NNX state as a pure dict,
                including the fixed `pos_embed` table (256 px and 512 px checkpoints differ there)

`convert.py` writes one from a PyTorch checkpoint, `save_model` from a live model, and
`load_model` is the single loader (sampler, bench, evaluator, notebook, trainer init); it also reads
the params / EMA of a training workdir, whose items use the same tree:

  WORKDIR/checkpoints/<step>/   params/ ema/ (model-directory trees), opt_state/, train/, data/,
                                config/ (the run config), model_config/ (the ModelConfig)

The trainer's `train.checkpointing.Checkpointer` writes and restores whole steps; what any tool needs
to read a workdir (`resolve_workdir`, `saved_model_config`, `check_compatible`) lives here. Loading
restores straight into `nnx.eval_shape` abstract targets, so an XL model is materialized once,
directly with the requested shardings. Directories are written under a temporary name next to the
destination and renamed at the end: a crash never leaves a half-written model behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from dydit_jax.errors import UserError
from dydit_jax.models import DiT, ModelConfig

CONFIG_FILE = "config.json"
VAE_CONFIG_FILE = "vae_config.json"   # a VAE directory (dydit_jax.vae): the same layout, its own config
PARAMS_DIR = "params"
CHECKPOINT_DIR = "checkpoints"     # of a training workdir

# Either one sharding for every array (e.g. NamedSharding(mesh, P()) to replicate), or a rule
# (state path, abstract array) -> sharding, so the trainer's sharding rules plug in unchanged.
ShardingSpec = Union[jax.sharding.Sharding, Callable[[tuple, jax.ShapeDtypeStruct], jax.sharding.Sharding]]


class DestinationExistsError(UserError):
  """The output directory already holds something and overwriting was not asked for."""


def check_destination(dst: os.PathLike | str, overwrite: bool) -> Path:
  """Fail before any work when `dst` is a non-empty directory (or a file) and `overwrite` is off."""
  dst = Path(dst).absolute()
  if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
    raise DestinationExistsError(f"{dst} already exists and is not empty (pass --overwrite / overwrite=True)")
  return dst


def write_model_dir(dst: os.PathLike | str, params: dict[str, Any], config: ModelConfig, *,
                    overwrite: bool = False, config_file: str = CONFIG_FILE) -> Path:
  """Atomically write `params` (a pure dict of arrays, NNX state layout) and `config` (anything with
  `to_json()`, e.g. a VAE config under its own `config_file` name) to `dst`."""
  dst = check_destination(dst, overwrite)
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()   # (not mkdtemp: the directory gets the usual umask permissions, not 0700)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / PARAMS_DIR, params)
    (tmp / config_file).write_text(config.to_json())
    if dst.exists():
      # Keep the old directory until the new one is in place, then drop it.
      old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
      dst.replace(old / dst.name)
      tmp.replace(dst)
      shutil.rmtree(old)
    else:
      tmp.replace(dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dst


def save_model(model: DiT, dst: os.PathLike | str, *, overwrite: bool = False) -> Path:
  """Write `model` (config + full state) as a model directory that `load_model` reads back."""
  return write_model_dir(dst, nnx.state(model).to_pure_dict(), model.config, overwrite=overwrite)


def _resolve(path: epath.Path, step: int | None, use_ema: bool) -> tuple[epath.Path, ModelConfig]:
  """(params tree directory, config) of a model directory or a training workdir.

  A workdir stores its params and EMA items in the model-directory tree layout, so only the lookup
  differs.
  """
  if (path / CHECKPOINT_DIR).is_dir():
    return resolve_workdir(str(path), step=step, use_ema=use_ema)
  config_file, params_dir = path / CONFIG_FILE, path / PARAMS_DIR
  if (path / VAE_CONFIG_FILE).is_file():
    raise FileNotFoundError(f"{path} holds a VAE ({VAE_CONFIG_FILE}), not a DiT / DyDiT; load it with "
                            "dydit_jax.vae.load_vae")
  if not (config_file.is_file() and params_dir.is_dir()):
    raise FileNotFoundError(f"{path} is neither a model directory ({CONFIG_FILE} and {PARAMS_DIR}/) nor a "
                            "training workdir (checkpoints/); write one with `python -m dydit_jax.convert`")
  return params_dir, ModelConfig.from_json(config_file.read_text())


def abstract_target(abstract_state: nnx.State, sharding: ShardingSpec | None) -> dict[str, Any]:
  """The restore target of an abstract NNX state: ShapeDtypeStructs carrying where each array lands."""
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def with_sharding(path, leaf):
    where = sharding(tuple(k.key for k in path), leaf) if callable(sharding) else sharding
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where)

  return jax.tree_util.tree_map_with_path(with_sharding, abstract_state.to_pure_dict())


def load_model(path: os.PathLike | str, *, dtype: Any = None, attention_impl: str | None = None,
               sharding: ShardingSpec | None = None, step: int | None = None, use_ema: bool = True) -> DiT:
  """The ready model stored at `path` (a DiT, or a DyDiT when the config says dynamic).

  path: a model directory (converter / `save_model`) or a training workdir, local or gs://; for a
    workdir, `step` picks the checkpoint (default the newest) and `use_ema` its EMA weights (default,
    as DiT and DyDiT sample) or the live ones.
  dtype: compute dtype override (e.g. "bfloat16"); parameters stay in the stored param dtype.
  attention_impl: override of `ModelConfig.attention_impl` (None keeps the stored choice).
  sharding: where the arrays land (see `ShardingSpec`); default: the first local device.
  Eval vs train is a call argument of the model, so the model is returned as is.
  """
  path = epath.Path(path)
  params_dir, config = _resolve(path if "://" in str(path) else path.absolute(), step, use_ema)
  if dtype is not None:
    config = config.replace(dtype=jnp.dtype(dtype).name)
  if attention_impl is not None:
    config = config.replace(attention_impl=attention_impl)
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(0))))
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(params_dir, abstract_target(abstract_state, sharding))
  nnx.replace_by_pure_dict(abstract_state, restored)
  return nnx.merge(graphdef, abstract_state)


# Training workdirs (read side) -------------------------------------------------------------------
class IncompatibleCheckpointError(UserError):
  """A checkpoint holds a different model than the config asks for."""


def check_compatible(saved: ModelConfig, wanted: ModelConfig, where: str) -> None:
  """Raise IncompatibleCheckpointError naming every differing geometry field (`ModelConfig.geometry`:
  numerics and implementation choices may change between a checkpoint and the run resuming it)."""
  a, b = saved.geometry().to_dict(), wanted.geometry().to_dict()
  diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
  if diff:
    lines = ", ".join(f"{k}: checkpoint {s!r} vs config {w!r}" for k, (s, w) in sorted(diff.items()))
    raise IncompatibleCheckpointError(f"{where} holds a different model than the config asks for ({lines})")


def saved_model_config(manager: ocp.CheckpointManager, step: int) -> ModelConfig:
  """The ModelConfig item of one workdir step, read alone (no array is touched)."""
  args = ocp.args.Composite(model_config=ocp.args.JsonRestore())
  return ModelConfig.from_dict(manager.restore(step, args=args).model_config)


def resolve_workdir(workdir: str, *, step: int | None = None, use_ema: bool = True
                    ) -> tuple[epath.Path, ModelConfig]:
  """(params item directory, ModelConfig) of a workdir's checkpoint (default: the newest).

  The item directory is an orbax StandardCheckpointer tree in the model-directory layout, so
  `load_model` restores it like a converted model's params/.
  """
  directory = epath.Path(workdir) / CHECKPOINT_DIR
  if not directory.is_dir():
    raise FileNotFoundError(f"{workdir} is not a training workdir (no {CHECKPOINT_DIR}/ inside)")
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(f"{directory} has no checkpoint" + ("" if step is None else f" at step {step}"))
    config = saved_model_config(manager, step)
  return directory / str(step) / ("ema" if use_ema else "params"), config
