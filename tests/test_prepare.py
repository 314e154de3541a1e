"""`python -m dydit_jax.prepare --image_folder ... --vae ...` end to end, then the trainer on its latents.

An ImageFolder tree of 3 classes x 4 random JPEG / PNG images of 40-80 px and a tiny random VAE with
the SD VAE's downsampling factor 8 (tests/tiny_vae.py) go through the real CLI in subprocesses:
32 px crops -> 4 x 4 x 4 posterior latents in 2 shards. The shards must hold what the VAE gives for
the center-cropped (and flipped) images, recomputed here; the trainer must run on them; an
interrupted preparation must resume to byte-identical shards; bad input must be one error line with
no partial shard left behind.
"""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import tiny_vae
import train_helpers as th
from dydit_jax.data import LatentShardSource
from dydit_jax.data import latents as latents_format
from dydit_jax.data.imagenet import preprocess_image
from dydit_jax.vae.batched import BatchedVAE

pytestmark = pytest.mark.slow   # end to end: subprocesses (`-m "not slow"` skips)

CLASSES = ("n01_cat", "n02_dog", "n03_eel")
ARGS = ("--image_size=32", "--num_shards=2", "--batch_size=4", "--num_workers=2", "--log_every=1")


def make_images(root):
  """3 classes x 4 images of random sizes: .JPEG, .png, .jpg, .png (an odd file that is no image too)."""
  rng = np.random.default_rng(0)
  for name in CLASSES:
    (root / name).mkdir(parents=True)
    for i, ext in enumerate(("JPEG", "png", "jpg", "png")):
      w, h = rng.integers(40, 81, 2)
      pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / name / f"img{i}.{ext}", format="PNG" if ext == "png" else "JPEG")
    (root / name / "notes.txt").write_text("not an image: skipped")


def prepare(out, images, vae, *flags, cache=None):
  return subprocess.run([sys.executable, "-m", "dydit_jax.prepare", f"--image_folder={images}", f"--vae={vae}",
                         f"--out_dir={out}", *ARGS, *flags], cwd=th.REPO, env=th.env(cache_dir=cache),
                        capture_output=True, text=True, timeout=300)


def ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def shard_bytes(folder):
  return {p.name: p.read_bytes() for p in sorted(folder.glob("latents-*"))}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("prepare")
  make_images(root / "images")
  vae = tiny_vae.vae_dir(root / "vae")
  tiny_vae.vae_dir(root / "vae3", latent_channels=3)
  cache = root / "jax_cache"
  proc = ok(prepare(root / "latents", root / "images", root / "vae", cache=cache))
  return {"root": root, "vae": vae, "cache": cache, "log": proc.stderr}


def test_shards_hold_the_vae_posterior_of_the_center_cropped_images(run):
  root = run["root"]
  meta = json.loads((root / "latents" / "metadata.json").read_text())
  assert meta["count"] == 12 and meta["shape"] == [4, 4, 4] and meta["content"] == "posterior"
  assert meta["class_names"] == list(CLASSES) and meta["num_classes"] == 3 and meta["shard_counts"] == [6, 6]
  assert meta["vae"]["latent_channels"] == 4 and len(meta["vae_fingerprint"]) == 64
  assert "images/s" in run["log"] and "ETA" in run["log"]
  files = [root / "images" / c / f"img{i}.{ext}" for c in CLASSES
           for i, ext in enumerate(("JPEG", "png", "jpg", "png"))]
  flips = np.random.default_rng([latents_format.STREAM_FLIP, 0]).random(12) < 0.5
  assert 0 < flips.sum() < 12
  pixels = np.stack([preprocess_image(str(f), 32, flip) for f, flip in zip(files, flips)])
  mean, std = BatchedVAE(run["vae"], batch_size=4).encode(pixels)
  source = LatentShardSource(str(root / "latents"))
  assert len(source) == 12
  for i in range(12):                                   # contiguous shards: record i is image i
    example = source[i]
    assert int(example["y"]) == i // 4
    np.testing.assert_allclose(example["x"], mean[i] * 0.18215, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(example["std"], std[i] * 0.18215, rtol=1e-4, atol=1e-7)


def test_the_trainer_runs_on_the_prepared_latents(run, tmp_path):
  root = run["root"]
  th.run_main(tmp_path / "workdir", "steps=2,every=2,complete=0", "--config.data.name=latents",
              f"--config.data.path={root / 'latents'}", "--config.model.in_channels=4",
              "--config.model.input_size=4", "--config.model.num_classes=3", cache_dir=run["cache"])
  rows = th.metric_rows(tmp_path / "workdir")
  assert sorted(rows) == [1, 2] and all(np.isfinite(r["loss"]) for r in rows.values())


def test_an_interrupted_preparation_resumes_to_identical_shards(run):
  root = run["root"]
  out = root / "resumed"
  first = ok(prepare(out, root / "images", root / "vae", "--max_shards=1", cache=run["cache"]))
  assert "rerun the same command to continue" in first.stdout
  assert sorted(p.name for p in out.iterdir()) == ["latents-00000-of-00002.array_record", "prepare_plan.json"]
  ok(prepare(out, root / "images", root / "vae", cache=run["cache"]))
  assert shard_bytes(out) == shard_bytes(root / "latents") and len(shard_bytes(out)) == 2
  assert (out / "metadata.json").read_text() == (root / "latents" / "metadata.json").read_text()
  again = prepare(out, root / "images", root / "vae", cache=run["cache"])
  assert "already holds prepared latents" in th.error_line(again)


def test_a_truncated_image_is_one_error_line_and_no_partial_shard(run):
  root = run["root"]
  images, out = root / "broken_images", root / "broken"
  shutil.copytree(root / "images", images)
  bad = images / CLASSES[2] / "img0.JPEG"               # example 8: in shard 1, after shard 0 is done
  data = bad.read_bytes()
  bad.write_bytes(data[:len(data) // 2])
  line = th.error_line(prepare(out, images, root / "vae", cache=run["cache"]))
  assert line.startswith(f"error: cannot read image {bad}: OSError: image file is truncated"), line
  assert sorted(p.name for p in out.iterdir()) == ["latents-00000-of-00002.array_record", "prepare_plan.json"]
  bad.write_bytes(data)                                  # fixed: the rerun encodes shard 1 only
  ok(prepare(out, images, root / "vae", cache=run["cache"]))
  assert shard_bytes(out) == shard_bytes(root / "latents")


@pytest.mark.parametrize("vae,words", [
    ("vae3", ["has 3 latent channels, DiT latents have 4; --vae wants a VAE converted with python -m "
              "dydit_jax.vae.convert --src sd-vae-ft-ema --dst DIR"]),
    ("images", ["is not a VAE directory (vae_config.json and params/)"]),
])
def test_a_wrong_vae_is_one_error_line_before_any_work(run, vae, words):
  root = run["root"]
  out = root / f"wrong_{vae}"
  line = th.error_line(prepare(out, root / "images", root / vae))
  for word in words:
    assert word in line, line
  assert not out.exists()
