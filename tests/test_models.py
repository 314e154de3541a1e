"""DiT / DyDiT model semantics that need no PyTorch: sizes, modes, gates, DiT<->DyDiT moves."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dydit_jax.models import MODEL_NAMES, DiT, model_config
from dydit_jax.models import layers
from dydit_jax.models.dydit_init import dit_from_dydit, dydit_from_dit, reorder_by_magnitude
from dydit_jax.models.routers import gate
from model_utils import rel_l2, randomize, randomize_routers, sample_inputs, tiny_config

# Published totals (DiT paper Table 4 and the released checkpoints): trainable, and with the stored pos_embed.
PUBLISHED = {
    ("DiT-S/2", 256): (32_865_056, 32_963_360),
    ("DiT-B/2", 256): (130_315_808, 130_512_416),
    ("DiT-L/2", 256): (457_840_672, 458_102_816),
    ("DiT-XL/2", 256): (674_834_720, 675_129_632),
    ("DiT-XL/4", 256): (675_000_704, 675_074_432),
    ("DiT-XL/8", 256): (675_664_640, 675_683_072),
    ("DiT-XL/2", 512): (674_834_720, 676_014_368),
}


def _torch_shape_count(name: str, image_size: int) -> tuple[int, int]:
  """Independent count from the PyTorch shape rules (dit.md §3), not from our modules."""
  cfg = model_config(name, image_size)
  d, p, c, h = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.mlp_hidden
  per_block = (3 * d * d + 3 * d) + (d * d + d) + (h * d + h) + (d * h + d) + (6 * d * d + 6 * d)
  trainable = (d * c * p * p + d) + (d * 256 + d) + (d * d + d) + (cfg.num_classes + 1) * d
  trainable += cfg.depth * per_block + (2 * d * d + 2 * d) + (p * p * 2 * c * d + p * p * 2 * c)
  return trainable, trainable + cfg.num_tokens * d


def _abstract_counts(name: str, image_size: int) -> tuple[int, int]:
  model = nnx.eval_shape(lambda: DiT(model_config(name, image_size), rngs=nnx.Rngs(0)))
  count = lambda state: sum(math.prod(v.shape) for v in jax.tree.leaves(state))
  return count(nnx.state(model, nnx.Param)), count(nnx.state(model))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_counts_all_sizes(name):
  for image_size in (256, 512):
    got = _abstract_counts(name, image_size)
    assert got == _torch_shape_count(name, image_size)
    if (name, image_size) in PUBLISHED:
      assert got == PUBLISHED[(name, image_size)]


def test_pos_embed_layout():
  table = layers.sincos_pos_embed_2d(1152, 16)
  quarter = 1152 // 4
  # token 1 = (row 0, col 1): the column half moves, the row half does not.
  np.testing.assert_allclose(table[1, 0], math.sin(1.0), rtol=1e-6)
  assert table[1, 2 * quarter] == 0.0
  # token 16 = (row 1, col 0).
  assert table[16, 0] == 0.0
  np.testing.assert_allclose(table[16, 2 * quarter], math.sin(1.0), rtol=1e-6)
  np.testing.assert_allclose(table[16, 3 * quarter], math.cos(1.0), rtol=1e-6)


def test_timestep_frequencies_cos_first():
  emb = layers.timestep_frequencies(jnp.array([0, 7]))
  np.testing.assert_allclose(emb[0, :128], 1.0)
  np.testing.assert_allclose(emb[0, 128:], 0.0)
  np.testing.assert_allclose(emb[1, 0], math.cos(7.0), rtol=1e-6)
  np.testing.assert_allclose(emb[1, 128], math.sin(7.0), rtol=1e-6)


def test_fresh_dit_outputs_zero_and_shapes():
  cfg = tiny_config(learn_sigma=True)
  model = DiT(cfg, rngs=nnx.Rngs(0))
  x, t, y = sample_inputs(cfg)
  out = model(x, t, y)
  assert out.shape == (3, 8, 8, 8)
  assert float(jnp.abs(out).max()) == 0.0  # adaLN-Zero: why parity tests must randomize first
  out = randomize(model)(x, t, y)
  assert float(jnp.abs(out).max()) > 1e-3


def test_label_dropout_and_forced_null():
  cfg = tiny_config()
  model = randomize(DiT(cfg, rngs=nnx.Rngs(0)))
  x, t, y = sample_inputs(cfg)
  null = jnp.full_like(y, cfg.num_classes)
  forced = model(x, t, y, force_drop_ids=jnp.ones_like(y))
  np.testing.assert_allclose(forced, model(x, t, null), rtol=1e-6, atol=1e-7)
  assert rel_l2(model(x, t, y), forced) > 1e-3
  # Training-time dropout rate ~ class_dropout_prob.
  ys = jnp.zeros((20000,), jnp.int32)
  dropped = model.y_embedder(ys, train=True, key=jax.random.key(3))
  rate = float((jnp.abs(dropped - model.y_embedder(ys, train=False, key=None)).sum(-1) > 0).mean())
  assert abs(rate - 0.1) < 0.01  # 5 sigma for n=20000


def test_label_without_a_row_is_loud():
  cfg = tiny_config(class_dropout_prob=0.0)  # no null row: CFG's null label does not exist
  model = randomize(DiT(cfg, rngs=nnx.Rngs(0)))
  x, t, y = sample_inputs(cfg)
  assert bool(jnp.isfinite(model(x, t, y)).all())
  assert bool(jnp.isnan(model(x, t, jnp.full_like(y, cfg.num_classes))).all())


def test_train_mode_needs_key():
  cfg = tiny_config()
  model = DiT(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="key"):
    model(*sample_inputs(cfg), train=True)


@pytest.mark.parametrize("router_format", ["forced_first", "all"])
def test_fresh_dydit_equals_dit_in_eval(router_format):
  cfg = tiny_config()
  dit = randomize(DiT(cfg, rngs=nnx.Rngs(0)))
  dydit = dydit_from_dit(dit, router_format=router_format)
  x, t, y = sample_inputs(cfg)
  out, masks = dydit(x, t, y, return_masks=True)
  for m in masks.values():
    assert float(m.min()) == 1.0
  # Multiplying by all-one masks changes XLA's fusion, not the math: float32 rounding only.
  assert rel_l2(out, dit(x, t, y)) < 1e-6


def test_complete_mode_equals_dit_for_any_routers():
  cfg = tiny_config()
  dit = randomize(DiT(cfg, rngs=nnx.Rngs(0)))
  dydit = randomize_routers(dydit_from_dit(dit), bias=0.0)
  x, t, y = sample_inputs(cfg)
  _, masks = dydit(x, t, y, return_masks=True)
  assert 0.2 < float(masks["head"].mean()) < 0.9  # the routers really do cut
  assert rel_l2(dydit(x, t, y), dit(x, t, y)) > 1e-3
  assert rel_l2(dydit(x, t, y, complete=True), dit(x, t, y)) < 1e-6
  # Export drops the routers and keeps the complete model.
  exported = dit_from_dydit(dydit)
  assert not exported.config.dynamic
  assert rel_l2(exported(x, t, y), dit(x, t, y)) < 1e-6


def test_masks_follow_router_format():
  cfg = tiny_config(dynamic=True)
  x, t, y = sample_inputs(cfg, batch=4)
  forced = randomize_routers(randomize(DiT(cfg, rngs=nnx.Rngs(0))), bias=-50.0)
  _, m = forced(x, t, y, return_masks=True)
  np.testing.assert_array_equal(m["head"][..., 0], 1.0)  # unit 0 forced on
  assert float(m["head"][..., 1:].max()) == 0.0 and float(m["token"].max()) == 0.0
  assert m["head"].shape == (4, cfg.depth, cfg.num_heads) and m["token"].shape == (4, cfg.depth, cfg.num_tokens)
  open_all = randomize_routers(randomize(DiT(cfg.replace(router_format="all"), rngs=nnx.Rngs(0))), bias=-50.0)
  out, m = open_all(x, t, y, return_masks=True)
  assert float(m["head"].max()) == 0.0 and bool(jnp.isfinite(out).all())  # zero heads is legal


def test_width_masks_depend_only_on_t():
  cfg = tiny_config(dynamic=True)
  model = randomize_routers(randomize(DiT(cfg, rngs=nnx.Rngs(0))))
  x, _, y = sample_inputs(cfg, batch=4)
  t = jnp.full((4,), 500)
  _, m = model(x, t, y, return_masks=True)
  np.testing.assert_array_equal(m["head"], jnp.broadcast_to(m["head"][:1], m["head"].shape))
  np.testing.assert_array_equal(m["group"], jnp.broadcast_to(m["group"][:1], m["group"].shape))


def test_training_gate_rate_matches_sigmoid():
  logits = jnp.array([-2.0, -0.5, 0.0, 0.7, 3.0])
  n = 40000
  draws = gate(jnp.broadcast_to(logits, (n, 5)), train=True, key=jax.random.key(0), tau=5.0)
  assert set(np.unique(np.asarray(draws)).round(5)) <= {0.0, 1.0}
  rate = np.asarray(draws.mean(0))
  expected = np.asarray(jax.nn.sigmoid(logits))
  sigma = np.sqrt(expected * (1 - expected) / n)
  assert np.all(np.abs(rate - expected) < 5 * sigma + 1e-4), (rate, expected)
  # Straight-through gradient: d gate / d logit = soft (1 - soft) / tau > 0.
  grad = jax.grad(lambda l: gate(l, train=True, key=jax.random.key(1), tau=5.0).sum())(logits)
  assert bool((grad > 0).all()) and float(grad.max()) <= 0.25 / 5.0 + 1e-6


def test_training_gates_are_stochastic_per_sample():
  cfg = tiny_config(dynamic=True)
  model = randomize_routers(randomize(DiT(cfg, rngs=nnx.Rngs(0))))
  x, _, y = sample_inputs(cfg, batch=8)
  t = jnp.full((8,), 300)
  _, m = model(x, t, y, train=True, key=jax.random.key(5), return_masks=True)
  assert float(jnp.abs(m["head"] - m["head"][:1]).max()) == 1.0  # same t, different draws


def test_reorder_by_magnitude_preserves_dense_output():
  cfg = tiny_config()
  model = randomize(DiT(cfg, rngs=nnx.Rngs(0)))
  x, t, y = sample_inputs(cfg)
  before = model(x, t, y)
  kernel_before = np.asarray(model.blocks.mlp.fc1.kernel[...])
  reorder_by_magnitude(model)
  assert not np.array_equal(kernel_before, np.asarray(model.blocks.mlp.fc1.kernel[...]))
  assert rel_l2(model(x, t, y), before) < 1e-5
  fc1 = jnp.abs(model.blocks.mlp.fc1.kernel[...]).sum(1) + jnp.abs(model.blocks.mlp.fc1.bias[...])
  scores = fc1 + jnp.abs(model.blocks.mlp.fc2.kernel[...]).sum(2)
  assert bool((jnp.diff(scores, axis=1) <= 1e-6).all())  # decreasing importance


def test_bf16_compute_close_to_fp32():
  cfg = tiny_config()
  model = randomize(DiT(cfg, rngs=nnx.Rngs(0)))
  bf16 = DiT(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
  nnx.update(bf16, nnx.state(model))
  x, t, y = sample_inputs(cfg)
  assert rel_l2(bf16(x, t, y), model(x, t, y)) < 3e-2


def test_residual_dtype_is_a_runtime_choice():
  cfg = tiny_config()
  with pytest.raises(ValueError, match="residual_dtype"):
    cfg.replace(residual_dtype="float16")
  fast = cfg.replace(dtype="bfloat16", residual_dtype="bfloat16", attention_impl="cudnn")
  assert fast.geometry() == cfg and fast != cfg   # checkpoints and width plans ignore it
  model = randomize(DiT(cfg, rngs=nnx.Rngs(0)))
  bf16_stream = DiT(cfg.replace(residual_dtype="bfloat16"), rngs=nnx.Rngs(0))
  nnx.update(bf16_stream, nnx.state(model))
  x, t, y = sample_inputs(cfg)
  assert bf16_stream.embed(x, t, y)[0].dtype == jnp.bfloat16
  assert 1e-6 < rel_l2(bf16_stream(x, t, y), model(x, t, y)) < 3e-2
