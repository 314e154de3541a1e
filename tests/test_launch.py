"""Tests of launch/: the gcloud commands tpu.py composes, the scripts it runs on workers, and
gpu_multihost.sh.

Nothing here reaches Google Cloud: a stand-in `gcloud` first on PATH records any call (dry runs must
make none), and the remote scripts run locally under a throwaway $HOME against a stand-in trainer,
which is what shows their quoting, detaching and stopping work.
"""

import contextlib
import os
from pathlib import Path
import shlex
import signal
import subprocess
import sys
import time

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu.py"
GPU = ROOT / "launch" / "gpu_multihost.sh"
MAIN = "-m dydit_jax.main --config=configs/xl.py:lam=0.5,res=256"
# Settings both launchers read from the environment; cleared so the host's shell cannot leak in.
_SETTINGS = ("PROJECT", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "BUCKET",
             "HOSTS", "LAUNCHER", "PORT", "REPO_DIR", "PYTHON", "CONFIG", "WORKDIR", "SRUN_ARGS",
             "LOG_DIR", "DRY_RUN", "SLURM_JOB_ID", "SLURM_JOB_NODELIST")

# Stand-in trainer: records its arguments (one per line) and DYDIT_* settings, then waits for
# SIGTERM the way the real trainer checkpoints and exits.
_TRAINER = """#!/usr/bin/env bash
out="${STUB_OUT:-$HOME}/${DYDIT_PROCESS_ID:-run}"
# Each file appears whole (written aside, then renamed): the test polls for them.
printf '%s\\n' "$@" > "$out.argv.tmp" && mv "$out.argv.tmp" "$out.argv"
env | grep '^DYDIT_\\|^FOO=' | sort > "$out.env.tmp" && mv "$out.env.tmp" "$out.env"
trap 'echo stopped > "$out.stopped"; exit 0' TERM
echo "trainer up"
while :; do sleep 0.05; done
"""


def _executable(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)
  return path


@pytest.fixture
def gcloud(tmp_path):
  """A stand-in gcloud that appends its argv (NUL-separated, one call per line) to a log."""
  log = tmp_path / "gcloud.log"
  _executable(tmp_path / "bin" / "gcloud",
              f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> {log}\necho >> {log}\n'
              'exit "${FAKE_GCLOUD_STATUS:-0}"\n')
  return log


def _env(tmp_path, **extra):
  env = {k: v for k, v in os.environ.items()
         if k not in _SETTINGS and not k.startswith("DYDIT_")}
  env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
  env.update(extra)
  return env


def tpu(tmp_path, *args, env=None):
  return subprocess.run([sys.executable, str(TPU), *args], capture_output=True, text=True,
                        env=_env(tmp_path, **(env or {})), timeout=30, check=False)


def dry(tmp_path, *args, passthrough=(), env=None):
  """The commands a dry run prints, each split back into its argv."""
  tail = ["--", *passthrough] if passthrough else []
  result = tpu(tmp_path, *args, "--dry-run", *tail, env=env)
  assert result.returncode == 0, result.stderr
  assert not (tmp_path / "gcloud.log").exists(), "a dry run called gcloud"
  return [shlex.split(line) for line in result.stdout.splitlines()]


def _script(cmd):
  """The remote script of a `gcloud ... ssh --command=SCRIPT`, checked to be valid bash."""
  [script] = [a.split("=", 1)[1] for a in cmd if a.startswith("--command=")]
  subprocess.run(["bash", "-n", "-c", script], check=True)
  return script


def test_create_tpu_vm(tmp_path, gcloud):
  [cmd] = dry(tmp_path, "create", "--accelerator-type=v4-32", "--zone=us-central2-b", "--spot",
              env={"ZONE": "europe-west4-a", "TPU_NAME": "my-tpu", "PROJECT": "proj"})
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu"]
  assert set(cmd[6:]) == {"--zone=us-central2-b", "--accelerator-type=v4-32",
                          "--version=tpu-ubuntu2204-base", "--spot", "--project=proj"}


