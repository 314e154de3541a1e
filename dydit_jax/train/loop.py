"""The training loop: one run in one workdir, resumable at any point.

  train(config, workdir) -> summary dict

Before any work (nothing is written until they pass): the config values (`config.validate`), the
files the run reads (`check_inputs`: the init checkpoint and the latents, each with the command that
makes it) and, when the workdir holds a checkpoint, the config change against it (`resume`).

Start: the newest readable checkpoint in the workdir if there is one (automatic resume, data
position included), else `config.init_checkpoint` (a converted DiT -> DyDiT) or a random init.
Every iteration: this host's slice of the global batch -> global arrays -> the jitted step.
Periodically: metrics (every `log_every`), a class-conditional sample grid (`sample.every`), an async
checkpoint (`checkpoint.every`, and at the end). On SIGTERM (preemption) the run saves at an agreed
step, waits for the write and returns normally; rerunning the same command resumes it.

NaN / inf: the step skips such updates (params stay finite) and flags them; the loop checks the
flags before every log and every save and stops with FloatingPointError, so no checkpoint is written
after a non-finite step.
"""
from __future__ import annotations

import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from dydit_jax import images
from dydit_jax.data import make_dataset
from dydit_jax.errors import UserError
from dydit_jax.models import ModelConfig
from dydit_jax.sampler import SampleOptions, Sampler, class_labels
from dydit_jax.train import checkpointing, resume, sharding, state as state_lib, step as step_lib
from dydit_jax.train.config import build_model_config, convert_command, prepare_command, validate
from dydit_jax.train.logging import MetricLogger


class Preemption:
  """Has a preemption notice (SIGTERM) arrived? Answered at the same step on every host.

  Multi-host: JAX's preemption sync manager receives the signal and agrees on a step with the other
  hosts (`reached_preemption_sync_point`, to be asked at every step). Single process: a Python
  SIGTERM handler sets a flag (restored on close).
  """

  def __init__(self):
    self.multihost = jax.process_count() > 1
    self.received = False
    self._previous = None
    if not self.multihost:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint, then stopping")
    self.received = True

  def reached(self, step: int) -> bool:
    if self.multihost:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _data_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {**config.data.to_dict(), "global_batch_size": config.batch_size}


def _check_data(data, cfg: ModelConfig) -> None:
  want = (cfg.input_size, cfg.input_size, cfg.in_channels)
  if tuple(data.shape) != want:
    raise UserError(f"the data gives examples of shape {tuple(data.shape)} but the model takes {want} "
                    "(check config.model.input_size / in_channels / image_size and config.data)")
  if data.num_classes != cfg.num_classes:
    raise UserError(f"the data has {data.num_classes} classes but the model {cfg.num_classes} "
                    "(config.model.num_classes)")


def _restore_data_position(data, data_state: dict[str, Any], config: ml_collections.ConfigDict) -> None:
  """Continue the example stream where the checkpoint left it. Under allow_config_change a data
  change can make that position meaningless (another seed or source): the stream then restarts."""
  try:
    data.set_state(data_state)
  except ValueError as e:
    if not config.get("allow_config_change", False):
      raise
    logging.warning("the checkpoint's data position %s does not apply to the changed data config (%s); "
                    "the example stream starts from its beginning", data_state, e)


class MissingInputError(UserError, FileNotFoundError):
  """A file the run reads is not set or does not exist (a UserError; also a FileNotFoundError)."""


def _missing(field: str, path: str, make: str) -> list[str]:
  """[why `path` cannot be read and how to make it], or [] when it exists."""
  if path:
    try:
      if epath.Path(path).exists():
        return []
    except Exception as e:  # pylint: disable=broad-except  (e.g. no gs:// credentials or network)
      raise UserError(f"cannot check {field} {path}: {type(e).__name__}: {e}") from e
  state = f"{path} does not exist" if path else "is not set"
  return [f"{field} {state} (make it with: {make}, then --{field}=DIR)"]


def check_inputs(config: ml_collections.ConfigDict, *, resuming: bool) -> None:
  """The files a run reads, checked before any work: one MissingInputError naming every missing one
  with the command that makes it. A workdir with a checkpoint (`resuming`) needs no init checkpoint."""
  missing = []
  if not resuming and not config.from_scratch:
    missing += _missing("config.init_checkpoint", config.init_checkpoint, convert_command(config.model))
  if config.data.name == "latents":
    missing += _missing("config.data.path", config.data.path, prepare_command(config.model))
  if missing:
    raise MissingInputError(f"this run needs files it does not have: {'; '.join(missing)}")


