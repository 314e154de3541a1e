"""Every router parameter learns: gradients from the diffusion loss and from the FLOPs loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dydit_jax.diffusion import create_diffusion
from dydit_jax.models import DiT
from dydit_jax.train.dydit_objectives import flops_loss
from model_utils import randomize, randomize_routers, sample_inputs, tiny_config


def _router_grads(loss_of_model):
  cfg = tiny_config(dynamic=True)
  model = randomize_routers(randomize(DiT(cfg, rngs=nnx.Rngs(0))), bias=0.5)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p):
    return loss_of_model(nnx.merge(graphdef, p, rest), cfg)

  grads = jax.jit(jax.grad(loss_fn))(params)   # one compile instead of one per eager op
  routers = [(path, g) for path, g in nnx.to_flat_state(grads)
             if any(s in map(str, path) for s in ("router", "mlp_head"))]
  assert len(routers) == 8  # attn_rate, mlp_rate: kernel+bias; token mlp_head: 2 x (kernel+bias)
  return routers


def _diffusion_loss(model, cfg):
  diffusion = create_diffusion("")
  x, _, y = sample_inputs(cfg, batch=8)
  t = jnp.arange(8) * 120
  noise = jax.random.normal(jax.random.key(7), x.shape)
  fn = lambda xt, tt: model(xt, tt, y, train=True, key=jax.random.key(3))
  return diffusion.training_losses(fn, x, t, noise)["loss"].mean()


def _flops_loss(model, cfg):
  x, t, y = sample_inputs(cfg, batch=8)
  _, masks = model(x, t, y, train=True, key=jax.random.key(3), return_masks=True)
  return flops_loss(cfg, masks, lam=0.3)


@pytest.mark.parametrize("loss", [_diffusion_loss, _flops_loss], ids=["diffusion", "flops"])
def test_gradients_reach_every_router_parameter(loss):
  for path, g in _router_grads(loss):
    g = np.asarray(g[...])
    name = ".".join(map(str, path))
    assert np.isfinite(g).all(), name
    assert np.abs(g).max() > 0, f"no gradient reaches {name}"
