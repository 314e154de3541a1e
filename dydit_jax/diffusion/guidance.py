"""Classifier-free guidance with the official DiT semantics (DiT's `forward_with_cfg`, Peebles & Xie 2023).

The batch is doubled: rows [0, N) carry the class labels, rows [N, 2N) the null class. As in the
official `forward_with_cfg`, only the first half of `x` is used (duplicated), and guidance is applied
to the first `guided_channels` output channels. Unguided channels and the learned variance come from
each half's own prediction, so the conditional half (the one samplers keep) uses conditional values.

Which channels are guided by default (`guided_channel_count`): for 4-channel latents the first 3, the
legacy GLIDE leftover the published FIDs (DiT 2.27, DyDiT 2.07) depend on (pass 4 for standard
guidance); for any other input the mean channels (eps, x0 or velocity), as many as the input has.
The legacy count is not a rule to generalize: on a 1-channel pixel model, whose output is
[mean | variance], 3 would reach into the learned-variance channel, and guiding a variance
extrapolates it out of its range. Guiding x0 or velocity equals guiding eps: at a fixed x_t each
is an affine function of eps with the same coefficients for both halves.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

LEGACY_GUIDED_CHANNELS = 3

# forward(x, t_original (B,), y (B,), row) -> (model output, aux pytree); row = sampling-order position.
Forward = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def guided_channel_count(in_channels: int) -> int:
  """The output channels CFG guides by default for a model of `in_channels` (module docstring)."""
  return LEGACY_GUIDED_CHANNELS if in_channels == 4 else in_channels


def forward_with_cfg(model_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], x: jax.Array,
                     t: jax.Array, y: jax.Array, cfg_scale: float,
                     guided_channels: int | None = None) -> jax.Array:
  """model_fn(x, t, y) -> (2N,H,W,C_out) NHWC; returns the guided output for the doubled batch.

  guided_channels: None = `guided_channel_count` of x's channels.
  """
  if guided_channels is None:
    guided_channels = guided_channel_count(x.shape[-1])
  half = x[: x.shape[0] // 2]
  out = model_fn(jnp.concatenate([half, half], axis=0), t, y)
  eps, rest = out[..., :guided_channels], out[..., guided_channels:]
  cond, uncond = jnp.split(eps, 2, axis=0)
  guided = uncond + cfg_scale * (cond - uncond)
  return jnp.concatenate([jnp.concatenate([guided, guided], axis=0), rest], axis=-1)


def cfg_labels(labels: jax.Array, num_classes: int) -> jax.Array:
  """[labels, null, ..., null]: the label half-batch followed by as many null-class rows."""
  return jnp.concatenate([labels, jnp.full_like(labels, num_classes)])


def guided(forward: Forward, labels: jax.Array, *, cfg_scale: float | None, num_classes: int):
  """(x, t, row) -> (output, aux): the conditional forward, or CFG on a doubled batch of x.

  The chain's forward for `run_chain`, for any model: the masked DiT / DyDiT or an engine (whose aux
  reports routed-token counts). With CFG, x holds 2N rows (only the first N are read, as in the
  official `forward_with_cfg`), labels the N class ids; the null class fills the second half.
  """
  if cfg_scale is None:
    return lambda x, t, row: forward(x, t, labels, row)
  y = cfg_labels(labels, num_classes)

  def run(x, t, row):
    aux = []

    def model_fn(xx, tt, yy):  # called exactly once, in this trace, by forward_with_cfg
      out, a = forward(xx, tt, yy, row)
      aux.append(a)
      return out

    out = forward_with_cfg(model_fn, x, t, y, cfg_scale)
    return out, aux[0]

  return run
