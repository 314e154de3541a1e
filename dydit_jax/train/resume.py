"""Resume safety: a rerun in a workdir that holds checkpoints must mean the same training.

Rerunning a command in its workdir resumes from the newest checkpoint (loop.train). Before any work,
the new run config is compared with the config saved in that checkpoint (its `config` item, the run
config as JSON; WORKDIR/config.json is only a copy for people to read). Every difference is logged as
`field: old -> new`. What happens to a difference is decided by RULES below, one row per field prefix
(the longest matching prefix wins; a field no row covers is refused):

  refuse  the saved state would mean something else under the new value: the parameters and
          routers have the model's geometry (model.*, router_format included), the Adam moments
          are averages with decays b1 / b2, the data position counts examples of one stream
          (data.*, batch_size), the RNG stream and the run's identity (seed), the routers are trained
          toward one FLOPs target (dydit.lam; another lambda is another model).
  allow   the change acts on what happens from now on and leaves the saved state meaningful: the
          length of the run (total_steps), update hyper-parameters that are not state (lr, eps,
          weight_decay, ema_decay, clipping), loss weights and step schedules (dydit.* but lam),
          numerics and placement (model.dtype / attention_impl / remat, mesh.*: resuming on another
          mesh is a feature), logging, checkpointing and sampling, and the init-only fields
          (init_checkpoint, from_scratch, reorder_units: a checkpoint always wins over them).

A refused change stops the run with one `IncompatibleCheckpointError` that lists the refused fields
and names the override, `--config.allow_config_change=True`: with it each refused change is logged as
a warning and the run continues (a geometry change still fails when the parameters are restored: no
flag makes a checkpoint hold another model). The next checkpoint then records the new config, so the
override is needed once. Nothing is written before the decision: a refused run leaves the workdir
byte-identical.

Multi-host: every host reads the same checkpoint files and computes the same decision; nothing here
writes or synchronizes.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from dydit_jax.checkpoints import CHECKPOINT_DIR, IncompatibleCheckpointError

ALLOW, REFUSE = "allow", "refuse"
OVERRIDE_FLAG = "--config.allow_config_change=True"
ABSENT = "(absent)"

_GEOMETRY = "the saved parameters and routers have this model's geometry"
_DATA = "the saved data position counts examples of this stream"
_UPDATE = "acts on the updates from now on; the saved state keeps its meaning"
_INIT_ONLY = "read only when the workdir has no checkpoint (the checkpoint wins)"
_RUNTIME = "how the run computes or reports, not what the saved state is"

# (field prefix, verdict, reason). The longest prefix matching a field decides; see the docstring.
RULES: tuple[tuple[str, str, str], ...] = (
    ("mode", REFUSE, "a demo workdir and a training workdir are laid out differently"),
    ("seed", REFUSE, "the run's random streams (saved RNG) derive from it"),
    ("init_checkpoint", ALLOW, _INIT_ONLY),
    ("from_scratch", ALLOW, _INIT_ONLY),
    ("reorder_units", ALLOW, _INIT_ONLY),
    ("model", REFUSE, _GEOMETRY),
    ("model.dtype", ALLOW, _RUNTIME),
    ("model.attention_impl", ALLOW, _RUNTIME),
    ("model.remat", ALLOW, _RUNTIME),
    ("data", REFUSE, _DATA),
    ("data.num_threads", ALLOW, _RUNTIME),
    ("batch_size", REFUSE, _DATA + " and the steps taken count batches of this size"),
    ("total_steps", ALLOW, "a longer or shorter run of the same training"),
    ("optimizer", ALLOW, _UPDATE),
    ("optimizer.b1", REFUSE, "the saved Adam moments are averages with this decay"),
    ("optimizer.b2", REFUSE, "the saved Adam moments are averages with this decay"),
    ("ema_decay", ALLOW, _UPDATE),
    ("grad_clip_norm", ALLOW, _UPDATE),
    ("grad_skip_norm", ALLOW, _UPDATE),
    ("dydit", ALLOW, "a loss weight or step schedule from now on"),
    ("dydit.lam", REFUSE, "the routers are trained toward this FLOPs target"),
    ("stratified_t", ALLOW, _UPDATE),
    ("mesh", ALLOW, "placement: a checkpoint resumes on any mesh"),
    ("fsdp_min_size_mb", ALLOW, "placement: a checkpoint resumes on any sharding"),
    ("checkpoint", ALLOW, _RUNTIME),
    ("log_every", ALLOW, _RUNTIME),
    ("tensorboard", ALLOW, _RUNTIME),
    ("parameter_overview", ALLOW, _RUNTIME),
    ("sample", ALLOW, _RUNTIME),
    ("allow_config_change", ALLOW, "the override itself"),
    ("demo", ALLOW, "read by the demo driver, not by a training run"),
    ("sweep", ALLOW, "read by the sweep driver, not by a training run"),
)


@dataclasses.dataclass(frozen=True)
class Change:
  field: str
  old: Any
  new: Any
  verdict: str
  reason: str

  def __str__(self) -> str:
    show = lambda v: v if v is ABSENT else repr(v)
    return f"{self.field}: {show(self.old)} -> {show(self.new)}"


@dataclasses.dataclass(frozen=True)
class SavedRun:
  """What a workdir holds: its newest checkpoint step and that step's run config (None: unreadable)."""
  step: int
  config: dict[str, Any] | None
  where: str


