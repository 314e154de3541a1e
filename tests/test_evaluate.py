"""`python -m dydit_jax.evaluate REF SAMPLES`: batches read in chunks, the reference file's statistics
used as ADM uses them, the five numbers printed and written, and one clear line for every missing file.

The network is a random Inception directory; the Frechet distance (a SciPy sqrtm of 2048x2048, half a
minute on two cores, tested in test_metrics.py) is replaced by a spy that records its statistics.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from dydit_jax import evaluate
from dydit_jax.errors import UserError
from dydit_jax.evaluation import manifold, metrics
from dydit_jax.evaluation.batches import ImageBatch
from dydit_jax.evaluation.inception import Features
import train_helpers as th
from evaluation_helpers import random_inception_dir, run_tool

POSITIONAL = ("REF", "SAMPLES")


def _images(seed: int, n: int, size: int = 32) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
  return random_inception_dir(tmp_path_factory.mktemp("evaluate") / "inception")


@pytest.fixture
def spy(monkeypatch):
  """frechet_distance replaced by |mu_a - mu_b|^2 + 1000 * dim, the statistics it saw recorded."""
  calls = []

  def fake(a, b):
    calls.append((a, b))
    return float(np.sum((np.asarray(a.mu, np.float64) - b.mu) ** 2)) + 1000 * len(a.mu)

  monkeypatch.setattr(metrics, "frechet_distance", fake)
  return calls


def test_cli_numbers(inception, spy, monkeypatch, tmp_path):
  """REF: an .npz carrying whole-dataset statistics; SAMPLES: a directory of PNGs. The activations the
  metrics receive are recorded; the network itself is tested against PyTorch in test_inception.py."""
  ref_images, sample_images = _images(0, 6), _images(1, 5)
  sample_images[4] = sample_images[0] = ref_images[2]     # one image thrice: in other chunks, padded or not
  file_stats = {"mu": np.arange(2048.0), "sigma": np.eye(2048), "mu_s": np.arange(2023.0), "sigma_s": np.eye(2023)}
  np.savez(tmp_path / "ref.npz", arr_0=ref_images, **file_stats)
  (tmp_path / "samples").mkdir()
  for i, image in enumerate(sample_images):
    Image.fromarray(image).save(tmp_path / "samples" / f"{i:06d}.png")
  seen = {}
  pr, inception_score = manifold.precision_recall, metrics.inception_score
  monkeypatch.setattr(manifold, "precision_recall", lambda r, s: seen.setdefault("pr", (r, s)) and pr(r, s))
  monkeypatch.setattr(metrics, "inception_score",
                      lambda logits: seen.setdefault("logits", logits) is not None and inception_score(logits))

  code, out, err = run_tool(evaluate, [str(tmp_path / "ref.npz"), str(tmp_path / "samples")],
                            f"--inception={inception}", "--batch_size=4", positional=POSITIONAL)
  assert code == 0, err
  assert "samples samples: 5/5 images" in err and "reference ref.npz: 4/6 images" in err
  record = json.loads((tmp_path / "samples.metrics.json").read_text())
  printed = dict(line.split(": ") for line in out.splitlines() if not line.startswith("wrote"))
  assert list(printed) == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
  assert record["ref_statistics"] == "file" and record["sample_images"] == 5
  assert float(printed["FID"]) == pytest.approx(record["fid"])

  ref_pool, pool = seen["pr"]
  assert ref_pool.shape == (6, 2048) and pool.shape == (5, 2048) and seen["logits"].shape == (5, 1008)
  np.testing.assert_allclose(pool[[0, 4]], ref_pool[[2, 2]], rtol=1e-5)     # images read in order, padding dropped
  assert np.abs(pool[1] - pool[0]).max() > 1e-3
  (s_pool, r_pool), (s_spatial, r_spatial) = spy
  np.testing.assert_array_equal(r_pool.mu, file_stats["mu"])            # the file's statistics, not the images'
  np.testing.assert_array_equal(r_spatial.sigma, file_stats["sigma_s"])
  np.testing.assert_array_equal(s_pool.mu, pool.mean(0))                # the samples' own, from the same features
  assert s_spatial.sigma.shape == (2023, 2023)
  assert (record["precision"], record["recall"]) == pr(ref_pool, pool)
  assert record["inception_score"] == inception_score(seen["logits"])


def test_statistics_from_images_without_file_statistics(spy):
  rng = np.random.default_rng(0)
  acts = [Features(rng.standard_normal((20, 6)), rng.standard_normal((20, 10)), rng.standard_normal((20, 4)))
          for _ in range(2)]
  results = evaluate.compute_metrics(*acts)
  assert set(results) == set(evaluate.NAMES)
  (s_pool, r_pool), (s_spatial, r_spatial) = spy
  np.testing.assert_array_equal(r_pool.sigma, np.cov(acts[0].pool, rowvar=False))
  np.testing.assert_array_equal(s_spatial.mu, acts[1].spatial.mean(0))


def test_missing_files_are_one_line(inception, tmp_path):
  np.savez(tmp_path / "ref.npz", arr_0=_images(0, 4))
  np.savez(tmp_path / "labels.npz", arr_1=np.zeros(3))
  (tmp_path / "empty").mkdir()
  ref, run = str(tmp_path / "ref.npz"), lambda *a: run_tool(evaluate, *a, positional=POSITIONAL)
  weights = [f"--inception={inception}"]
  cases = {
      "no --inception": ([ref, ref], [], "--inception is required"),
      "absent weights": ([ref, ref], [f"--inception={tmp_path / 'nope'}"],
                         f"{tmp_path / 'nope'} (--inception) does not exist"),
      "absent REF": ([str(tmp_path / "absent.npz"), ref], weights, "reference batch REF"),
      "absent SAMPLES": ([ref, str(tmp_path / "gone")], weights,
                         f"sample batch SAMPLES {tmp_path / 'gone'} does not exist"),
      "no PNGs": ([ref, str(tmp_path / "empty")], weights, "without .png files"),
      "no images": ([ref, str(tmp_path / "labels.npz")], weights, "has no arr_0"),
      "one argument": ([ref], weights, "expected 2 arguments REF SAMPLES, got 1"),
  }
  for name, (words, flags_, message) in cases.items():
    code, _, err = run(words, *flags_)
    one_line = len(err.strip().splitlines()) == 1
    assert code == 1 and err.startswith("error: ") and message in err and one_line, (name, err)
  assert "python -m dydit_jax.evaluation.convert" in run([ref, ref])[2]
  assert not list(tmp_path.glob("*.json"))


def test_batches_stream_npz_and_pngs(tmp_path):
  images = _images(3, 10, size=8)
  np.savez_compressed(tmp_path / "a.npz", arr_0=images)
  batch = ImageBatch(tmp_path / "a.npz", "x")
  assert (batch.count, batch.shape, batch.stats) == (10, (8, 8, 3), None)
  np.testing.assert_array_equal(np.concatenate(list(batch.chunks(3))), images)
  (tmp_path / "png").mkdir()
  for i, image in enumerate(images[:3]):
    Image.fromarray(image).save(tmp_path / "png" / f"{i}.png")
  Image.fromarray(_images(4, 1, size=9)[0]).save(tmp_path / "png" / "3.png")
  batch = ImageBatch(tmp_path / "png", "samples")
  with pytest.raises(UserError, match="3.png is not 8x8"):
    list(batch.chunks(4))


# A stand-in network (per-image channel means times a parameter): the runner is what is tested here.
_SPLIT_CHECK = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from dydit_jax.evaluation.features import InceptionRunner
    from dydit_jax.evaluation.inception import Features

    class Probe(nnx.Module):
      def __init__(self):
        self.w = nnx.Param(jnp.arange(1.0, 4.0))
      def __call__(self, x):
        f = x.astype(jnp.float32).mean(axis=(1, 2)) * self.w[...]
        return Features(f, 2 * f, f.sum(-1, keepdims=True))

    seen = []
    images = np.random.default_rng(0).integers(0, 256, (13, 5, 5, 3), dtype=np.uint8)
    runner = InceptionRunner(Probe(), batch_size=8)
    forward = runner._forward
    runner._forward = lambda state, x: seen.append(x.sharding) or forward(state, x)   # the rows as sent
    acts = runner.activations(images)
    want = images.astype(np.float32).mean(axis=(1, 2)) * np.arange(1.0, 4.0)
    np.testing.assert_allclose(acts.pool, want, rtol=1e-6)
    np.testing.assert_allclose(acts.spatial[:, 0], want.sum(-1), rtol=1e-6)
    print(len(jax.devices()), len(seen[0].device_set), acts.pool.shape[0])
""")


def test_runner_splits_batches_over_devices():
  proc = subprocess.run([sys.executable, "-c", _SPLIT_CHECK], env=th.env(devices=4), capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["4", "4", "13"]     # 4 devices, each batch on all 4, 13 rows back
