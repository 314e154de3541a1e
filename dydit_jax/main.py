"""Entry point: `python -m dydit_jax.main --config=configs/xl.py:lam=0.5 --workdir=gs://BUCKET/run`.

--config   an ml_collections config file (configs/*.py) with an optional argument after ':'; fields
           are overridden with --config.FIELD=VALUE. The config is locked: an unknown field on the
           command line is an error.
--workdir  local path or gs://; checkpoints, logs and samples go there. Rerunning the same command
           resumes from the newest checkpoint in it; a config that changes what the saved state means
           (model, data, batch size, ...) is refused unless --config.allow_config_change=True
           (dydit_jax/train/resume.py).

Modes (config.mode): "train" (fine-tune from config.init_checkpoint, or config.from_scratch), "demo"
(the MNIST DiT -> DyDiT walk-through, dydit_jax/train/demo.py) and "sweep" (the demo's DyDiT at
several lambdas against a dense control, scored and timed: dydit_jax/train/sweep.py).

Bad input (a flag, the config file or its argument, a field or value, a missing file, a refused
resume) stops the run before anything is written, with one `error: ...` line on stderr and exit
status 1 (dydit_jax.cli; DYDIT_DEBUG=1 shows the traceback).

Multi-host: every host runs the same command. JAX discovers Cloud TPU slices by itself; GPU or CPU
hosts name the coordinator with --coordinator/--num_processes/--process_id or the environment
variables DYDIT_COORDINATOR (host:port), DYDIT_NUM_PROCESSES, DYDIT_PROCESS_ID (launch/).
"""
from __future__ import annotations

import json
import logging as std_logging
import re
import traceback

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from dydit_jax import cli
from dydit_jax.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/xl.py:lam=0.5,res=256",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "checkpoints, logs and samples (local or gs://)")
  flags.DEFINE_string("coordinator", "", "host:port of process 0 (multi-host GPU/CPU; or DYDIT_COORDINATOR)")
  flags.DEFINE_integer("num_processes", 0, "number of processes (or DYDIT_NUM_PROCESSES)")
  flags.DEFINE_integer("process_id", -1, "this process's index (or DYDIT_PROCESS_ID)")
  flags.mark_flags_as_required(["config", "workdir"])


# Flag parsing --------------------------------------------------------------------------------------
# ml_collections' config flag reports mistakes in several shapes: absl flag errors wrapping the config
# file's own exception (with its traceback pasted into the message; `cli.flag_error`), a raw KeyError /
# AttributeError for an unknown --config.FIELD, an OSError (deferred to the first access) for a file
# that cannot be loaded. `parse_flags` turns each into one line; anything else (a bug in a config
# file) keeps its traceback.
def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of --name in argv (`--name=V` or `--name V`), None when absent."""
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    match = re.fullmatch(rf"--?{name}(=(.*))?", arg, re.DOTALL)
    if match:
      return match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def _unknown_field(error: Exception, argv: list[str]) -> str | None:
  """'config has no field X (did you mean Y?)' for an unknown --config.X override, else None."""
  if not any(f.filename.endswith("config_flags/config_path.py") for f in traceback.extract_tb(error.__traceback__)):
    return None
  keys = [e for e in cli.causes(error) if isinstance(e, KeyError) and e.args]
  if not keys:
    return None
  key = str(keys[-1].args[0])
  suggestion = next((m.group(1) for e in keys for m in [re.search(r'Did you mean "([^"]+)"', str(e.args[0]))]
                     if m), None)
  # The override that names the key: its path up to the unknown part.
  for arg in argv[1:]:
    match = re.match(r"--?(?:no)?config\.([^=\s]+)", arg)
    parts = match.group(1).split(".") if match else []
    if key in parts:
      prefix = parts[:parts.index(key)]
      field = ".".join(prefix + [key])
      hint = f" (did you mean {'.'.join(prefix + [suggestion])}?)" if suggestion else ""
      return f"config has no field {field}{hint}"
  return f"config has no field {key}" + (f" (did you mean {suggestion}?)" if suggestion else "")


def _locked_field(error: Exception, config_file: str) -> str | None:
  """'config file F sets field X, which does not exist (did you mean Y?)' when a config file assigns
  a field base_config() does not define (the config comes locked), else None."""
  match = re.search(r'Key "([^"]+)" does not exist and cannot be added since the config is locked', str(error))
  if not match:
    return None
  hint = re.search(r'Did you mean "([^"]+)"', str(error))
  return (f"config file {config_file} sets field {match.group(1)!r}, which the config does not have"
          + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (app.run's flags_parser) with every mistake as one `error:` line."""
  config_arg = _flag_value(argv, "config")
  if config_arg:
    path = config_arg.split(":", 1)[0]
    try:
      open(path, "rb").close()
    except OSError as e:
      cli.fail(f"cannot read config file {path} ({cli.one_line(e)})" if not isinstance(e, FileNotFoundError)
            else f"config file {path} does not exist")
  try:
    rest = FLAGS(argv)
    config = FLAGS.config
    if not isinstance(config, ml_collections.ConfigDict):
      config.lock()  # config_flags defers the load error of a config file to the first access
      raise UserError(f"get_config() of {config_flags.get_config_filename(FLAGS['config'])} returned "
                      f"{type(config).__name__}, not a ConfigDict")
  except flags.Error as e:
    cli.fail(cli.flag_error(e))
  except (KeyError, AttributeError) as e:
    message = _unknown_field(e, argv) or _locked_field(e, (config_arg or "").split(":", 1)[0])
    if message is None:
      raise
    cli.fail(message)
  except OSError as e:
    cli.fail(f"cannot load the config file: {cli.one_line(cli.causes(e)[-1])}")
  except UserError as e:
    cli.fail(cli.one_line(e))
  return rest


# The program ----------------------------------------------------------------------------------------
class _OrbaxWarningsOnly(std_logging.Filter):
  """orbax logs every save and restore phase at INFO (dozens of lines per checkpoint); the trainer
  logs its own one-line save / restore messages, so only orbax's warnings and errors are kept."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  del argv  # positional words: refused by cli.guarded
  if not FLAGS.workdir:
    raise UserError("--workdir must not be empty")
  logging.get_absl_handler().addFilter(_OrbaxWarningsOnly())
  # Imported here: the distributed runtime must start before anything touches the devices.
  from dydit_jax.train import sharding  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  config = FLAGS.config
  if config.mode == "demo":
    from dydit_jax.train import demo  # pylint: disable=g-import-not-at-top
    summary = demo.run(config, FLAGS.workdir)
  elif config.mode == "sweep":
    from dydit_jax.train import sweep  # pylint: disable=g-import-not-at-top
    summary = sweep.run(config, FLAGS.workdir)
  else:
    from dydit_jax.train import loop  # pylint: disable=g-import-not-at-top
    summary = loop.train(config, FLAGS.workdir)
  logging.info("done: %s", json.dumps(summary, sort_keys=True, default=str))


if __name__ == "__main__":
  cli.run(main, define_flags, flags_parser=parse_flags)
