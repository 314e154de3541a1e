"""The same training on 1 device, on a 4x2 (data x fsdp) mesh, on 2 processes x 4 devices, and resumed
from an 8-device checkpoint onto a 2-device mesh, all on simulated CPU devices.

Every run is the real entry point (`python -m dydit_jax.main`, tests/train_tiny_config.py, 6 steps of
a tiny DyDiT at lr 1e-2, checkpoints at 2, 4, 6). Tolerance: every step-6 param (and EMA) element
agrees with the 1-device run to max |difference| <= 1e-5, 0.1% of one Adam step (fp32 reductions in
another order give ~1e-6); per-step losses agree to rtol 1e-5. A wrong batch layout, data order or RNG
stream moves params by whole steps (~1e-2). Left out: the attention KEY bias. Softmax ignores a shift
of the logits, so its true gradient is zero and Adam turns fp rounding noise into steps of any sign
(~5e-5 apart after 6 steps) that, for the same reason, change no output.
"""
import shutil

import numpy as np
import pytest
from PIL import Image

import train_helpers as th

pytestmark = pytest.mark.slow   # end to end: subprocesses / whole runs (`-m "not slow"` skips)

ARG = "steps=6,every=2,fsdp=2,complete=0,sample=6"
TOL = 1e-5


def params(workdir, **kwargs):
  """th.params without the attention key bias (see the module docstring)."""
  out = th.params(workdir, **kwargs)
  qkv_bias = out.pop("blocks/attn/qkv/bias")
  d = qkv_bias.shape[-1] // 3
  out["blocks/attn/qkv/bias (q, v)"] = np.concatenate([qkv_bias[..., :d], qkv_bias[..., 2 * d:]], -1)
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("distributed")
  cache = tmp_path_factory.getbasetemp() / "jax_cache"
  wd = {name: root / name for name in ("one", "mesh", "hosts", "moved")}
  # Two processes x 4 devices, joined on localhost (gloo collectives); started first, they run
  # while the single-process runs go.
  port = th.free_port()
  hosts = [th.start(th.main_cmd(wd["hosts"], ARG, f"--coordinator=localhost:{port}", "--num_processes=2",
                                f"--process_id={i}"), devices=4, cache_dir=cache) for i in range(2)]
  logs = {"one": th.run_main(wd["one"], "steps=6,every=2,fsdp=1,complete=0,sample=6", cache_dir=cache).stderr,
          "mesh": th.run_main(wd["mesh"], ARG, devices=8, cache_dir=cache).stderr}
  logs["hosts"] = [th.finish(p) for p in hosts]
  for i, p in enumerate(hosts):
    assert p.returncode == 0, f"process {i} failed:\n{logs['hosts'][i][-4000:]}"
  # The 8-device run's step-4 checkpoint, resumed on 2 devices (mesh 1 x 2) to step 6.
  shutil.copytree(wd["mesh"], wd["moved"])
  shutil.rmtree(wd["moved"] / "checkpoints" / "6")
  logs["moved"] = th.run_main(wd["moved"], ARG, devices=2, cache_dir=cache).stderr
  return wd, logs


def test_mesh_4x2_equals_one_device(runs):
  wd, logs = runs
  assert "mesh {'data': 4, 'fsdp': 2}" in logs["mesh"]
  assert "mesh {'data': 1, 'fsdp': 1}" in logs["one"]
  assert th.max_abs_error(params(wd["mesh"]), params(wd["one"])) <= TOL
  assert th.max_abs_error(params(wd["mesh"], use_ema=True), params(wd["one"], use_ema=True)) <= TOL
  one, mesh = th.metric_rows(wd["one"]), th.metric_rows(wd["mesh"])
  assert sorted(one) == sorted(mesh) == list(range(1, 7))
  np.testing.assert_allclose([mesh[s]["loss"] for s in one], [one[s]["loss"] for s in one], rtol=1e-5)
  # The params changed a lot over the 6 steps, so the agreement is not trivial.
  assert th.max_abs_error(params(wd["one"]), params(wd["one"], step=2)) > 1e-2


def test_large_params_are_sharded(runs):
  _, logs = runs
  # describe() measures the live arrays: the block kernels are split over fsdp=2, so each device
  # holds less than the whole state; without fsdp every array is whole.
  line = next(l for l in logs["mesh"].splitlines() if "train state:" in l)
  split, total = line.split("train state: ")[1].split(" arrays sharded")[0].split(" of ")
  assert 0 < int(split) < int(total)
  per_device, whole = (float(x.split(" MiB")[0]) for x in line.split("; ")[-1].split(" per device of "))
  assert per_device < 0.8 * whole
  assert "train state: 0 of" in logs["one"]


def test_two_processes_equal_one_process(runs):
  wd, logs = runs
  assert "process 0 of 2; 4 local / 8 global devices" in logs["hosts"][0]
  assert "process 1 of 2; 4 local / 8 global devices" in logs["hosts"][1]
  # Each host read only its own half of every global batch, and the runs still agree.
  assert "reads block 0 of 2 of each global batch" in logs["hosts"][0]
  assert "reads block 1 of 2 of each global batch" in logs["hosts"][1]
  assert "reads block 0 of 1 of each global batch" in logs["one"]
  assert th.max_abs_error(params(wd["hosts"]), params(wd["mesh"])) <= TOL
  assert th.max_abs_error(params(wd["hosts"]), params(wd["one"])) <= TOL


def test_periodic_samples_agree(runs):
  # The step-6 sample grid (EMA weights, eval mode) of the sharded runs, gathered from all hosts.
  wd, _ = runs
  grids = {k: np.asarray(Image.open(wd[k] / "samples" / "step_00000006.png")) for k in ("one", "mesh", "hosts")}
  assert grids["one"].shape == (3 * 10 + 2, 2 * 10 + 2) and grids["one"].std() > 0
  for k in ("mesh", "hosts"):
    assert np.abs(grids[k].astype(int) - grids["one"]).max() <= 1      # uint8 rounding


def test_checkpoint_from_8_devices_resumes_on_2(runs):
  wd, logs = runs
  assert "resuming at step 4" in logs["moved"]
  assert "mesh {'data': 1, 'fsdp': 2}" in logs["moved"]
  assert th.steps(wd["moved"]) == [2, 4, 6]
  assert th.max_abs_error(params(wd["moved"]), params(wd["mesh"])) <= TOL
