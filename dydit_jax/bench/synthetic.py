"""Synthetic DyDiT routers: a model whose masks cost a chosen fraction of the dense MACs.

For speed measurements without a trained checkpoint (speed depends on the weights only through the
masks). Deterministic given `seed`. How the routers are built:

1. Width profile. Layer l at timestep t opens round(w H) heads and groups, with
   w(t, l) = clip(mu + tilt (0.5 - t / 999) + o_l, 0, 1) and per-layer offsets o_l ~ U(-0.15, 0.15)
   (drawn separately for heads and groups). tilt > 0 gives more width at low noise (small t): our
   reading of DyDiT's motivation that predictions near pure noise are easier; tilt < 0 reverses it.
   Which units open follows a per-layer random priority order (unit 0 first under `forced_first`), so
   open sets are nested over t like a trained router's. mu is found by bisection so the official ratio
   mean_{t,l} (h A + g k M) / (A + M) equals `target`, with k = `token_keep`.
2. Width routers. The router is linear in the timestep embedding, so its weights are fitted by least
   squares to logits +1 (open) / -1 (closed) at the given timesteps: exact whenever the number of
   timesteps is <= D + 1 (e.g. DDPM-250 and DDIM-50 together for any DiT size).
3. Token routers. mlp_head computes relu(x.u) - relu(-x.u) + b_l = x.u + b_l for a random unit
   vector u per layer; b_l is bisected (all layers together) until the eval-mode model routes a
   fraction `token_keep` of tokens on a calibration batch of Gaussian latents at timesteps spread over
   the chain. During real sampling the fraction varies per sample, layer and step around that value.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax.bench.calibration import token_fraction_fn
from dydit_jax.models import flops
from dydit_jax.models.dit import DiT


def width_counts(cfg, timesteps: np.ndarray, mu: float, tilt: float, offsets: np.ndarray) -> np.ndarray:
  """(S, L) open units for the profile w(t, l) above."""
  w = mu + tilt * (0.5 - timesteps[:, None] / 999.0) + offsets[None]
  low = 1 if cfg.router_format == "forced_first" else 0
  return np.clip(np.rint(np.clip(w, 0, 1) * cfg.num_heads), low, cfg.num_heads).astype(int)


def _solve_mu(cfg, timesteps, target, token_keep, tilt, head_off, group_off) -> float:
  attn, mlp = flops.layer_macs(cfg)

  def ratio(mu):
    h = width_counts(cfg, timesteps, mu, tilt, head_off) / cfg.num_heads
    g = width_counts(cfg, timesteps, mu, tilt, group_off) / cfg.num_heads
    return float(np.mean((h * attn + g * token_keep * mlp) / (attn + mlp)))

  lo, hi = -1.0, 2.0
  for _ in range(40):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if ratio(mid) < target else (lo, mid)
  return (lo + hi) / 2


def _open_masks(counts: np.ndarray, priority: np.ndarray) -> np.ndarray:
  """(S, L, H) bool: the first counts[s, l] units of layer l's priority order."""
  rank = np.argsort(priority, axis=-1)              # rank[l, unit] = position of unit in the order
  return rank[None] < counts[..., None]


def _fit_width_router(router, t_emb: np.ndarray, masks: np.ndarray, forced_first: bool) -> int:
  """Least-squares router weights for +-1 logits; returns the number of fitted gates that miss."""
  routed = masks[..., 1:] if forced_first else masks          # (S, L, R)
  s, l, r = routed.shape
  design = np.concatenate([t_emb, np.ones((s, 1))], axis=1)   # (S, D + 1)
  targets = np.where(routed, 1.0, -1.0).reshape(s, l * r)
  sol = np.linalg.lstsq(design, targets, rcond=None)[0]       # (D + 1, L R)
  kernel = sol[:-1].reshape(-1, l, r).transpose(1, 0, 2)
  router.router.kernel[...] = jnp.asarray(kernel, jnp.float32)
  router.router.bias[...] = jnp.asarray(sol[-1].reshape(l, r), jnp.float32)
  fitted = design.astype(np.float32) @ sol.astype(np.float32)
  return int(np.sum((fitted > 0) != (targets > 0)))