def initial_state(config, cfg: ModelConfig, tx, shardings, mesh, min_bytes: float) -> state_lib.TrainState:
  """Step-0 state created in place on the mesh: random init or the init checkpoint's weights."""
  if config.from_scratch:
    return jax.jit(lambda: state_lib.scratch_state(cfg, tx, config.seed), out_shardings=shardings)()

  def rule(path, leaf):
    del path
    return sharding.tree_shardings(leaf, mesh, min_bytes)

  model = checkpointing.load_init_model(config.init_checkpoint, cfg, sharding=rule,
                                        reorder_units=config.reorder_units, seed=config.seed)
  _, params, buffers = state_lib.split_model(model)
  # Arrays already on this mesh stay where they are; the rest (e.g. freshly built routers on one
  # device) enter as host values, which jit treats as replicated on every host.
  on_mesh = lambda a: a if getattr(a.sharding, "mesh", None) == mesh else np.asarray(a)
  params, buffers = jax.tree.map(on_mesh, (params, buffers))
  make = lambda p, b: state_lib.new_state(p, b, tx, config.seed)
  return jax.jit(make, out_shardings=shardings)(params, buffers)


class _Window:
  """Per-step metrics since the last flush (device arrays: fetching them would stall the steps)."""

  def __init__(self):
    self.first_step, self.metrics = None, []

  def add(self, step: int, metrics) -> None:
    if self.first_step is None:
      self.first_step = step
    self.metrics.append(metrics)

  def flush(self) -> dict[str, np.ndarray] | None:
    """Window means; FloatingPointError naming the first step whose loss or gradient was not finite."""
    if not self.metrics:
      return None
    means = step_lib.window_means(self.metrics)
    if means["nonfinite"] > 0:
      flags = [float(m) for m in jax.device_get([m["nonfinite"] for m in self.metrics])]
      bad = self.first_step + flags.index(1.0)
      raise FloatingPointError(
          f"the loss or the gradients became NaN/inf at step {bad} (updates skipped; no checkpoint is "
          "written after it). Check the data for NaN/inf, lower config.optimizer.lr, or compute in "
          "float32 (config.model.dtype).")
    self.first_step, self.metrics = None, []
    return means


