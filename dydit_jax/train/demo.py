"""The demo: DiT -> DyDiT on the embedded MNIST digits, end to end on a laptop CPU.

  python -m dydit_jax.main --config=configs/demo.py --workdir=DIR

1. trains a small pixel-space DiT from scratch (DIR/dit, an ordinary resumable training workdir),
2. fine-tunes it into a DyDiT at lambda (DIR/dydit, initialized from DIR/dit exactly like an ImageNet
   run is initialized from a converted DiT-XL/2),
3. samples a class-conditional grid from both EMA models (eval mode) and writes into DIR:
     samples_dit.png, samples_dydit.png   one row per digit class
     active_widths.png                   open heads / MLP groups per layer over the sampling steps
                                         (the engine's WidthPlan of the DyDiT at the sampler's t)
     summary.json                        steps, final losses, train steps/s, wall time, the DyDiT's
                                         measured FLOPs ratio over the sampling run, and both grids'
                                         class accuracy and Frechet distance under the digit judge
The measured ratio is the official block-MACs ratio (dydit_jax.models.flops.macs_ratio) of the eval
masks of every model call of the chain (CFG rows included); the demo is tuned so it lands within
+-0.05 of lambda. The judge (dydit_jax.judge: a small CNN trained on the embedded digits, cached in
DIR/judge) says whether the samples are digits of their row's class, so "the demo works" is a number
and not only a picture. Both stages resume after an interruption; a finished stage is not rerun.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from dydit_jax import checkpoints, images
from dydit_jax.engine.plan import WidthPlan
from dydit_jax.evaluation.metrics import Statistics
from dydit_jax.judge import DigitJudge, JudgeSettings
from dydit_jax.sampler import SampleOptions, Sampler, class_labels
from dydit_jax.train import loop
from dydit_jax.train.logging import read_metrics

TOLERANCE = 0.05


def stage_configs(config: ml_collections.ConfigDict, workdir: epath.Path):
  """(DiT pre-training config, DyDiT fine-tuning config) derived from the demo config."""
  demo = config.demo
  dit = ml_collections.ConfigDict(config.to_dict())
  dit.mode = "train"
  dit.model.dynamic = False
  dit.from_scratch, dit.init_checkpoint = True, ""
  dit.total_steps = demo.dit_steps
  dit.optimizer.lr = demo.dit_lr
  dit.ema_decay = demo.dit_ema_decay
  dit.grad_clip_norm = 0.0            # DiT trains without clipping
  dydit = ml_collections.ConfigDict(config.to_dict())
  dydit.mode = "train"
  dydit.model.dynamic = True
  dydit.from_scratch, dydit.init_checkpoint = False, str(workdir / "dit")
  del dit.demo, dydit.demo
  return dit, dydit


def stage_report(summary: dict[str, Any], workdir: epath.Path) -> dict[str, Any]:
  """Steps, speed and the last logged metrics (from metrics.jsonl, so a rerun reports them too)."""
  keys = ("loss", "mse", "vb", "flops_loss", "flops_ratio", "lam", "complete_loss", "skipped", "grad_norm")
  last = next((row for row in reversed(read_metrics(str(workdir))) if "loss" in row), {})
  speed = summary["steps_per_sec"]
  return {"steps": summary["step"], "train_steps_per_sec": speed if np.isfinite(speed) else None,
          "wall_time_s": summary["wall_time_s"], "final_metrics": {k: last[k] for k in keys if k in last}}


def load_judge(config: ml_collections.ConfigDict, root: epath.Path, num_samples: int
               ) -> tuple[DigitJudge, Statistics, dict[str, Any]]:
  """The workdir's digit judge, the statistics of its held-out digits (the reference every sample set
  is compared with) and its report: own accuracy, and the FD `num_samples` real digits score."""
  judge = DigitJudge.load_or_train(root / "judge", JudgeSettings(steps=config.demo.judge_steps))
  real = judge.real_digits()[0]
  reference = judge.stats(real)
  return judge, reference, {"held_out_accuracy": judge.held_out_accuracy, "held_out_digits": len(real),
                            "real_baseline_fd": judge.real_baseline_fd(num_samples, reference)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  start = time.time()
  root = epath.Path(workdir)
  dit_config, dydit_config = stage_configs(config, root)
  report: dict[str, Any] = {"lambda": config.dydit.lam}
  for name, stage in (("dit", dit_config), ("dydit", dydit_config)):
    logging.info("demo stage %s -> %s", name, root / name)
    summary = loop.train(stage, str(root / name))
    if summary["preempted"]:
      logging.warning("demo interrupted in stage %s; rerun the same command to continue", name)
      return {"preempted": True, "stage": name}
    report[name] = stage_report(summary, root / name)

  s = config.sample
  labels = class_labels(range(config.model.num_classes), s.per_class)
  options = SampleOptions(sampler=s.sampler, steps=s.steps, cfg_scale=s.cfg_scale)
  key = jax.random.PRNGKey(s.seed)
  judge, real_stats, report["judge"] = load_judge(config, root, len(labels))
  models, results = {}, {}
  for name in ("dit", "dydit"):
    models[name] = checkpoints.load_model(str(root / name))
    results[name] = result = Sampler(models[name], options).generate(labels, key)
    if jax.process_index() == 0:
      images.save_grid(images.to_uint8(result.samples), root / f"samples_{name}.png", ncols=s.per_class)
    score = judge.score(result.samples, labels, real_stats)
    report[name].update(class_accuracy=score.class_accuracy, frechet_distance=score.frechet_distance)
    logging.info("demo %s samples: class accuracy %.3f, Frechet distance %.1f (%d real digits: %.1f; "
                 "judge accuracy on held-back digits %.3f)", name, report[name]["class_accuracy"],
                 report[name]["frechet_distance"], len(labels), report["judge"]["real_baseline_fd"],
                 judge.held_out_accuracy)
    report[name]["sampling_flops_ratio"] = result.flops_ratio
    report[name]["sampling_macs_ratio_whole_forward"] = result.macs_ratio
    report[name]["sampling_open_fractions"] = {"heads": float(result.head.mean()),
                                               "groups": float(result.group.mean()),
                                               "tokens": float(result.token.mean())}
  # The heatmap comes from the engine's width plan; it must agree with the masks sampling used.
  plan = WidthPlan.from_model(models["dydit"], results["dydit"].timesteps)
  if not np.allclose(plan.head_counts / plan.config.num_heads, results["dydit"].head):
    raise AssertionError("the width plan disagrees with the head masks the model used while sampling")
  if jax.process_index() == 0:
    plan.plot(root / "active_widths.png")
  ratio = report["dydit"]["sampling_flops_ratio"]
  report.update(sampling=dict(dataclasses.asdict(options), num_samples=len(labels)),
                flops_ratio_error=ratio - config.dydit.lam,
                flops_ratio_within_tolerance=bool(abs(ratio - config.dydit.lam) <= TOLERANCE),
                width_plan=plan.summary(), wall_time_s=time.time() - start)
  if jax.process_index() == 0:
    (root / "summary.json").write_text(json.dumps(report, indent=2))
  logging.info("demo done: DyDiT FLOPs ratio %.3f (lambda %.2f), files in %s", ratio, config.dydit.lam, root)
  return report
