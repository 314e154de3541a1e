"""The lambda sweep: the demo's DiT fine-tuned into DyDiT at several lambdas, against a dense control.

  python -m dydit_jax.main --config=configs/repro_small.py --workdir=DIR

Stages, each an ordinary resumable training workdir (`loop.train`; a finished one is restored and
returns at once, a killed one continues from its newest checkpoint):
  DIR/dit        the DiT pre-training, exactly the demo's (`demo.stage_configs`)
  DIR/control    the dense control the DyDiT paper lacks: the DiT fine-tuned from DIR/dit's EMA weights
                 for the same steps with the same optimizer, EMA and clipping as every DyDiT, without
                 routers. A DyDiT row differs from DIR/dit by two things (routers, and more training);
                 it differs from the control by the routers alone.
  DIR/lam_<l>    the demo's DyDiT stage at lambda l, for each l in config.sweep.lams

Evaluation, each model (dit, control, lam_*) under each sampler (config.sweep.samplers at
config.sweep.sampling_steps steps, CFG config.sample.cfg_scale): config.sweep.num_samples
class-balanced samples, image i's noise drawn from (config.sample.seed, i), so every model sees the
same seeds. Recorded in DIR/eval/<model>_<sampler>.json (written atomically; a present file is not
redone, so a killed evaluation continues too):
  flops_ratio       the official block-MACs ratio measured over the whole sampling run (every model
                    call, CFG rows included; 1 for the dense models); macs_ratio: whole forward
  class_accuracy, frechet_distance   the digit judge's (dydit_jax.judge) class accuracy and Frechet
                    distance to its held-out real digits
  *_spread          the std of each metric over config.sweep.bootstrap resamples of the samples: images
                    are a function of (seed, index), so it is the spread over sampling seeds
  seconds           wall time of sampling them all, compilation excluded (compiled first); DyDiTs
                    sample with the fast engine (config.sweep.engine), the dense models densely, so
                    control seconds / DyDiT seconds is the speedup the routers buy on this machine
Plus DIR/samples_<model>_<sampler>.png (grid_per_class columns, one row per class) and, per DyDiT,
DIR/widths_<model>.png (open heads / MLP groups per layer over the first sampler's steps). The training
wall time of each stage, summed over the runs that trained it, is kept in DIR/eval/training.json. The
report (results.json, results.md, quality_vs_macs.png: dydit_jax.train.sweep_report) is rewritten
from the eval files at the end of every run.
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
from dydit_jax.errors import UserError
from dydit_jax.evaluation.metrics import Statistics
from dydit_jax.files import atomic_write_json
from dydit_jax.judge import DigitJudge, frechet_from_stats, gaussian_stats
from dydit_jax.sampler import SampleOptions, Sampler, SampleResult, class_labels
from dydit_jax.train import demo, loop, sweep_report


def lam_name(lam: float) -> str:
  return f"lam_{lam:g}"


def stage_configs(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict[str, ml_collections.ConfigDict]:
  """{stage name: training config}, in training order: dit, control, lam_<l> for each lambda."""
  dit, dydit = demo.stage_configs(config, workdir)
  for stage in (dit, dydit):
    del stage.sweep            # the sweep section is read here, not by a training run
  control = ml_collections.ConfigDict(dydit.to_dict())
  control.model.dynamic = False
  stages = {"dit": dit, "control": control}
  for lam in config.sweep.lams:
    stages[lam_name(lam)] = stage = ml_collections.ConfigDict(dydit.to_dict())
    stage.dydit.lam = lam
  return stages


def check(config: ml_collections.ConfigDict) -> None:
  """The sweep's own fields, checked before any work (the stages' fields are checked by loop.train)."""
  s, classes = config.sweep, config.model.num_classes
  if not s.lams or any(not 0.0 < lam <= 1.0 for lam in s.lams) or len(set(map(lam_name, s.lams))) != len(s.lams):
    raise UserError(f"config.sweep.lams must be distinct values in (0, 1], got {tuple(s.lams)}")
  if not s.samplers or any(name not in ("ddpm", "ddim") for name in s.samplers):
    raise UserError(f"config.sweep.samplers must name 'ddpm' and/or 'ddim', got {tuple(s.samplers)}")
  if s.num_samples <= 0 or s.num_samples % classes or s.batch <= 0:
    raise UserError(f"config.sweep.num_samples must be a positive multiple of the {classes} classes and "
                    f"config.sweep.batch positive, got {s.num_samples} and {s.batch}")
  if s.sampling_steps <= 0 or s.bootstrap < 2 or s.grid_per_class <= 0 or s.engine == "masked":
    raise UserError("config.sweep wants sampling_steps > 0, bootstrap >= 2, grid_per_class > 0 and a fast "
                    f"engine, got {s.sampling_steps}, {s.bootstrap}, {s.grid_per_class}, {s.engine!r}")


def sample_options(config: ml_collections.ConfigDict, sampler: str, dynamic: bool) -> SampleOptions:
  """DDPM respaced to n steps ("n"), DDIM on the evenly strided chain ("ddimn", as DDIM samples)."""
  n = config.sweep.sampling_steps
  return SampleOptions(sampler=sampler, steps=str(n) if sampler == "ddpm" else f"ddim{n}",
                       cfg_scale=config.sample.cfg_scale, engine=config.sweep.engine if dynamic else "masked")


def timed_sampling(sampler: Sampler, labels: np.ndarray, key: jax.Array, batch: int
                   ) -> tuple[np.ndarray, list[SampleResult], float, float]:
  """(samples, per-batch results, sampling seconds, compile seconds): every batch size is compiled
  before the clock starts; image i draws its noise from (key, i) whatever the batching."""
  starts = range(0, len(labels), batch)
  compile_s = sum(sampler.compile(len(labels[i:i + batch])) for i in starts)
  start = time.perf_counter()
  results = [sampler.generate(labels[i:i + batch], key, first_id=i) for i in starts]
  seconds = time.perf_counter() - start
  return np.concatenate([r.samples for r in results]), results, seconds, compile_s


def spread(features: np.ndarray, correct: np.ndarray, reference: Statistics, resamples: int, seed: int = 0
           ) -> tuple[float, float]:
  """(std of the Frechet distance, std of the accuracy) over `resamples` draws with replacement of the
  samples (their judge features and 0/1 correctness): the bootstrap spread of each metric."""
  rng = np.random.default_rng(seed)
  fds, accs = [], []
  for _ in range(resamples):
    idx = rng.integers(0, len(features), len(features))
    fds.append(frechet_from_stats(gaussian_stats(features[idx]), reference))
    accs.append(float(np.mean(correct[idx])))
  return float(np.std(fds, ddof=1)), float(np.std(accs, ddof=1))


def evaluate(config, name: str, lam: float | None, model, sampler_name: str, judge: DigitJudge,
             reference: Statistics, root: epath.Path) -> dict[str, Any]:
  """One eval row (module docstring); writes the sample grid and, for a DyDiT, its width plot."""
  s = config.sweep
  options = sample_options(config, sampler_name, model.config.dynamic)
  labels = class_labels(range(config.model.num_classes), s.num_samples // config.model.num_classes)
  samples, results, seconds, compile_s = timed_sampling(Sampler(model, options), labels,
                                                        jax.random.PRNGKey(config.sample.seed), s.batch)
  weights = np.array([len(r.samples) for r in results], np.float64)
  mean = lambda values: float(np.average(values, weights=weights))
  score = judge.score(samples, labels, reference)
  fd_spread, acc_spread = spread(score.features, score.correct, reference, s.bootstrap)
  if jax.process_index() == 0:
    per_class = s.num_samples // config.model.num_classes
    cols = min(s.grid_per_class, per_class)
    grid = np.concatenate([samples[c * per_class:c * per_class + cols] for c in range(config.model.num_classes)])
    images.save_grid(images.to_uint8(grid), root / f"samples_{name}_{sampler_name}.png", ncols=cols)
    if model.config.dynamic and sampler_name == s.samplers[0]:
      WidthPlan.from_model(model, results[0].timesteps).plot(root / f"widths_{name}.png")
  return {"model": name, "lam": lam, "sampler": sampler_name,
          "options": dataclasses.asdict(options), "num_samples": len(samples),
          "flops_ratio": mean([r.flops_ratio for r in results]),
          "macs_ratio": mean([r.macs_ratio for r in results]),
          "class_accuracy": score.class_accuracy, "accuracy_spread": acc_spread,
          "frechet_distance": score.frechet_distance, "fd_spread": fd_spread,
          "seconds": seconds, "images_per_s": len(samples) / seconds, "compile_s": compile_s}


def record_stage(root: epath.Path, name: str, summary: dict[str, Any]) -> dict[str, Any]:
  """The stage's report (demo's: steps, speed, last metrics) with its training wall time summed over
  every run that trained it, kept in DIR/eval/training.json: a rerun that only restores a finished
  stage must not report its seconds as the stage's cost."""
  path = root / "eval" / "training.json"
  saved = json.loads(path.read_text()) if path.exists() else {}
  before = saved.get(name, {"wall_time_s": 0.0, "train_steps_per_sec": None})
  steps = summary["step"] - summary["start_step"]
  report = demo.stage_report(summary, root / name)
  report["steps_this_run"] = steps
  if steps == 0:
    report.update(wall_time_s=before["wall_time_s"], train_steps_per_sec=before["train_steps_per_sec"])
  else:
    report["wall_time_s"] += before["wall_time_s"]
  if steps and jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**saved, name: {k: report[k] for k in ("wall_time_s", "train_steps_per_sec")}})
  return report


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  start = time.time()
  check(config)
  root = epath.Path(workdir)
  stages, trained = stage_configs(config, root), {}
  for name, stage in stages.items():
    logging.info("sweep stage %s -> %s", name, root / name)
    summary = loop.train(stage, str(root / name))
    trained[name] = record_stage(root, name, summary)
    if summary["preempted"]:
      logging.warning("sweep interrupted in stage %s; rerun the same command to continue", name)
      return {"preempted": True, "stage": name}

  judge, reference, judge_report = demo.load_judge(config, root, config.sweep.num_samples)
  (root / "eval").mkdir(parents=True, exist_ok=True)
  lams = {lam_name(lam): float(lam) for lam in config.sweep.lams}
  rows, sampled = [], 0
  for name in stages:
    model = None    # loaded only when one of its evaluations is missing
    for sampler_name in config.sweep.samplers:
      path = root / "eval" / f"{name}_{sampler_name}.json"
      if path.exists():
        rows.append(json.loads(path.read_text()))
        continue
      if model is None:
        model = checkpoints.load_model(str(root / name))
      began = time.time()
      row = evaluate(config, name, lams.get(name), model, sampler_name, judge, reference, root)
      row["wall_time_s"] = time.time() - began
      rows.append(row)
      if jax.process_index() == 0:
        atomic_write_json(path, row)
      sampled += 1
      logging.info("sweep %s %s: MACs ratio %.3f, accuracy %.3f +- %.3f, FD %.1f +- %.1f, %.1f s", name,
                   sampler_name, row["flops_ratio"], row["class_accuracy"], row["accuracy_spread"],
                   row["frechet_distance"], row["fd_spread"], row["seconds"])

  results = {"rows": sweep_report.with_speedups(rows), "judge": judge_report, "stages": trained,
             "config": json.loads(config.to_json()), "evaluations_this_run": sampled,
             "wall_time_s": {"training": sum(t["wall_time_s"] for t in trained.values()),
                             "evaluation": sum(r["wall_time_s"] for r in rows), "this_run": time.time() - start}}
  if jax.process_index() == 0:
    sweep_report.write(results, root)
  logging.info("sweep done: %d models x %d samplers, files in %s", len(stages), len(config.sweep.samplers), root)
  return results
