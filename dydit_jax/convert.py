"""Convert a PyTorch DiT / DyDiT checkpoint into a model directory (see `checkpoints.py`).

  python -m dydit_jax.convert --src DiT-XL-2-256x256.pt --dst ckpt/dit_xl2_256 --model DiT-XL/2
  python -m dydit_jax.convert --src new_dydit0.5.pt --dst ckpt/dydit05 --model DiT-XL/2
  python -m dydit_jax.convert --src run/0050000.pt --dst ckpt/tiny --num_heads 6   # custom geometry

Accepted inputs: a raw state dict (.pt / .pth, official DiT releases), a training dict
{model, ema, opt, args} (the EMA weights are taken, as the official samplers do), a DyFLUX-style
{"module": ...} wrapper, or a .safetensors file (read with numpy; PyTorch not needed). A DDP
"module." key prefix is stripped. Router keys make the result a DyDiT; the router width tells the
release apart (H-1 outputs: Mar-2025 "forced_first", H outputs: Dec-2024 "all").

The mapping is an explicit key table, checked both ways: every source tensor must be used and every
model variable filled with the right shape, otherwise the tool stops with one message listing the
missing, unexpected and mismatched keys, and writes nothing. Depth, width, patch size, channels,
learned sigma, class count and token grid come from the tensor shapes; the head count (the one
thing shapes cannot tell) comes from --model (checked against the shapes) or --num_heads.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from absl import flags
from flax import nnx, traverse_util

from dydit_jax import checkpoints, cli
from dydit_jax.torch_files import ConversionError, as_numpy, check_problems, read_safetensors, read_torch
from dydit_jax.models import DiT
from dydit_jax.models.config import MODEL_NAMES, ModelConfig, model_config
from dydit_jax.models.layers import sincos_pos_embed_2d

# Axis permutations from a PyTorch tensor to its Flax variable (None: same layout).
_LINEAR = (1, 0)          # [out, in] -> kernel [in, out]
_CONV = (2, 3, 1, 0)      # OIHW -> HWIO
_SAME = None


def _dense(torch_prefix: str, nnx_path: tuple) -> dict[str, tuple[tuple, Any]]:
  return {f"{torch_prefix}.weight": (nnx_path + ("kernel",), _LINEAR),
          f"{torch_prefix}.bias": (nnx_path + ("bias",), _SAME)}


# PyTorch key -> (NNX state path, permutation).
_TOP_LEVEL = {
    "pos_embed": (("pos_embed",), _SAME),
    "x_embedder.proj.weight": (("x_embedder", "proj", "kernel"), _CONV),
    "x_embedder.proj.bias": (("x_embedder", "proj", "bias"), _SAME),
    **_dense("t_embedder.mlp.0", ("t_embedder", "mlp", "layers", 0)),
    **_dense("t_embedder.mlp.2", ("t_embedder", "mlp", "layers", 2)),
    "y_embedder.embedding_table.weight": (("y_embedder", "embedding_table", "embedding"), _SAME),
    **_dense("final_layer.adaLN_modulation.1", ("final_layer", "adaLN_modulation")),
    **_dense("final_layer.linear", ("final_layer", "linear")),
}
# Keys under `blocks.{i}.`; block i becomes index i of a leading depth axis under ("blocks", ...).
_BLOCK = {
    **_dense("attn.qkv", ("attn", "qkv")),
    **_dense("attn.proj", ("attn", "proj")),
    **_dense("mlp.fc1", ("mlp", "fc1")),
    **_dense("mlp.fc2", ("mlp", "fc2")),
    **_dense("adaLN_modulation.1", ("adaLN_modulation",)),
}
_ROUTER_BLOCK = {
    **_dense("attn_rate.router", ("attn_rate", "router")),
    **_dense("mlp_rate.router", ("mlp_rate", "router")),
    **_dense("token_selection.mlp_head.0", ("token_selection", "mlp_head", "layers", 0)),
    **_dense("token_selection.mlp_head.2", ("token_selection", "mlp_head", "layers", 2)),
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_ROUTER_KEY = re.compile(r"^blocks\.\d+\.(attn_rate|mlp_rate|token_selection)\.")
_WRAPPERS = ("ema", "model", "module")   # in order of preference


# Reading ------------------------------------------------------------------------------------------
def read_state_dict(src: Path, notes: list[str]) -> dict[str, np.ndarray]:
  """Tensors of `src` as numpy arrays, unwrapped (ema > model > module) and without "module." prefixes."""
  if not src.is_file():
    raise ConversionError(f"{src} does not exist")
  obj = read_safetensors(src) if src.suffix == ".safetensors" else read_torch(src, notes)
  if not isinstance(obj, dict):
    raise ConversionError(f"{src} holds a {type(obj).__name__}, not a state dict")
  for wrapper in _WRAPPERS:
    if isinstance(obj.get(wrapper), dict):
      others = ", ".join(sorted(map(str, set(obj) - {wrapper})))
      notes.append(f"note: using the {wrapper!r} weights" + (f" (the file also holds {others})" if others else ""))
      obj = obj[wrapper]
      break
  return {k.removeprefix("module."): as_numpy(k, v, "a DiT state dict") for k, v in obj.items()}


# Geometry -----------------------------------------------------------------------------------------
def _describe(cfg: ModelConfig) -> str:
  kind = f"DyDiT ({cfg.router_format} routers)" if cfg.dynamic else "DiT"
  return (f"{kind}: depth {cfg.depth}, hidden {cfg.hidden_size}, {cfg.num_heads} heads, patch {cfg.patch_size}, "
          f"input {cfg.input_size}x{cfg.input_size}x{cfg.in_channels}, {cfg.num_classes} classes, "
          f"learn_sigma {cfg.learn_sigma}")


def infer_config(shapes: dict[str, tuple], *, model: str | None = None, image_size: int | None = None,
                 num_heads: int | None = None) -> ModelConfig:
  """The ModelConfig the tensor shapes describe; the head count from `model` or `num_heads`."""
  anchors = ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight",
             "y_embedder.embedding_table.weight", "blocks.0.mlp.fc1.weight")
  if not any(k in _TOP_LEVEL or _BLOCK_KEY.match(k) for k in shapes):
    raise ConversionError(f"not a DiT / DyDiT state dict: none of its {len(shapes)} keys is a DiT key "
                          f"(e.g. {', '.join(list(shapes)[:4])})")
  absent = [k for k in anchors if k not in shapes]
  if absent:
    raise ConversionError(f"incomplete DiT state dict: missing {', '.join(absent)}")
  hidden, in_channels, patch, patch_w = _expect_ndim(shapes, "x_embedder.proj.weight", 4)
  tokens = _expect_ndim(shapes, "pos_embed", 3)[1]
  grid = math.isqrt(tokens)
  out_features = _expect_ndim(shapes, "final_layer.linear.weight", 2)[0]
  out_channels, rest = divmod(out_features, patch * patch)
  if patch != patch_w or grid * grid != tokens or rest or out_channels not in (in_channels, 2 * in_channels):
    raise ConversionError(f"inconsistent DiT shapes: patch conv {shapes['x_embedder.proj.weight']}, pos_embed "
                          f"{shapes['pos_embed']}, final linear {shapes['final_layer.linear.weight']}")
  mlp_hidden = _expect_ndim(shapes, "blocks.0.mlp.fc1.weight", 2)[0]
  depth = 1 + max(int(m.group(1)) for m in map(_BLOCK_KEY.match, shapes) if m)
  geometry = dict(input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                  depth=depth, mlp_ratio=mlp_hidden / hidden, learn_sigma=out_channels == 2 * in_channels,
                  num_classes=shapes["y_embedder.embedding_table.weight"][0] - 1)

  if image_size is not None and image_size // 8 != geometry["input_size"]:
    raise ConversionError(f"pos_embed holds {tokens} tokens ({grid}x{grid} patches of {patch}, latent "
                          f"{grid * patch}, i.e. {grid * patch * 8} px), not --image_size {image_size}")
  num_heads = _head_count(model, num_heads, depth=depth, hidden=hidden, patch=patch)
  if any(_ROUTER_KEY.match(k) for k in shapes):
    geometry.update(dynamic=True, router_format=_router_format(shapes, num_heads))
  try:
    cfg = ModelConfig(num_heads=num_heads, **geometry)
  except ValueError as e:
    raise ConversionError(f"unsupported geometry: {e}") from None
  if cfg.mlp_hidden != mlp_hidden:
    raise ConversionError(f"unsupported MLP width {mlp_hidden} for hidden size {hidden}")
  return cfg


def _head_count(model: str | None, num_heads: int | None, *, depth: int, hidden: int, patch: int) -> int:
  """Heads from --model (after checking its geometry against the shapes) or from --num_heads."""
  if model is not None:
    try:
      reference = model_config(model)
    except ValueError as e:
      raise ConversionError(str(e)) from None
    official = (reference.depth, reference.hidden_size, reference.patch_size)
    if official != (depth, hidden, patch):
      raise ConversionError(f"--model {model} has depth {official[0]}, hidden {official[1]}, patch {official[2]}, "
                            f"but the checkpoint has depth {depth}, hidden {hidden}, patch {patch} (pass the "
                            "matching --model, or --num_heads N for a geometry outside the registry)")
    if num_heads is not None and num_heads != reference.num_heads:
      raise ConversionError(f"--num_heads {num_heads} contradicts --model {model} ({reference.num_heads} heads)")
    return reference.num_heads
  if num_heads is None:
    raise ConversionError(f"the head count is not in the tensor shapes: pass --model ({', '.join(MODEL_NAMES)}) "
                          "or --num_heads N")
  return num_heads


def _expect_ndim(shapes: dict[str, tuple], key: str, ndim: int) -> tuple:
  if len(shapes[key]) != ndim:
    raise ConversionError(f"{key} has shape {shapes[key]}, expected {ndim} dimensions: not a DiT state dict")
  return shapes[key]


def _router_format(shapes: dict[str, tuple], num_heads: int) -> str:
  for key in ("blocks.0.attn_rate.router.weight", "blocks.0.mlp_rate.router.weight"):
    if key in shapes:
      outputs = shapes[key][0]
      if outputs == num_heads - 1:
        return "forced_first"
      if outputs == num_heads:
        return "all"
      raise ConversionError(f"{key} has {outputs} outputs; with {num_heads} heads a DyDiT router has "
                            f"{num_heads - 1} (Mar-2025 release) or {num_heads} (Dec-2024 release)")
  return "forced_first"   # no width router at all: the key check below reports them missing


# Mapping ------------------------------------------------------------------------------------------
def key_table(cfg: ModelConfig) -> dict[str, tuple[tuple, Any, int | None]]:
  """PyTorch key -> (NNX path, permutation, block index or None) for every tensor of `cfg`."""
  table = {k: (path, perm, None) for k, (path, perm) in _TOP_LEVEL.items()}
  per_block = {**_BLOCK, **(_ROUTER_BLOCK if cfg.dynamic else {})}
  for i in range(cfg.depth):
    table.update({f"blocks.{i}.{k}": (("blocks",) + path, perm, i) for k, (path, perm) in per_block.items()})
  return table


def abstract_shapes(cfg: ModelConfig) -> dict[tuple, tuple[tuple, np.dtype]]:
  """NNX state path -> (shape, dtype) of the model `cfg` describes, without allocating it."""
  state = nnx.state(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))))
  return {path: (v.get_value().shape, np.dtype(v.get_value().dtype)) for path, v in nnx.to_flat_state(state)}


def _torch_shape(target: tuple, perm, stacked: bool) -> tuple:
  target = target[1:] if stacked else target
  if perm is None:
    return tuple(target)
  shape = [0] * len(perm)
  for j, axis in enumerate(perm):
    shape[axis] = target[j]
  return tuple(shape)


def check_keys(shapes: dict[str, tuple], cfg: ModelConfig, targets: dict[tuple, tuple]) -> None:
  """Raise one ConversionError listing every missing, unexpected and mismatched key."""
  table = key_table(cfg)
  missing = [k for k in table if k not in shapes]
  unexpected = [k for k in shapes if k not in table]
  mismatched, unfilled = [], sorted(set(targets) - {path for path, _, _ in table.values()}, key=str)
  for key, (path, perm, block) in table.items():
    if key in shapes and path not in targets:
      mismatched.append(f"{key} (the model has no variable {path})")
    elif key in shapes:
      want = _torch_shape(targets[path][0], perm, block is not None)
      if tuple(shapes[key]) != want:
        mismatched.append(f"{key} {tuple(shapes[key])} (expected {want})")
  check_problems(_describe(cfg), [("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched),
                                  ("model variables without a source", unfilled)])


def to_nnx_params(state_dict: dict[str, np.ndarray], cfg: ModelConfig, targets: dict[tuple, tuple],
                  notes: list[str]) -> dict[str, Any]:
  """The nested pure dict (NNX state layout) that `checkpoints.load_model` restores."""
  flat, cast = {}, set()
  for key, (path, perm, block) in key_table(cfg).items():
    array = state_dict[key] if perm is None else np.transpose(state_dict[key], perm)   # a view
    shape, dtype = targets[path]
    if array.dtype != dtype:
      cast.add(f"{array.dtype} -> {dtype}")
    if block is None:
      flat[path] = np.ascontiguousarray(array, dtype=dtype)
    else:   # fill the stacked array in place: one copy of the weights, not two
      flat.setdefault(path, np.empty(shape, dtype))[block] = array
  if cast:
    notes.append(f"note: cast tensors {', '.join(sorted(cast))}")
  return traverse_util.unflatten_dict(flat)


def check_pos_embed(pos_embed: np.ndarray, cfg: ModelConfig, notes: list[str]) -> None:
  """Warn when the stored table is not DiT's analytic sin-cos table (the stored one is kept)."""
  diff = float(np.max(np.abs(pos_embed[0] - sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size))))
  if diff > 1e-6:
    notes.append(f"warning: the stored pos_embed differs from the analytic sin-cos table by up to {diff:.3g}; "
                 "the stored table is kept")


