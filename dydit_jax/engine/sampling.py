"""Whole sampling chains (DDPM / DDIM, optional CFG) as one traceable loop that also returns stats.

The diffusion helper's `ddpm_sample` / `ddim_sample` take `model_fn(x, t) -> output` and keep nothing
else; the engine also reports, per call, how many tokens each sample routed through each layer's MLP
(needed for honest MAC counts). This loop therefore calls the forward itself and hands its output to
the public `ddpm_step` / `ddim_step` through a constant model_fn. The noise protocol is the samplers'
(x_T in float32, one key per step split from `key`), so with the same key the chain equals
`ddpm_sample` / `ddim_sample` on the same model.

`steps` runs a subset of the chain's steps (sampling order positions, e.g. every 5th of 250) for
timing on a budget: each executed step uses its true timestep, plan row and schedule coefficients,
but the chain is then not a valid sampler (speed does not care; images would).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dydit_jax.diffusion.gaussian import compute_dtype
from dydit_jax.diffusion.samplers import ddim_step, ddpm_step
from dydit_jax.models.guidance import cfg_labels, forward_with_cfg

# forward(x, t_original (B,), y (B,), row) -> (model output, aux pytree)
Forward = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
SAMPLERS = ("ddpm", "ddim")


def guided(forward: Forward, labels: jax.Array, *, cfg_scale: float | None, num_classes: int):
  """(x, t, row) -> (output, aux): the conditional forward, or CFG on a doubled batch of x.

  With CFG, x holds 2N rows (only the first N are read, as in the official `forward_with_cfg`),
  labels the N class ids; the null class fills the second half.
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


def sample(step_forward, diffusion, noise: jax.Array, key: jax.Array, *, method: str = "ddpm",
           eta: float = 0.0, steps: Sequence[int] | None = None):
  """Runs the chain; returns (x_0, aux stacked over executed steps).

  step_forward(x, t_original (B,), row) -> (output, aux), e.g. from `guided`; row = position in
  sampling order (0 = the noisiest step), which is the engine's plan row.
  """
  if method not in SAMPLERS:
    raise ValueError(f"method must be one of {SAMPLERS}, got {method!r}")
  num = diffusion.num_timesteps
  positions = np.arange(num) if steps is None else np.asarray(steps, np.int32)
  indices = (num - 1 - positions).astype(np.int32)
  keys = jax.random.split(key, num)[positions]
  timesteps = diffusion.timestep_map[indices]
  x = noise.astype(compute_dtype(noise))
  batch = x.shape[0]

  def body(x, xs):
    row, index, t, step_key = xs
    out, aux = step_forward(x, jnp.full((batch,), t, jnp.int32), row)
    z = jax.random.normal(step_key, x.shape, x.dtype)
    chain_t = jnp.full((batch,), index, jnp.int32)
    if method == "ddpm":
      x, _ = ddpm_step(lambda *_: out, diffusion, x, chain_t, z)
    else:
      x, _ = ddim_step(lambda *_: out, diffusion, x, chain_t, z, eta=eta)
    return x, aux

  return jax.lax.scan(body, x, (jnp.asarray(positions), jnp.asarray(indices), jnp.asarray(timesteps), keys))
