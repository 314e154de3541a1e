#!/usr/bin/env python3
"""Cloud TPU launcher for dydit_jax: create a slice, install, run, watch, stop, delete.

A multi-host TPU slice runs the SAME command on every worker (jax.distributed.initialize() finds its
peers by itself on Cloud TPU), so every step here is one gcloud command, fanned out with
`--worker=all`. This file only composes those commands; `--dry-run` prints them (one per line,
shell-quoted) instead of running them, which is how they are tested and reviewed.

Standard library only, so it runs on a laptop that has gcloud but not the project's dependencies.

Each worker keeps fixed names under its $HOME: the code in ~/dydit (a git clone, or the copied
package and configs/), the virtual environment in ~/dydit-venv, the run's log in ~/dydit-run.log and
its process group id in ~/dydit-run.pid (one run per slice, since a TPU serves one process at a time).

  python launch/tpu.py create --zone=us-central2-b --name=dydit --accelerator-type=v4-32
  python launch/tpu.py setup  --zone=us-central2-b --name=dydit --repo=https://github.com/ORG/dydit_jax
  python launch/tpu.py run    --zone=us-central2-b --name=dydit --config=configs/xl.py:lam=0.5,res=256 \
      --workdir=gs://BUCKET/xl_lam05 -- --config.total_steps=200000
  python launch/tpu.py logs   --zone=us-central2-b --name=dydit
  python launch/tpu.py delete --zone=us-central2-b --name=dydit
"""

import argparse
import os
from pathlib import Path
import shlex
import subprocess
import sys

_REPO_ROOT = Path(__file__).resolve().parent.parent
# Remote names, relative to each worker's $HOME.
_CODE_DIR = "dydit"
_VENV_DIR = "dydit-venv"
_LOG = "dydit-run.log"
_PID = "dydit-run.pid"

# Environment fallback of each flag (by argparse dest); an explicit flag always wins.
_ENV = {
    "project": "PROJECT",
    "zone": "ZONE",
    "name": "TPU_NAME",
    "accelerator_type": "ACCELERATOR_TYPE",
    "runtime_version": "RUNTIME_VERSION",
    "bucket": "BUCKET",
    "repo": "DYDIT_REPO",
    "config": "DYDIT_CONFIG",
    "workdir": "DYDIT_WORKDIR",
}

# The TPU software version to boot per accelerator family (Cloud TPU's recommendation for JAX).
_RUNTIME_BY_FAMILY = (
    ("v6e-", "v2-alpha-tpuv6e"),
    ("v5p-", "v2-alpha-tpuv5"),
    ("v5litepod-", "v2-alpha-tpuv5-lite"),
    ("v4-", "tpu-ubuntu2204-base"),
    ("v3-", "tpu-ubuntu2204-base"),
    ("v2-", "tpu-ubuntu2204-base"),
)


class UsageError(Exception):
  """A missing or inconsistent value; reported as one line, exit status 2."""


def _home(path: str) -> str:
  """Shell text for a worker path; $HOME stays unexpanded until it reaches the worker."""
  return f'"$HOME"/{path}'


def _flag(dest: str) -> str:
  return "--" + dest.replace("_", "-")


def _require(args, *dests):
  """Raises one UsageError naming every missing value and its environment variable."""
  missing = [f"{_flag(d)} (or ${_ENV[d]})" if d in _ENV else _flag(d)
             for d in dests if not getattr(args, d)]
  if missing:
    raise UsageError("missing " + ", ".join(missing))


def _gcloud(args, *words):
  cmd = ["gcloud", *words, f"--zone={args.zone}"]
  if args.project:  # Otherwise gcloud's configured project (gcloud config set project ...).
    cmd.append(f"--project={args.project}")
  return cmd


def _ssh(args, worker, script):
  return _gcloud(args, "compute", "tpus", "tpu-vm", "ssh", args.name, f"--worker={worker}",
                 f"--command={script}")


def _script(*steps):
  """One-line remote bash script that stops at the first failing step (one line keeps --dry-run's
  one-command-per-line promise)."""
  return "; ".join(("set -e",) + steps)


