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
