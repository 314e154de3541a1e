"""DyDiT fine-tuning pieces: FLOPs loss, lambda ramp, stratified t, clip-then-skip."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dydit_jax.models.flops import macs_ratio
from dydit_jax.train import dydit_objectives as obj
from model_utils import HAND_CONFIG, hand_masks

TINY = HAND_CONFIG


def test_flops_loss_hand_example():
  # mean ratio (0.39 + 1.0) / 2 = 0.695; 2 * (0.695 - 0.5)^2 = 0.07605.
  np.testing.assert_allclose(obj.flops_loss(TINY, hand_masks(), 0.5), 0.07605, rtol=1e-5)
  np.testing.assert_allclose(obj.flops_loss(TINY, hand_masks(), 0.5, weight=1.0), 0.038025, rtol=1e-5)
  # Two replicas of one sample: 2 * mean((0.39 - 0.5)^2, (1 - 0.5)^2) = 0.2621.
  np.testing.assert_allclose(obj.flops_loss(TINY, hand_masks(), 0.5, num_replicas=2), 0.2621, rtol=1e-5)
  jitted = jax.jit(lambda m, lam: obj.flops_loss(TINY, m, lam))(hand_masks(), jnp.float32(0.5))
  np.testing.assert_allclose(jitted, 0.07605, rtol=1e-5)


def test_flops_loss_gradient_wrt_softhand_masks():
  soft = jax.tree.map(lambda m: m * 0.9 + 0.05, hand_masks())
  grads = jax.grad(lambda m: obj.flops_loss(TINY, m, 0.2))(soft)
  for name in ("head", "group", "token"):
    assert np.all(np.asarray(grads[name]) > 0), name  # ratio above target: closing gates helps
  # d loss / d head[b, l, h] = weight * 2 * (mean r - lam) / B * (A / (A + M)) / (L * H).
  ratio = float(jnp.mean(macs_ratio(TINY, soft)))
  want = 2.0 * 2 * (ratio - 0.2) / 2 * (294912 / 819200) / (2 * 4)
  np.testing.assert_allclose(grads["head"], np.full((2, 2, 4), want), rtol=1e-5)


@pytest.mark.parametrize("step,want", [(0, 1.0), (99, 1.0), (100, 0.994), (2500, 0.85), (5000, 0.7),
                                       (5001, 0.7), (150000, 0.7)])
def test_lambda_schedule_official_rule(step, want):
  np.testing.assert_allclose(obj.lambda_schedule(step, 0.7, 5000), want, rtol=1e-6)


def test_lambda_schedule_traced_and_without_warmup():
  steps = jnp.array([0, 99, 100, 500, 1000, 30000])
  got = jax.jit(lambda s: obj.lambda_schedule(s, 0.5, 1000))(steps)
  np.testing.assert_allclose(got, [1.0, 1.0, 0.95, 0.75, 0.5, 0.5], rtol=1e-6)
  np.testing.assert_allclose(obj.lambda_schedule(jnp.array([99, 100]), 0.5, 0), [1.0, 0.5])


def test_complete_loss_active():
  np.testing.assert_array_equal(obj.complete_loss_active(np.array([0, 29999, 30000]), 30000), [1, 1, 0])
  assert obj.complete_loss_active(10 ** 6, -1) is True
  assert obj.complete_loss_active(0, 0) is False
  assert obj.complete_loss_active(5, 6) is True


def test_stratified_timesteps_land_in_their_quarters():
  keys = jax.random.split(jax.random.key(0), 200)
  t = np.asarray(jax.vmap(lambda k: obj.stratified_timesteps(k, 10))(keys))  # (200, 10)
  assert t.dtype == np.int32
  quarter = np.arange(10) % 4
  np.testing.assert_array_equal(t // 250, np.broadcast_to(quarter, t.shape))
  assert t.min() < 5 and t.max() > 994  # each stratum is sampled over its whole width


def test_stratified_timesteps_uneven_strata():
  t = np.asarray(obj.stratified_timesteps(jax.random.key(1), 3000, num_timesteps=10, num_strata=3))
  stratum = np.arange(3000) % 3
  low, high = np.array([0, 3, 6])[stratum], np.array([3, 6, 10])[stratum]
  assert np.all((t >= low) & (t < high))
  assert set(t[stratum == 2]) == {6, 7, 8, 9}


def _grads():
  return {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array([[4.0]])}}  # global norm 5


def test_clip_then_skip_no_clip_no_skip():
  clipped, norm, skip = obj.clip_then_skip(_grads(), 10.0)
  assert float(norm) == pytest.approx(5.0) and not bool(skip)
  np.testing.assert_allclose(clipped["a"], [3.0, 0.0])


def test_clip_then_skip_official_equal_thresholds_skip():
  clipped, norm, skip = obj.clip_then_skip(_grads(), 2.5)
  assert float(norm) == pytest.approx(5.0)  # the pre-clip norm is returned and compared
  assert bool(skip)
  np.testing.assert_allclose(clipped["b"]["c"], [[4.0 * 2.5 / (5.0 + 1e-6)]], rtol=1e-6)
  _, _, skip_at = obj.clip_then_skip(_grads(), 5.0)  # norm == threshold skips (norm >= max_norm)
  assert bool(skip_at)


def test_clip_then_skip_clip_without_skip_and_nonfinite():
  clipped, _, skip = obj.clip_then_skip(_grads(), 2.5, skip_norm=100.0)
  assert not bool(skip)
  np.testing.assert_allclose(optax.tree.norm(clipped), 2.5, rtol=1e-5)
  _, _, skip_nan = obj.clip_then_skip({"a": jnp.array([jnp.nan])}, 10.0)
  assert bool(skip_nan)


@pytest.mark.parametrize("skip", [False, True])
def test_apply_unless_skipped(skip):
  tx = optax.adamw(1e-2, weight_decay=0.0)
  params = {"w": jnp.array([1.0, -2.0])}
  state = tx.init(params)
  step = jax.jit(lambda g, s, p, k: obj.apply_unless_skipped(tx, g, s, p, k))
  new_params, new_state = step({"w": jnp.array([0.5, 0.5])}, state, params, jnp.bool_(skip))
  changed = not np.allclose(new_params["w"], params["w"])
  assert changed != skip
  count = int(new_state[0].count)
  assert count == (0 if skip else 1)  # one Adam step per iteration, none when skipped
