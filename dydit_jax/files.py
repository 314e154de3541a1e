"""Writing a file so that readers see all of it or none of it: a temporary name beside it, flushed to
disk, then renamed over the target (atomic on one file system). Every "finished" mark of the project
(a prepared folder's metadata, a sampling run's chunks and plan, an evaluation's results) is written
this way, so a kill or preemption at any moment leaves either the old file or the new one.
"""
from __future__ import annotations

import json
import os
from typing import Any, BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], tmp_suffix: str = ".tmp") -> None:
  """write(binary file) into `path + tmp_suffix`, fsynced, then renamed to `path`. Hosts writing into
  one shared folder pass their own suffix so their temporary files never collide."""
  path = os.fspath(path)
  tmp = path + tmp_suffix
  with open(tmp, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, value: Any, tmp_suffix: str = ".tmp") -> None:
  """`value` as indented JSON (with a final newline), written with `atomic_write`."""
  atomic_write(path, lambda f: f.write((json.dumps(value, indent=2) + "\n").encode()), tmp_suffix)
