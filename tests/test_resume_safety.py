"""Resuming a workdir with another config (dydit_jax/train/resume.py).

A change that alters what the saved state means (model, data, batch size, Adam decays, lambda, seed)
stops the run before anything is written: one error line naming the field and the override, the
workdir byte-identical. Schedule-like changes (total_steps, lr, ...) are logged as `field: old -> new`
and the run continues. --config.allow_config_change=True lets a refused change through with a
warning, once: the next checkpoint records the new config.
"""
import json
import re
import shutil

import pytest

import train_helpers as th
from dydit_jax import checkpoints
from dydit_jax.train import loop, resume
from dydit_jax.train.config import base_config
from test_train_errors import tiny

pytestmark = pytest.mark.slow   # end to end: subprocesses / whole runs (`-m "not slow"` skips)

TINY_ARG, run_fails, tree_hash = th.TINY_ARG, th.run_fails, th.tree_hash


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """The session's persistent compilation cache: the resumed runs reuse the base run's programs."""
  return tmp_path_factory.getbasetemp() / "jax_cache"


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache):
  """A finished 2-step run (checkpoint at step 2), made by the real entry point."""
  wd = tmp_path_factory.mktemp("resume_safety") / "base"
  th.run_main(wd, TINY_ARG, cache_dir=cache)
  assert th.steps(wd) == [2]
  return wd


@pytest.fixture
def workdir(base, tmp_path):
  """A private copy of the base run, with a config.json a rewrite would show."""
  wd = tmp_path / "wd"
  shutil.copytree(base, wd)
  (wd / "config.json").write_text("the previous run's copy")
  return wd


def test_refused_change_is_one_error_line_and_touches_nothing(workdir):
  line = run_fails(workdir, "--config.batch_size=8", "--config.optimizer.lr=1e-3", "--config.data.seed=3")
  assert re.fullmatch(r"error: checkpoint \S+/checkpoints/2 was trained with another configuration: "
                      r"batch_size: 16 -> 8; data\.seed: 0 -> 3\. .*--config\.allow_config_change=True.*", line), line
  assert "optimizer.lr" not in line       # an allowed change is logged, not listed as refused


def test_bad_command_leaves_an_existing_workdir_byte_identical(workdir):
  assert "config has no field optimizer.lrr" in run_fails(workdir, "--config.optimizer.lrr=1e-3")
  assert "config.batch_size must be positive" in run_fails(workdir, "--config.batch_size=0")


@pytest.mark.parametrize("field,value,shown", [
    ("model.hidden_size", 48, "model.hidden_size: 32 -> 48"),
    ("model.router_format", "all", "model.router_format: 'forced_first' -> 'all'"),
    ("data.seed", 3, "data.seed: 0 -> 3"),
    ("data.name", "mnist", "data.name: 'synthetic' -> 'mnist'"),
    ("optimizer.b1", 0.5, "optimizer.b1: 0.9 -> 0.5"),
    ("dydit.lam", 0.3, "dydit.lam: 0.5 -> 0.3"),
    ("seed", 1, "seed: 0 -> 1"),
])
def test_state_changing_fields_are_refused(workdir, field, value, shown):
  before = tree_hash(workdir)
  with pytest.raises(checkpoints.IncompatibleCheckpointError, match=re.escape(shown) + r"\. These change"):
    loop.train(tiny(**{field: value, "total_steps": 4}), str(workdir))
  assert tree_hash(workdir) == before


def test_allowed_changes_are_logged_and_the_run_continues(workdir, cache):
  # (Changes that leave the compiled step as it is, so the base run's programs are reused.)
  log = th.run_main(workdir, TINY_ARG, "--config.total_steps=4", "--config.checkpoint.every=4",
                    "--config.log_every=2", cache_dir=cache).stderr
  changed = [line.split("] ", 1)[1] for line in log.splitlines() if "resuming with a changed config" in line]
  assert changed == [
      "resuming with a changed config: checkpoint.every: 2 -> 4 (allowed: how the run computes or reports, "
      "not what the saved state is)",
      "resuming with a changed config: log_every: 1 -> 2 (allowed: how the run computes or reports, not "
      "what the saved state is)",
      "resuming with a changed config: total_steps: 2 -> 4 (allowed: a longer or shorter run of the same "
      "training)"], log[-3000:]
  assert "resuming at step 2" in log
  assert th.steps(workdir) == [2, 4]
  assert json.loads((workdir / "config.json").read_text())["total_steps"] == 4
  assert 4 in th.metric_rows(workdir)


def test_update_and_runtime_changes_are_allowed(workdir, caplog):
  caplog.set_level("INFO")
  summary = loop.train(tiny(**{"optimizer.lr": 1e-3, "ema_decay": 0.5, "dydit.complete_steps": 10,
                               "model.dtype": "bfloat16", "mesh.data": 1, "sample.every": 2}), str(workdir))
  assert summary["step"] == 2                          # nothing left to train: the checks and the restore
  logged = caplog.text
  for change in ("optimizer.lr: 0.01 -> 0.001 (allowed", "ema_decay: 0.9 -> 0.5 (allowed",
                 "dydit.complete_steps: 0 -> 10 (allowed", "model.dtype: 'float32' -> 'bfloat16' (allowed",
                 "mesh.data: -1 -> 1 (allowed", "sample.every: 0 -> 2 (allowed"):
    assert change in logged, change


def test_override_lets_a_refused_change_through_with_a_warning(workdir, cache):
  log = th.run_main(workdir, TINY_ARG, "--config.total_steps=3", "--config.data.seed=3",
                    "--config.allow_config_change=True", cache_dir=cache).stderr
  warnings = [line for line in log.splitlines() if line.startswith("W") and "changed config" in line]
  assert len(warnings) == 1 and "data.seed: 0 -> 3 (allowed by allow_config_change; normally refused" in warnings[0]
  assert "does not apply to the changed data config" in log      # the example stream restarts
  assert th.steps(workdir) == [2, 3]
  # The step-3 checkpoint recorded the new config: the same command without the override resumes.
  summary = loop.train(tiny(**{"total_steps": 3, "data.seed": 3}), str(workdir))
  assert (summary["start_step"], summary["step"]) == (3, 3)


def test_resume_needs_no_init_checkpoint(workdir):
  """A checkpoint wins over the init fields, so a resumed run needs neither of them."""
  summary = loop.train(tiny(from_scratch=False, init_checkpoint=""), str(workdir))
  assert (summary["start_step"], summary["step"]) == (2, 2)


def test_every_config_field_has_a_rule():
  fields = resume.changes({}, base_config())          # every field, each "absent" in the saved config
  uncovered = [c.field for c in fields if not any(c.field == p or c.field.startswith(p + ".")
                                                  for p, _, _ in resume.RULES)]
  assert fields and not uncovered, uncovered
  verdicts = {f: resume.rule(f)[0] for f in ("model.hidden_size", "model.dtype", "model.remat", "data.path",
                                             "data.num_threads", "optimizer.lr", "optimizer.b2", "dydit.lam",
                                             "dydit.complete_steps", "mesh.fsdp", "batch_size", "sample.every",
                                             "no_such.field")}
  assert verdicts == {"model.hidden_size": "refuse", "model.dtype": "allow", "model.remat": "allow",
                      "data.path": "refuse", "data.num_threads": "allow", "optimizer.lr": "allow",
                      "optimizer.b2": "refuse", "dydit.lam": "refuse", "dydit.complete_steps": "allow",
                      "mesh.fsdp": "allow", "batch_size": "refuse", "sample.every": "allow",
                      "no_such.field": "refuse"}
