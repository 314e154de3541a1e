"""`python -m dydit_jax.prepare` without a VAE (or without an image source) stops with one clear line
that names the fix, before creating anything (the full runs are in tests/test_prepare.py)."""
import subprocess
import sys

import pytest

import train_helpers as th


@pytest.mark.parametrize("flags,words", [
    (["--manual_dir={tmp}"], ["error: --vae is required: the VAE that encodes the images, a VAE converted with "
                              "python -m dydit_jax.vae.convert --src sd-vae-ft-ema --dst DIR",
                              "stabilityai/sd-vae-ft-ema"]),
    (["--vae={tmp}"], ["error: pass exactly one image source: --manual_dir (tfds imagenet2012) or --image_folder"]),
    (["--vae={tmp}", "--manual_dir={tmp}", "--image_folder={tmp}"], ["error: pass exactly one image source"]),
])
def test_prepare_without_vae_or_source_fails_clearly(tmp_path, flags, words):
  out = tmp_path / "latents"
  proc = subprocess.run([sys.executable, "-m", "dydit_jax.prepare", f"--out_dir={out}",
                         *(f.format(tmp=tmp_path) for f in flags)],
                        cwd=th.REPO, env=th.env(), capture_output=True, text=True, timeout=120)
  line = th.error_line(proc)
  for word in words:
    assert word in line, line
  assert not out.exists()
