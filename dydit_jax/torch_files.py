"""Reading PyTorch checkpoints (.pt / .pth / .bin / .ckpt, .safetensors) into numpy, for the converters.

Both converters (`dydit_jax.convert` for DiT / DyDiT, `dydit_jax.vae.convert` for the SD VAE) read
foreign files the same way and fail the same way: one `ConversionError` (a `UserError`) whose message
names the file and the first line of what went wrong. PyTorch is needed only for pickled files;
.safetensors files are read with numpy.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from dydit_jax.errors import UserError


class ConversionError(UserError):
  """A problem with a converter's input or arguments, reported as one message without a traceback."""


def first_line(e: BaseException) -> str:
  """'Type: first line of the message', for naming a foreign library's error in ours."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"


def read_torch(path: Path, notes: list[str]) -> Any:
  """The object pickled in `path`: `torch.load(weights_only=True)` first; other pickles are loaded
  with weights_only=False and a note (convert only files you trust)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConversionError("reading .pt files needs PyTorch (pip install 'dydit_jax[convert]'); "
                          ".safetensors files do not") from None
  # Training dicts pickle their argparse Namespace: allow exactly that class in the safe loader.
  torch.serialization.add_safe_globals([argparse.Namespace])
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as safe_error:
    try:
      obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # pylint: disable=broad-except
      raise ConversionError(f"cannot read {path} as a PyTorch checkpoint, is it corrupt? "
                            f"({first_line(safe_error)})") from None
    notes.append(f"note: {path.name} pickles Python objects other than tensors and argparse.Namespace, so it "
                 "was loaded with torch.load(weights_only=False); convert only files you trust")
    return obj
  except Exception as e:  # pylint: disable=broad-except  (torch raises RuntimeError, EOFError, ...)
    raise ConversionError(f"cannot read {path} as a PyTorch checkpoint, is it truncated or corrupt? "
                          f"({first_line(e)})") from None


def read_safetensors(path: Path, select=None) -> dict[str, np.ndarray]:
  """Tensors of a .safetensors file as numpy arrays (bfloat16 too: JAX's ml_dtypes gives numpy the
  dtype). select(keys) -> {file key: name to return}: read only those (e.g. the VAE of a whole SD
  checkpoint); default all, under their own names."""
  try:
    with safe_open(str(path), framework="numpy") as f:
      keys = list(f.keys())
      chosen = select(keys) if select else {k: k for k in keys}
      return {name: f.get_tensor(key) for key, name in chosen.items()}
  except ConversionError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"cannot read {path} as a safetensors file, is it truncated or corrupt? "
                          f"({first_line(e)})") from None


def as_numpy(name: str, value: Any, what: str) -> np.ndarray:
  """A state-dict entry as a numpy array (floats of any width as float32); `what` names the kind of
  state dict expected, for the error."""
  if isinstance(value, np.ndarray):
    return value
  if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()
  raise ConversionError(f"entry {name!r} is a {type(value).__name__}, not a tensor: this is not {what}")


LIST_LIMIT = 12   # keys named per kind of problem; the rest are counted


def check_problems(what: str, problems: list[tuple[str, list]]) -> None:
  """Raise one ConversionError listing every kind of key problem that is not empty: the header line
  "the state dict does not match WHAT: 2 missing, 1 unexpected", then one line per kind."""
  problems = [(name, items) for name, items in problems if items]
  if not problems:
    return
  lines = [f"the state dict does not match {what}: " + ", ".join(f"{len(items)} {n}" for n, items in problems)]
  for name, items in problems:
    more = f" ... and {len(items) - LIST_LIMIT} more" if len(items) > LIST_LIMIT else ""
    lines.append(f"  {name}: {', '.join(map(str, items[:LIST_LIMIT]))}{more}")
  raise ConversionError("\n".join(lines))
