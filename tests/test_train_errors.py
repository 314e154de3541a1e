"""Bad input stops the trainer early with a message that names the fix, and never damages checkpoints."""
import pathlib

import numpy as np
import pytest
from flax import nnx

import train_helpers as th
import train_tiny_config
from dydit_jax import checkpoints
from dydit_jax.data import LatentShardWriter
from dydit_jax.models import DiT
from dydit_jax.train import checkpointing, loop
from dydit_jax.train.config import build_model_config, parse_arg, validate


def tiny(**changes):
  c = train_tiny_config.get_config("steps=2,every=2,complete=0")
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_config_typo_on_the_command_line(tmp_path):
  result = th.run_main(tmp_path / "wd", "", "--config.optimizer.lrr=1e-3", expect_ok=False)
  assert result.returncode != 0
  assert "lrr" in result.stderr
  assert not (tmp_path / "wd").exists()


def test_config_typos_in_code_and_arguments():
  c = train_tiny_config.get_config()
  c.lock()
  with pytest.raises(AttributeError, match="optimzer"):
    c.optimzer = 1
  with pytest.raises(ValueError, match="lamda"):
    parse_arg("lamda=0.5", lam=0.5)
  with pytest.raises(ValueError, match="exactly one"):
    validate(tiny(init_checkpoint="/somewhere"))
  with pytest.raises(ValueError, match="unknown model"):
    validate(tiny(**{"model.name": "DiT-M/2"}))


def test_missing_init_checkpoint(tmp_path):
  config = tiny(from_scratch=False, init_checkpoint=str(tmp_path / "no_such_model"))
  with pytest.raises(FileNotFoundError, match="init_checkpoint .* does not exist"):
    loop.train(config, str(tmp_path / "wd"))
  assert th.steps(tmp_path / "wd") == []


def test_incompatible_init_checkpoint(tmp_path):
  other = build_model_config(tiny(**{"model.hidden_size": 48, "model.dynamic": False}).model)
  checkpoints.save_model(DiT(other, rngs=nnx.Rngs(0)), tmp_path / "dit48")
  config = tiny(from_scratch=False, init_checkpoint=str(tmp_path / "dit48"))
  with pytest.raises(checkpointing.IncompatibleCheckpointError, match="hidden_size: checkpoint 48 vs config 32"):
    loop.train(config, str(tmp_path / "wd"))
  assert th.steps(tmp_path / "wd") == []


def test_empty_data_folder(tmp_path):
  (tmp_path / "latents").mkdir()
  config = tiny(**{"data.name": "latents", "data.path": str(tmp_path / "latents")})
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "latents")):
    loop.train(config, str(tmp_path / "wd"))


def test_wrong_data_shape(tmp_path):
  config = tiny(**{"data.shape": (16, 16, 1)})
  with pytest.raises(ValueError, match=r"examples of shape \(16, 16, 1\) but the model takes \(8, 8, 1\)"):
    loop.train(config, str(tmp_path / "wd"))


def test_nan_loss_stops_without_a_checkpoint(tmp_path):
  with LatentShardWriter(str(tmp_path / "nan"), 2, num_classes=10, image_size=64) as writer:
    x = np.random.default_rng(0).standard_normal((40, 8, 8, 1)).astype(np.float32)
    x[30] = np.nan                         # one bad example, not in the first batch: its batch -> NaN loss
    writer.write(x, np.arange(40) % 10)
  config = tiny(**{"data.name": "latents", "data.path": str(tmp_path / "nan"), "checkpoint.every": 1,
                   "total_steps": 6})
  with pytest.raises(FloatingPointError, match=r"NaN/inf at step \d"):
    loop.train(config, str(tmp_path / "wd"))
  # Steps before the bad batch were saved; none from or after it.
  rows = th.metric_rows(tmp_path / "wd")
  saved = th.steps(tmp_path / "wd")
  assert all(rows[s]["nonfinite"] == 0 for s in saved)
  assert len(saved) < 6
  # Every step before the bad batch was saved (checkpoint.every=1), so "none after it" is not vacuous.
  bad = min([s for s, r in rows.items() if r.get("nonfinite")] + [len(saved) + 1])
  assert saved == list(range(1, bad)) and bad >= 2, (saved, bad)


def test_resume_with_another_model_is_refused(tmp_path):
  loop.train(tiny(), str(tmp_path / "wd"))
  assert th.steps(tmp_path / "wd") == [2]
  with pytest.raises(checkpointing.IncompatibleCheckpointError, match="hidden_size: checkpoint 32 vs config 48"):
    loop.train(tiny(**{"model.hidden_size": 48, "total_steps": 4}), str(tmp_path / "wd"))
  assert th.steps(tmp_path / "wd") == [2]            # untouched, not set aside
  assert not (pathlib.Path(tmp_path) / "wd" / "checkpoints_unreadable").exists()
