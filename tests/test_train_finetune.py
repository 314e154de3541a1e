"""Fine-tuning starts from a converted DiT: every DiT weight copied, routers at the official init."""
import numpy as np
import pytest
from flax import nnx

import train_tiny_config
from dydit_jax import checkpoints
from dydit_jax.models import DiT, dydit_init
from dydit_jax.train import loop, sharding, state as state_lib
from dydit_jax.train.config import build_model_config
from model_utils import randomize

pytestmark = pytest.mark.slow   # end to end: subprocesses / whole runs (`-m "not slow"` skips)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  config = train_tiny_config.get_config()
  dit_cfg = build_model_config(config.model).replace(dynamic=False)
  dit = randomize(DiT(dit_cfg, rngs=nnx.Rngs(7)), seed=3)   # heads out of magnitude order (see below)
  path = tmp_path_factory.mktemp("finetune") / "dit"
  checkpoints.save_model(dit, path)
  config.from_scratch, config.init_checkpoint = False, str(path)
  return config, dit


def _initial(config):
  cfg = build_model_config(config.model)
  tx = state_lib.make_optimizer(config.optimizer)
  mesh = sharding.make_mesh()
  shardings = sharding.tree_shardings(state_lib.abstract_state(cfg, tx), mesh, 2**20)
  return loop.initial_state(config, cfg, tx, shardings, mesh, 2**20)


def _flat(tree):
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(tree)}


def test_dit_weights_and_open_routers(setup):
  config, dit = setup
  state = _initial(config)
  params, dit_params = _flat(state.params), _flat(nnx.state(dit, nnx.Param))
  for k, v in dit_params.items():
    np.testing.assert_array_equal(params[k], v, err_msg=k)
  extra = sorted(set(params) - set(dit_params))
  assert extra and all(("_rate" in k or "token_selection" in k) for k in extra)
  np.testing.assert_array_equal(params["blocks/attn_rate/router/bias"], 15.0)
  np.testing.assert_array_equal(params["blocks/token_selection/mlp_head/layers/2/bias"], 35.0)
  assert int(state.step) == 0 and int(state.opt_state[0].count) == 0
  for k in params:
    np.testing.assert_array_equal(_flat(state.ema)[k], params[k])
  np.testing.assert_array_equal(_flat(state.buffers)["pos_embed"], np.asarray(dit.pos_embed[...]))


def test_reorder_units_permutes_heads(setup):
  config, dit = setup
  config = config.copy_and_resolve_references()
  config.reorder_units = True
  scores = np.asarray(dydit_init._head_scores(dit.config, dit.blocks))      # (layers, heads)
  assert np.any(np.diff(scores, axis=1) > 0), "the fixture's heads are already sorted: nothing to test"
  params, dit_params = _flat(_initial(config).params), _flat(nnx.state(dit, nnx.Param))
  qkv, ref = params["blocks/attn/qkv/kernel"], dit_params["blocks/attn/qkv/kernel"]
  assert not np.array_equal(qkv, ref)
  np.testing.assert_allclose(np.sort(qkv.ravel()), np.sort(ref.ravel()))   # same weights, new order
