"""The ADM evaluation suite: Inception Score, FID, sFID, precision and recall of a sample batch.

  python -m dydit_jax.evaluate VIRTUAL_imagenet256_labeled.npz samples.npz --inception=ckpt/inception
  python -m dydit_jax.evaluate VIRTUAL_imagenet256_labeled.npz samples_png/ --inception=ckpt/inception

The interface and the numbers are those of guided-diffusion's `evaluations/evaluator.py` (the
protocol DiT and DyDiT report): REF is a reference batch (its images give the reference activations
for precision / recall; its `mu, sigma, mu_s, sigma_s`, when present, are the FID / sFID statistics),
SAMPLES an .npz with `arr_0` uint8 (N, H, W, 3) images or a directory of PNGs. The Inception is the
ADM graph's network (`dydit_jax.evaluation.inception`), converted once with
`python -m dydit_jax.evaluation.convert`. Activations run on the accelerators in batches split over
the local devices; the metrics are computed as ADM computes them (`evaluation.metrics`,
`evaluation.manifold`). The five numbers are printed and written as JSON (--out, default next to
SAMPLES: samples.metrics.json).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

from absl import flags

from dydit_jax import cli, files
from dydit_jax.errors import UserError
from dydit_jax.evaluation import manifold, metrics
from dydit_jax.evaluation.batches import ImageBatch
from dydit_jax.evaluation.features import InceptionRunner
from dydit_jax.evaluation.inception import Features
from dydit_jax.evaluation.weights import CONVERT_HINT, load_inception

NAMES = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision",
         "recall": "Recall"}


def compute_metrics(ref: Features, samples: Features, ref_stats=None, sample_stats=None) -> dict[str, float]:
  """The five ADM numbers from activations; `*_stats`: (pool, spatial) `Statistics` a batch file
  carries, used instead of the activations' own (as ADM's read_statistics does)."""
  ref_pool, ref_spatial = ref_stats or (metrics.statistics(ref.pool), metrics.statistics(ref.spatial))
  pool, spatial = sample_stats or (metrics.statistics(samples.pool), metrics.statistics(samples.spatial))
  precision, recall = manifold.precision_recall(ref.pool, samples.pool)
  return {"inception_score": metrics.inception_score(samples.logits),
          "fid": metrics.frechet_distance(pool, ref_pool),
          "sfid": metrics.frechet_distance(spatial, ref_spatial),
          "precision": precision, "recall": recall}


def progress_printer(what: str):
  """A `features.Progress` callback printing '<what>: done/total images, rate, ETA' to stderr."""
  def report(done: int, total: int, seconds: float):
    rate = done / max(seconds, 1e-9)
    print(f"{what}: {done}/{total} images, {rate:.1f} images/s, ETA {(total - done) / rate:.0f} s",
          file=sys.stderr, flush=True)
  return report


def default_out(samples: Path) -> Path:
  return samples.with_name(samples.name.rstrip("/").removesuffix(".npz") + ".metrics.json")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  fv = {"flag_values": flag_values}
  flags.DEFINE_string("inception", None, "Inception directory written by python -m dydit_jax.evaluation.convert", **fv)
  flags.DEFINE_string("out", None, "JSON file for the results (default: SAMPLES with .metrics.json)", **fv)
  flags.DEFINE_integer("batch_size", 64, "images per Inception call (a multiple of the local device count "
                       "splits them over the devices)", **fv)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  f = flag_values
  ref_path, sample_path = (Path(a) for a in argv[1:])
  if not f.inception:
    raise UserError(f"--inception is required (the FID Inception weights): {CONVERT_HINT}")
  if f.batch_size <= 0:
    raise UserError(f"--batch_size must be positive, got {f.batch_size}")
  ref = ImageBatch(ref_path, "reference batch REF")
  samples = ImageBatch(sample_path, "sample batch SAMPLES")
  out = Path(f.out) if f.out else default_out(sample_path)
  if not out.parent.is_dir():
    raise UserError(f"--out {out}: directory {out.parent} does not exist")
  net = load_inception(f.inception)
  runner = InceptionRunner(net, f.batch_size)
  start = time.perf_counter()
  ref_acts = runner.activations(ref, progress_printer(f"reference {ref_path.name}"))
  sample_acts = runner.activations(samples, progress_printer(f"samples {sample_path.name}"))
  seconds_inception = time.perf_counter() - start
  results = compute_metrics(ref_acts, sample_acts, ref.stats, samples.stats)
  for key, name in NAMES.items():
    print(f"{name}: {results[key]}")
  record = {**results, "ref": str(ref_path), "samples": str(sample_path), "ref_images": ref.count,
            "sample_images": samples.count, "ref_statistics": "file" if ref.stats else "images",
            "seconds_inception": round(seconds_inception, 1),
            "seconds_total": round(time.perf_counter() - start, 1)}
  files.atomic_write_json(out, record)
  print(f"wrote {out}")


if __name__ == "__main__":
  cli.run(main, define_flags, positional=("REF", "SAMPLES"))
