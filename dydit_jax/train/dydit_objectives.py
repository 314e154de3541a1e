"""The DyDiT fine-tuning recipe as small pure pieces for a jitted train step.

Official recipe (DyDiT paper §3.2-§4; `DyDiT/train.py`, `DyDiT/loss.py`,
`DyDiT/utils.py` of alibaba-damo-academy/DyDiT):
  L = L_diff(dynamic) + w_c * L_diff(complete) + 2 * (mean_b r_b - lambda_s)^2
with r_b the per-sample block-MAC ratio (`dydit_jax.models.flops.macs_ratio`), lambda_s the
ramped target (`lambda_schedule`), w_c the complete-model switch (`complete_loss_active`),
stratified timesteps (`stratified_timesteps`) and "clip, then skip large-norm steps"
(`clip_then_skip` + `apply_unless_skipped`).

One deliberate difference: the official `train.py` (stage 1, with the complete-model loss) calls
`opt.step()` twice per iteration by mistake, once on the raw gradient before clipping and again
after the norm check, so a normal iteration makes two Adam steps and a "skipped" one still makes an
unclipped step. `train_without_completemodel.py` steps once. We step the optimizer exactly once per
iteration, and not at all when the step is skipped.

Everything here is jnp and traceable: `step` may be a traced integer.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from dydit_jax.models.config import ModelConfig
from dydit_jax.models.flops import macs_ratio

# Official weight of the FLOPs term (`token_ratio=2.` in train.py's select_config).
FLOPS_LOSS_WEIGHT = 2.0
# Official: the target stays at 1.0 while train_steps < 100, whatever the warmup.
LAMBDA_HOLD_STEPS = 100


def flops_loss(cfg: ModelConfig, masks: Mapping[str, jax.Array], lam, weight: float = FLOPS_LOSS_WEIGHT,
               *, num_replicas: int = 1) -> jax.Array:
  """weight * (mean_b r_b - lam)^2: the square of the batch-mean ratio, not a mean of squares.

  The official loss is computed per GPU on its local batch and DDP averages the gradients. With
  `num_replicas` > 1 the batch is cut into that many contiguous local batches, each gets its own
  squared term and the terms are averaged, which gives exactly the DDP gradient. With 1 (default)
  the whole batch is one group. Gradients reach the masks through their straight-through values.
  """
  ratio = macs_ratio(cfg, masks)
  if ratio.shape[0] % num_replicas:
    raise ValueError(f"batch {ratio.shape[0]} does not split into {num_replicas} replicas")
  local_means = ratio.reshape(num_replicas, -1).mean(axis=1)
  return weight * jnp.mean(jnp.square(local_means - lam))


def lambda_schedule(step, target: float, warmup_steps: int, hold_steps: int = LAMBDA_HOLD_STEPS) -> jax.Array:
  """FLOPs target at iteration `step` (0-based count of finished updates, as the official train_steps).

  Official rule (train.py with --warmup): lambda_s = 1 - (1 - target) * s / warmup_steps while
  s <= warmup_steps, then target; overridden to 1.0 while s < 100. The ramp is anchored at s = 0,
  not at the end of the hold, so at s = hold_steps the target drops straight to
  1 - (1 - target) * hold_steps / warmup_steps (0.994 for target 0.7, warmup 5000; 0.95 for 0.5,
  warmup 1000) instead of ramping from 1. We keep that. `warmup_steps` <= 0 means no ramp (the
  official run without --warmup): target after the hold, which still applies.
  Resuming (stage 2 from 30k) simply continues the step count, so the ramp is long past.
  """
  step = jnp.asarray(step, jnp.float32)
  if warmup_steps > 0:
    lam = 1.0 - (1.0 - target) * jnp.minimum(step, warmup_steps) / warmup_steps
  else:
    lam = jnp.full_like(step, target)
  return jnp.where(step < hold_steps, 1.0, lam)


def complete_loss_active(step, complete_steps: int):
  """Whether iteration `step` adds the complete-model (routers bypassed) diffusion loss, weight 1.

  The official code has no ramp: `train.py` adds the complete-model loss with weight 1 on every
  step, and the lambda=0.5 recipe stops it by switching scripts (`train_without_completemodel.py`
  resumed from the 30k checkpoint), i.e. on for step < 30000, then off. `complete_steps` < 0 keeps it
  for the whole run (the lambda=0.7 script, 150k steps), 0 never adds it (the paper's S/B setting).
  A Python bool for a Python step (the trainer compiles the two variants and picks one per step, so
  an off phase skips the second forward altogether); elementwise for arrays.
  """
  return (complete_steps < 0) | (step < complete_steps)


def stratified_timesteps(key: jax.Array, batch_size: int, num_timesteps: int = 1000,
                         num_strata: int = 4) -> jax.Array:
  """(batch_size,) int32 timesteps; sample i is uniform in stratum i mod num_strata.

  Official (--t_sample): stratum s covers [250 s, 250 s + 249], and sample i of the LOCAL batch gets
  stratum i % 4, interleaved (0,1,2,3,0,1,...), not contiguous quarters. With a batch not divisible
  by num_strata the first strata get one sample more, which is what the official i % 4 does too.
  Strata boundaries are floor(s * T / S), so any num_timesteps works (equal widths when divisible).
  For a global batch made of equal local batches whose size is a multiple of num_strata, calling
  this on the global batch gives every local batch the official pattern.
  """
  stratum = jnp.arange(batch_size) % num_strata
  low = stratum * num_timesteps // num_strata
  high = (stratum + 1) * num_timesteps // num_strata
  return jax.random.randint(key, (batch_size,), low, high, dtype=jnp.int32)


def clip_then_skip(grads: Any, clip_norm: float, skip_norm: float | None = None):
  """Official gradient handling: clip by global norm, flag the step for skipping on the raw norm.

  Returns (clipped_grads, global_norm, skip). `global_norm` is the L2 norm over all leaves BEFORE
  clipping (what `DyDiT/utils.py` returns and train.py compares); grads are scaled by
  min(1, clip_norm / (norm + 1e-6)); skip = not (norm < skip_norm), so a NaN / inf norm also skips.
  `skip_norm=None` uses clip_norm, as the official scripts do (one --clip_max_norm for both). With
  equal thresholds the clipping never changes a gradient that is applied: every gradient big enough
  to be clipped is skipped.
  """
  skip_norm = clip_norm if skip_norm is None else skip_norm
  norm = optax.tree.norm(grads)
  scale = jnp.minimum(1.0, clip_norm / (norm + 1e-6))
  clipped = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
  skip = jnp.logical_not(norm < skip_norm)
  return clipped, norm, skip


def select_tree(skip: jax.Array, new: Any, old: Any) -> Any:
  """Leafwise `old if skip else new` for two pytrees of the same structure (jit-friendly)."""
  return jax.tree.map(lambda n, o: jnp.where(skip, o, n), new, old)


def apply_unless_skipped(tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any,
                         skip: jax.Array):
  """One optax step, discarded when `skip`: returns (params, opt_state), both unchanged if skipped.

  The optimizer state (Adam moments and count) is also left untouched on a skipped step, as
  torch's skipped `opt.step()` would leave it. Exactly one step per call (see module docstring).
  """
  updates, new_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  return select_tree(skip, new_params, params), select_tree(skip, new_state, opt_state)
