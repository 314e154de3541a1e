"""Inception directories: the converted FID Inception on disk, and `load_inception`, their loader.

  inception_config.json   which network and which file it was converted from
  params/                 an orbax (StandardCheckpointer) tree: the full NNX state (BatchNorm
                          moving statistics included) as a pure dict

The layout of a DiT model directory (`dydit_jax.checkpoints`), written by the same atomic
`checkpoints.write_model_dir`; `python -m dydit_jax.evaluation.convert` makes one.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx

from dydit_jax import checkpoints
from dydit_jax.evaluation.inception import InceptionV3

CONFIG_FILE = "inception_config.json"
NETWORK = "inception-v3-fid-2015-12-05"
# How to get the weights every evaluation needs, said the same way everywhere.
CONVERT_HINT = ("convert the FID Inception once with python -m dydit_jax.evaluation.convert --src FILE --dst DIR, "
                "FILE being the ADM evaluator's classify_image_graph_def.pb, torch-fidelity's "
                "weights-inception-2015-12-05-6726825d.pth or pytorch-fid's pt_inception-2015-12-05-6726825d.pth")


@dataclasses.dataclass(frozen=True)
class InceptionInfo:
  """What an Inception directory says about itself (there is one geometry; this records provenance)."""

  network: str = NETWORK
  source: str = ""      # the file name it was converted from

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2)


def write_inception_dir(dst: os.PathLike | str, params: dict[str, Any], info: InceptionInfo, *,
                        overwrite: bool = False) -> Path:
  """Atomically write `params` (pure dict, NNX state layout) and `info` to `dst`."""
  return checkpoints.write_model_dir(dst, params, info, overwrite=overwrite, config_file=CONFIG_FILE)


def save_inception(model: InceptionV3, dst: os.PathLike | str, *, source: str = "", overwrite: bool = False) -> Path:
  """Write a live network as an Inception directory (tests and benchmarks use random ones)."""
  return write_inception_dir(dst, nnx.state(model).to_pure_dict(), InceptionInfo(source=source), overwrite=overwrite)


def load_inception(path: os.PathLike | str, *, flag: str = "--inception") -> InceptionV3:
  """The network stored at `path`; a missing or foreign directory is a FileNotFoundError naming the
  path, `flag` (how the caller's user passed it) and how to make one."""
  path = Path(path).absolute()
  if not (path / CONFIG_FILE).is_file() or not (path / checkpoints.PARAMS_DIR).is_dir():
    what = "does not exist" if not path.exists() else f"is not an Inception directory ({CONFIG_FILE} and params/)"
    raise FileNotFoundError(f"Inception weights {path} ({flag}) {what}: {CONVERT_HINT}")
  info = json.loads((path / CONFIG_FILE).read_text())
  if info.get("network") != NETWORK:
    raise FileNotFoundError(f"{path} ({flag}) holds {info.get('network')!r}, not {NETWORK!r}")
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0))))
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(path / checkpoints.PARAMS_DIR, checkpoints.abstract_target(abstract_state, None))
  nnx.replace_by_pure_dict(abstract_state, restored)
  return nnx.merge(graphdef, abstract_state)
