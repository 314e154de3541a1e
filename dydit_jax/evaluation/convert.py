"""Convert the FID Inception weights into an Inception directory (see `evaluation.weights`).

  python -m dydit_jax.evaluation.convert --src classify_image_graph_def.pb --dst ckpt/inception
  python -m dydit_jax.evaluation.convert --src weights-inception-2015-12-05-6726825d.pth --dst ckpt/inception

Two sources hold the same 2015-12-05 network:
- the ADM evaluator's TF1 GraphDef (`classify_image_graph_def.pb`): its Const nodes
  `<layer>/conv2d_params` (already HWIO), `<layer>/batchnorm/{gamma,beta,moving_mean,
  moving_variance}`, `softmax/weights` (2048 x 1008) and `softmax/biases`. TensorFlow reads it and
  is imported only here. A BatchNormWithGlobalNormalization node with another epsilon than 1e-3, or
  that does not scale by gamma, is refused (this network assumes both).
- torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` or pytorch-fid's
  `pt_inception-2015-12-05-6726825d.pth` (both converted from that graph, torchvision key names:
  `Mixed_6d.branch7x7_2.conv.weight`, `.bn.running_var`, `fc.weight`; `num_batches_tracked` ignored).

Strict both ways, as the other converters: every variable of the network filled exactly once with
the right shape, no unknown parameter tensor; otherwise one message lists the problems and nothing
is written. The directory is written atomically.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from absl import flags
from flax import nnx, traverse_util

from dydit_jax import checkpoints, cli
from dydit_jax.evaluation.inception import BN_EPS, InceptionV3
from dydit_jax.evaluation.weights import InceptionInfo, write_inception_dir
from dydit_jax.torch_files import ConversionError, as_numpy, check_problems, first_line, read_torch

WHAT = "the FID Inception-v3 (2015-12-05)"
_CONV = (2, 3, 1, 0)     # OIHW -> HWIO
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_TF_BN_LEAF = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}
_TF_LEAVES = ("/conv2d_params", "/batchnorm/gamma", "/batchnorm/beta", "/batchnorm/moving_mean",
              "/batchnorm/moving_variance", "softmax/weights", "softmax/biases")

# Where each torchvision layer lives in the TF graph: stem convs, then per Mixed block its scope and
# the tower of every branch ("conv_k" is the k-th conv of a scope, "conv" the 0-th).
_STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2", "Conv2d_3b_1x1": "conv_3",
         "Conv2d_4a_3x3": "conv_4"}


def _tower(prefix: str, branches: Sequence[str]) -> dict[str, str]:
  return {b: f"{prefix}conv" + (f"_{k}" if k else "") for k, b in enumerate(branches)}


_A = {"branch1x1": "conv", **_tower("tower/", ["branch5x5_1", "branch5x5_2"]),
      **_tower("tower_1/", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]), "branch_pool": "tower_2/conv"}
_B = {"branch3x3": "conv", **_tower("tower/", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"])}
_C = {"branch1x1": "conv", **_tower("tower/", [f"branch7x7_{i}" for i in range(1, 4)]),
      **_tower("tower_1/", [f"branch7x7dbl_{i}" for i in range(1, 6)]), "branch_pool": "tower_2/conv"}
_D = {**_tower("tower/", ["branch3x3_1", "branch3x3_2"]),
      **_tower("tower_1/", [f"branch7x7x3_{i}" for i in range(1, 5)])}
_E = {"branch1x1": "conv", "branch3x3_1": "tower/conv", **_tower("tower/mixed/", ["branch3x3_2a", "branch3x3_2b"]),
      **_tower("tower_1/", ["branch3x3dbl_1", "branch3x3dbl_2"]),
      **_tower("tower_1/mixed/", ["branch3x3dbl_3a", "branch3x3dbl_3b"]), "branch_pool": "tower_2/conv"}
_MIXED = {name: (f"mixed_{i}" if i else "mixed", table) for i, (name, table) in enumerate(
    [("Mixed_5b", _A), ("Mixed_5c", _A), ("Mixed_5d", _A), ("Mixed_6a", _B), ("Mixed_6b", _C), ("Mixed_6c", _C),
     ("Mixed_6d", _C), ("Mixed_6e", _C), ("Mixed_7a", _D), ("Mixed_7b", _E), ("Mixed_7c", _E)])}


@functools.cache
def targets() -> dict[tuple, tuple]:
  """NNX state path -> (shape, dtype) of every variable of the network (no array is allocated; traced
  once per process, ~2 s). Do not modify the returned dict."""
  state = nnx.state(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0))))
  return {path: (tuple(v.shape), v.dtype) for path, v in traverse_util.flatten_dict(state.to_pure_dict()).items()}


def _tf_scope(path: tuple) -> str:
  """TF scope of the BasicConv2d at NNX path ('Mixed_6d', 'branch7x7_2', ...) or ('Conv2d_1a_3x3', ...)."""
  if path[0] in _STEM:
    return _STEM[path[0]]
  scope, table = _MIXED[path[0]]
  return f"{scope}/{table[path[1]]}"


def torch_table() -> dict[str, tuple[tuple, tuple | None]]:
  """torchvision state-dict key -> (NNX path, transpose or None)."""
  table = {}
  for path in targets():
    perm = (1, 0) if path == ("fc", "kernel") else _CONV if path[-1] == "kernel" else None
    table[".".join(path[:-1] + (_TORCH_LEAF[path[-1]],))] = (path, perm)
  return table


def tf_table() -> dict[str, tuple]:
  """TF GraphDef Const name -> NNX path (every tensor already in the NNX layout)."""
  table = {}
  for path in targets():
    if path[0] == "fc":
      table["softmax/weights" if path[-1] == "kernel" else "softmax/biases"] = path
    elif path[-2] == "conv":
      table[f"{_tf_scope(path)}/conv2d_params"] = path
    else:
      table[f"{_tf_scope(path)}/batchnorm/{_TF_BN_LEAF[path[-1]]}"] = path
  return table


# Reading -----------------------------------------------------------------------------------------
def read_graphdef(path: Path, notes: list[str]) -> dict[str, np.ndarray]:
  """The parameter Consts of a TF1 GraphDef (.pb), by node name; checks the BatchNorm ops' attributes."""
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from tensorflow.python.framework import tensor_util  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConversionError("reading a .pb GraphDef needs TensorFlow (pip install tensorflow-cpu)") from None
  graph = tf.compat.v1.GraphDef()
  try:
    graph.ParseFromString(path.read_bytes())
  except Exception as e:  # pylint: disable=broad-except  (protobuf's DecodeError and friends)
    raise ConversionError(f"cannot read {path} as a TensorFlow GraphDef, is it truncated or corrupt? "
                          f"({first_line(e)})") from None
  bad = []
  for node in graph.node:
    if node.op == "BatchNormWithGlobalNormalization":
      eps, scaled = node.attr["variance_epsilon"].f, node.attr["scale_after_normalization"].b
      if not np.isclose(eps, BN_EPS) or not scaled:
        bad.append(f"{node.name} (variance_epsilon {eps:g}, scale_after_normalization {scaled})")
  if bad:
    raise ConversionError(f"{path}: batch norms this network does not implement (it assumes eps {BN_EPS:g}, "
                          f"scaled by gamma): {', '.join(bad)}")
  consts = {n.name: n for n in graph.node if n.op == "Const" and n.name.endswith(_TF_LEAVES)}
  if not consts:
    raise ConversionError(f"{path} has no Inception parameters (no Const named */conv2d_params, */batchnorm/*, "
                          "softmax/weights): is it the ADM evaluator's classify_image_graph_def.pb?")
  notes.append(f"note: read {len(consts)} parameter constants of {len(graph.node)} graph nodes")
  return {name: tensor_util.MakeNdarray(node.attr["value"].tensor) for name, node in consts.items()}


