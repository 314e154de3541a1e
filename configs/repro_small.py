"""The lambda sweep at small scale: the demo's DiT, fine-tuned into DyDiT at lambda 0.9 / 0.7 / 0.5 / 0.3,
against the dense control the DyDiT paper lacks, each scored by the digit judge and timed on the CPU.

Run (writes results.md, results.json, quality_vs_macs.png, a sample grid per model and sampler and a
width plot per lambda into the workdir, see dydit_jax/train/sweep.py; rerunning continues a killed sweep):

  python -m dydit_jax.main --config=configs/repro_small.py --workdir=/tmp/dydit_sweep

Reduced sweep for CI (checks the pipeline's invariants, not the quality: a few steps per stage, 2
samples per class, 10 sampling steps):

  python -m dydit_jax.main --config=configs/repro_small.py:quick=1 --workdir=/tmp/dydit_sweep_quick

Arguments (after ':'): quick (bool).

The recipe is the demo's (configs/demo.py, loaded from this folder: one recipe, not a copy): the same
data, model, DiT pre-training and DyDiT fine-tuning settings. What the sweep sets, and why:
  total_steps   the fine-tune length of every model, DyDiT and control alike: 10% of the DiT's
                pre-training steps (150; the paper fine-tunes DiT-XL/2 for < 3% of its 7M steps, DiT-S
                for 50k steps; at a few hundred CPU steps the routers need the 10%: the measured
                ratios land within 0.04 of lambda, docs/results.md)
  lams          0.9 / 0.7 / 0.5 / 0.3: the paper's range and below it, so the trend has four points
  samplers      DDPM and DDIM at 25 steps, CFG 4 as the demo, noise a function of (config.sample.seed,
                image index): fixed seeds. 25, not the demo's 50: 24,000 samples fit the time budget,
                and on the demo's models 25 steps scored as 50 did (DDPM-25 / DDPM-50 / DDIM-25 /
                DDIM-50 judge accuracy 0.965 / 0.94 / 0.935 / 0.935 for the DiT, 200 samples)
  num_samples   2,000 per model and sampler (200 per class): the Frechet distance of 64-d judge
                features needs many more samples than dimensions to be stable, and its bootstrap spread
                (config.sweep.bootstrap resamples) says how stable
  batch         500 images per sampling call (1,000 rows with CFG): large enough to keep 2 cores busy
Quick: the demo's quick stages (DiT 20 steps, a 100-step judge, the lambda ramp over 20 steps) with
40 fine-tune steps, lambdas 0.9 and 0.3 only (the test checks that the measured
MACs ratio follows lambda: both ends of the range say it), DDPM and DDIM at 10 steps, 20 samples.
"""
import importlib.util
from pathlib import Path

from dydit_jax.train.config import parse_arg


def _demo_config(quick: bool):
  spec = importlib.util.spec_from_file_location("configs_demo", Path(__file__).with_name("demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(f"quick={int(quick)}")


def get_config(arg=None):
  arg = parse_arg(arg, quick=False)
  c = _demo_config(arg.quick)
  c.mode = "sweep"
  s = c.sweep
  if arg.quick:
    c.total_steps = 40
    s.lams = (0.9, 0.3)
    s.sampling_steps = 10
    s.num_samples = 20
    s.batch = 20
    s.bootstrap = 5
    s.grid_per_class = 2
  else:
    c.total_steps = c.demo.dit_steps // 10
    s.lams = (0.9, 0.7, 0.5, 0.3)
    s.sampling_steps = 25
    s.num_samples = 2000
    s.batch = 500
    s.bootstrap = 20
    s.grid_per_class = 8
  s.samplers = ("ddpm", "ddim")
  return c