_IF_RUNNING = f'[ -f {_home(_PID)} ] && kill -0 "$(cat {_home(_PID)})" 2>/dev/null'
# Refuses to touch a worker whose trainer is still alive (re-running setup would delete its code).
_REFUSE_IF_RUNNING = (f'if {_IF_RUNNING}; then echo "dydit: a run is active on $(hostname);'
                      f' stop it first (tpu.py stop)" >&2; exit 1; fi')


def _create(args):
  _require(args, "zone", "name", "accelerator_type")
  runtime = args.runtime_version or next(
      (v for prefix, v in _RUNTIME_BY_FAMILY if args.accelerator_type.startswith(prefix)), None)
  if not runtime:
    raise UsageError(f"missing --runtime-version (or $RUNTIME_VERSION): no default is known for "
                     f"--accelerator-type={args.accelerator_type}")
  if args.best_effort and not args.queued:
    raise UsageError("--best-effort exists only for queued resources; add --queued")
  if args.preemptible and args.queued:
    raise UsageError("queued resources have no --preemptible; use --spot")
  if args.valid_until and not args.queued:
    raise UsageError("--valid-until needs --queued")
  tier = [_flag(t) for t in ("spot", "preemptible", "reserved", "best_effort") if getattr(args, t)]
  if not args.queued:
    return [_gcloud(args, "compute", "tpus", "tpu-vm", "create", args.name,
                    f"--accelerator-type={args.accelerator_type}", f"--version={runtime}",
                    *tier) + args.passthrough]
  # The queued resource takes the node's name: one name addresses both, and `delete --queued`
  # removes the request together with its node.
  alpha = ["alpha"] if args.best_effort else []  # --best-effort is an alpha-only flag.
  until = [f"--valid-until-duration={args.valid_until}"] if args.valid_until else []
  return [_gcloud(args, *alpha, "compute", "tpus", "queued-resources", "create", args.name,
                  f"--node-id={args.name}", f"--accelerator-type={args.accelerator_type}",
                  f"--runtime-version={runtime}", *tier, *until) + args.passthrough]


def _setup(args):
  """Installs the package with its tpu extra into a fresh venv on every worker.

  TPU VM images ship Python 3.10 while JAX needs a newer one, so uv (pip-installed for the user)
  provides the interpreter as well as the fast install.
  """
  _require(args, "zone", "name")
  if not args.package and not args.repo:
    raise UsageError("missing --repo (or $DYDIT_REPO) or --package")
  prepare = (_REFUSE_IF_RUNNING, 'cd "$HOME"', "python3 -m pip install -q --user -U uv",
             f"rm -rf {_CODE_DIR} {_VENV_DIR}")
  make_venv = f"python3 -m uv venv -q --python={args.python} {_VENV_DIR}"
  install = f"python3 -m uv pip install -q --python={_VENV_DIR}/bin/python "
  if args.package:
    # A wheel or sdist built here (python -m build), copied with configs/, which `run` reads.
    package, configs = Path(args.package), Path(args.configs_dir)
    for path in (package, configs):
      if not path.exists():
        raise UsageError(f"no such file or directory: {path}")
    return [
        _ssh(args, "all", _script(*prepare, f"mkdir {_CODE_DIR}")),
        _gcloud(args, "compute", "tpus", "tpu-vm", "scp", "--recurse", str(package),
                str(configs), f"{args.name}:{_CODE_DIR}/", "--worker=all"),
        _ssh(args, "all", _script('cd "$HOME"', make_venv,
                                  install + shlex.quote(f"./{_CODE_DIR}/{package.name}[tpu]"))),
    ]
  branch = [f"--branch={shlex.quote(args.ref)}"] if args.ref else []
  clone = " ".join(["git clone -q --depth=1", *branch, shlex.quote(args.repo), _CODE_DIR])
  return [_ssh(args, "all", _script(*prepare, clone, make_venv,
                                    install + shlex.quote(f"./{_CODE_DIR}[tpu]")))]


