"""Bad input stops the trainer early with a message that names the fix, and never damages checkpoints.

The command-line cases run the real entry point (`python -m dydit_jax.main`) and hold it to the
convention of dydit_jax.cli: exit status 1, exactly one `error: ...` line on stderr besides absl's log
lines, no traceback, and nothing written: a fresh workdir is not created, an existing one stays
byte-identical.
"""
import pathlib
import subprocess

import numpy as np
import pytest
from flax import nnx

import train_helpers as th
import train_tiny_config
from dydit_jax import checkpoints
from dydit_jax.data import LatentShardWriter
from dydit_jax.models import DiT
from dydit_jax.train import loop
from dydit_jax.train.config import build_model_config, parse_arg, validate

TINY_ARG = th.TINY_ARG


def tiny(**changes):
  c = train_tiny_config.get_config(TINY_ARG)
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


error_line, run_fails, tree_hash = th.error_line, th.run_fails, th.tree_hash


# Every way a new user can get the command wrong: (flags, config file, config argument, words the
# one error line must contain).
CLI_CASES = {
    "field typo": (["--config.optimizer.lrr=1e-3"], th.TINY, TINY_ARG,
                   ["config has no field optimizer.lrr", "did you mean optimizer.lr?"]),
    "top-level typo": (["--config.total_stepz=5"], th.TINY, TINY_ARG,
                       ["config has no field total_stepz", "did you mean total_steps?"]),
    "section typo": (["--config.optimzer.lr=5"], th.TINY, TINY_ARG,
                     ["config has no field optimzer ", "did you mean optimizer?"]),
    "demo config typo": (["--config.optimizer.lrr=1e-3"], "configs/demo.py", "",
                         ["config has no field optimizer.lrr"]),
    "no config file": ([], "configs/nope.py", "", ["config file configs/nope.py does not exist"]),
    "no config file, overrides": (["--config.batch_size=3"], "configs/nope.py", "",
                                  ["config file configs/nope.py does not exist"]),
    "bad config argument": ([], "configs/xl.py", "lamda=0.5",
                            ["--config=configs/xl.py:lamda=0.5", "bad config argument 'lamda=0.5'",
                             "'lam'"]),
    "unknown model": (["--config.model.name=DiT-M/2"], th.TINY, TINY_ARG,
                      ["config.model.name: unknown model 'DiT-M/2'; choose one of DiT-S/2,", "DiT-XL/2"]),
    "bad geometry": (["--config.model.hidden_size=33"], th.TINY, TINY_ARG,
                     ["config.model: hidden_size 33 is not divisible by num_heads 2"]),
    "unparsable value": (["--config.batch_size=abc"], th.TINY, TINY_ARG,
                         ["--config.batch_size=abc", "invalid literal"]),
    "batch size": (["--config.batch_size=0"], th.TINY, TINY_ARG, ["config.batch_size must be positive, got 0"]),
    "lam range": (["--config.dydit.lam=1.5"], th.TINY, TINY_ARG, ["config.dydit.lam must lie in (0, 1], got 1.5"]),
    "unknown dataset": (["--config.data.name=imagenet"], th.TINY, TINY_ARG,
                        ["config.data.name must be one of latents, mnist, synthetic", "'imagenet'"]),
    "mesh": (["--config.mesh.fsdp=3"], th.TINY, TINY_ARG, ["config.mesh: mesh.fsdp=3", "1 devices"]),
    "positional arguments": (["extra", "args"], th.TINY, TINY_ARG, ["unexpected arguments 'extra args'"]),
    "unknown flag": (["--bogus=1"], th.TINY, TINY_ARG, ["Unknown command line flag 'bogus'"]),
    "mission command without files": ([], "configs/xl.py", "", [
        "config.init_checkpoint is not set",
        "python -m dydit_jax.convert --src DiT-XL-2-256x256.pt --dst DIR --model DiT-XL/2, then "
        "--config.init_checkpoint=DIR",
        "config.data.path is not set",
        "python -m dydit_jax.prepare --vae VAE_DIR --manual_dir IMAGENET_TARS_DIR --out_dir DIR "
        "--image_size 256, then --config.data.path=DIR"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_bad_command_is_one_error_line(tmp_path, case):
  flags, config, arg, words = CLI_CASES[case]
  line = run_fails(tmp_path / "wd", *flags, config=config, arg=arg)
  for word in words:
    assert word in line, line


def test_missing_files_are_named_with_their_commands(tmp_path):
  """Paths that do not exist (not just unset fields) and a latent folder without shards."""
  line = run_fails(tmp_path / "wd", f"--config.init_checkpoint={tmp_path}/dit_xl2",
                   f"--config.data.path={tmp_path}/latents", config="configs/xl.py", arg="res=512")
  assert f"config.init_checkpoint {tmp_path}/dit_xl2 does not exist" in line
  assert "--src DiT-XL-2-512x512.pt --dst DIR --model DiT-XL/2" in line
  assert f"config.data.path {tmp_path}/latents does not exist" in line and "--image_size 512" in line
  (tmp_path / "latents").mkdir()
  line = run_fails(tmp_path / "wd", "--config.data.name=latents", f"--config.data.path={tmp_path}/latents")
  assert f"Latent folder '{tmp_path}/latents' is empty" in line and "python -m dydit_jax.prepare" in line


def test_debug_shows_the_traceback(tmp_path):
  result = subprocess.run(th.main_cmd(tmp_path / "wd", TINY_ARG, "--config.total_stepz=5"), cwd=th.REPO,
                          env={**th.env(), "DYDIT_DEBUG": "1"}, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert "Traceback" in result.stderr and "KeyError" in result.stderr
  assert result.stderr.strip().splitlines()[-1] == "error: config has no field total_stepz (did you mean total_steps?)"
  assert not (tmp_path / "wd").exists()


def test_config_typos_in_code_and_arguments():
  c = train_tiny_config.get_config()           # base_config() comes locked: config files cannot add fields
  with pytest.raises(AttributeError, match="optimzer"):
    c.optimzer = 1
  with pytest.raises(ValueError, match="lamda"):
    parse_arg("lamda=0.5", lam=0.5)
  with pytest.raises(ValueError, match="exactly one"):
    validate(tiny(init_checkpoint="/somewhere"))
  with pytest.raises(ValueError, match="unknown model"):
    validate(tiny(**{"model.name": "DiT-M/2"}))


def test_typo_inside_a_config_file(tmp_path):
  bad = tmp_path / "bad_config.py"
  bad.write_text("from dydit_jax.train.config import base_config\n\n\ndef get_config(arg=None):\n"
                 "  c = base_config()\n  c.optimizer.lrr = 1e-3\n  return c\n")
  line = th.run_fails(tmp_path / "wd", config=str(bad), arg="")
  assert line == f"error: config file {bad} sets field 'lrr', which the config does not have (did you mean 'lr'?)"


def test_missing_init_checkpoint(tmp_path):
  config = tiny(from_scratch=False, init_checkpoint=str(tmp_path / "no_such_model"))
  with pytest.raises(FileNotFoundError, match="init_checkpoint .* does not exist"):
    loop.train(config, str(tmp_path / "wd"))
  assert th.steps(tmp_path / "wd") == []


def test_incompatible_init_checkpoint(tmp_path):
  other = build_model_config(tiny(**{"model.hidden_size": 48, "model.dynamic": False}).model)
  checkpoints.save_model(DiT(other, rngs=nnx.Rngs(0)), tmp_path / "dit48")
  config = tiny(from_scratch=False, init_checkpoint=str(tmp_path / "dit48"))
  with pytest.raises(checkpoints.IncompatibleCheckpointError, match="hidden_size: checkpoint 48 vs config 32"):
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
  before = tree_hash(tmp_path / "wd")
  with pytest.raises(checkpoints.IncompatibleCheckpointError, match=r"model.hidden_size: 32 -> 48\b"):
    loop.train(tiny(**{"model.hidden_size": 48, "total_steps": 4}), str(tmp_path / "wd"))
  # The override lets config changes through, never another model into a checkpoint.
  with pytest.raises(checkpoints.IncompatibleCheckpointError, match="hidden_size: checkpoint 32 vs config 48"):
    loop.train(tiny(**{"model.hidden_size": 48, "total_steps": 4, "allow_config_change": True}),
               str(tmp_path / "wd"))
  assert tree_hash(tmp_path / "wd") == before        # untouched, not set aside
  assert not (pathlib.Path(tmp_path) / "wd" / "checkpoints_unreadable").exists()
