"""Convert a PyTorch Stable Diffusion VAE (AutoencoderKL) into a VAE directory (see `vae.checkpoints`).

  python -m dydit_jax.vae.convert --src sd-vae-ft-ema/ --dst ckpt/sd_vae_ft_ema
  python -m dydit_jax.vae.convert --src vae-ft-mse-840000-ema-pruned.safetensors --dst ckpt/sd_vae_ft_mse
  python -m dydit_jax.vae.convert --src sd-v1-4.ckpt --dst ckpt/sd14_vae    # the VAE of a whole SD checkpoint

Accepted inputs: a diffusers folder (config.json + diffusion_pytorch_model.safetensors or .bin; a
pipeline folder with a vae/ subfolder works too), whose config.json gives the geometry; or one
.safetensors / .bin / .ckpt / .pt file, whose geometry comes from the tensor shapes (widths from the
encoder convs, layers_per_block from the resnet count, latent channels from conv_out). Shapes cannot
tell the GroupNorm group count nor the latent scale: a bare file gets 32 groups and 0.18215 (the SD
VAE's) unless --norm_num_groups / --scaling_factor say otherwise.

Three key schemas are read, even mixed in one file: current diffusers names, the legacy diffusers
attention names (`query`, `key`, `value`, `proj_attn`: what the sd-vae-ft-* files on the Hub hold),
and CompVis / LDM names (`encoder.down.{i}.block.{j}`, `mid.attn_1.q` as 1x1 convs, `decoder.up.{k}`
in reverse order, ...), optionally under `first_stage_model.` or `vae.` inside a whole SD checkpoint
(whose other tensors, e.g. the UNet and text encoder, are ignored) and a .ckpt's `state_dict`
wrapper. Every key is renamed to the diffusers schema, then checked both ways against an explicit
key table: each model variable filled exactly once with the right shape, no unknown key under
encoder. / decoder. / quant_conv. / post_quant_conv.; otherwise one message lists the missing,
unexpected, duplicated and mismatched keys and nothing is written.
"""
from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from absl import flags
from flax import nnx, traverse_util

from dydit_jax import checkpoints, cli
from dydit_jax.errors import UserError
from dydit_jax.torch_files import (LIST_LIMIT, ConversionError, as_numpy, check_problems, read_safetensors,
                                   read_torch)
from dydit_jax.vae.checkpoints import write_vae_dir
from dydit_jax.vae.config import SD_VAE, VAEConfig
from dydit_jax.vae.model import AutoencoderKL

_LINEAR = (1, 0)          # [out, in] -> kernel [in, out]
_CONV = (2, 3, 1, 0)      # OIHW -> HWIO
VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
SD_PREFIXES = ("first_stage_model.", "vae.")     # where whole SD checkpoints keep the VAE
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


# Reading ------------------------------------------------------------------------------------------
def _diffusers_folder(src: Path, notes: list[str]) -> tuple[Path, dict[str, Any]]:
  """(weights file, parsed config.json) of a diffusers AutoencoderKL folder (or a pipeline's vae/)."""
  folder = src
  if not (folder / "config.json").is_file() and (src / "vae" / "config.json").is_file():
    folder = src / "vae"
    notes.append(f"note: reading the VAE of the pipeline folder {src} ({folder})")
  if not (folder / "config.json").is_file():
    raise ConversionError(f"{src} is a directory without config.json: a diffusers AutoencoderKL folder holds "
                          f"config.json and {' or '.join(DIFFUSERS_WEIGHTS)}")
  try:
    config = json.loads((folder / "config.json").read_text())
  except (OSError, ValueError) as e:
    raise ConversionError(f"cannot read {folder / 'config.json'}: {e}") from None
  if not isinstance(config, dict):
    raise ConversionError(f"{folder / 'config.json'} is not a JSON object")
  for name in DIFFUSERS_WEIGHTS:
    if (folder / name).is_file():
      return folder / name, config
  raise ConversionError(f"{folder} has config.json but none of {', '.join(DIFFUSERS_WEIGHTS)}")


