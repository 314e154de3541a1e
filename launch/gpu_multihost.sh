#!/usr/bin/env bash
# Multi-host GPU training of dydit_jax: one process per host, each driving all of its local GPUs.
#
# The trainer joins the hosts through jax.distributed.initialize(), which it feeds from flags or, as
# here, from these environment variables (the same on every host except the process id):
#   DYDIT_COORDINATOR    host:port of process 0, reachable from every host
#   DYDIT_NUM_PROCESSES  number of hosts (processes)
#   DYDIT_PROCESS_ID     this host's index, 0 .. DYDIT_NUM_PROCESSES-1 (0 runs on the coordinator)
# Every host runs the same `python -m dydit_jax.main --config=... --workdir=...`; the workdir must be
# shared (gs://, or a network file system) because all hosts write one orbax checkpoint.
#
# Usage (settings come from the environment; arguments go to the trainer):
#   HOSTS="gpu0 gpu1 gpu2 gpu3" CONFIG=configs/xl.py:lam=0.5,res=256 WORKDIR=gs://BUCKET/run \
#     launch/gpu_multihost.sh --config.batch_size=256
# Inside a SLURM allocation (sbatch/salloc) HOSTS defaults to the allocated nodes.
#
#   HOSTS       hosts, space separated; process ids follow this order (default: the SLURM nodes)
#   LAUNCHER    ssh (one `ssh HOST` per host) or srun (one SLURM step, one task per node);
#               default srun inside SLURM, ssh elsewhere
#   PORT        coordinator port on the first host (default 12355)
#   REPO_DIR    the project checkout on every host, holding configs/ (default: this one, $PWD)
#   PYTHON      the interpreter with dydit_jax installed on every host (default: python)
#   CONFIG, WORKDIR   required; passed as --config and --workdir
#   SRUN_ARGS   extra srun options, e.g. "--cpus-per-task=32" (srun only)
#   LOG_DIR     with ssh, hosts other than the first log there (default: logs/gpu_multihost)
#   DRY_RUN=1   print the launch command(s), one per line, and start nothing
set -euo pipefail

: "${CONFIG:?set CONFIG, e.g. configs/xl.py:lam=0.5,res=256}"
: "${WORKDIR:?set WORKDIR, e.g. gs://BUCKET/run}"
if [[ -z "${HOSTS:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
  HOSTS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | tr '\n' ' ')"
fi
: "${HOSTS:?set HOSTS, e.g. HOSTS=\"gpu0 gpu1\" (or run inside a SLURM allocation)}"
read -r -a hosts <<< "$HOSTS"
num=${#hosts[@]}
coordinator="${hosts[0]}:${PORT:-12355}"
launcher="${LAUNCHER:-$([[ -n "${SLURM_JOB_ID:-}" ]] && echo srun || echo ssh)}"
repo_dir="${REPO_DIR:-$PWD}"
trainer=("${PYTHON:-python}" -m dydit_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "$@")

# Quotes a command for printing, leaving plain words bare (like Python's shlex.join).
show() {
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then out+=("$arg"); else out+=("${arg@Q}"); fi
  done
  echo "${out[*]}"
}

dist_env() {  # The distributed settings of process $1, as `env` arguments.
  echo "DYDIT_COORDINATOR=$coordinator" "DYDIT_NUM_PROCESSES=$num" "DYDIT_PROCESS_ID=$1"
}

case "$launcher" in
  srun)
    # One step, one task per node; each task's shell fills in its own SLURM_PROCID.
    read -r -a extra <<< "${SRUN_ARGS:-}"
    inner="exec env $(dist_env '"$SLURM_PROCID"') $(show "${trainer[@]}")"
    nodelist="$(IFS=,; echo "${hosts[*]}")"
    cmd=(srun "--nodes=$num" "--ntasks=$num" --ntasks-per-node=1 "--nodelist=$nodelist"
         "--chdir=$repo_dir" "${extra[@]}" bash -c "$inner")
    if [[ "${DRY_RUN:-0}" == 1 ]]; then show "${cmd[@]}"; exit 0; fi
    exec "${cmd[@]}"
    ;;
  ssh)
    pids=()
    trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
    for ((i = 0; i < num; i++)); do
      read -r -a dist <<< "$(dist_env "$i")"
      remote="cd $(show "$repo_dir") && $(show env "${dist[@]}" "${trainer[@]}")"
      # -tt ties the remote trainer to this ssh: Ctrl-C here (or a lost connection) ends it.
      cmd=(ssh -tt -o BatchMode=yes "${hosts[$i]}" "$remote")
      if [[ "${DRY_RUN:-0}" == 1 ]]; then show "${cmd[@]}"; continue; fi
      if ((i == 0)); then  # Process 0 streams to this terminal, the others to files.
        "${cmd[@]}" < /dev/null &
      else
        mkdir -p "${LOG_DIR:=logs/gpu_multihost}"
        "${cmd[@]}" < /dev/null > "$LOG_DIR/$i-${hosts[$i]}.log" 2>&1 &
      fi
      pids+=($!)
    done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    exit "$status"
    ;;
  *)
    echo "LAUNCHER must be ssh or srun, got '$launcher'" >&2
    exit 2
    ;;
esac
