"""Which output channels classifier-free guidance touches: the legacy 3 of 4-channel latents, and
only the eps channels of any other model (never the learned-variance channels)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dydit_jax.diffusion.guidance import forward_with_cfg, guided_channel_count


def _model_fn(in_channels):
  """A fake [eps | v] model whose conditional and null rows differ in every output channel."""
  def fn(x, t, y):
    del t
    scale = jnp.where(y < 10, 1.0, -0.5)[:, None, None, None]   # label 10 = the null class
    out = jnp.concatenate([x, x * 0.25 + 0.1], axis=-1)          # 2 * in_channels outputs
    return out * scale
  return fn


@pytest.mark.parametrize("in_channels,want_guided", [(4, 3), (1, 1), (3, 3)])
def test_default_guides_eps_channels_only(in_channels, want_guided):
  assert guided_channel_count(in_channels) == want_guided
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, in_channels))
  y = jnp.asarray([1, 2, 10, 10])
  fn = _model_fn(in_channels)
  out = forward_with_cfg(fn, x, jnp.zeros(4, jnp.int32), y, 3.0)
  raw = fn(jnp.concatenate([x[:2], x[:2]]), None, y)
  cond, uncond = raw[:2], raw[2:]
  want = uncond + 3.0 * (cond - uncond)
  k = want_guided
  np.testing.assert_allclose(out[:2, ..., :k], want[..., :k], rtol=1e-6)
  np.testing.assert_allclose(out[2:, ..., :k], want[..., :k], rtol=1e-6)
  # Every channel after the guided ones (the variance channels included) is each half's own output.
  np.testing.assert_array_equal(out[..., k:], raw[..., k:])
  assert not np.allclose(want[..., k:], raw[:2, ..., k:])      # guiding them would have changed them


def test_explicit_count_overrides_the_default():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 2, 2, 4))
  y = jnp.asarray([3, 10])
  fn = _model_fn(4)
  default = forward_with_cfg(fn, x, jnp.zeros(2, jnp.int32), y, 2.0)
  legacy = forward_with_cfg(fn, x, jnp.zeros(2, jnp.int32), y, 2.0, guided_channels=3)
  standard = forward_with_cfg(fn, x, jnp.zeros(2, jnp.int32), y, 2.0, guided_channels=4)
  np.testing.assert_array_equal(default, legacy)               # 4-channel latents: bit-for-bit legacy
  assert not np.allclose(standard[..., 3], legacy[..., 3])


def test_guiding_velocity_equals_guiding_eps():
  """A v-model guided as v takes the same DDPM step as the eps-model whose outputs are its v's eps."""
  from dydit_jax.diffusion import create_diffusion
  v_chain = create_diffusion("50", learn_sigma=False, prediction="v")
  eps_chain = create_diffusion("50", learn_sigma=False)
  k = jax.random.split(jax.random.PRNGKey(3), 3)
  x = jax.random.normal(k[0], (2, 4, 4, 1))
  v_cond, v_null = (jax.random.normal(kk, x.shape) for kk in k[1:])
  t = jnp.asarray([40, 7])
  ab = jnp.asarray(v_chain.alphas_cumprod, jnp.float32)[t][:, None, None, None]
  to_eps = lambda v: jnp.sqrt(1 - ab) * x + jnp.sqrt(ab) * v       # eps of a v at this x_t
  scale = 4.0
  by_v = v_chain.p_mean_variance_from_output(v_null + scale * (v_cond - v_null), x, t)["mean"]
  by_eps = eps_chain.p_mean_variance_from_output(
      to_eps(v_null) + scale * (to_eps(v_cond) - to_eps(v_null)), x, t)["mean"]
  np.testing.assert_allclose(by_v, by_eps, rtol=1e-5, atol=1e-5)
  assert not np.allclose(by_v, v_chain.p_mean_variance_from_output(v_cond, x, t)["mean"], atol=1e-3)