def rule(field: str) -> tuple[str, str]:
  """(verdict, reason) of a dotted config field: the longest RULES prefix; uncovered fields refuse."""
  matches = [r for r in RULES if field == r[0] or field.startswith(r[0] + ".")]
  if not matches:
    return REFUSE, "no resume rule covers this field (dydit_jax/train/resume.py)"
  _, verdict, reason = max(matches, key=lambda r: len(r[0]))
  return verdict, reason


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a.b": leaf} of a nested dict; an empty sub-dict is a leaf."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A config in the form a checkpoint saves it (tuples as lists, placeholders as None)."""
  return json.loads(config.to_json())


def changes(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[Change]:
  """Every field whose value differs between a saved run config and `config`, sorted by field."""
  old, new = _flatten(saved), _flatten(as_json(config))
  out = []
  for field in sorted(old.keys() | new.keys()):
    a, b = old.get(field, ABSENT), new.get(field, ABSENT)
    if a != b:
      out.append(Change(field, a, b, *rule(field)))
  return out


def saved_run(workdir: str) -> SavedRun | None:
  """The newest checkpoint of `workdir` with its run config; None when the workdir has none.

  Reads only (a read-only CheckpointManager, the small JSON item): a step whose config cannot be
  read is skipped with a warning, as the restore will fall back past it too.
  """
  directory = epath.Path(workdir) / CHECKPOINT_DIR
  if not directory.is_dir():
    return None
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  with ocp.CheckpointManager(directory, options=options) as manager:
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
      try:
        config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        return SavedRun(step, dict(config), f"checkpoint {directory / str(step)}")
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("cannot read the run config of checkpoint step %d in %s (%s: %s)", step, directory,
                        type(e).__name__, e)
  if not steps:
    return None
  logging.warning("no checkpoint in %s has a readable run config: the config change check is skipped",
                  directory)
  return SavedRun(steps[0], None, f"checkpoint {directory / str(steps[0])}")


def check_config_change(saved: SavedRun, config: ml_collections.ConfigDict) -> list[Change]:
  """Log every difference between the saved run config and `config`; refuse state-changing ones.

  Raises IncompatibleCheckpointError (a UserError) listing the refused changes unless
  `config.allow_config_change` is set, in which case they are logged as warnings. Returns the
  changes.
  """
  if saved.config is None:
    return []
  found = changes(saved.config, config)
  override = bool(config.get("allow_config_change", False))
  for c in found:
    if c.verdict == ALLOW:
      logging.info("resuming with a changed config: %s (allowed: %s)", c, c.reason)
    elif override:
      logging.warning("resuming with a changed config: %s (allowed by allow_config_change; normally "
                      "refused: %s)", c, c.reason)
    else:
      logging.error("resuming with a changed config: %s (refused: %s)", c, c.reason)
  refused = [c for c in found if c.verdict == REFUSE]
  if refused and not override:
    raise IncompatibleCheckpointError(
        f"{saved.where} was trained with another configuration: {'; '.join(map(str, refused))}. These "
        "change what the saved state means; restore the old values, use a new --workdir, or pass "
        f"{OVERRIDE_FLAG} to resume anyway")
  return found