def _set_token_routers(model: DiT, rng: np.random.Generator) -> None:
  """mlp_head = relu(x.u) - relu(-x.u) + b: hidden units 0 and 1 carry +-x.u, the rest are unused."""
  cfg = model.config
  d, hid = cfg.hidden_size, cfg.token_router_hidden
  u = rng.standard_normal((cfg.depth, d))
  u /= np.linalg.norm(u, axis=1, keepdims=True)
  first, second = model.blocks.token_selection.mlp_head.layers[0], model.blocks.token_selection.mlp_head.layers[2]
  k1 = np.zeros((cfg.depth, d, hid), np.float32)
  k1[:, :, 0], k1[:, :, 1] = u, -u
  k2 = np.zeros((cfg.depth, hid, 1), np.float32)
  k2[:, 0, 0], k2[:, 1, 0] = 1.0, -1.0
  first.kernel[...] = jnp.asarray(k1)
  first.bias[...] = jnp.zeros_like(first.bias[...])
  second.kernel[...] = jnp.asarray(k2)


def calibrate_token_routers(model: DiT, keep: float, *, seed: int = 0, batch: int = 8,
                            iters: int = 20) -> np.ndarray:
  """Token routers logit = x.u + b_l (random unit u per layer), b_l bisected so the eval-mode model
  routes a fraction `keep` of tokens per layer on the calibration batch (`bench.calibration`); in
  place. Returns the achieved (B, L) per-sample fractions (sample b at its own timestep).
  """
  cfg = model.config
  _set_token_routers(model, np.random.default_rng(seed))
  bias_var = model.blocks.token_selection.mlp_head.layers[2].bias
  if keep >= 1.0:
    bias_var[...] = jnp.full((cfg.depth, 1), 1e4, jnp.float32)
    return np.ones((batch, cfg.depth))
  fraction_fn = token_fraction_fn(model, batch, seed)
  fractions = lambda: np.asarray(fraction_fn(nnx.state(model)))
  lo, hi = np.full(cfg.depth, -np.inf), np.full(cfg.depth, np.inf)
  b = np.zeros(cfg.depth)
  for _ in range(iters):
    bias_var[...] = jnp.asarray(b.reshape(cfg.depth, 1), jnp.float32)
    above = fractions().mean(0) > keep
    hi, lo = np.where(above, b, hi), np.where(above, lo, b)
    step = np.maximum(1.0, 2 * np.abs(b))
    b = np.where(np.isinf(hi), lo + step, np.where(np.isinf(lo), hi - step, (lo + hi) / 2))
  bias_var[...] = jnp.asarray(b.reshape(cfg.depth, 1), jnp.float32)
  return fractions()


def set_synthetic_routers(model: DiT, target: float, timesteps, *, seed: int = 0, token_keep: float = 0.85,
                          tilt: float = 0.4, calibration_batch: int = 8, calibration_iters: int = 20) -> dict:
  """Overwrites the routers of a DyDiT (in place) as described in the module docstring.

  timesteps: the original-chain timesteps the width routers must hit exactly (all samplers to run).
  Returns a report {"mu", "width_misses", "token_fraction" (B, L) on the calibration batch}.
  """
  cfg = model.config
  if not cfg.dynamic:
    raise ValueError("synthetic routers need a DyDiT (cfg.dynamic)")
  timesteps = np.unique(np.asarray(timesteps, np.int32))
  rng = np.random.default_rng(seed)
  head_off, group_off = (rng.uniform(-0.15, 0.15, cfg.depth) for _ in range(2))
  mu = _solve_mu(cfg, timesteps, target, token_keep, tilt, head_off, group_off)
  forced = cfg.router_format == "forced_first"
  t_emb = np.asarray(model.t_embedder(jnp.asarray(timesteps)), np.float64)
  misses = 0
  for router, offsets in ((model.blocks.attn_rate, head_off), (model.blocks.mlp_rate, group_off)):
    priority = np.stack([rng.permutation(cfg.num_heads) for _ in range(cfg.depth)])
    if forced:  # unit 0 is always open: put it first
      priority = np.stack([np.concatenate([[0], p[p != 0]]) for p in priority])
    masks = _open_masks(width_counts(cfg, timesteps, mu, tilt, offsets), priority)
    misses += _fit_width_router(router, t_emb, masks, forced)
  fraction = calibrate_token_routers(model, token_keep, seed=seed, batch=calibration_batch,
                                     iters=calibration_iters)
  return {"mu": mu, "width_misses": misses, "token_fraction": fraction}
