"""SD VAE cost per image: `python -m dydit_jax.bench.vae --image_size 256 --batch 1 --dtype float32`.

Jits `AutoencoderKL.decode` (latents -> pixels) and `.encode(...).mean` of the sd-vae-ft channel
config (random weights: the cost does not depend on them) and prints, per image, XLA's MAC count
(cost-analysis FLOPs / 2, of the compiled program), compile seconds and the wall time of one call after
a warm-up call. What a decode costs next to the DiT chain that produced its latents: docs/benchmarks.md.
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from dydit_jax import cli
from dydit_jax.errors import UserError
from dydit_jax.vae import SD_VAE, AutoencoderKL

FLAGS = flags.FLAGS


def measure(image_size: int = 256, batch: int = 1, dtype: str = "float32", *, run: bool = True
            ) -> dict[str, dict[str, float]]:
  """{"decode" | "encode": {"gmacs_per_image", "compile_s"[, "s_per_image"]}}; run=False compiles
  on abstract weights only (the MAC count, no weights made, nothing timed)."""
  if image_size % 8:
    raise UserError(f"--image_size must be a multiple of 8, got {image_size}")
  cfg = SD_VAE.replace(dtype=dtype)
  build = lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(build() if run else nnx.eval_shape(build))
  side = image_size // 8
  programs = {"decode": (lambda s, z: nnx.merge(graphdef, s).decode(z),
                         jnp.zeros((batch, side, side, cfg.latent_channels))),
              "encode": (lambda s, x: nnx.merge(graphdef, s).encode(x).mean,
                         jnp.zeros((batch, image_size, image_size, cfg.in_channels)))}
  if not run:
    programs = {k: (f, jax.ShapeDtypeStruct(a.shape, a.dtype)) for k, (f, a) in programs.items()}
  out = {}
  for name, (fn, arg) in programs.items():
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(state, arg).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out[name] = {"gmacs_per_image": cost["flops"] / 2 / batch / 1e9, "compile_s": compile_s}
    if run:
      jax.block_until_ready(compiled(state, arg))
      start = time.perf_counter()
      jax.block_until_ready(compiled(state, arg))
      out[name]["s_per_image"] = (time.perf_counter() - start) / batch
  return out


def define_flags():
  flags.DEFINE_integer("image_size", 256, "pixels per side (latents are 1/8 of it)")
  flags.DEFINE_integer("batch", 1, "images per call")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")


def main(argv):
  del argv  # positional words: refused by cli.guarded
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(json.dumps(measure(FLAGS.image_size, FLAGS.batch, FLAGS.dtype), indent=1))


if __name__ == "__main__":
  cli.run(main, define_flags)
