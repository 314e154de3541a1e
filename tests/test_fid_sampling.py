"""FID sampling runs (`dydit_jax.fid_sampling`, `python -m dydit_jax.sample --out=FILE.npz`).

Exactly N distinct samples whatever the chunking; a run interrupted mid-chunk (an exception inside the
sampler call, a leftover temporary file, and a real SIGKILL of the CLI) resumes to the bytes of an
uninterrupted run; two hosts splitting the chunks give the same file; a resume with other settings is
refused naming the field, leaving the folder untouched; a DyDiT's summary holds its MACs ratio.
The tiny pixel DiT (8x8x1, 4 classes) with CFG samples 4-step chains, so every run takes ~1 s.
"""
import dataclasses
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

import train_helpers as th
from dydit_jax import checkpoints, fid_sampling, images
from dydit_jax.errors import UserError
from dydit_jax.sampler import SampleOptions, Sampler
from dydit_jax.vae.checkpoints import fingerprint

OPTIONS = SampleOptions(steps="4", cfg_scale=2.0)
N, CHUNK, SEED = 10, 4, 7          # chunks of 4, 4 and 2 samples


def plan_for(sampler, model, *, num_samples=N, chunk=CHUNK, seed=SEED):
  return fid_sampling.run_plan(num_samples=num_samples, chunk=chunk, seed=seed, sampler=sampler,
                               model_id=fingerprint(model), vae_id=None, decode_batch=None)


def read_npz(path):
  with np.load(path) as z:
    return z["arr_0"], z["arr_1"]


class FailingSampler:
  """The sampler, raising inside its call number `fail_at` (1-based): a run stopped mid-chunk."""

  def __init__(self, sampler, fail_at):
    self.sampler, self.fail_at, self.calls = sampler, fail_at, 0

  def __getattr__(self, name):
    return getattr(self.sampler, name)

  def generate(self, labels, key, *, first_id):
    self.calls += 1
    if self.calls == self.fail_at:
      raise KeyboardInterrupt("stopped mid-chunk")
    return self.sampler.generate(labels, key, first_id=first_id)


@pytest.fixture(scope="module")
def sampler(tiny_dit):
  return Sampler(tiny_dit, OPTIONS)


@pytest.fixture(scope="module")
def straight(sampler, tiny_dit, tmp_path_factory):
  """One uninterrupted run: (images, labels, summary)."""
  out = tmp_path_factory.mktemp("straight") / "samples.npz"
  summary = fid_sampling.sample_run(sampler, out, plan_for(sampler, tiny_dit))
  return (*read_npz(out), summary, out)


def test_n_not_a_multiple_of_the_chunk_gives_exactly_n_distinct_samples(straight, sampler):
  pixels, labels, summary, out = straight
  assert pixels.shape == (N, 8, 8, 1) and pixels.dtype == np.uint8
  assert len(np.unique(pixels.reshape(N, -1), axis=0)) == N
  np.testing.assert_array_equal(labels, fid_sampling.sample_labels(SEED, np.arange(N), 4))
  assert len(set(labels.tolist())) > 1
  assert not (out.parent / "samples.chunks").exists()
  assert summary["num_samples"] == N and summary["seed"] == SEED and summary["options"]["cfg_scale"] == 2.0
  assert summary["flops_ratio"] == 1.0 and summary["images_per_s"] > 0 and summary["engine"] == "masked"
  assert json.loads(out.with_suffix(".json").read_text()) == summary
  # Image i depends on (seed, i) only: one batch of all N images samples the same (up to the rounding
  # of a differently shaped program).
  _, noise_key = fid_sampling.run_keys(SEED)
  whole = images.to_uint8(sampler.generate(labels, noise_key).samples)
  assert np.abs(whole.astype(int) - pixels).max() <= 1 and np.mean(whole != pixels) < 0.01


def test_a_run_stopped_mid_chunk_resumes_to_the_uninterrupted_bytes(straight, sampler, tiny_dit, tmp_path):
  out = tmp_path / "samples.npz"
  plan = plan_for(sampler, tiny_dit)
  failing = FailingSampler(sampler, fail_at=2)           # chunk 0 written, chunk 1 stopped
  with pytest.raises(KeyboardInterrupt):
    fid_sampling.sample_run(failing, out, plan)
  chunks = tmp_path / "samples.chunks"
  assert sorted(p.name for p in chunks.iterdir()) == ["chunk-00000.npz", "plan.json"] and not out.exists()
  (chunks / "chunk-00001.npz.tmp-0").write_bytes(b"half a chunk")   # what a kill during the write leaves
  counting = FailingSampler(sampler, fail_at=0)
  summary = fid_sampling.sample_run(counting, out, plan)
  assert counting.calls == 2                              # only the missing chunks 1 and 2
  for got, want in zip(read_npz(out), straight[:2]):
    np.testing.assert_array_equal(got, want)
  assert summary["flops_ratio"] == 1.0 and not chunks.exists()


