"""One training iteration as a pure function `train_step(state, batch) -> (state, metrics)`.

The loop jits it once over the mesh (state donated, sharded by rule; batch split over data x fsdp).
What one iteration does (DyDiT paper §3.3 and §4; the official `DyDiT/train.py`):

  t       stratified over the four quarters of [0, 1000) (or uniform), noise ~ N(0, I)
  loss  = mean_b L_diff(dynamic forward, Gumbel gates)                      mse + vb
        + w_c * mean_b L_diff(complete forward, routers bypassed)           while step < complete_steps
        + weight * (mean_b r_b - lambda_step)^2                             DyDiT only
  grads   clipped to the global norm; the update is SKIPPED when the raw norm >= the skip threshold
          or is not finite (a NaN loss never reaches the params)
  update  ONE AdamW step (the official stage-1 script steps twice by mistake), then the EMA of all
          params, routers included, every iteration

The complete forward shares x_t and t with the dynamic one but draws its own label-dropout key. It
is switched by building two step functions (`with_complete`), so the 2x cost ends with the warm-up
instead of being multiplied by zero. All random draws derive from fold_in(state.rng, state.step):
a resumed run draws exactly what an uninterrupted one would, on any mesh (threefry-partitionable
keys give the same numbers whatever the sharding).

The FLOPs loss uses the mean over the GLOBAL batch (or `flops_groups` fixed contiguous groups, to
reproduce the official 8-GPU run's per-GPU squares); either way it is independent of the mesh.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dydit_jax.diffusion import create_diffusion
from dydit_jax.models import ModelConfig
from dydit_jax.models.flops import macs_ratio, mask_fractions
from dydit_jax.train import dydit_objectives as objectives
from dydit_jax.train.state import TrainState, ema_update

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
COUNTS = ("skipped", "nonfinite")


def make_train_step(cfg: ModelConfig, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, *, with_complete: bool
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """The step function for model `cfg` under the run `config` (values read once, here)."""
  diffusion = create_diffusion("", learn_sigma=cfg.learn_sigma, prediction=cfg.prediction)
  num_timesteps = diffusion.num_timesteps
  dynamic = cfg.dynamic
  with_complete = with_complete and dynamic
  dy = config.dydit
  clip_norm = config.grad_clip_norm
  skip_norm = config.grad_skip_norm if config.grad_skip_norm > 0 else None
  ema_decay = config.ema_decay
  stratified = config.stratified_t

  def losses(params, buffers, batch, step, draws):
    model = nnx.merge(graphdef, params, buffers)
    x, y = batch["x"], batch["y"]
    t, noise = draws["t"], draws["noise"]
    captured = {}

    def dynamic_fn(x_t, timesteps):
      out, captured["masks"] = model(x_t, timesteps, y, train=True, key=draws["model"], return_masks=True)
      return out

    terms = diffusion.training_losses(dynamic_fn, x, t, noise)
    loss = jnp.mean(terms["loss"])
    metrics = {"mse": jnp.mean(terms["mse"]), "vb": jnp.mean(terms["vb"]), "diffusion_loss": loss}
    if dynamic:
      masks = captured["masks"]
      lam = objectives.lambda_schedule(step, dy.lam, dy.lambda_warmup_steps, dy.lambda_hold_steps)
      flops = objectives.flops_loss(cfg, masks, lam, dy.flops_weight, num_replicas=dy.flops_groups)
      loss = loss + flops
      heads, groups, tokens = mask_fractions(masks)
      metrics.update(flops_loss=flops, flops_ratio=jnp.mean(macs_ratio(cfg, masks)), lam=lam,
                     head_rate=jnp.mean(heads, 0), group_rate=jnp.mean(groups, 0),
                     token_rate=jnp.mean(tokens, 0))
    if with_complete:
      def complete_fn(x_t, timesteps):
        return model(x_t, timesteps, y, train=True, complete=True, key=draws["complete"])
      aux = jnp.mean(diffusion.training_losses(complete_fn, x, t, noise)["loss"])
      loss = loss + dy.complete_weight * aux
      metrics["complete_loss"] = aux
    metrics["loss"] = loss
    return loss, metrics

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    key = jax.random.fold_in(state.rng, state.step)
    k_t, k_noise, k_model, k_complete = jax.random.split(key, 4)
    batch_size = batch["x"].shape[0]
    if stratified:
      t = objectives.stratified_timesteps(k_t, batch_size, num_timesteps)
    else:
      t = jax.random.randint(k_t, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
    draws = {"t": t, "noise": jax.random.normal(k_noise, batch["x"].shape, jnp.float32),
            "model": k_model, "complete": k_complete}
    grad_fn = jax.value_and_grad(losses, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, state.buffers, batch, state.step, draws)
    if clip_norm > 0:
      grads, grad_norm, skip = objectives.clip_then_skip(grads, clip_norm, skip_norm)
    else:
      grad_norm = optax.tree.norm(grads)
      skip = jnp.logical_not(jnp.isfinite(grad_norm))
    nonfinite = jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    skip = skip | nonfinite
    params, opt_state = objectives.apply_unless_skipped(tx, grads, state.opt_state, state.params, skip)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema=ema_update(state.ema, params, ema_decay))
    metrics.update(grad_norm=grad_norm, skipped=skip.astype(jnp.float32),
                   nonfinite=nonfinite.astype(jnp.float32))
    return new_state, metrics

  return train_step


def uses_complete_loss(config: ml_collections.ConfigDict, step: int) -> bool:
  """Whether iteration `step` adds the complete-model loss (a Python bool: picks the step fn)."""
  return bool(config.model.dynamic and objectives.complete_loss_active(step, config.dydit.complete_steps))


def window_means(metrics_list: list[Metrics]) -> dict[str, np.ndarray]:
  """A window of per-step metrics on the host: means, except counts ("skipped", "nonfinite") summed."""
  host = jax.device_get(metrics_list)
  out = {}
  for name in host[0]:
    values = np.stack([np.asarray(m[name]) for m in host])
    out[name] = values.sum(0) if name in COUNTS else values.mean(0)
  return out
