"""Whole sampling chains (DDPM / DDIM, optional CFG) through an engine, returning routed-token stats.

The loop itself is `dydit_jax.diffusion.run_chain` (the noise protocol of `ddpm_sample` /
`ddim_sample`: x_T in float32, step i's noise from key i of one split), so with the same key a chain
here equals `ddpm_sample` / `ddim_sample` on the same model. What this module adds: CFG around a
forward that also returns aux (the engine's routed-token counts per layer), and chains run as
consecutive pieces, each with its own forward (a segmented engine compiles one program per range of
steps; `engine.forwards` lists them).

`steps` runs a subset of the chain's steps (sampling order positions, e.g. every 5th of 250) for
timing on a budget: each executed step uses its true timestep, plan row and schedule coefficients,
but the chain is then not a valid sampler (speed does not care; images would).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dydit_jax.diffusion.samplers import run_chain
from dydit_jax.models.guidance import cfg_labels, forward_with_cfg

# forward(x, t_original (B,), y (B,), row) -> (model output, aux pytree)
Forward = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


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
           eta: float = 0.0, steps: Sequence[int] | None = None, row_ids=None):
  """Runs the chain with one forward; returns (x_0, aux stacked over executed steps).

  step_forward(x, t_original (B,), row) -> (output, aux), e.g. from `guided`; row = position in
  sampling order (0 = the noisiest step), which is the engine's plan row. row_ids: see `run_chain`.
  """
  return run_chain(step_forward, diffusion, noise, key, method=method, eta=eta, positions=steps,
                   row_ids=row_ids)


def sample_pieces(pieces, diffusion, noise: jax.Array, key: jax.Array, *, method: str = "ddpm",
                  eta: float = 0.0, steps: Sequence[int] | None = None, row_ids=None):
  """Runs the chain as consecutive pieces [(plan rows, step_forward), ...] in sampling order.

  Each piece scans the rows it owns (intersected with `steps`); pieces with no executed row are
  skipped. Returns (x_0, aux concatenated over the executed steps in order). row_ids: see `run_chain`.
  """
  wanted = np.unique(np.arange(diffusion.num_timesteps) if steps is None else np.asarray(steps))
  owned = [np.intersect1d(np.asarray(rows), wanted) for rows, _ in pieces]
  if sum(len(p) for p in owned) != len(wanted) or not np.array_equal(np.concatenate(owned), wanted):
    raise ValueError("the pieces must own every requested step once, in sampling order")
  x, auxes = noise, []
  for positions, (_, step_forward) in zip(owned, pieces):
    if positions.size:
      x, aux = run_chain(step_forward, diffusion, x, key, method=method, eta=eta, positions=positions,
                         row_ids=row_ids)
      auxes.append(aux)
  return x, jax.tree.map(lambda *a: jnp.concatenate(a), *auxes)
