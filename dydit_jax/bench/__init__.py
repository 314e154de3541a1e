"""Benchmarks: dense DiT vs dynamic DyDiT speed, honest compute accounting, train-step throughput.

  python -m dydit_jax.bench --model DiT-XL/2 --batch 128 --routers synthetic:0.5 \
      --samplers ddpm250,ddim50 --steps_limit 50 --json bench.json
  rows = run(BenchConfig(model="DiT-S/8", batch=1, parts=("chain",)))     # the same, from Python

The top floor of the package: it times the `dydit_jax.sampler.Sampler` users run and costs the
engine's pieces; nothing below (models, diffusion, engine, train) imports it. Modules: `config` (the
frozen `BenchConfig`, also the CLI's flags), `parts` (the table's parts: matmul, forward, chain,
calls, cost), `measure` (timing, table), `cost` (analytic vs XLA-counted MACs and bytes),
`synthetic` and `calibration` (routers with a chosen MACs ratio), `profile_summary` (where device
time goes in a trace), `train_step` (the trainer's step throughput). No clu / TensorFlow import:
this runs on a bare GPU image.
"""
from __future__ import annotations

import dataclasses
import json

import jax

from dydit_jax.bench.config import BenchConfig
from dydit_jax.bench.measure import Table
from dydit_jax.bench.parts import Bench

__all__ = ["BenchConfig", "run"]


def run(config: BenchConfig) -> list[dict]:
  """Runs the parts of `config` in order; returns the table's rows (also printed, and written to
  `config.json` when set). A part that fails adds an ERROR row and the next one runs."""
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; model "
        f"{config.ckpt or config.model} {config.image_size}px, {config.dtype} (residual {config.residual_dtype}), "
        f"batch {config.batch} images, cfg {config.cfg_scale or 'off'}, routers {config.router_spec}", flush=True)
  table = Table()
  bench = Bench(config, table)
  try:
    bench.setup()
  except Exception as e:  # noqa: BLE001 - nothing else can run without models
    bench.error("setup", e)
    return table.rows
  for part in config.parts:  # "name" or "name:arg:arg", e.g. chain:cudnn:ddpm250
    name, *part_args = part.split(":")
    try:
      getattr(bench, f"part_{name}")(*part_args)
    except Exception as e:  # noqa: BLE001
      bench.error(part, e)
  print("\n## summary\n")
  printed = Table()
  for row in table.rows:
    printed.add(**row)
  if config.json:
    with open(config.json, "w") as f:
      json.dump({"device": device.device_kind, "config": dataclasses.asdict(config), "rows": table.rows}, f,
                indent=1, default=str)
  return table.rows
