"""Random weights that make every part of a DiT / DyDiT do something, for tests and benchmarks.

A freshly initialized DiT is adaLN-Zero: its blocks are the identity and its output is zero, so two
fresh models agree whatever their code does, and a DyDiT at the official router init opens every
unit. `randomize` overwrites parameters (the zero-initialized ones included) with Gaussian noise;
`randomize_routers` gives the routers weights that open some units and close others.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax.models.dit import DiT

ROUTER_PARAMS = ("router", "mlp_head")


def _params(model: DiT):
  """(index, names along the path, variable) of every nnx.Param, in a fixed order."""
  for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
    yield i, [str(p) for p in path], var


def _normal(seed: int, index: int, shape) -> np.ndarray:
  """N(0, 1) noise for parameter `index`, drawn on the host: one device transfer per parameter and
  no compile (eager jax.random would compile a program per parameter shape, seconds per model)."""
  return np.random.default_rng((seed, index)).standard_normal(shape, dtype=np.float32)


def randomize(model: DiT, seed: int = 0, scale: float = 0.05, *, only: Sequence[str] | None = None,
              skip: Sequence[str] = ROUTER_PARAMS) -> DiT:
  """Fill parameters with N(0, scale^2) noise, in place; returns the model.

  only: restrict to parameters with one of these names on their path (e.g. the zero-initialized
  "adaLN_modulation" and "final_layer"); skip: leave these out (the routers by default, so callers
  choose the routing regime with `randomize_routers`).
  """
  for i, names, var in _params(model):
    if any(s in names for s in skip) or (only is not None and not any(s in names for s in only)):
      continue
    var[...] = jnp.asarray(scale * _normal(seed, i, var.shape), var.dtype)
  return model


def randomize_routers(model: DiT, seed: int = 1, weight_scale: float = 1.0, bias: float = 0.0) -> DiT:
  """Router weights ~ N(0, weight_scale^2 / fan_in), biases constant, in place: bias 0 gives masks
  that open about half the units (weight_scale ~3 makes them vary strongly with t and the tokens)."""
  for i, names, var in _params(model):
    if not any(s in names for s in ROUTER_PARAMS):
      continue
    if names[-1] == "bias":
      var[...] = jnp.full(var.shape, bias, var.dtype)
    else:
      var[...] = jnp.asarray(weight_scale * _normal(seed, i, var.shape) / var.shape[-2] ** 0.5, var.dtype)
  return model
