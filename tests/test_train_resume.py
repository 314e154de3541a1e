"""Interrupted training continues exactly: kill -9, SIGTERM, an unreadable newest checkpoint.

One straight run of N=100 steps is compared with one run that is killed (SIGKILL) right after its
step-50 checkpoint, resumed and stopped by SIGTERM (which must save a checkpoint and exit with 0),
then resumed again after its newest checkpoint was damaged (which must fall back to step 50 and say
so). The interrupted run must end with the same params, EMA and data position as the straight run,
and its per-step losses after step 50 (same data order, same RNG draws) must match too. Same device,
same programs: agreement is exact up to 1e-6. The complete-model loss is on for the first 2 steps.
"""
import json
import pathlib
import signal

import numpy as np
import pytest

import train_helpers as th

pytestmark = pytest.mark.slow   # end to end: subprocesses / whole runs (`-m "not slow"` skips)

N = 100
ARG = f"steps={N},every=50"
SYNC_SAVES = "--config.checkpoint.use_async=False"  # the step-50 directory appears exactly at step 50


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("resume")
  cache = tmp_path_factory.getbasetemp() / "jax_cache"
  straight, broken = root / "straight", root / "broken"
  th.run_main(straight, ARG, cache_dir=cache)

  # 1. kill -9 right after the step-50 checkpoint exists.
  proc = th.start(th.main_cmd(broken, ARG, SYNC_SAVES), cache_dir=cache)
  th.wait_for(lambda: 50 in th.steps(broken), proc=proc)
  proc.send_signal(signal.SIGKILL)
  th.finish(proc)
  killed = {"rc": proc.returncode, "steps": th.steps(broken)}

  # 2. resume; SIGTERM once it has logged a few steps past the checkpoint.
  proc = th.start(th.main_cmd(broken, ARG), cache_dir=cache)
  th.wait_for(lambda: max((r["step"] for r in _rows_after_restart(broken)), default=0) >= 53, proc=proc)
  proc.send_signal(signal.SIGTERM)
  term_log = th.finish(proc)
  terminated = {"rc": proc.returncode, "steps": th.steps(broken), "log": term_log}

  # 3. damage the newest checkpoint, resume to the end.
  newest = pathlib.Path(broken) / "checkpoints" / str(terminated["steps"][-1])
  data_files = [p for p in (newest / "params").rglob("*") if p.is_file() and p.stat().st_size > 0
                and p.parent.name == "d"]
  for p in data_files:
    p.write_bytes(b"\0" * 16)
  final_log = th.run_main(broken, ARG, cache_dir=cache).stderr
  return straight, broken, killed, terminated, final_log


def _rows_after_restart(workdir):
  """Rows the current (resumed) process wrote: those after the last row whose step decreases."""
  rows = th.metric_list(workdir)
  start = max((i for i in range(1, len(rows)) if rows[i]["step"] <= rows[i - 1]["step"]), default=0)
  return rows[start:]


def test_kill_minus_9_leaves_the_last_checkpoint(runs):
  _, _, killed, _, _ = runs
  assert killed["rc"] == -signal.SIGKILL
  assert killed["steps"] == [50]          # killed before the end


def test_sigterm_saves_and_exits_cleanly(runs):
  _, _, _, terminated, _ = runs
  assert terminated["rc"] == 0, terminated["log"][-3000:]
  assert "resuming at step 50" in terminated["log"]
  assert "stopped for preemption at step" in terminated["log"]
  stopped = terminated["steps"][-1]
  assert 50 < stopped < N                 # a checkpoint at the step the signal arrived


def test_unreadable_newest_checkpoint_falls_back(runs):
  _, broken, _, terminated, final_log = runs
  stopped = terminated["steps"][-1]
  assert f"checkpoint step {stopped}" in final_log and "unreadable" in final_log
  assert "resuming at step 50" in final_log
  moved = list((pathlib.Path(broken) / "checkpoints_unreadable").iterdir())
  assert [p.name.split("-")[0] for p in moved] == [str(stopped)]
  assert th.steps(broken)[-1] == N


def test_resumed_run_equals_straight_run(runs):
  straight, broken, _, _, _ = runs
  assert th.max_abs_error(th.params(broken), th.params(straight)) <= 1e-6
  assert th.max_abs_error(th.params(broken, use_ema=True), th.params(straight, use_ema=True)) <= 1e-6
  a, b = th.metric_rows(straight), th.metric_rows(broken)
  for step in range(51, N + 1):
    np.testing.assert_allclose(b[step]["loss"], a[step]["loss"], rtol=1e-6, err_msg=f"step {step}")
  data_state = lambda wd: json.loads((pathlib.Path(wd) / "checkpoints" / str(N) / "data" / "metadata")
                                     .read_text())
  assert data_state(broken) == data_state(straight)
  # The straight run really moved: a resume that silently restarted from scratch would not match.
  assert th.max_abs_error(th.params(straight), th.params(straight, step=50)) > 1e-2