@pytest.mark.parametrize("tier,prefix", [("--spot", ["gcloud"]),
                                         ("--best-effort", ["gcloud", "alpha"])])
def test_create_queued_resource(tmp_path, gcloud, tier, prefix):
  [cmd] = dry(tmp_path, "create", "--queued", tier, "--valid-until=6h", "--name=qr",
              passthrough=["--network=net"],
              env={"ZONE": "us-east5-a", "ACCELERATOR_TYPE": "v5litepod-64"})
  words = prefix + ["compute", "tpus", "queued-resources", "create", "qr"]
  assert cmd[:len(words)] == words
  assert {"--node-id=qr", "--zone=us-east5-a", "--accelerator-type=v5litepod-64",
          "--runtime-version=v2-alpha-tpuv5-lite", tier, "--valid-until-duration=6h"} <= set(cmd)
  assert cmd[-1] == "--network=net" and not any(a.startswith("--project") for a in cmd)


@pytest.mark.parametrize("args,env,message", [
    (["create"], {}, "missing --zone (or $ZONE), --name (or $TPU_NAME), --accelerator-type"),
    (["create", "--zone=z", "--name=n", "--accelerator-type=v9-8"], {}, "--runtime-version"),
    (["create", "--zone=z", "--name=n", "--accelerator-type=v4-8", "--best-effort"], {},
     "add --queued"),
    (["setup", "--zone=z", "--name=n"], {}, "missing --repo (or $DYDIT_REPO) or --package"),
    (["setup", "--zone=z", "--name=n", "--package=/no/such.whl"], {}, "/no/such.whl"),
    (["run", "--zone=z"], {"TPU_NAME": "n"}, "missing --config (or $DYDIT_CONFIG)"),
    (["run", "--zone=z", "--name=n", "--config=c.py"], {}, "missing --workdir"),
    (["run", "--zone=z", "--name=n", "--config=c.py", "--workdir=w", "--env=1X=y"], {}, "--env"),
    (["logs", "--zone=z", "--name=n", "--worker=first"], {}, "--worker"),
    (["delete", "--name=n"], {}, "missing --zone (or $ZONE)"),
])
def test_usage_errors(tmp_path, gcloud, args, env, message):
  result = tpu(tmp_path, *args, env=env)
  assert result.returncode != 0 and result.stdout == ""
  [line] = result.stderr.splitlines()
  assert line.startswith(f"tpu.py {args[0]}: error: ") and message in line
  assert not gcloud.exists()


def test_setup_from_git(tmp_path, gcloud):
  [cmd] = dry(tmp_path, "setup", "--zone=z", "--name=n", "--ref=v1",
              env={"DYDIT_REPO": "https://example.com/org/dydit_jax.git"})
  assert cmd[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "n", "--worker=all"]
  script = _script(cmd)
  for piece in ("git clone -q --depth=1 --branch=v1 https://example.com/org/dydit_jax.git dydit",
                "uv venv", "pip install", "'./dydit[tpu]'"):
    assert piece in script


def test_setup_from_package(tmp_path, gcloud):
  wheel = tmp_path / "dydit_jax-0.1-py3-none-any.whl"
  wheel.touch()
  (tmp_path / "configs").mkdir()
  mkdir, scp, install = dry(tmp_path, "setup", "--zone=z", "--name=n", f"--package={wheel}",
                            f"--configs-dir={tmp_path / 'configs'}",
                            env={"DYDIT_REPO": "https://example.com/ignored.git"})
  assert "mkdir dydit" in _script(mkdir) and "--worker=all" in mkdir
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
  assert scp[6:9] == [str(wheel), str(tmp_path / "configs"), "n:dydit/"]
  assert {"--worker=all", "--zone=z"} <= set(scp)
  assert f"'./dydit/{wheel.name}[tpu]'" in _script(install) and "--worker=all" in install
  assert "git clone" not in _script(mkdir) + _script(install)


