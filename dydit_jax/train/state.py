"""The train state: params, EMA, optimizer state, step and RNG as one pytree.

The NNX model is split once into a static `graphdef` and array states; the jitted train step
merges them back, so there is one compiled program per step and no per-call `nnx.jit` overhead.
`buffers` holds the model's non-trainable state (the fixed sin-cos `pos_embed`): the optimizer and
the EMA only see `params` (`nnx.Param`), routers included.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from dydit_jax.models import DiT, ModelConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: iterations done (skipped updates included, as officially)
  params: nnx.State        # trainable nnx.Param leaves
  buffers: nnx.State       # the rest of the model state, never trained
  ema: nnx.State           # exponential moving average of params (the weights to sample with)
  opt_state: Any
  rng: jax.Array           # base PRNG key (uint32[2]); step s uses fold_in(rng, s)


def make_optimizer(opt: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with a constant learning rate (DiT and DyDiT use no schedule and no warm-up)."""
  return optax.adamw(opt.lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)


def split_model(model: DiT) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, params, buffers) of a model."""
  return nnx.split(model, nnx.Param, ...)


def model_graphdef(cfg: ModelConfig) -> nnx.GraphDef:
  return split_model(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))))[0]


def new_state(params: nnx.State, buffers: nnx.State, tx: optax.GradientTransformation, seed: int,
              step: int = 0) -> TrainState:
  """A fresh state around given weights: EMA = a copy of the params, Adam moments at zero.

  Pure: jit it with `out_shardings` to create the state directly in place on the mesh.
  """
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, buffers=buffers,
                    ema=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    rng=jax.random.PRNGKey(seed))


def scratch_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """A randomly initialized model's state (the official initializers). Pure: jit it."""
  _, params, buffers = split_model(DiT(cfg, rngs=nnx.Rngs(seed)))
  return new_state(params, buffers, tx, seed)


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation) -> TrainState:
  """The state's shapes and dtypes (ShapeDtypeStruct leaves), without allocating anything."""
  return jax.eval_shape(lambda: scratch_state(cfg, tx, 0))


def ema_update(ema: nnx.State, params: nnx.State, decay: float) -> nnx.State:
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf (DiT's update_ema, no bias correction)."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def model_from_state(graphdef: nnx.GraphDef, state: TrainState, *, use_ema: bool = False) -> DiT:
  """The live NNX model of a state (EMA weights or the raw params)."""
  return nnx.merge(graphdef, state.ema if use_ema else state.params, state.buffers)