def vae_keys(keys: list[str], notes: list[str]) -> dict[str, str]:
  """Source key -> key without a whole-SD-checkpoint prefix, for the VAE's tensors only; every other
  entry (UNet, text encoder, EMA copies, LDM loss, ...) is ignored, with a note."""
  def under(key: str, prefix: str) -> bool:
    return key.startswith(prefix) and key[len(prefix):].startswith(VAE_ROOTS)

  prefixes = [p for p in SD_PREFIXES if any(under(k, p) for k in keys)]
  if len(prefixes) > 1:
    raise ConversionError(f"the file holds VAE tensors under both {' and '.join(prefixes)}: which one to convert "
                          "is ambiguous")
  prefix = prefixes[0] if prefixes else ""
  selected = {k: k[len(prefix):] for k in keys if under(k, prefix)}
  if not selected:
    raise ConversionError(f"not an AutoencoderKL state dict: none of its {len(keys)} keys is under "
                          f"{', '.join(VAE_ROOTS)} (e.g. {', '.join(keys[:4])})")
  if prefix:
    notes.append(f"note: using the {len(selected)} tensors under {prefix!r}")
  ignored = Counter(k.split(".", 1)[0] for k in keys if k not in selected)
  if ignored:
    groups = ", ".join(f"{name}.* ({n})" for name, n in ignored.most_common(LIST_LIMIT))
    notes.append(f"note: ignored {sum(ignored.values())} entries outside the VAE: {groups}")
  return selected


def _read_torch(path: Path, notes: list[str]) -> dict[str, np.ndarray]:
  obj = read_torch(path, notes)
  if not isinstance(obj, dict):
    raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
  if isinstance(obj.get("state_dict"), dict):    # Lightning / LDM .ckpt
    others = ", ".join(sorted(map(str, set(obj) - {"state_dict"})))
    notes.append("note: using the file's 'state_dict' entry" + (f" (it also holds {others})" if others else ""))
    obj = obj["state_dict"]
  obj = {str(k): v for k, v in obj.items()}
  return {name: as_numpy(key, obj[key], "a VAE state dict") for key, name in vae_keys(list(obj), notes).items()}


def read_vae_state_dict(path: Path, notes: list[str]) -> dict[str, np.ndarray]:
  """The VAE tensors of a .safetensors or PyTorch file, keyed without any whole-checkpoint prefix."""
  if path.suffix == ".safetensors":   # the VAE's tensors only: a whole SD checkpoint is not loaded
    return read_safetensors(path, select=lambda keys: vae_keys(keys, notes))
  return _read_torch(path, notes)


# Key schemas --------------------------------------------------------------------------------------
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_BLOCK_INDEX = re.compile(r"^encoder\.down(?:_blocks)?\.(\d+)\.")


