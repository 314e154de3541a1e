"""Timing helpers and the benchmark table (markdown rows printed as they complete)."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

COLUMNS = ("part", "sampler", "model", "attn", "rows", "steps", "compile s", "ms/call", "s/image",
           "speedup", "MACs ratio", "TFLOP/s", "% matmul", "note", "at s")


def timed(fn, *args):
  """(fn(*args) with every array ready, wall seconds)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def spread(num: int, limit: int | None) -> np.ndarray:
  """`limit` positions spread evenly over 0..num-1 (all of them without a limit)."""
  if not limit or limit >= num:
    return np.arange(num)
  return np.unique(np.linspace(0, num - 1, limit).round().astype(np.int32))


def matmul_rate(n: int, iters: int = 10) -> float:
  """bf16 n^3 matmul TFLOP/s (jit of a chain of `iters` dependent products, timed after warm-up)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16) / n ** 0.5

  @jax.jit
  def chain(a, b):
    return jax.lax.fori_loop(0, iters, lambda _, x: x @ b, a)

  jax.block_until_ready(chain(a, b))
  _, seconds = timed(chain, a, b)
  return 2 * n ** 3 * iters / seconds / 1e12


class Table:
  """Markdown rows printed as they complete (a timed-out run still shows what it measured).

  "at s" is the time since the table started: what each part costs of a device-time budget.
  """

  def __init__(self):
    self.rows: list[dict] = []
    self.start = time.perf_counter()
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)

  def add(self, **row):
    row.setdefault("at s", round(time.perf_counter() - self.start))
    self.rows.append(row)
    cells = []
    for c in COLUMNS:
      v = row.get(c, "")
      cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
    print("| " + " | ".join(cells) + " |", flush=True)
