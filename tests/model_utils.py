"""Shared test helpers: tiny geometries, hand-checkable masks, comparisons.

An adaLN-Zero DiT outputs zeros at init, so any comparison of two fresh models proves nothing:
`randomize` (from `dydit_jax.models.random_weights`, shared with the benchmark) overwrites every
parameter, zero-initialized ones included, with random values.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax.models import ModelConfig
from dydit_jax.models.random_weights import randomize, randomize_routers  # noqa: F401 (re-exported)
from dydit_jax.sampler import Sampler


def tiny_config(**overrides) -> ModelConfig:
  base = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
              num_classes=10, class_dropout_prob=0.1)
  base.update(overrides)
  return ModelConfig(**base)


# Hand-computable DyDiT geometry: N = 16 tokens, D = 64, L = 2, H = 4, p = 2.
#   A = 4*16*64^2 + 2*16^2*64 = 294912, M = 8*16*64^2 = 524288, A + M = 819200.
HAND_CONFIG = ModelConfig(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, dynamic=True)


def hand_masks():
  """Sample 0: layer 0 h=1/2, g=1/4, k=1/2; layer 1 h=1, g=1, k=1/4 (ratio 0.39). Sample 1: all open."""
  head = np.ones((2, 2, 4), np.float32)
  group = np.ones((2, 2, 4), np.float32)
  token = np.ones((2, 2, 16), np.float32)
  head[0, 0, 2:] = 0
  group[0, 0, 1:] = 0
  token[0, 0, 8:] = 0
  token[0, 1, 4:] = 0
  return {"head": jnp.asarray(head), "group": jnp.asarray(group), "token": jnp.asarray(token)}


def rel_l2(a, b) -> float:
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def sample_inputs(cfg: ModelConfig, batch: int = 3, seed: int = 0):
  kx, kt, ky = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, cfg.input_size, cfg.input_size, cfg.in_channels))
  t = jax.random.randint(kt, (batch,), 0, 1000)
  y = jax.random.randint(ky, (batch,), 0, cfg.num_classes)
  return x, t, y


def checked(forward, reference, tol: float = 1e-5, poison: bool = True):
  """A chain forward(x, t, y, row) -> (out, aux with "kept" (L, B)) that also runs `reference` (the
  masked model) on the same input, adds the call's relative L2 error ("err") and whether its routed
  tokens are the same ("same_tokens") to aux, and (`poison`) turns the output into NaN when the call
  differs (error above `tol`, or other routed-token counts).

  A final-sample check alone cannot see a wrong call: with random weights x_t grows along the chain
  (RMS ~ 200) until the output barely depends on the blocks, so one wrong head at one step moves x_0
  by ~1e-7. Poisoned, the wrong call turns the whole sample into NaN.
  """
  graphdef, state = nnx.split(reference)

  def run(x, t, y, row):
    out, aux = forward(x, t, y, row)
    want, masks = nnx.merge(graphdef, state)(x, t, y, return_masks=True)
    err = jnp.linalg.norm(out - want) / jnp.linalg.norm(want)
    same = jnp.all(aux["kept"] == jnp.round(masks["token"].sum(-1)).astype(aux["kept"].dtype).T)
    if poison:
      out = jnp.where((err <= tol) & same, out, jnp.nan)
    return out, {**aux, "err": err, "same_tokens": same}

  return run


class CheckedSampler(Sampler):
  """A `Sampler` (any engine) whose every model call is `checked` against the masked `reference`."""

  def __init__(self, model, options, reference, **kwargs):
    self.reference = reference
    super().__init__(model, options, **kwargs)

  def _pieces(self, arrays):
    return [(rows, checked(forward, self.reference)) for rows, forward in super()._pieces(arrays)]
