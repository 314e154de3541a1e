"""`python -m dydit_jax.prepare` stops with one clear message while no VAE encoder exists."""
import subprocess
import sys


def test_prepare_without_vae_fails_clearly(tmp_path):
  out = tmp_path / "latents"
  proc = subprocess.run([sys.executable, "-m", "dydit_jax.prepare", f"--manual_dir={tmp_path}",
                         f"--out_dir={out}"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "VAE" in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr
  assert not out.exists()