def _run(args):
  """Starts the trainer on every worker, detached (setsid + nohup) so it outlives the ssh session.

  setsid makes the trainer the leader of its own process group; the pid file holds that group's id,
  which is what `stop` signals.
  """
  if not args.workdir and args.bucket and args.name:
    args.workdir = f"gs://{args.bucket}/{args.name}"
  _require(args, "zone", "name", "config")
  if not args.workdir:
    raise UsageError("missing --workdir (or $DYDIT_WORKDIR, or $BUCKET for gs://BUCKET/NAME)")
  for pair in args.env:
    if "=" not in pair or not pair.split("=", 1)[0].isidentifier():
      raise UsageError(f"--env expects KEY=VALUE, got {pair!r}")
  main = shlex.join([f"--config={args.config}", f"--workdir={args.workdir}", *args.passthrough])
  env = " ".join(["env", *map(shlex.quote, args.env)]) if args.env else ""
  python = _home(_VENV_DIR + "/bin/python")
  trainer = " ".join(filter(None, ["setsid nohup", env, python, "-m dydit_jax.main", main]))
  script = _script(
      _REFUSE_IF_RUNNING, f"cd {_home(_CODE_DIR)}",
      f"{{ {trainer} >> {_home(_LOG)} 2>&1 < /dev/null & }}",
      f"echo $! > {_home(_PID)}",
      f'echo "dydit: started on $(hostname), log ~/{_LOG}"')
  return [_ssh(args, "all", script)]


def _stop(args):
  """SIGTERM to the trainer's process group: the trainer checkpoints and exits (as on preemption)."""
  _require(args, "zone", "name")
  script = _script(f'if {_IF_RUNNING}; then kill -TERM -- -"$(cat {_home(_PID)})";'
                   ' echo "dydit: SIGTERM sent on $(hostname)";'
                   ' else echo "dydit: no active run on $(hostname)"; fi')
  return [_ssh(args, "all", script)]


def _logs(args):
  _require(args, "zone", "name")
  if args.worker != "all" and not args.worker.isdigit():
    raise UsageError(f"--worker must be a worker index or 'all', got {args.worker!r}")
  follow = [] if args.no_follow else ["-F"]
  tail = " ".join(["tail", f"-n {args.lines}", *follow, _home(_LOG)])
  return [_ssh(args, args.worker, tail)]


def _delete(args):
  _require(args, "zone", "name")
  if args.queued:  # --force deletes the node first, then the request.
    return [_gcloud(args, "compute", "tpus", "queued-resources", "delete", args.name, "--force",
                    "--quiet")]
  return [_gcloud(args, "compute", "tpus", "tpu-vm", "delete", args.name, "--quiet")]


