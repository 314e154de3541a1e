"""Shared test helpers: tiny geometries and parameter randomization.

An adaLN-Zero DiT outputs zeros at init, so any comparison of two fresh models proves nothing:
`randomize` overwrites every parameter (zero-initialized ones included) with random values.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax.models import DiT, ModelConfig


def tiny_config(**overrides) -> ModelConfig:
  base = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
              num_classes=10, class_dropout_prob=0.1)
  base.update(overrides)
  return ModelConfig(**base)


def randomize(model: DiT, seed: int = 0, scale: float = 0.05, skip=("router", "mlp_head")) -> DiT:
  """Fill every Param with N(0, scale^2) noise (in place). Router params are skipped by default so
  that callers decide the routing regime explicitly (see `set_router_logits`)."""
  key = jax.random.key(seed)
  for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
    if any(s in map(str, path) for s in skip):
      continue
    var[...] = scale * jax.random.normal(jax.random.fold_in(key, i), var.shape, var.dtype)
  return model


def randomize_routers(model: DiT, seed: int = 1, weight_scale: float = 1.0, bias: float = 0.0) -> DiT:
  """Router weights ~ N(0, weight_scale^2 / fan_in), biases constant: bias 0 gives mixed masks."""
  key = jax.random.key(seed)
  for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
    names = list(map(str, path))
    if not any(s in names for s in ("router", "mlp_head")):
      continue
    if names[-1] == "bias":
      var[...] = jnp.full(var.shape, bias, var.dtype)
    else:
      fan_in = var.shape[-2]
      var[...] = weight_scale * jax.random.normal(jax.random.fold_in(key, i), var.shape) / fan_in ** 0.5
  return model


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