class _PeriodicSamples:
  """The run's class-conditional grid every `sample.every` steps (PNG + image summary; latent models
  keep the latents), from one `Sampler` compiled at the first grid and fed the new weights after."""

  def __init__(self, config, graphdef, workdir: epath.Path, logger: MetricLogger):
    s = self.settings = config.sample
    self.graphdef, self.workdir, self.logger = graphdef, workdir, logger
    self.labels = class_labels(s.classes, s.per_class)
    self.options = SampleOptions(sampler=s.sampler, steps=s.steps, cfg_scale=s.cfg_scale)
    self.sampler = None

  def __call__(self, state, step: int) -> None:
    s = self.settings
    model = state_lib.model_from_state(self.graphdef, state, use_ema=s.use_ema)
    if self.sampler is None:
      self.sampler = Sampler(model, self.options)
    else:
      self.sampler.update(model)
    result = self.sampler.generate(self.labels, jax.random.PRNGKey(s.seed))
    self.logger.write_scalars(step, {"sample_flops_ratio": result.flops_ratio})
    if result.samples.shape[-1] not in (1, 3):
      # Latent models: images need the VAE decoder; keep the latents.
      if jax.process_index() == 0:
        with (self.workdir / "samples" / f"step_{step:08d}.npy").open("wb") as f:
          np.save(f, result.samples)
      return
    grid = images.to_uint8(result.samples)
    if jax.process_index() == 0:
      images.save_grid(grid, self.workdir / "samples" / f"step_{step:08d}.png", ncols=s.per_class)
    self.logger.write_images(step, {"samples": images.make_grid(grid, s.per_class)})


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) training to `config.total_steps`; returns a summary (also the last metrics)."""
  start_time = time.time()
  # Everything the request can get wrong is checked before anything is written: a refused run leaves
  # the workdir as it was (or does not create it).
  saved = resume.saved_run(workdir)
  check_inputs(config, resuming=saved is not None)
  validate(config, resuming=saved is not None)
  if saved is not None:
    resume.check_config_change(saved, config)
  cfg = build_model_config(config.model)
  workdir_path = epath.Path(workdir)
  primary = jax.process_index() == 0

  try:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  except ValueError as e:
    raise UserError(f"config.mesh: {e}") from e
  tx = state_lib.make_optimizer(config.optimizer)
  graphdef = state_lib.model_graphdef(cfg)
  abstract = state_lib.abstract_state(cfg, tx)
  min_bytes = config.fsdp_min_size_mb * 2 ** 20
  shardings = sharding.tree_shardings(abstract, mesh, min_bytes)
  if config.batch_size % mesh.size:
    raise UserError(f"config.batch_size {config.batch_size} is not divisible by the {mesh.size} devices")
  # Each host reads only the rows of every global batch that its devices hold.
  block = sharding.host_rows(mesh, config.batch_size)
  data = make_dataset(_data_config(config), process_index=block[0], process_count=block[1])
  try:
    _check_data(data, cfg)
  except BaseException:
    data.close()
    raise

  if primary:
    workdir_path.mkdir(parents=True, exist_ok=True)
  ckpt = checkpointing.Checkpointer(workdir, keep=config.checkpoint.keep, use_async=config.checkpoint.use_async)
  logger = MetricLogger(workdir, total_steps=config.total_steps, tensorboard=config.tensorboard,
                        is_primary=primary)
  preemption = Preemption()
  try:
    restored = ckpt.restore_latest(abstract, shardings, cfg)
    if restored is not None:
      state, data_state = restored
      _restore_data_position(data, data_state, config)
      logging.info("resuming at step %d", int(jax.device_get(state.step)))
    else:
      if saved is not None:  # Every checkpoint was unreadable (set aside): the run starts over.
        check_inputs(config, resuming=False)
        validate(config)
      state = initial_state(config, cfg, tx, shardings, mesh, min_bytes)
      if config.parameter_overview:
        logger.parameter_overview(nnx.to_pure_dict(state.params))
    if primary:  # Written once the run is under way: a refused or failed start leaves the old one.
      (workdir_path / "config.json").write_text(config.to_json(indent=2))
    step = int(jax.device_get(state.step))
    first_step = step
    logging.info("mesh %s; this host reads block %d of %d of each global batch; train state: %s",
                 dict(mesh.shape), block[0], block[1], sharding.describe(state))
    last_saved = ckpt.latest_step()
    step_fns = {}
    sample_grid = _PeriodicSamples(config, graphdef, workdir_path, logger)

    def step_fn(with_complete: bool):
      if with_complete not in step_fns:
        fn = step_lib.make_train_step(cfg, graphdef, tx, config, with_complete=with_complete)
        step_fns[with_complete] = jax.jit(fn, donate_argnums=0, out_shardings=(shardings, None))
      return step_fns[with_complete]

    def save():
      nonlocal last_saved
      if last_saved != step:
        ckpt.save(state, data.get_state(), config, cfg)
        last_saved = step

    window = _Window()
    last_metrics: dict[str, Any] = {}
    timer = None
    preempted = False

    def flush():
      """Check the steps since the last flush for NaN/inf, then log their means."""
      nonlocal last_metrics
      means = window.flush()
      if means is not None:
        last_metrics = means
        logger.write_scalars(step, means)

    while step < config.total_steps:
      batch = sharding.global_batch(next(data), mesh, block)
      state, metrics = step_fn(step_lib.uses_complete_loss(config, step))(state, batch)
      step += 1
      window.add(step, metrics)
      if timer is None:  # Steps/s excludes the first step (compilation).
        jax.block_until_ready(metrics)
        timer = (step, time.time())
      logger.step(step)
      if step % config.log_every == 0:
        flush()
      if config.sample.every and step % config.sample.every == 0:
        sample_grid(state, step)
      if preemption.reached(step):
        flush()
        save()
        preempted = True
        logging.warning("stopped for preemption at step %d with a checkpoint; rerun to resume", step)
        break
      if step % config.checkpoint.every == 0 or step == config.total_steps:
        flush()
        save()
    jax.block_until_ready(state)
    end = time.time()
    ckpt.wait()
  finally:
    preemption.close()
    ckpt.close()
    logger.close()
    data.close()
  steps_per_sec = (step - timer[0]) / (end - timer[1]) if timer and step > timer[0] else float("nan")
  return {"step": step, "start_step": first_step, "preempted": preempted, "steps_per_sec": steps_per_sec,
          "wall_time_s": end - start_time, "metrics": {k: np.asarray(v).tolist() for k, v in last_metrics.items()}}
