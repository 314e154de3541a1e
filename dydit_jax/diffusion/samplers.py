"""Ancestral DDPM and DDIM sampling as single traceable loops.

Each sampler is one `jax.lax.scan` over the chain's steps (last index first) with
explicit PRNG keys and no jit of its own: the caller jits the whole sampler with the
model state as an argument, e.g.

  @nnx.jit
  def sample(model, noise, y, key):
    return ddpm_sample(lambda x, t: model(x, t, y), diffusion, noise, key)

so one compiled program runs all steps and parameters are not baked in as constants.
`diffusion` is closed over (it is static). `model_fn(x, t)` always receives the
ORIGINAL-chain timesteps (int32, shape (B,)), e.g. 999, 995, ..., 0 for "250".

Both samplers return the final x_0-space sample in float32 (or the noise's dtype if
wider): the step at t = 0 adds no noise.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dydit_jax.diffusion.gaussian import GaussianDiffusion, ModelFn, compute_dtype

SAMPLERS = ("ddpm", "ddim")


def sampling_timesteps(diffusion: GaussianDiffusion) -> np.ndarray:
  """Original-chain timesteps the model sees, in sampling order (int32, descending).

  Entry i is the timestep of scan step i of `ddpm_sample` / `ddim_sample`, e.g.
  [999, 995, ..., 4, 0] for a "250" chain; lets planners precompute per-step work.
  """
  return diffusion.timestep_map[::-1].copy()


def _nonzero_mask(t, x):
  """1 where t > 0, 0 at the last step (no noise there); shaped to broadcast on x."""
  return (t != 0).astype(x.dtype).reshape(t.shape + (1,) * (x.ndim - t.ndim))


def ddpm_step(model_fn: ModelFn, diffusion: GaussianDiffusion, x, t, noise,
              clip_denoised: bool = False):
  """One ancestral step x_t -> x_{t-1} = mean + [t > 0] exp(0.5 log_var) noise.

  Args:
    model_fn: model_fn(x, t_original) -> (B, H, W, 2C) output.
    diffusion: the (possibly respaced) chain.
    x: x_t, (B, H, W, C).
    t: (B,) int indices of the chain.
    noise: standard Gaussian noise shaped like x.
    clip_denoised: clamp the x_0 prediction to [-1, 1].

  Returns:
    (x_{t-1}, pred_xstart).
  """
  out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised)
  sample = out["mean"] + _nonzero_mask(t, x) * jnp.exp(0.5 * out["log_variance"]) * noise
  return sample, out["pred_xstart"]


def ddim_step(model_fn: ModelFn, diffusion: GaussianDiffusion, x, t, noise,
              eta: float = 0.0, clip_denoised: bool = False):
  """One DDIM step (Song et al. eq. 12); eta = 0 is deterministic, eta = 1 ~ DDPM.

  eps is re-derived from the (optionally clipped) x_0 prediction; a learned variance
  is ignored. Arguments as `ddpm_step`. Returns (x_{t-1}, pred_xstart).
  """
  out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised)
  pred_xstart = out["pred_xstart"]
  eps = diffusion.predict_eps_from_xstart(x, t, pred_xstart)
  alpha_bar = diffusion.extract(diffusion.alphas_cumprod, t, x)
  alpha_bar_prev = diffusion.extract(diffusion.alphas_cumprod_prev, t, x)
  sigma = (eta * jnp.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
           * jnp.sqrt(1.0 - alpha_bar / alpha_bar_prev))
  mean = pred_xstart * jnp.sqrt(alpha_bar_prev) + jnp.sqrt(1.0 - alpha_bar_prev - sigma ** 2) * eps
  return mean + _nonzero_mask(t, x) * sigma * noise, pred_xstart


# forward(x, t_original (B,), row) -> (model output, aux); row = position in sampling order.
ChainForward = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], tuple]


def row_noise(key, row_ids, shape, dtype=jnp.float32):
  """Standard normal noise, row r drawn from fold_in(key, row_ids[r]): (len(row_ids),) + shape.

  A row's noise depends on its id only, not on the batch it sits in or the device that holds it, so a
  chain split over devices (or into smaller batches) draws exactly what one big batch draws.
  """
  return jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(key, r), shape, dtype))(
      jnp.asarray(row_ids, jnp.int32))


def run_chain(forward: ChainForward, diffusion: GaussianDiffusion, x, key, *, method: str = "ddpm",
              eta: float = 0.0, positions=None, clip_denoised: bool = False, row_ids=None):
  """Scans the chain's steps from x; returns (x_0, aux of `forward` stacked over the executed steps).

  The one sampling loop of the project: `ddpm_sample` / `ddim_sample` wrap it, and the fast engine
  uses it with forwards that also report routed-token counts (aux) and read their plan row.
  positions: sampling-order positions to run (0 = the noisiest step), default all. Step i draws row
  r's noise as `row_noise(key_i, row_ids)` with key_i = key i of `jax.random.split(key, T)`, whichever
  subset runs, so consecutive pieces of one chain (`positions` split in order, x handed on) equal the
  whole chain. row_ids: (B,) global ids of x's rows (default 0..B-1); shards of one batch pass their
  own ids and together equal the unsharded chain.
  """
  if method not in SAMPLERS:
    raise ValueError(f"method must be one of {SAMPLERS}, got {method!r}")
  num = diffusion.num_timesteps
  positions = np.arange(num) if positions is None else np.asarray(positions, np.int32)
  indices = (num - 1 - positions).astype(np.int32)
  keys = jax.random.split(key, num)[positions]
  timesteps = diffusion.timestep_map[indices]
  x = x.astype(compute_dtype(x))
  batch = x.shape[0]
  row_ids = jnp.arange(batch, dtype=jnp.int32) if row_ids is None else row_ids

  def body(x, xs):
    row, index, t, step_key = xs
    out, aux = forward(x, jnp.full((batch,), t, jnp.int32), row)
    z = row_noise(step_key, row_ids, x.shape[1:], x.dtype)
    chain_t = jnp.full((batch,), index, jnp.int32)
    if method == "ddpm":
      x, _ = ddpm_step(lambda *_: out, diffusion, x, chain_t, z, clip_denoised=clip_denoised)
    else:
      x, _ = ddim_step(lambda *_: out, diffusion, x, chain_t, z, eta=eta, clip_denoised=clip_denoised)
    return x, aux

  xs = (jnp.asarray(positions), jnp.asarray(indices), jnp.asarray(timesteps), keys)
  return jax.lax.scan(body, x, xs)


def run_pieces(pieces, diffusion: GaussianDiffusion, x, key, *, method: str = "ddpm", eta: float = 0.0,
               positions=None, row_ids=None):
  """Runs the chain as consecutive pieces [(sampling-order positions it owns, forward), ...].

  Each piece scans the positions it owns (intersected with `positions`, default all) through
  `run_chain` and hands x on; pieces with nothing to run are skipped. A segmented engine runs one
  program per range of steps this way. Returns (x_0, aux concatenated over the executed steps).
  """
  wanted = np.unique(np.arange(diffusion.num_timesteps) if positions is None else np.asarray(positions))
  owned = piece_positions(pieces, wanted)
  auxes = []
  for own, (_, forward) in zip(owned, pieces):
    if own.size:
      x, aux = run_chain(forward, diffusion, x, key, method=method, eta=eta, positions=own, row_ids=row_ids)
      auxes.append(aux)
  return x, jax.tree.map(lambda *a: jnp.concatenate(a), *auxes)


def piece_positions(pieces, wanted: np.ndarray) -> list[np.ndarray]:
  """The positions of `wanted` each piece runs; every wanted position exactly once, in order."""
  owned = [np.intersect1d(np.asarray(rows), wanted) for rows, _ in pieces]
  if sum(len(p) for p in owned) != len(wanted) or not np.array_equal(np.concatenate(owned), wanted):
    raise ValueError("the pieces must own every requested step once, in sampling order")
  return owned


def ddpm_sample(model_fn: ModelFn, diffusion: GaussianDiffusion, noise, key,
                clip_denoised: bool = False):
  """Ancestral sampling from x_T = `noise` through every step of `diffusion`.

  Args:
    model_fn: model_fn(x, t_original) -> (B, H, W, 2C) output.
    diffusion: the (possibly respaced) chain; DiT samples with "250".
    noise: x_T, (B, H, W, C).
    key: PRNG key for the per-step noise.
    clip_denoised: clamp x_0 predictions to [-1, 1] (DiT: False).

  Returns:
    x_0 samples, (B, H, W, C).
  """
  return run_chain(lambda x, t, row: (model_fn(x, t), None), diffusion, noise, key,
                   method="ddpm", clip_denoised=clip_denoised)[0]


def ddim_sample(model_fn: ModelFn, diffusion: GaussianDiffusion, noise, key,
                eta: float = 0.0, clip_denoised: bool = False):
  """DDIM sampling from x_T = `noise`; `key` only matters when eta > 0.

  Arguments as `ddpm_sample`, plus `eta` (0 = deterministic DDIM). Returns x_0 samples.
  """
  return run_chain(lambda x, t, row: (model_fn(x, t), None), diffusion, noise, key,
                   method="ddim", eta=eta, clip_denoised=clip_denoised)[0]
