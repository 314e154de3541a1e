"""Shared pieces of the evaluator tests: running a tool's CLI in-process, random Inception directories."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
from absl import flags
from flax import traverse_util

from dydit_jax import cli
from dydit_jax.evaluation import convert
from dydit_jax.evaluation.weights import InceptionInfo, write_inception_dir


def run_tool(module, words: list[str], *args: str, positional=()) -> tuple[int, str, str]:
  """`module.main` behind its flags and cli.guarded, in-process: (exit status, stdout, stderr)."""
  values = flags.FlagValues()
  module.define_flags(values)
  argv = values(["tool", *words, *args])
  out, err, code = io.StringIO(), io.StringIO(), 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      cli.guarded(module.main, positional)(argv, values)
    except SystemExit as e:
      code = e.code
  return code, out.getvalue(), err.getvalue()


def random_inception_dir(dst: Path, seed: int = 0) -> Path:
  """An Inception directory with every variable random (host-side numpy, no network init): He-scaled
  kernels, BatchNorm scales / biases / moving statistics, fc."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, (shape, dtype) in sorted(convert.targets().items()):
    leaf = path[-1]
    if leaf == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      value = rng.standard_normal(shape) * (2.0 / fan_in) ** 0.5
    elif leaf in ("scale", "var"):
      value = 0.5 + rng.random(shape)
    else:
      value = 0.2 * rng.standard_normal(shape)
    flat[path] = value.astype(dtype)
  return write_inception_dir(dst, traverse_util.unflatten_dict(flat), InceptionInfo(source="random"))
