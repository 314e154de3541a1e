"""Run checkpoints in a workdir: save, resume (with fallback), and the weights a run starts from.

Layout (orbax `CheckpointManager`, local path or gs://):

  WORKDIR/checkpoints/<step>/
      params/        full model state as a pure dict (params + fixed pos_embed): the same tree as a
      ema/           converted model directory's params/, so the one model loader reads either
      opt_state/     AdamW moments and count
      train/         {"step", "rng"}
      data/          the data iterator position (JSON)
      config/        the run config (JSON)
      model_config/  the ModelConfig (JSON)

Saves are asynchronous (training continues while orbax writes) and atomic: a step directory appears
only when complete, so a crash mid-save leaves the previous checkpoints as they were. Restores target
abstract arrays that carry the CURRENT mesh's shardings, so a run saved on 8 devices resumes on 2
(or on a pod). If the newest checkpoint cannot be read (disk corruption, a deleted file), it is moved
to WORKDIR/checkpoints_unreadable/ and the previous one is used, with a warning that says so.
"""
from __future__ import annotations

import json
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from dydit_jax import checkpoints
from dydit_jax.checkpoints import CHECKPOINT_DIR, IncompatibleCheckpointError, check_compatible, saved_model_config
from dydit_jax.models import DiT, ModelConfig
from dydit_jax.train.state import TrainState

UNREADABLE_DIR = "checkpoints_unreadable"


def _full_dict(params: nnx.State, buffers: nnx.State) -> dict[str, Any]:
  return nnx.to_pure_dict(nnx.merge_state(params, buffers))


def _split_full(full: dict[str, Any], params: nnx.State, buffers: nnx.State):
  """(params, buffers) states shaped like the given templates, filled from a full pure dict."""
  template = nnx.merge_state(jax.tree.map(lambda x: x, params), jax.tree.map(lambda x: x, buffers))
  nnx.replace_by_pure_dict(template, full)
  return nnx.split_state(template, nnx.Param, ...)


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class Checkpointer:
  """The workdir's CheckpointManager with the train-state layout above."""

  def __init__(self, workdir: str, *, keep: int = 3, use_async: bool = True):
    self.workdir = epath.Path(workdir)
    self.directory = self.workdir / CHECKPOINT_DIR
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async,
                                             create=True, cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, data_state: dict[str, Any], config: ml_collections.ConfigDict,
           model_cfg: ModelConfig) -> int:
    """Starts an (async) save of `state` at its step; returns the step."""
    step = int(jax.device_get(state.step))
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(_full_dict(state.params, state.buffers)),
        ema=ocp.args.StandardSave(_full_dict(state.ema, state.buffers)),
        opt_state=ocp.args.StandardSave(state.opt_state),
        train=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config.to_json())),
        model_config=ocp.args.JsonSave(model_cfg.to_dict()))
    self.manager.save(step, args=args, force=True)
    logging.info("saving checkpoint step %d to %s", step, self.directory)
    return step

  def restore_latest(self, abstract: TrainState, shardings: TrainState, model_cfg: ModelConfig
                     ) -> tuple[TrainState, dict[str, Any]] | None:
    """(state, data_state) of the newest READABLE checkpoint, placed by `shardings`; None if none.

    A geometry mismatch with `model_cfg` is the user's error and raised as such (nothing is
    moved); any other failure to read a step marks it unreadable and falls back to the one before.
    """
    while (step := self.manager.latest_step()) is not None:
      try:
        saved = saved_model_config(self.manager, step)
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      check_compatible(saved, model_cfg, f"checkpoint {self.directory / str(step)}")
      try:
        return self._restore(step, abstract, shardings)
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
    return None

  def _restore(self, step: int, abstract: TrainState, shardings: TrainState):
    target = _with_shardings(abstract, shardings)
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(_full_dict(target.params, target.buffers)),
        ema=ocp.args.StandardRestore(_full_dict(target.ema, target.buffers)),
        opt_state=ocp.args.StandardRestore(target.opt_state),
        train=ocp.args.StandardRestore({"step": target.step, "rng": target.rng}),
        data=ocp.args.JsonRestore())
    r = self.manager.restore(step, args=args)
    params, buffers = _split_full(r.params, abstract.params, abstract.buffers)
    ema, _ = _split_full(r.ema, abstract.ema, abstract.buffers)
    state = TrainState(step=r.train["step"], params=params, buffers=buffers, ema=ema,
                       opt_state=r.opt_state, rng=r.train["rng"])
    if int(jax.device_get(state.step)) != step:
      raise ValueError(f"step directory {step} holds step {int(jax.device_get(state.step))}")
    logging.info("restored checkpoint step %d from %s", step, self.directory)
    return state, r.data

  def _set_aside(self, step: int, error: Exception) -> None:
    """Move an unreadable step out of the manager's sight (kept for inspection, never deleted)."""
    dest = self.workdir / UNREADABLE_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    logging.warning("checkpoint step %d in %s is unreadable (%s: %s); moved to %s, falling back to "
                    "the previous checkpoint", step, self.directory, type(error).__name__, error, dest)
    if jax.process_index() == 0:
      dest.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(dest)
    multihost_utils.sync_global_devices(f"dydit_jax set aside checkpoint {step}")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def load_init_model(path: str, model_cfg: ModelConfig, *, sharding=None, reorder_units: bool = False,
                    seed: int = 0) -> DiT:
  """The weights a run starts from: a converted model dir or another workdir, made into `model_cfg`.

  A DiT becomes a DyDiT with fully open routers (dydit_from_dit) when the config is dynamic; a DyDiT
  checkpoint continues as is (or drops its routers for a plain-DiT config). Any other difference in
  geometry is an IncompatibleCheckpointError; a missing path a FileNotFoundError.
  """
  from dydit_jax.models import dydit_init  # pylint: disable=g-import-not-at-top
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"config.init_checkpoint {path} does not exist (convert a DiT checkpoint "
                            "with `python -m dydit_jax.convert`, or point at a training workdir)")
  model = checkpoints.load_model(path, sharding=sharding)
  loaded = model.config
  check_compatible(loaded.replace(dynamic=model_cfg.dynamic, router_format=model_cfg.router_format),
                   model_cfg, f"init checkpoint {path}")
  if reorder_units:
    model = dydit_init.reorder_by_magnitude(model)
  if model_cfg.dynamic and not loaded.dynamic:
    model = dydit_init.dydit_from_dit(model, router_format=model_cfg.router_format, seed=seed)
  elif loaded.dynamic and not model_cfg.dynamic:
    model = dydit_init.dit_from_dydit(model)
  elif loaded.router_format != model_cfg.router_format:
    raise IncompatibleCheckpointError(f"init checkpoint {path} has router_format {loaded.router_format!r}, "
                                      f"the config {model_cfg.router_format!r}")
  logging.info("initialized from %s (%s)", path, "DiT -> DyDiT" if model_cfg.dynamic != loaded.dynamic
               else "same model type")
  return model