def test_two_hosts_splitting_the_chunks_write_the_same_file(straight, sampler, tiny_dit, tmp_path):
  out = tmp_path / "samples.npz"
  plan = plan_for(sampler, tiny_dit)
  assert fid_sampling.sample_run(sampler, out, plan, process_index=1, process_count=2) is None   # chunk 1
  assert sorted(p.name for p in (tmp_path / "samples.chunks").iterdir()) == ["chunk-00001.npz", "plan.json"]
  summary = fid_sampling.sample_run(sampler, out, plan, process_index=0, process_count=2)       # 0, 2
  for got, want in zip(read_npz(out), straight[:2]):
    np.testing.assert_array_equal(got, want)
  assert summary["hosts"] == 2


@pytest.mark.parametrize("change, field", [
    ({"seed": SEED + 1}, "seed"), ({"num_samples": N + 1}, "num_samples"), ({"chunk": 3}, "chunk"),
    ({"cfg_scale": 1.5}, "options.cfg_scale"), ({"steps": "5"}, "options.steps"),
    ({"model": True}, "model_fingerprint")])
def test_resuming_with_other_settings_is_refused_and_changes_nothing(sampler, tiny_dit, tmp_path, change, field):
  out = tmp_path / "samples.npz"
  with pytest.raises(KeyboardInterrupt):
    fid_sampling.sample_run(FailingSampler(sampler, fail_at=2), out, plan_for(sampler, tiny_dit))
  before = th.tree_hash(tmp_path)
  options = {k: change[k] for k in ("cfg_scale", "steps") if k in change}
  other_sampler = Sampler(tiny_dit, dataclasses.replace(OPTIONS, **options))
  plan = plan_for(other_sampler, tiny_dit, **{k: change[k] for k in ("seed", "num_samples", "chunk") if k in change})
  if change.get("model"):   # other weights (or a workdir that gained a newer checkpoint)
    plan["model_fingerprint"] = "0" * 64
  with pytest.raises(UserError) as error:
    fid_sampling.sample_run(other_sampler, out, plan)
  message = str(error.value)
  assert f"(different: {field};" in message and "unfinished run with other settings" in message, message
  assert th.tree_hash(tmp_path) == before


def test_a_finished_output_is_never_overwritten(straight, sampler, tiny_dit):
  out = straight[3]
  before = th.tree_hash(out.parent)
  with pytest.raises(UserError, match="exists already; delete it"):
    fid_sampling.sample_run(sampler, out, plan_for(sampler, tiny_dit))
  assert th.tree_hash(out.parent) == before


def test_a_dydit_summary_reports_the_macs_ratio_of_every_image(tiny_dydit, tmp_path):
  sampler = Sampler(tiny_dydit, OPTIONS)
  summary = fid_sampling.sample_run(sampler, tmp_path / "dydit.npz", plan_for(sampler, tiny_dydit, num_samples=6,
                                                                              chunk=3))
  labels = fid_sampling.sample_labels(SEED, np.arange(6), 4)
  whole = sampler.generate(labels, fid_sampling.run_keys(SEED)[1])
  assert 0.2 < summary["flops_ratio"] < 0.95 and summary["macs_ratio"] < 1.0
  assert summary["flops_ratio"] == pytest.approx(whole.flops_ratio, rel=1e-6)
  assert summary["macs_ratio"] == pytest.approx(whole.macs_ratio, rel=1e-6)
  assert summary["dynamic"] is True


@pytest.mark.slow
def test_cli_killed_mid_run_resumes_to_the_uninterrupted_samples(tiny_dit, tmp_path):
  """kill -9 of `python -m dydit_jax.sample` once its first chunk exists; the rerun of the same command
  completes the file, equal to an in-process uninterrupted run of the same settings."""
  model_dir = checkpoints.save_model(tiny_dit, tmp_path / "model")
  out = tmp_path / "samples.npz"
  cmd = [sys.executable, "-m", "dydit_jax.sample", f"--model={model_dir}", "--num_samples=16", "--chunk=2",
         "--steps=50", "--cfg_scale=2", f"--seed={SEED}", f"--out={out}"]
  proc = th.start(cmd)
  th.wait_for(lambda: (tmp_path / "samples.chunks" / "chunk-00000.npz").exists(), proc=proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  done = sorted(p.name for p in (tmp_path / "samples.chunks").glob("chunk-*.npz"))
  assert proc.returncode == -signal.SIGKILL and not out.exists() and 0 < len(done) < 8, done
  resumed = subprocess.run(cmd, cwd=th.REPO, env=th.env(), capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"{8 - len(done)} of 8 chunks to sample" in resumed.stderr and "(resuming)" in resumed.stderr
  assert "images/s, ETA" in resumed.stderr
  model = checkpoints.load_model(model_dir)
  sampler = Sampler(model, SampleOptions(steps="50", cfg_scale=2.0))
  want = tmp_path / "want.npz"
  fid_sampling.sample_run(sampler, want, plan_for(sampler, model, num_samples=16, chunk=2))
  for got, expected in zip(read_npz(out), read_npz(want)):
    np.testing.assert_array_equal(got, expected)
  summary = json.loads(out.with_suffix(".json").read_text())
  assert summary["num_samples"] == 16 and summary["sources"]["model"] == str(model_dir)
  again = subprocess.run(cmd, cwd=th.REPO, env=th.env(), capture_output=True, text=True, timeout=300)
  assert "exists already; delete it" in th.error_line(again)
