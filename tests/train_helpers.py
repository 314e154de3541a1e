"""Helpers for tests/test_train_*.py: run the real entry point in subprocesses, read workdirs back.

Subprocesses because the simulated device count (XLA_FLAGS) must be set before jax is imported, and
because kill -9 / SIGTERM need a process to hit. All runs of a session share a persistent compilation
cache, so the many identical tiny programs compile once.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import numpy as np
from flax import nnx

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "tests/train_tiny_config.py"
TINY_ARG = "steps=2,every=2,complete=0"
# absl's log line prefix: severity, date, time, thread id, file:line]
ABSL_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^ \]]+:\d+\] ")


def env(devices: int = 1, cache_dir=None) -> dict[str, str]:
  out = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  if cache_dir is not None:
    out.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return out


def main_cmd(workdir, arg: str = "", *flags: str, config: str = TINY) -> list[str]:
  return [sys.executable, "-m", "dydit_jax.main", f"--config={config}" + (f":{arg}" if arg else ""),
          f"--workdir={workdir}", *flags]


def start(cmd: list[str], *, devices: int = 1, cache_dir=None) -> subprocess.Popen:
  return subprocess.Popen(cmd, cwd=REPO, env=env(devices, cache_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
  out, _ = proc.communicate(timeout=timeout)
  return out


def run_main(workdir, arg: str = "", *flags: str, devices: int = 1, cache_dir=None, expect_ok: bool = True,
             timeout: float = 300, config: str = TINY) -> subprocess.CompletedProcess:
  result = subprocess.run(main_cmd(workdir, arg, *flags, config=config), cwd=REPO, env=env(devices, cache_dir),
                          capture_output=True, text=True, timeout=timeout)
  if expect_ok and result.returncode != 0:
    raise AssertionError(f"trainer failed (rc {result.returncode}):\n{result.stderr[-4000:]}")
  return result


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def wait_for(predicate, timeout: float = 120, interval: float = 0.005, proc: subprocess.Popen | None = None):
  """Polls until predicate() is truthy; fails early if `proc` exits first."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    value = predicate()
    if value:
      return value
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"process exited (rc {proc.returncode}) before the condition:\n"
                           f"{proc.stdout.read()[-4000:]}")
    time.sleep(interval)
  raise TimeoutError("condition not reached")


def steps(workdir) -> list[int]:
  """Finalized checkpoint steps of a workdir (orbax renames a step directory in place when done)."""
  root = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def metric_list(workdir) -> list[dict]:
  """The rows of metrics.jsonl in order; a line still being written is left out."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  rows = []
  for line in (path.read_text().splitlines() if path.exists() else []):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      break
  return rows


def metric_rows(workdir) -> dict[int, dict]:
  """metrics.jsonl as {step: row}; rows of one step are merged, later values winning (a resumed run
  rewrites steps; a sample grid adds its own row)."""
  out = {}
  for row in metric_list(workdir):
    out.setdefault(row["step"], {}).update(row)
  return out


def params(workdir, *, step=None, use_ema: bool = False) -> dict[str, np.ndarray]:
  """{path: array} of a workdir checkpoint's params (on this process's first device)."""
  from dydit_jax.checkpoints import load_model  # pylint: disable=g-import-not-at-top
  model = load_model(str(workdir), step=step, use_ema=use_ema)
  return {"/".join(map(str, path)): np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model))}


def max_abs_error(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
  """max |a - b| over every element of every array: one number for 'same training state'."""
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def error_line(result) -> str:
  """The one `error:` line of a failed run: exit status 1, no traceback, nothing else but absl logs."""
  assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip() and not ABSL_LOG_LINE.match(line)]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  return lines[0]


def tree_hash(root) -> dict[str, str]:
  """{relative path: sha256} of every file under root (empty directories as entries too)."""
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
          for p in sorted(root.rglob("*"))}


def run_fails(workdir, *flags, config=TINY, arg=TINY_ARG) -> str:
  """Run the entry point with bad input: the error line, after checking nothing was written."""
  before = tree_hash(workdir) if pathlib.Path(workdir).exists() else None
  result = run_main(workdir, arg, *flags, config=config, expect_ok=False, timeout=120)
  line = error_line(result)
  if before is None:
    assert not pathlib.Path(workdir).exists(), "a refused run created its workdir"
  else:
    assert tree_hash(workdir) == before, "a refused run changed its workdir"
  return line