def test_run_command(tmp_path, gcloud):
  [cmd] = dry(tmp_path, "run", "--zone=z", "--name=pod", "--config=configs/xl.py:lam=0.5,res=256",
              "--env=XLA_FLAGS=--xla_a --xla_b", passthrough=["--config.total_steps=10"],
              env={"BUCKET": "bkt"})
  assert cmd[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--worker=all"]
  script = _script(cmd)
  assert f"{MAIN} --workdir=gs://bkt/pod --config.total_steps=10 >>" in script
  assert "setsid nohup env 'XLA_FLAGS=--xla_a --xla_b' " in script


def test_logs_stop_delete(tmp_path, gcloud):
  [logs] = dry(tmp_path, "logs", "--zone=z", "--name=n")
  [logs_all] = dry(tmp_path, "logs", "--zone=z", "--name=n", "--worker=all", "--no-follow")
  assert "--worker=0" in logs and "-F" in _script(logs).split()
  assert "--worker=all" in logs_all and "-F" not in _script(logs_all).split()
  [stop] = dry(tmp_path, "stop", "--zone=z", "--name=n")
  assert "--worker=all" in stop and "kill -TERM" in _script(stop)
  [vm] = dry(tmp_path, "delete", "--zone=z", "--name=n")
  [queued] = dry(tmp_path, "delete", "--zone=z", "--name=n", "--queued")
  assert vm == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "n", "--quiet", "--zone=z"]
  assert queued[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "n"]
  assert {"--force", "--quiet", "--zone=z"} <= set(queued)


def test_runs_what_dry_run_prints_and_stops_on_failure(tmp_path, gcloud):
  wheel = tmp_path / "pkg.tar.gz"
  wheel.touch()
  args = ["setup", "--zone=z", "--name=n", f"--package={wheel}", f"--configs-dir={tmp_path}"]
  expected = dry(tmp_path, *args)
  assert tpu(tmp_path, *args).returncode == 0
  calls = [call.split("\0") for call in gcloud.read_text().split("\0\n")[:-1]]
  assert [["gcloud", *c] for c in calls] == expected
  gcloud.unlink()
  failed = tpu(tmp_path, *args, env={"FAKE_GCLOUD_STATUS": "3"})
  assert failed.returncode == 3 and gcloud.read_text().count("\0\n") == 1


def _eventually(check, what):
  """Polls `check` for up to 20 s (a loaded CI machine is slow): the detached trainer starts and stops
  asynchronously."""
  for _ in range(800):
    if check():
      return
    time.sleep(0.025)
  raise AssertionError(f"timed out waiting for {what}")


def test_remote_run_detaches_refuses_a_second_run_and_stops(tmp_path, gcloud):
  home = tmp_path / "home"
  (home / "dydit").mkdir(parents=True)
  _executable(home / "dydit-venv" / "bin" / "python", _TRAINER)
  base = ["--zone=z", "--name=n"]
  [run] = dry(tmp_path, "run", *base, "--config=configs/xl.py:lam=0.5,res=256", "--workdir=w",
              "--env=FOO=a b", passthrough=["--note=x y"])
  [stop] = dry(tmp_path, "stop", *base)
  [logs] = dry(tmp_path, "logs", *base, "--no-follow")

  def remote(cmd):  # What gcloud's ssh would run on a worker, run here with HOME=home.
    return subprocess.run(["bash", "-c", _script(cmd)], capture_output=True, text=True,
                          env={"HOME": str(home), "PATH": os.environ["PATH"]}, timeout=10,
                          check=False)

  pid = None
  try:
    assert remote(run).returncode == 0  # Returns at once: the trainer is detached.
    pid = int((home / "dydit-run.pid").read_text())
    _eventually((home / "run.env").exists, "the trainer to start")
    assert (home / "run.argv").read_text().splitlines() == [
        "-m", "dydit_jax.main", "--config=configs/xl.py:lam=0.5,res=256", "--workdir=w",
        "--note=x y"]
    assert (home / "run.env").read_text() == "FOO=a b\n"
    assert os.getpgid(pid) == pid  # Its own process group: what `stop` signals.
    second = remote(run)
    assert second.returncode == 1 and "a run is active" in second.stderr
    _eventually(lambda: "trainer up" in remote(logs).stdout, "the log")
    assert "SIGTERM sent" in remote(stop).stdout
    _eventually((home / "run.stopped").exists, "the SIGTERM handler")
    _eventually(lambda: "no active run" in remote(stop).stdout, "the trainer to exit")
  finally:
    if pid is not None and not (home / "run.stopped").exists():
      with contextlib.suppress(ProcessLookupError):  # Its group, else the process alone.
        if os.getpgid(pid) == pid:
          os.killpg(pid, signal.SIGKILL)
        else:
          os.kill(pid, signal.SIGKILL)


