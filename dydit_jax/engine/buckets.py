"""Capacity buckets: the few static shapes the engine compiles for dynamic widths and token counts.

jit needs static shapes, but the number of open heads / groups changes per layer and step, and the
number of MLP-routed tokens changes per call. The engine therefore compiles each block for a small set
of capacities and picks one at run time with `lax.switch`:

- widths: up to `max_buckets` head capacities (and as many group capacities) chosen from the plan by a
  small dynamic program that minimises the padded work sum_count freq(count) * (cap(count) - count);
  a plan with few distinct counts gets exact capacities and no padding.
- tokens: fractions of the flattened batch (B*N rows, rounded up to a multiple of 8), plus 0 for a
  layer that routes no token and B*N for any count: uniform j/T, or fitted to routed fractions
  observed on a calibration batch. The chosen capacity is the smallest one >= the routed count.

`plan_tables` turns a plan into the per-(step, layer) arrays the compiled program indexes: open unit
indices (padded to H), their validity, the natural-order mask, and the bucket id.
"""
from __future__ import annotations

import math

import numpy as np

from dydit_jax.engine.plan import WidthPlan


def choose_caps(counts: np.ndarray, max_buckets: int) -> tuple[int, ...]:
  """At most `max_buckets` capacities covering every value in `counts` with least padded work.

  Optimal 1-D partition of the sorted distinct counts (each bucket's capacity is its largest count),
  O(m^2 k) for m distinct values (m <= H + 1).
  """
  values, freq = np.unique(np.asarray(counts).reshape(-1), return_counts=True)
  m, k = len(values), max(1, min(max_buckets, len(values)))

  def waste(i, j):  # values[i..j] padded up to values[j]
    return int(np.sum(freq[i:j + 1] * (values[j] - values[i:j + 1])))

  best = np.full((k + 1, m), np.inf)
  choice = np.zeros((k + 1, m), int)
  for j in range(m):
    best[1, j] = waste(0, j)
  for b in range(2, k + 1):
    for j in range(m):
      for i in range(1, j + 1):
        cost = best[b - 1, i - 1] + waste(i, j)
        if cost < best[b, j]:
          best[b, j], choice[b, j] = cost, i
  caps, j, b = [], m - 1, int(np.argmin(best[1:, m - 1])) + 1
  while b >= 1:
    caps.append(int(values[j]))
    j, b = (choice[b, j] - 1, b - 1) if b > 1 else (-1, 0)
  return tuple(sorted(caps))


def token_caps(rows: int, num_buckets: int, fractions: tuple[float, ...] | None = None) -> tuple[int, ...]:
  """Capacities for `rows` = B*N flattened tokens: 0, the given fractions of rows (default j/T for
  j < T), and rows itself, each rounded up to a multiple of 8."""
  if fractions is None:
    fractions = tuple(j / num_buckets for j in range(1, num_buckets))
  caps = {0, rows}
  for f in fractions:
    caps.add(min(rows, 8 * math.ceil(f * rows / 8)))
  return tuple(sorted(caps))


def fit_token_fractions(observed: np.ndarray, num_buckets: int, resolution: int = 256) -> tuple[float, ...]:
  """Token-capacity fractions fitted to observed routed fractions (e.g. `bench.calibration`).

  Uniform j/T capacities waste half a bucket on average; with observations concentrated in part of
  [0, 1] (trained and synthetic routers are), the same number of branches fitted by `choose_caps`
  wastes several times less. Capacity 1.0 is always kept, so an unforeseen count still fits.
  """
  counts = np.ceil(np.clip(np.asarray(observed, np.float64), 0, 1) * resolution).astype(int)
  caps = set(choose_caps(counts, max(1, num_buckets - 1))) | {resolution}
  return tuple(c / resolution for c in sorted(caps) if c > 0)


def padded_counts(counts: np.ndarray, caps: tuple[int, ...]) -> np.ndarray:
  """Capacity actually computed for each count (smallest cap >= count)."""
  caps_arr = np.asarray(caps)
  return caps_arr[np.searchsorted(caps_arr, np.asarray(counts), side="left")]


def _unit_tables(mask: np.ndarray, caps: tuple[int, ...]) -> dict[str, np.ndarray]:
  """Index tables for one kind of unit; mask (S, L, H) bool."""
  num_units = mask.shape[-1]
  counts = mask.sum(-1)
  # Open units first (ascending), then closed ones; padded slots are zeroed through `valid`.
  order = np.argsort(~mask, axis=-1, kind="stable").astype(np.int32)
  valid = (np.arange(num_units) < counts[..., None]).astype(np.float32)
  bucket = np.searchsorted(np.asarray(caps), counts, side="left").astype(np.int32)
  if np.any(bucket >= len(caps)):
    raise ValueError(f"counts up to {counts.max()} exceed the capacities {caps}")
  return {"idx": order, "valid": valid, "mask": mask.astype(np.float32), "bucket": bucket}


def plan_tables(plan: WidthPlan, head_caps: tuple[int, ...], group_caps: tuple[int, ...]):
  """{"head": tables, "group": tables}, each array with leading (S, L) axes."""
  return {"head": _unit_tables(plan.head, head_caps), "group": _unit_tables(plan.group, group_caps)}
