"""Entry point: `python -m dydit_jax.main --config=configs/xl.py:lam=0.5 --workdir=gs://BUCKET/run`.

--config   an ml_collections config file (configs/*.py) with an optional argument after ':'; fields
           are overridden with --config.FIELD=VALUE. The config is locked: an unknown field (a typo,
           in the file or on the command line) is an error.
--workdir  local path or gs://; checkpoints, logs and samples go there. Rerunning the same command
           resumes from the newest checkpoint in it.

Modes (config.mode): "train" (fine-tune from config.init_checkpoint, or config.from_scratch) and
"demo" (the MNIST DiT -> DyDiT walk-through, dydit_jax/train/demo.py).

Multi-host: every host runs the same command. JAX discovers Cloud TPU slices by itself; GPU or CPU
hosts name the coordinator with --coordinator/--num_processes/--process_id or the environment
variables DYDIT_COORDINATOR (host:port), DYDIT_NUM_PROCESSES, DYDIT_PROCESS_ID (launch/).
"""
from __future__ import annotations

import json
import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/xl.py:lam=0.5,res=256",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, logs and samples (local or gs://)")
flags.DEFINE_string("coordinator", "", "host:port of process 0 (multi-host GPU/CPU; or DYDIT_COORDINATOR)")
flags.DEFINE_integer("num_processes", 0, "number of processes (or DYDIT_NUM_PROCESSES)")
flags.DEFINE_integer("process_id", -1, "this process's index (or DYDIT_PROCESS_ID)")
flags.mark_flags_as_required(["config", "workdir"])


class _OrbaxWarningsOnly(std_logging.Filter):
  """orbax logs every save and restore phase at INFO (dozens of lines per checkpoint); the trainer
  logs its own one-line save / restore messages, so only orbax's warnings and errors are kept."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_OrbaxWarningsOnly())
  # Imported here: the distributed runtime must start before anything touches the devices.
  from dydit_jax.train import sharding  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  config = FLAGS.config
  if config.mode == "demo":
    from dydit_jax.train import demo  # pylint: disable=g-import-not-at-top
    summary = demo.run(config, FLAGS.workdir)
  else:
    from dydit_jax.train import loop  # pylint: disable=g-import-not-at-top
    summary = loop.train(config, FLAGS.workdir)
  logging.info("done: %s", json.dumps(summary, sort_keys=True, default=str))


if __name__ == "__main__":
  app.run(main)
