"""Model directories and training workdirs through the one loader: round trips, load-time overrides."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from dydit_jax import checkpoints
from dydit_jax.models import DiT, ModelConfig
from dydit_jax.models.layers import FixedEmbedding, sincos_pos_embed_2d
from model_utils import tiny_config

CFG = tiny_config()


def _flat(model) -> dict:
  return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))}


def _random_dit(cfg: ModelConfig, seed: int = 0) -> DiT:
  """A DiT with every parameter random (adaLN-Zero and final layers included), built without running
  the JAX initializers (eager init compiles one program per parameter shape: seconds)."""
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape, np.float32)), params)
  rest["pos_embed"] = FixedEmbedding(jnp.asarray(sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size))[None])
  return nnx.merge(graphdef, params, rest)


def _inputs(cfg: ModelConfig, batch: int = 3):
  k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(k1, (batch, cfg.input_size, cfg.input_size, cfg.in_channels))
  return x, jax.random.randint(k2, (batch,), 0, 1000), jax.random.randint(k3, (batch,), 0, cfg.num_classes + 1)


def _assert_same(got, want):
  assert got.config == want.config
  got, want = _flat(got), _flat(want)
  assert got.keys() == want.keys()
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))


def test_save_load_round_trip(tmp_path):
  model = _random_dit(CFG.replace(dynamic=True, router_format="all"))
  checkpoints.save_model(model, tmp_path / "m")
  _assert_same(checkpoints.load_model(tmp_path / "m"), model)
  with pytest.raises(checkpoints.DestinationExistsError):
    checkpoints.save_model(model, tmp_path / "m")


def test_load_overrides_and_sharding_rule(tmp_path):
  checkpoints.save_model(_random_dit(CFG), tmp_path / "m")
  seen = []
  device = jax.devices()[-1]

  def rule(path, abstract):
    seen.append(path)
    return jax.sharding.SingleDeviceSharding(device)

  model = checkpoints.load_model(tmp_path / "m", dtype=jnp.bfloat16, attention_impl="xla", sharding=rule)
  assert model.config.dtype == "bfloat16" and model.config.attention_impl == "xla"
  state = nnx.to_flat_state(nnx.state(model))
  assert sorted(seen, key=str) == sorted((path for path, _ in state), key=str)
  assert all(v.get_value().dtype == jnp.float32 and v.get_value().devices() == {device} for _, v in state)
  x, t, y = _inputs(CFG)
  assert model(x, t, y).dtype == jnp.float32


def test_load_rejects_other_directories(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither a model directory"):
    checkpoints.load_model(tmp_path)


def test_load_model_reads_a_training_workdir(tmp_path):
  """The items a trainer checkpoint step holds (layout of dydit_jax.train.checkpointing)."""
  live, ema = _random_dit(CFG, seed=0), _random_dit(CFG, seed=1)
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    for step, average in ((5, live), (9, ema)):
      manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(nnx.state(live).to_pure_dict()),
          ema=ocp.args.StandardSave(nnx.state(average).to_pure_dict()),
          model_config=ocp.args.JsonSave(CFG.to_dict())))
  _assert_same(checkpoints.load_model(tmp_path), ema)                      # newest step, EMA weights
  _assert_same(checkpoints.load_model(tmp_path, step=5), live)
  _assert_same(checkpoints.load_model(tmp_path, use_ema=False), live)

