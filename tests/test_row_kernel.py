"""The Pallas row kernel (interpret mode on the CPU) computes what the composed XLA formulas compute.

`norm_modulate` at a sub-block boundary: gated residual add rounded to the stream's dtype, LayerNorm,
adaLN modulation, cast to the compute dtype. Tolerances: float32 outputs to float32 rounding (relative
L2 <= 1e-6: the row sums run in another order); bfloat16 outputs within one bf16 ulp of the XLA
path's; whole models and the engine with the kernel on equal the XLA models (relative L2 <= 1e-5, fp32).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_utils import rel_l2

from dydit_jax.engine.engine import DynamicEngine, EngineOptions
from dydit_jax.engine.plan import WidthPlan
from dydit_jax.errors import UserError
from dydit_jax.models import ModelConfig
from dydit_jax.models.compute import compute_model
from dydit_jax.models.row_kernel import norm_modulate

B, N, D = 2, 8, 72      # D not a power of two: the kernel's masked lanes are exercised


def _inputs(stream: str, seed: int = 0):
  k = jax.random.split(jax.random.key(seed), 5)
  x = (3.0 * jax.random.normal(k[0], (B, N, D)) + 1.0).astype(stream)   # mean far from 0
  update = jax.random.normal(k[1], (B, N, D)).astype(jnp.bfloat16)
  gate, shift, scale = (jax.random.normal(k[i], (B, D)) for i in (2, 3, 4))
  return x, update, gate, shift, scale


def _within_one_ulp(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  ulp = np.abs(np.asarray(jnp.asarray(want, jnp.bfloat16), np.float32)) * 2.0 ** -7 + 1e-30
  assert np.all(np.abs(got - want) <= ulp), np.max(np.abs(got - want) / ulp)


@pytest.mark.parametrize("stream", ["float32", "bfloat16"])
@pytest.mark.parametrize("out", ["float32", "bfloat16"])
def test_kernel_equals_xla(stream, out):
  x, update, gate, shift, scale = _inputs(stream)
  x_xla, h_xla = norm_modulate(x, shift, scale, out, update=update, gate=gate, impl="xla")
  x_pl, h_pl = norm_modulate(x, shift, scale, out, update=update, gate=gate, impl="pallas")
  h_only = norm_modulate(x, shift, scale, out, impl="pallas")
  assert x_pl.dtype == jnp.dtype(stream) and h_pl.dtype == h_only.dtype == jnp.dtype(out)
  for got, want in ((x_pl, x_xla), (h_pl, h_xla), (h_only, norm_modulate(x, shift, scale, out))):
    if got.dtype == jnp.bfloat16:
      _within_one_ulp(got, want)
    else:
      assert rel_l2(got, want) <= 1e-6
  # A wrong gate (the kernel's only per-sample input besides the modulation) is caught.
  assert rel_l2(norm_modulate(x, shift, scale, "float32", update=update, gate=-gate, impl="pallas")[1],
                norm_modulate(x, shift, scale, "float32", update=update, gate=gate)[1]) > 1e-2


def test_unknown_row_kernel_is_refused():
  with pytest.raises(UserError, match="row_kernel"):
    ModelConfig(row_kernel="triton")


def test_models_and_engine_with_the_kernel_equal_xla(tiny_dit, tiny_dydit):
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  t, y = jnp.array([10, 900]), jnp.array([1, 3])
  forward = nnx.jit(lambda model, x, t, y: model(x, t, y))
  for model in (tiny_dit, tiny_dydit):
    ref = compute_model(model, "float32")
    fast = compute_model(model, "float32", row_kernel="pallas")
    assert fast.config.row_kernel == "pallas"
    assert rel_l2(forward(fast, x, t, y), forward(ref, x, t, y)) <= 1e-5
  # Engine (its LayerNorms through the kernel) against the masked model on the XLA path.
  plan = WidthPlan.from_model(tiny_dydit, np.array([10, 900]))
  engine = DynamicEngine(compute_model(tiny_dydit, "float32", row_kernel="pallas"), plan,
                         EngineOptions(dtype="float32", head_buckets=2, group_buckets=2, token_buckets=2))
  reference = compute_model(tiny_dydit, "float32")
  for row in (0, 1):
    tt = jnp.full((2,), plan.timesteps[row], jnp.int32)
    want = forward(reference, x, tt, y)
    got, _ = jax.jit(engine.apply)(engine.arrays, x, tt, y, row)
    assert rel_l2(got, want) <= 1e-5
