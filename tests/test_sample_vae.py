"""Latent models sample images: `python -m dydit_jax.sample --vae DIR` and `vae.batched.decode_to_images`.

A tiny latent DiT (4 x 8 x 8 latents) and a tiny random VAE with the SD VAE's downsampling factor 8
(tests/tiny_vae.py) go through the real CLI in subprocesses: the grid holds 64 x 64 images equal to
the in-process decode of the same samples; every wrong pairing of model and VAE is one error line
before any sampling, and no PNG.
"""
import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import tiny_vae
import train_helpers as th
from dydit_jax import checkpoints, images
from dydit_jax.models import ModelConfig
from dydit_jax.sampler import SampleOptions, Sampler, class_labels
from dydit_jax.vae.batched import BatchedVAE, decode_to_images, dit_uint8

LATENT = ModelConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                     num_classes=4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("sample_vae")
  latent = tiny_vae.random_dit(LATENT)
  checkpoints.save_model(latent, root / "latent_model")
  checkpoints.save_model(tiny_vae.random_dit(LATENT.replace(in_channels=1)), root / "pixel_model")
  vae = tiny_vae.vae_dir(root / "vae")
  tiny_vae.vae_dir(root / "vae3", latent_channels=3)
  return {"root": root, "latent": latent, "vae": vae}


def sample_cli(model, out, *flags):
  return subprocess.run([sys.executable, "-m", "dydit_jax.sample", f"--model={model}", "--classes=0,3",
                         "--per_class=2", "--steps=3", "--cfg_scale=2", f"--out={out}", *flags],
                        cwd=th.REPO, env=th.env(), capture_output=True, text=True, timeout=300)


def test_cli_decodes_a_latent_model_into_a_png_grid(files):
  root = files["root"]
  out = root / "grid.png"
  proc = sample_cli(root / "latent_model", out, f"--vae={root / 'vae'}", "--decode_batch=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  grid = np.asarray(Image.open(out))
  assert grid.shape == (2 * 66 + 2, 2 * 66 + 2, 3)            # 8 latent px -> 64 px, 2 px gaps
  assert json.loads(out.with_suffix(".json").read_text())["vae"] == str(root / "vae")
  # The same samples decoded here (4 latents in batches of 3: one padded chunk) give the same grid.
  labels = class_labels([0, 3], 2)
  result = Sampler(files["latent"], SampleOptions(steps="3", cfg_scale=2.0)).generate(labels, jax.random.PRNGKey(0))
  want = images.make_grid(decode_to_images(files["vae"], result.samples, 3), ncols=2)
  assert np.abs(grid.astype(int) - want).max() <= 1 and np.mean(grid != want) < 1e-3
  assert want.std() > 5                                       # not a flat image


@pytest.mark.parametrize("case", ["latent model without --vae", "VAE of 3 latent channels",
                                  "pixel model with --vae", "a model directory as --vae"])
def test_cli_refuses_a_wrong_pairing_before_sampling(files, case):
  root = files["root"]
  model, flags, words = {
      "latent model without --vae": ("latent_model", [], [
          "holds a latent model (4 channels): pass --vae=DIR, a VAE converted with python -m "
          "dydit_jax.vae.convert --src sd-vae-ft-ema --dst DIR", "stabilityai/sd-vae-ft-ema"]),
      "VAE of 3 latent channels": ("latent_model", [f"--vae={root / 'vae3'}"], [
          "has 3 latent channels but the model", "samples 4"]),
      "pixel model with --vae": ("pixel_model", [f"--vae={root / 'vae'}"], [
          "holds a pixel model (1 channels): its samples are images already and need no VAE; drop --vae"]),
      "a model directory as --vae": ("latent_model", [f"--vae={root / 'pixel_model'}"], [
          "holds a DiT model (config.json), not a VAE (vae_config.json)"]),
  }[case]
  out = root / f"{case.replace(' ', '_')}.png"
  line = th.error_line(sample_cli(root / model, out, *flags))
  for word in words:
    assert word in line, line
  assert not out.exists() and not out.with_suffix(".json").exists()


def test_decode_to_images_is_decode_latents_then_dits_pixel_mapping():
  vae = tiny_vae.random_vae(seed=3)
  latents = np.random.default_rng(0).standard_normal((5, 8, 8, 4)).astype(np.float32)
  runner = BatchedVAE(vae, batch_size=2)                      # 3 calls, the last one padded
  pixels = runner.decode(latents)
  graphdef, state = nnx.split(vae)
  reference = jax.jit(lambda s, method, x: getattr(nnx.merge(graphdef, s), method)(x), static_argnums=1)
  np.testing.assert_allclose(pixels, reference(state, "decode_latents", latents), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(decode_to_images(runner, latents), dit_uint8(pixels))
  assert decode_to_images(vae, latents, 2).shape == (5, 64, 64, 3)
  mean, std = runner.encode(pixels)
  posterior = reference(state, "encode", pixels)
  np.testing.assert_allclose(mean, np.asarray(posterior.mean), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(std, np.asarray(posterior.std), rtol=1e-5, atol=1e-6)
  # clamp(127.5 x + 128, 0, 255), truncated (sample_ddp.py): 1.0 -> 255.5 -> 255, 0 -> 128.
  np.testing.assert_array_equal(dit_uint8(np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0])), [0, 0, 128, 191, 255, 255])


_DEVICES_CHECK = textwrap.dedent("""
    import json, jax, numpy as np
    import tiny_vae
    from dydit_jax.vae.batched import BatchedVAE
    vae = tiny_vae.random_vae(seed=3)
    latents = np.random.default_rng(0).standard_normal((12, 8, 8, 4)).astype(np.float32)
    split, whole = BatchedVAE(vae, batch_size=8), BatchedVAE(vae, batch_size=6)
    a, b = split.decode(latents), whole.decode(latents)
    (ma, sa), (mb, sb) = split.encode(a), whole.encode(a)
    rel = lambda x, y: float(np.linalg.norm(x - y) / np.linalg.norm(y))
    print(json.dumps({"devices": jax.local_device_count(), "split_mesh": split.mesh is not None,
                      "whole_mesh": whole.mesh is not None, "decode": rel(a, b), "mean": rel(ma, mb),
                      "std": rel(sa, sb)}))
""")


@pytest.mark.slow
def test_batched_vae_split_over_8_devices_equals_one_device():
  env = {**th.env(devices=8), "PYTHONPATH": f"{th.REPO}:{th.REPO / 'tests'}"}
  proc = subprocess.run([sys.executable, "-c", _DEVICES_CHECK], cwd=th.REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8 and out["split_mesh"] and not out["whole_mesh"], out
  assert out["decode"] <= 1e-5 and out["mean"] <= 1e-5 and out["std"] <= 1e-5, out
