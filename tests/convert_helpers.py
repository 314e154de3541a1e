"""Shared pieces of the converter / parity tests: random PyTorch models, conversion, comparison."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch

import torch_reference as tr
from absl import flags

from dydit_jax import checkpoints, cli, convert

REPO = Path(__file__).resolve().parents[1]
# fp32 parity bound on the relative L2 error of whole-model outputs (observed ~1e-6 on CPU).
PARITY_RTOL = 1e-5


def torch_model(seed: int = 0, router_gain: float = 1.0, **geometry) -> tr.DiT:
  """A reference DiT / DyDiT in eval mode with every parameter (adaLN-Zero included) random."""
  return tr.randomize_(tr.DiT(**geometry).eval(), seed, router_gain)


def random_inputs(model: tr.DiT, batch: int, seed: int):
  """x (B,C,H,W), t in 0..999, y in 0..num_classes (the null class included)."""
  gen = torch.Generator().manual_seed(seed)
  side = int(model.pos_embed.shape[1] ** 0.5) * model.patch_size
  x = torch.randn(batch, model.in_channels, side, side, generator=gen)
  t = torch.randint(0, 1000, (batch,), generator=gen)
  y = torch.randint(0, model.y_embedder.embedding_table.num_embeddings, (batch,), generator=gen)
  return x, t, y


def convert_main(src, dst, *args: str) -> int:
  """The converter's CLI (its flags, its error guard), in-process: no jax import per call; exit status."""
  values = flags.FlagValues()
  convert.define_flags(values)
  values(["convert", f"--src={src}", f"--dst={dst}", *args])
  try:
    cli.guarded(convert.main)(["convert"], values)
  except SystemExit as e:
    return e.code
  return 0


def run_cli(src, dst, *flags: str) -> subprocess.CompletedProcess:
  """The real `python -m dydit_jax.convert` in a subprocess."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
  return subprocess.run([sys.executable, "-m", "dydit_jax.convert", "--src", str(src), "--dst", str(dst), *flags],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def save_and_convert(model: tr.DiT, tmp_path: Path, *flags: str, name: str = "model"):
  """torch.save the state dict, convert it in-process, and load the result with `load_model`."""
  src, dst = tmp_path / f"{name}.pt", tmp_path / name
  torch.save(model.state_dict(), src)
  assert convert_main(src, dst, *flags) == 0
  return checkpoints.load_model(dst)


def to_jax(x, t, y):
  """Torch (NCHW) inputs as JAX (NHWC) inputs."""
  return jnp.asarray(x.permute(0, 2, 3, 1).numpy()), jnp.asarray(t.numpy()), jnp.asarray(y.numpy())


def jax_forward(model, x, t, y, **kwargs):
  """Call the JAX model on NCHW torch inputs; outputs come back NCHW numpy (masks as numpy)."""
  out = model(*to_jax(x, t, y), **kwargs)
  if isinstance(out, tuple):
    return np.asarray(out[0]).transpose(0, 3, 1, 2), {k: np.asarray(v) for k, v in out[1].items()}
  return np.asarray(out).transpose(0, 3, 1, 2)


def rel_l2(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))