def _parser():
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--project", help="GCP project (env PROJECT; default: gcloud's configured "
                      "project)")
  common.add_argument("--zone", help="TPU zone, e.g. us-central2-b (env ZONE)")
  common.add_argument("--name", help="TPU VM (and queued resource) name (env TPU_NAME)")
  common.add_argument("--dry-run", action="store_true",
                      help="print the gcloud commands, one per line, instead of running them")

  parser = argparse.ArgumentParser(
      prog="tpu.py", description=__doc__.split("\n\n")[0],
      epilog="Arguments after a lone `--` go to the trainer (run) or to gcloud (create).")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  def command(name, handler, help_text, epilog=None):
    p = sub.add_parser(name, parents=[common], help=help_text, description=help_text,
                       epilog=epilog)
    p.set_defaults(handler=handler)
    return p

  p = command("create", _create, "Create a TPU VM slice, or queue a request for one (--queued).",
              epilog="Arguments after a lone `--` are added to the gcloud command.")
  p.add_argument("--accelerator-type", help="e.g. v4-32, v5litepod-64, v6e-16 (env "
                 "ACCELERATOR_TYPE)")
  p.add_argument("--runtime-version", help="TPU software version (env RUNTIME_VERSION; default "
                 "by accelerator family: " + ", ".join(f"{f}*: {v}" for f, v in _RUNTIME_BY_FAMILY)
                 + ")")
  p.add_argument("--queued", action="store_true",
                 help="create a queued resource: waits for capacity and is the way to get Spot "
                      "and best-effort slices")
  p.add_argument("--valid-until", help="queued only: give up if not provisioned within this "
                 "duration, e.g. 6h")
  tier = p.add_mutually_exclusive_group()
  tier.add_argument("--spot", action="store_true", help="Spot capacity (preemptible, cheaper)")
  tier.add_argument("--preemptible", action="store_true", help="preemptible TPU VM (not queued)")
  tier.add_argument("--reserved", action="store_true", help="use the project's reservation")
  tier.add_argument("--best-effort", action="store_true",
                    help="queued only, via `gcloud alpha`: the best-effort tier")

  p = command("setup", _setup, "Install dydit_jax[tpu] into ~/dydit-venv on every worker.")
  p.add_argument("--repo", help="git URL of the project (env DYDIT_REPO); cloned into ~/dydit")
  p.add_argument("--ref", help="branch or tag of --repo (default: its default branch)")
  p.add_argument("--package", help="a local wheel or sdist to copy and install instead of --repo "
                 "(takes precedence)")
  p.add_argument("--configs-dir", default=str(_REPO_ROOT / "configs"),
                 help="with --package: the configs/ folder copied next to it (default: %(default)s)")
  p.add_argument("--python", default="3.11", help="Python version of the venv (default: "
                 "%(default)s)")

  p = command("run", _run, "Start `python -m dydit_jax.main` on every worker, detached, logging "
              "to ~/dydit-run.log.", epilog="Arguments after a lone `--` go to the trainer.")
  p.add_argument("--config", help="config file and argument, e.g. configs/xl.py:lam=0.5,res=256 "
                 "(env DYDIT_CONFIG; relative to ~/dydit)")
  p.add_argument("--workdir", help="checkpoints and logs, e.g. gs://BUCKET/run (env "
                 "DYDIT_WORKDIR; default gs://$BUCKET/NAME)")
  p.add_argument("--bucket", help="GCS bucket for the default --workdir (env BUCKET)")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment variable for the trainer (repeatable)")

  command("stop", _stop, "Send SIGTERM to the run on every worker (it checkpoints, then exits).")

  p = command("logs", _logs, "Stream ~/dydit-run.log from one worker or all of them.")
  p.add_argument("--worker", default="0", help="worker index or 'all' (default: %(default)s)")
  p.add_argument("--lines", type=int, default=100, help="lines of history (default: "
                 "%(default)s)")
  p.add_argument("--no-follow", action="store_true", help="print and exit instead of following")

  p = command("delete", _delete, "Delete the TPU VM, or the queued resource and its node.")
  p.add_argument("--queued", action="store_true", help="the slice came from `create --queued`")
  return parser


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  passthrough = []
  if "--" in argv:
    cut = argv.index("--")
    argv, passthrough = argv[:cut], argv[cut + 1:]
  parser = _parser()
  args = parser.parse_args(argv)
  if passthrough and args.command not in ("run", "create"):
    parser.error(f"{args.command} takes no arguments after --")
  args.passthrough = passthrough
  for dest, var in _ENV.items():
    if hasattr(args, dest) and not getattr(args, dest):
      setattr(args, dest, os.environ.get(var) or None)
  try:
    commands = args.handler(args)
  except UsageError as e:
    print(f"tpu.py {args.command}: error: {e}", file=sys.stderr)
    return 2
  for cmd in commands:
    if args.dry_run:
      print(shlex.join(cmd))
      continue
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    try:
      status = subprocess.run(cmd, check=False).returncode
    except FileNotFoundError:
      print("tpu.py: error: gcloud not found on PATH (install the Google Cloud CLI, or use "
            "--dry-run)", file=sys.stderr)
      return 127
    except KeyboardInterrupt:  # Leaving `logs`; the remote run is unaffected.
      return 130
    if status:
      return status
  return 0


if __name__ == "__main__":
  sys.exit(main())