def _gpu(tmp_path, *args, **env):
  return subprocess.run(["bash", str(GPU), *args], capture_output=True, text=True,
                        env=_env(tmp_path, **env), timeout=30, check=False)


def test_gpu_multihost_dry_run_one_line_per_host(tmp_path):
  result = _gpu(tmp_path, "--note=a b", DRY_RUN="1", HOSTS="gpu-a gpu-b gpu-c", PORT="4321",
                CONFIG="configs/xl.py:lam=0.5,res=256", WORKDIR="gs://bkt/run", REPO_DIR="/r")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 3
  for i, (line, host) in enumerate(zip(lines, ["gpu-a", "gpu-b", "gpu-c"])):
    ssh = shlex.split(line)
    assert ssh[0] == "ssh" and ssh[-2] == host
    assert shlex.split(ssh[-1]) == [
        "cd", "/r", "&&", "env", "DYDIT_COORDINATOR=gpu-a:4321", "DYDIT_NUM_PROCESSES=3",
        f"DYDIT_PROCESS_ID={i}", "python", *MAIN.split(), "--workdir=gs://bkt/run", "--note=a b"]


def test_gpu_multihost_srun_dry_run(tmp_path):
  result = _gpu(tmp_path, DRY_RUN="1", SLURM_JOB_ID="7", HOSTS="n1 n2", CONFIG="c.py",
                WORKDIR="w")
  [line] = result.stdout.splitlines()
  srun = shlex.split(line)
  assert srun[0] == "srun" and {"--ntasks=2", "--ntasks-per-node=1", "--nodelist=n1,n2"} <= set(srun)
  assert 'DYDIT_PROCESS_ID="$SLURM_PROCID"' in srun[-1] and "DYDIT_NUM_PROCESSES=2" in srun[-1]


def test_gpu_multihost_launches_every_host(tmp_path):
  """With a stand-in ssh that runs the remote command here, each process gets its own id."""
  _executable(tmp_path / "bin" / "ssh", '#!/usr/bin/env bash\nexec bash -c "${@: -1}"\n')
  trainer = _executable(tmp_path / "bin" / "trainer",
                        _TRAINER.replace("while :; do sleep 0.05; done", "exit 0"))
  out = tmp_path / "out"
  out.mkdir()
  result = _gpu(tmp_path, "--note=a b", HOSTS="h0 h1", CONFIG="c.py", WORKDIR="w",
                PYTHON=str(trainer), REPO_DIR=str(tmp_path), LOG_DIR=str(tmp_path / "logs"),
                STUB_OUT=str(out))
  assert result.returncode == 0, result.stderr
  for i in range(2):
    assert (out / f"{i}.env").read_text().splitlines() == [
        "DYDIT_COORDINATOR=h0:12355", "DYDIT_NUM_PROCESSES=2", f"DYDIT_PROCESS_ID={i}"]
    assert (out / f"{i}.argv").read_text().splitlines() == [
        "-m", "dydit_jax.main", "--config=c.py", "--workdir=w", "--note=a b"]
  assert "trainer up" in result.stdout  # Process 0 streams here, process 1 to its log file.
  assert "trainer up" in (tmp_path / "logs" / "1-h1.log").read_text()


def test_gpu_multihost_requires_workdir(tmp_path):
  result = _gpu(tmp_path, DRY_RUN="1", HOSTS="a", CONFIG="c.py")
  assert result.returncode != 0 and "WORKDIR" in result.stderr and result.stdout == ""