# Entry point --------------------------------------------------------------------------------------
def convert(src: Path, dst: Path, *, model: str | None = None, image_size: int | None = None,
            num_heads: int | None = None, overwrite: bool = False,
            export_dit: bool = False) -> tuple[ModelConfig, list[str]]:
  """Convert `src` into the model directory `dst`; returns the config and the notes to show."""
  try:
    checkpoints.check_destination(dst, overwrite)
  except checkpoints.DestinationExistsError as e:
    raise ConversionError(str(e)) from None
  notes: list[str] = []
  state_dict = read_state_dict(src, notes)
  if export_dit:
    routers = {k for k in state_dict if _ROUTER_KEY.match(k)}
    notes.append(f"note: --export_dit dropped {len(routers)} router tensors" if routers
                 else "note: --export_dit on a plain DiT changes nothing")
    state_dict = {k: v for k, v in state_dict.items() if k not in routers}
  shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
  cfg = infer_config(shapes, model=model, image_size=image_size, num_heads=num_heads)
  targets = abstract_shapes(cfg)
  check_keys(shapes, cfg, targets)
  check_pos_embed(state_dict["pos_embed"], cfg, notes)
  params = to_nnx_params(state_dict, cfg, targets, notes)
  checkpoints.write_model_dir(dst, params, cfg, overwrite=overwrite)
  return cfg, notes


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = {"flag_values": flag_values}
  flags.DEFINE_string("src", None, ".pt / .pth / .safetensors checkpoint", required=True, **fv)
  flags.DEFINE_string("dst", None, "model directory to create", required=True, **fv)
  flags.DEFINE_enum("model", None, list(MODEL_NAMES), "official geometry (checked against the shapes)", **fv)
  flags.DEFINE_integer("image_size", None, "image side in pixels (checked against pos_embed)", **fv)
  flags.DEFINE_integer("num_heads", None, "head count for a geometry outside the registry", **fv)
  flags.DEFINE_bool("overwrite", False, "replace an existing non-empty --dst", **fv)
  flags.DEFINE_bool("export_dit", False, "drop DyDiT routers and write a plain DiT", **fv)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  del argv  # positional words: refused by cli.guarded
  f = flag_values
  dst = Path(f.dst)
  cfg, notes = convert(Path(f.src), dst, model=f.model, image_size=f.image_size, num_heads=f.num_heads,
                       overwrite=f.overwrite, export_dit=f.export_dit)
  for note in notes:
    print(note, file=sys.stderr)
  print(f"wrote {dst}: {_describe(cfg)}")


if __name__ == "__main__":
  cli.run(main, define_flags)