def read_pth(path: Path, notes: list[str]) -> dict[str, np.ndarray]:
  obj = read_torch(path, notes)
  if not isinstance(obj, dict):
    raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
  tracked = [k for k in obj if str(k).endswith(".num_batches_tracked")]
  if tracked:
    notes.append(f"note: ignored {len(tracked)} BatchNorm num_batches_tracked counters")
  return {str(k): as_numpy(str(k), v, "an Inception state dict") for k, v in obj.items() if k not in tracked}


# Mapping -----------------------------------------------------------------------------------------
def to_params(tensors: dict[str, np.ndarray], table: dict[str, tuple[tuple, tuple | None]]) -> dict:
  """The NNX pure dict from source tensors through `table` (source key -> (path, transpose)), after
  checking every key both ways and every shape."""
  want = targets()
  missing = sorted(k for k in table if k not in tensors)
  unexpected = sorted(k for k in tensors if k not in table)
  mismatched = []
  for key, (path, perm) in table.items():
    if key in tensors:
      shape = tensors[key].shape
      if (tuple(shape[i] for i in perm) if perm and len(shape) == len(perm) else tuple(shape)) != want[path][0]:
        mismatched.append(f"{key} {tuple(tensors[key].shape)} (expected {want[path][0]} after layout change)")
  check_problems(WHAT, [("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)])
  flat = {path: np.ascontiguousarray(np.transpose(tensors[key], perm) if perm else tensors[key], want[path][1])
          for key, (path, perm) in table.items()}
  return traverse_util.unflatten_dict(flat)


def convert(src: Path, dst: Path, *, overwrite: bool = False) -> tuple[dict, list[str]]:
  """Convert `src` (.pb, .pth / .pt) into the Inception directory `dst`; returns (summary, notes)."""
  try:
    checkpoints.check_destination(dst, overwrite)
  except checkpoints.DestinationExistsError as e:
    raise ConversionError(str(e)) from None
  if not src.is_file():
    raise ConversionError(f"{src} (--src) does not exist" if not src.exists() else f"{src} (--src) is not a file")
  notes: list[str] = []
  if src.suffix == ".pb":
    tensors, table = read_graphdef(src, notes), {k: (p, None) for k, p in tf_table().items()}
  else:
    tensors, table = read_pth(src, notes), torch_table()
  params = to_params(tensors, table)
  write_inception_dir(dst, params, InceptionInfo(source=src.name), overwrite=overwrite)
  values = int(sum(a.size for a in traverse_util.flatten_dict(params).values()))
  return {"tensors": len(table), "parameters": values}, notes


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = {"flag_values": flag_values}
  flags.DEFINE_string("src", None, "classify_image_graph_def.pb (ADM) or the torch-fidelity / pytorch-fid .pth",
                      required=True, **fv)
  flags.DEFINE_string("dst", None, "Inception directory to create", required=True, **fv)
  flags.DEFINE_bool("overwrite", False, "replace an existing non-empty --dst", **fv)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  del argv  # positional words: refused by cli.guarded
  summary, notes = convert(Path(flag_values.src), Path(flag_values.dst), overwrite=flag_values.overwrite)
  for note in notes:
    print(note, file=sys.stderr)
  print(f"wrote {flag_values.dst}: {WHAT} ({summary['tensors']} tensors, {summary['parameters']:,} values)")


if __name__ == "__main__":
  cli.run(main, define_flags)