def _rules(num_blocks: int) -> list[tuple[str, re.Pattern, Callable[[re.Match], str | None]]]:
  """(schema, pattern, replacement) renaming a legacy or LDM key prefix to its diffusers name; a
  replacement of None leaves the key as it is (and so, unexpected).

  LDM numbers the decoder's up blocks from the lowest resolution (`up.{n-1}` runs first); diffusers
  numbers them in execution order: up_blocks.{i} = up.{n-1-i}.
  """
  def shortcut(m: re.Match) -> str:
    return "conv_shortcut." if m[0].endswith("nin_shortcut.") else ""

  def up(m: re.Match, rest: str) -> str | None:
    k = int(m[1])
    return f"decoder.up_blocks.{num_blocks - 1 - k}.{rest}" if k < num_blocks else None

  resnet = r"(?:nin_shortcut\.)?"
  return [
      ("legacy diffusers", re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(query|key|value|proj_attn)\."),
       lambda m: f"{m[1]}.mid_block.attentions.0.{_LEGACY_ATTENTION[m[2]]}."),
      ("LDM", re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\." + resnet),
       lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{shortcut(m)}"),
      ("LDM", re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\."),
       lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv."),
      ("LDM", re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\." + resnet),
       lambda m: up(m, f"resnets.{m[2]}.{shortcut(m)}")),
      ("LDM", re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\."), lambda m: up(m, "upsamplers.0.conv.")),
      ("LDM", re.compile(r"^(encoder|decoder)\.mid\.block_([12])\." + resnet),
       lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{shortcut(m)}"),
      ("LDM", re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\."),
       lambda m: f"{m[1]}.mid_block.attentions.0.{_LDM_ATTENTION[m[2]]}."),
      ("LDM", re.compile(r"^(encoder|decoder)\.norm_out\."), lambda m: f"{m[1]}.conv_norm_out."),
  ]


def to_diffusers_names(state_dict: dict[str, np.ndarray], notes: list[str]
                       ) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
  """(tensors under diffusers names, diffusers name -> source name, duplicates).

  LDM's attention q / k / v / proj_out are 1x1 convolutions: their (C, C, 1, 1) weights become the
  (C, C) Linear weights diffusers uses. Two source keys that land on one name are duplicates.
  """
  indices = [int(m[1]) for m in map(_BLOCK_INDEX.match, state_dict) if m]
  rules = _rules(1 + max(indices or [0]))
  out, source, duplicates, renamed = {}, {}, [], Counter()
  for key, array in state_dict.items():
    name = key
    for rule_schema, pattern, replace in rules:
      m = pattern.match(key)
      prefix = replace(m) if m else None
      if prefix is not None:
        name = prefix + key[m.end():]
        renamed[rule_schema] += 1
        if ".mid.attn_1." in key and key.endswith(".weight") and array.ndim > 2 and set(array.shape[2:]) == {1}:
          array = array.reshape(array.shape[:2])
        break
    if name in source:
      duplicates.append(f"{source[name]} and {key} (both {name})")
      continue
    out[name], source[name] = array, key
  if renamed:
    counts = ", ".join(f"{n} {schema} keys" for schema, n in renamed.most_common())
    notes.append(f"note: renamed to diffusers names: {counts}")
  return out, source, duplicates


# Geometry -----------------------------------------------------------------------------------------
def describe(cfg: VAEConfig) -> str:
  return (f"AutoencoderKL: block_out_channels {list(cfg.block_out_channels)}, layers_per_block "
          f"{cfg.layers_per_block}, {cfg.norm_num_groups} groups, {cfg.in_channels}->{cfg.latent_channels}->"
          f"{cfg.out_channels} channels, scaling_factor {cfg.scaling_factor}")


def _make_config(**fields) -> VAEConfig:
  try:
    return VAEConfig(**fields)
  except (UserError, TypeError) as e:
    raise ConversionError(f"unsupported VAE geometry: {e}") from None


def config_from_diffusers(d: dict[str, Any], *, norm_num_groups: int | None = None,
                          scaling_factor: float | None = None) -> VAEConfig:
  """The VAEConfig of a diffusers AutoencoderKL config.json (absent fields take diffusers' defaults);
  refuses what this implementation does not cover and flags that contradict the file."""
  widths = list(d.get("block_out_channels", [64]))
  down, up = ["DownEncoderBlock2D"], ["UpDecoderBlock2D"]
  supported = {
      "_class_name": ("AutoencoderKL", d.get("_class_name", "AutoencoderKL")),
      "down_block_types": (down * len(widths), list(d.get("down_block_types", down))),
      "up_block_types": (up * len(widths), list(d.get("up_block_types", up))),
      "act_fn": ("silu", d.get("act_fn", "silu")),
      "use_quant_conv": (True, d.get("use_quant_conv", True)),
      "use_post_quant_conv": (True, d.get("use_post_quant_conv", True)),
      "mid_block_add_attention": (True, d.get("mid_block_add_attention", True)),
      "shift_factor": (None, d.get("shift_factor")),
  }
  bad = [f"{k} {got!r} (supported: {want!r})" for k, (want, got) in supported.items() if got != want]
  if bad:
    raise ConversionError("config.json describes a VAE this implementation does not cover: " + "; ".join(bad))
  stored = {"norm_num_groups": d.get("norm_num_groups", 32), "scaling_factor": d.get("scaling_factor", 0.18215)}
  for name, flag in (("norm_num_groups", norm_num_groups), ("scaling_factor", scaling_factor)):
    if flag is not None and flag != stored[name]:
      raise ConversionError(f"--{name} {flag} contradicts config.json ({name} {stored[name]})")
  return _make_config(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
                      latent_channels=d.get("latent_channels", 4), block_out_channels=tuple(widths),
                      layers_per_block=d.get("layers_per_block", 1), **stored)


def infer_config(shapes: dict[str, tuple], notes: list[str], *, norm_num_groups: int | None = None,
                 scaling_factor: float | None = None) -> VAEConfig:
  """The VAEConfig the tensor shapes (diffusers names) describe; groups and scale from the flags."""
  num_blocks = 1 + max([int(m[1]) for m in map(_BLOCK_INDEX.match, shapes) if m] or [-1])
  layers = 1 + max([int(m[1]) for m in map(re.compile(r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.").match, shapes)
                    if m] or [-1])
  anchors = ["encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight",
             *(f"encoder.down_blocks.{i}.resnets.0.conv1.weight" for i in range(num_blocks))]
  absent = [k for k in anchors if k not in shapes]
  if num_blocks == 0 or layers == 0 or absent:
    raise ConversionError("incomplete AutoencoderKL state dict: cannot read its geometry without "
                          + ", ".join(absent or ["encoder.down_blocks.0.resnets.0.*"]))
  bad = [f"{k} {shapes[k]}" for k in anchors if len(shapes[k]) != 4]
  if bad:
    raise ConversionError(f"not AutoencoderKL conv weights: {', '.join(bad)}")
  moments = shapes["encoder.conv_out.weight"][0]
  if moments % 2:
    raise ConversionError(f"encoder.conv_out has {moments} outputs; an AutoencoderKL has 2 x latent channels "
                          "(mean and log-variance)")
  defaults = (("norm_num_groups", SD_VAE.norm_num_groups, norm_num_groups),
              ("scaling_factor", SD_VAE.scaling_factor, scaling_factor))
  assumed = [f"{name} {default}" for name, default, flag in defaults if flag is None]
  if assumed:
    notes.append("note: a bare state dict does not record the GroupNorm group count or the latent scale: assumed "
                 f"{', '.join(assumed)} (the SD VAE's; pass --norm_num_groups / --scaling_factor for another VAE)")
  return _make_config(
      in_channels=shapes["encoder.conv_in.weight"][1], out_channels=shapes["decoder.conv_out.weight"][0],
      latent_channels=moments // 2, layers_per_block=layers,
      block_out_channels=tuple(shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(num_blocks)),
      norm_num_groups=SD_VAE.norm_num_groups if norm_num_groups is None else norm_num_groups,
      scaling_factor=SD_VAE.scaling_factor if scaling_factor is None else scaling_factor)


# Mapping ------------------------------------------------------------------------------------------
def key_table(cfg: VAEConfig) -> dict[str, tuple[tuple, tuple | None]]:
  """Diffusers key -> (NNX state path, permutation) for every tensor of `cfg`.

  The NNX path is the key itself (the model mirrors the diffusers tree), with `to_out.0` -> `to_out`
  and the leaf renamed: a conv / linear `weight` is a `kernel`, a GroupNorm `weight` a `scale`.
  """
  table: dict[str, tuple[tuple, tuple | None]] = {}

  def add(module: str, kind: str) -> None:
    path = tuple(int(p) if p.isdigit() else p for p in module.replace("to_out.0", "to_out").split("."))
    leaf, perm = {"conv": ("kernel", _CONV), "linear": ("kernel", _LINEAR), "norm": ("scale", None)}[kind]
    table[f"{module}.weight"] = (path + (leaf,), perm)
    table[f"{module}.bias"] = (path + ("bias",), None)

  def resnet(module: str, cin: int, cout: int) -> None:
    for name, kind in (("norm1", "norm"), ("conv1", "conv"), ("norm2", "norm"), ("conv2", "conv")):
      add(f"{module}.{name}", kind)
    if cin != cout:
      add(f"{module}.conv_shortcut", "conv")

  def mid_block(module: str, width: int) -> None:
    resnet(f"{module}.resnets.0", width, width)
    add(f"{module}.attentions.0.group_norm", "norm")
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
      add(f"{module}.attentions.0.{name}", "linear")
    resnet(f"{module}.resnets.1", width, width)

  widths, n = cfg.block_out_channels, len(cfg.block_out_channels)
  add("encoder.conv_in", "conv")
  for i in range(n):
    for j in range(cfg.layers_per_block):
      resnet(f"encoder.down_blocks.{i}.resnets.{j}", widths[max(i - 1, 0)] if j == 0 else widths[i], widths[i])
    if i < n - 1:
      add(f"encoder.down_blocks.{i}.downsamplers.0.conv", "conv")
  mid_block("encoder.mid_block", widths[-1])
  add("encoder.conv_norm_out", "norm")
  add("encoder.conv_out", "conv")
  add("quant_conv", "conv")
  add("post_quant_conv", "conv")
  add("decoder.conv_in", "conv")
  mid_block("decoder.mid_block", widths[-1])
  reversed_widths = widths[::-1]
  for i in range(n):
    for j in range(cfg.layers_per_block + 1):
      cin = reversed_widths[max(i - 1, 0)] if j == 0 else reversed_widths[i]
      resnet(f"decoder.up_blocks.{i}.resnets.{j}", cin, reversed_widths[i])
    if i < n - 1:
      add(f"decoder.up_blocks.{i}.upsamplers.0.conv", "conv")
  add("decoder.conv_norm_out", "norm")
  add("decoder.conv_out", "conv")
  return table


def abstract_shapes(cfg: VAEConfig) -> dict[tuple, tuple[tuple, np.dtype]]:
  """NNX state path -> (shape, dtype) of the VAE `cfg` describes, without allocating it."""
  state = nnx.state(nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0))))
  return {path: (v.get_value().shape, np.dtype(v.get_value().dtype)) for path, v in nnx.to_flat_state(state)}


def _torch_shape(target: tuple, perm) -> tuple:
  if perm is None:
    return tuple(target)
  shape = [0] * len(perm)
  for j, axis in enumerate(perm):
    shape[axis] = target[j]
  return tuple(shape)


def check_keys(shapes: dict[str, tuple], source: dict[str, str], duplicates: list[str], cfg: VAEConfig,
               targets: dict[tuple, tuple]) -> None:
  """Raise one ConversionError listing every missing, unexpected, duplicated and mismatched key.

  `shapes` uses diffusers names; the messages name unexpected and mismatched tensors as the file
  does (`source`), and missing ones by their diffusers names.
  """
  table = key_table(cfg)
  missing = [k for k in table if k not in shapes]
  unexpected = [source[k] for k in shapes if k not in table]
  mismatched, unfilled = [], sorted(set(targets) - {path for path, _ in table.values()}, key=str)
  for key, (path, perm) in table.items():
    if key in shapes and path not in targets:
      mismatched.append(f"{source[key]} (the model has no variable {path})")
    elif key in shapes:
      want = _torch_shape(targets[path][0], perm)
      if tuple(shapes[key]) != want:
        mismatched.append(f"{source[key]} {tuple(shapes[key])} (expected {want})")
  check_problems(describe(cfg), [("missing", missing), ("unexpected", unexpected), ("given twice", duplicates),
                                 ("mismatched", mismatched), ("model variables without a source", unfilled)])


def to_nnx_params(state_dict: dict[str, np.ndarray], cfg: VAEConfig, targets: dict[tuple, tuple],
                  notes: list[str]) -> dict[str, Any]:
  """The nested pure dict (NNX state layout) that `load_vae` restores; tensors cast to float32."""
  flat, cast = {}, Counter()
  for key, (path, perm) in key_table(cfg).items():
    array = state_dict[key] if perm is None else np.transpose(state_dict[key], perm)
    dtype = targets[path][1]
    if array.dtype != dtype:
      cast[f"{array.dtype} -> {dtype}"] += 1
    flat[path] = np.ascontiguousarray(array, dtype=dtype)
  if cast:
    notes.append(f"note: cast tensors {', '.join(f'{c} ({n})' for c, n in sorted(cast.items()))}")
  return traverse_util.unflatten_dict(flat)


# Entry point --------------------------------------------------------------------------------------
def convert(src: Path, dst: Path, *, norm_num_groups: int | None = None, scaling_factor: float | None = None,
            overwrite: bool = False) -> tuple[VAEConfig, dict[str, Any], list[str]]:
  """Convert `src` into the VAE directory `dst`; returns the config, a summary and the notes to show."""
  try:
    checkpoints.check_destination(dst, overwrite)
  except checkpoints.DestinationExistsError as e:
    raise ConversionError(str(e)) from None
  notes: list[str] = []
  if src.is_dir():
    weights, diffusers_config = _diffusers_folder(src, notes)
  elif src.is_file():
    weights, diffusers_config = src, None
  else:
    raise ConversionError(f"{src} does not exist")
  state_dict, source, duplicates = to_diffusers_names(read_vae_state_dict(weights, notes), notes)
  shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
  if diffusers_config is not None:
    cfg = config_from_diffusers(diffusers_config, norm_num_groups=norm_num_groups, scaling_factor=scaling_factor)
  else:
    cfg = infer_config(shapes, notes, norm_num_groups=norm_num_groups, scaling_factor=scaling_factor)
  targets = abstract_shapes(cfg)
  check_keys(shapes, source, duplicates, cfg, targets)
  params = to_nnx_params(state_dict, cfg, targets, notes)
  write_vae_dir(dst, params, cfg, overwrite=overwrite)
  summary = {"tensors": len(state_dict), "parameters": int(sum(np.prod(s) for s, _ in targets.values()))}
  return cfg, summary, notes


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = {"flag_values": flag_values}
  flags.DEFINE_string("src", None, "diffusers AutoencoderKL folder, or a .safetensors / .bin / .ckpt / .pt file",
                      required=True, **fv)
  flags.DEFINE_string("dst", None, "VAE directory to create", required=True, **fv)
  flags.DEFINE_integer("norm_num_groups", None, "GroupNorm groups of a bare file (default 32; checked against a "
                       "folder's config.json)", **fv)
  flags.DEFINE_float("scaling_factor", None, "latent scale of a bare file (default 0.18215; checked against a "
                     "folder's config.json)", **fv)
  flags.DEFINE_bool("overwrite", False, "replace an existing non-empty --dst", **fv)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  del argv  # positional words: refused by cli.guarded
  f = flag_values
  dst = Path(f.dst)
  cfg, summary, notes = convert(Path(f.src), dst, norm_num_groups=f.norm_num_groups,
                                scaling_factor=f.scaling_factor, overwrite=f.overwrite)
  for note in notes:
    print(note, file=sys.stderr)
  print(f"wrote {dst}: {describe(cfg)} ({summary['tensors']} tensors, {summary['parameters']:,} parameters)")


if __name__ == "__main__":
  cli.run(main, define_flags)
