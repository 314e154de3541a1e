"""The train step's semantics on one device: one optimizer step, skips, NaN guard, EMA, loss terms."""
import jax
import numpy as np
import pytest
from flax import nnx

import train_tiny_config
from dydit_jax.train import sharding, state as state_lib, step as step_lib
from dydit_jax.train.config import build_model_config

DECAY = 0.9


def _setup(**changes):
  config = train_tiny_config.get_config("complete=5")
  config.dydit.lambda_warmup_steps = 0     # target 0.5 at once: the routers get gradients
  config.ema_decay = DECAY
  for k, v in changes.items():
    setattr(config, k, v)
  cfg = build_model_config(config.model)
  tx = state_lib.make_optimizer(config.optimizer)
  graphdef = state_lib.model_graphdef(cfg)
  fn = jax.jit(step_lib.make_train_step(cfg, graphdef, tx, config, with_complete=True))
  return fn, state_lib.scratch_state(cfg, tx, 0)


def _batch(nan=False):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 8, 8, 1)).astype(np.float32)
  if nan:
    x[3, 2, 2, 0] = np.nan
  return sharding.global_batch({"x": x, "y": (np.arange(16) % 10).astype(np.int32)}, sharding.make_mesh())


def _flat(tree):
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(tree)}


@pytest.fixture(scope="module")
def stepped():
  fn, state = _setup()
  new, metrics = fn(state, _batch())
  return fn, state, new, metrics


def test_one_adam_step_per_iteration(stepped):
  _, state, new, metrics = stepped
  assert int(new.step) == 1
  assert int(new.opt_state[0].count) == 1     # optax.adamw: (scale_by_adam, weight decay, lr)
  # Adam's first update is lr * g / (|g| + eps): no parameter moves by more than one lr.
  lr = train_tiny_config.get_config().optimizer.lr
  moved = max(np.abs(a - b).max() for a, b in zip(_flat(new.params).values(), _flat(state.params).values()))
  assert 0.5 * lr < moved <= lr * 1.0001
  assert float(metrics["skipped"]) == 0


def test_ema_follows_every_param_routers_included(stepped):
  _, state, new, _ = stepped
  old, params, ema = _flat(state.ema), _flat(new.params), _flat(new.ema)
  for k in params:
    np.testing.assert_allclose(ema[k], DECAY * old[k] + (1 - DECAY) * params[k], rtol=1e-6, atol=1e-7, err_msg=k)
  routers = [k for k in params if "attn_rate" in k or "token_selection" in k]
  assert routers and all(np.abs(ema[k] - old[k]).max() > 0 for k in routers)


def test_loss_is_the_sum_of_its_terms(stepped):
  _, _, _, m = stepped
  np.testing.assert_allclose(m["loss"], m["diffusion_loss"] + m["flops_loss"] + m["complete_loss"], rtol=1e-6)
  np.testing.assert_allclose(m["diffusion_loss"], m["mse"] + m["vb"], rtol=1e-6)
  np.testing.assert_allclose(m["flops_loss"], 2.0 * (m["flops_ratio"] - m["lam"]) ** 2, rtol=1e-5)
  assert float(m["lam"]) == 0.5
  assert m["head_rate"].shape == m["group_rate"].shape == m["token_rate"].shape == (2,)


def test_nan_batch_is_skipped_and_flagged(stepped):
  fn, state, _, _ = stepped
  new, m = fn(state, _batch(nan=True))
  assert float(m["nonfinite"]) == 1 and float(m["skipped"]) == 1
  assert int(new.step) == 1 and int(new.opt_state[0].count) == 0
  for a, b in zip(_flat(new.params).values(), _flat(state.params).values()):
    np.testing.assert_array_equal(a, b)


def test_large_gradient_norm_skips_the_update():
  fn, state = _setup(grad_clip_norm=1e-6)
  new, m = fn(state, _batch())
  assert float(m["skipped"]) == 1 and float(m["nonfinite"]) == 0 and float(m["grad_norm"]) > 1e-6
  assert int(new.step) == 1 and int(new.opt_state[0].count) == 0
  for a, b in zip(_flat(new.params).values(), _flat(state.params).values()):
    np.testing.assert_array_equal(a, b)


def test_host_block_of_a_global_batch():
  mesh = sharding.make_mesh()
  assert sharding.host_rows(mesh, 16) == (0, 1)          # one process holds every row
  x = np.arange(16, dtype=np.float32)[:, None]
  np.testing.assert_array_equal(np.asarray(sharding.global_batch({"x": x}, mesh)["x"]), x)
  # A block that does not contain the rows this host's devices hold is refused, not misplaced.
  with pytest.raises(ValueError, match="outside this host's block"):
    sharding.global_batch({"x": x[:8]}, mesh, block=(1, 2))
