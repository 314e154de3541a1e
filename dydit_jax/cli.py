"""How every `python -m dydit_jax.*` tool starts and fails: absl flags, one error line on bad input.

  if __name__ == "__main__":
    cli.run(main, define_flags)

The tool's flags are defined only when it runs as a program (`define_flags`), so importing several
tools in one process (tests, notebooks) never collides on flag names. A user's mistake
(`errors.UserError`, or a missing / unreadable file) prints one `error: ...` line on stderr and exits
with status 1; the tool must have created nothing by then. Set DYDIT_DEBUG=1 to see the traceback
instead. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Callable, Sequence

from absl import app, flags

from dydit_jax.errors import UserError

DEBUG_ENV = "DYDIT_DEBUG"
# Exceptions that describe the user's input, not the code: shown as one line.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def debug() -> bool:
  """True when DYDIT_DEBUG asks for tracebacks."""
  return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def one_line(error: BaseException) -> str:
  """The message as one line: a KeyError's repr quotes dropped, detail lines joined with "; "."""
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  if isinstance(error, OSError) and error.filename and error.strerror:
    text = f"{error.strerror}: {error.filename}"
  lines = [" ".join(line.split()) for line in str(text).splitlines()]
  return "; ".join(line for line in lines if line) or type(error).__name__


def fail(message: str, code: int = 1):
  """Print `error: message` on stderr and exit with `code`; with DYDIT_DEBUG set, the traceback being
  handled (if any) first."""
  if debug() and sys.exc_info()[0] is not None:
    traceback.print_exc()
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def causes(error: BaseException) -> list[BaseException]:
  """`error` and the exceptions it was raised from or while handling, outermost first."""
  out = [error]
  while (nxt := out[-1].__cause__ or out[-1].__context__) is not None and nxt not in out:
    out.append(nxt)
  return out


def flag_error(error: flags.Error) -> str:
  """One line for an absl flag error; a wrapped cause (e.g. a config file's ValueError) is shown
  instead of the traceback text some flag parsers paste into the message."""
  text = str(error)
  required = re.search(r"Flag --(\S+) must have a value other than None", text)
  if required:
    return f"--{required.group(1)} is required"
  wrapped = [c for c in causes(error)[1:]
             if "Traceback (most recent call last)" not in str(c) and not isinstance(c, SyntaxError)]
  if not wrapped:
    return one_line(UserError(text.split("Traceback (most recent call last)")[0]))
  root = wrapped[-1]
  head = text.split(": ", 1)[0].removeprefix("flag ") if text.startswith("flag --") else "bad flag"
  kind = "" if isinstance(root, ValueError) else f"{type(root).__name__}: "
  return f"{head}: {kind}{one_line(root)}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (app.run's flags_parser) with a bad or missing flag as one `error:` line
  instead of absl's usage banner."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(flag_error(e))


def guarded(main: Callable, positional: Sequence[str] = ()) -> Callable:
  """`main(argv, ...)` with user errors turned into one line and exit status 1 (see the module
  docstring); positional words left in argv are such an error, unless the tool names exactly that
  many in `positional` (e.g. ("REF", "SAMPLES") for the evaluator, whose interface is ADM's)."""

  def wrapped(argv, *args, **kwargs):
    try:
      words = argv[1:]   # absl leaves non-flag words in argv
      if not positional and words:
        raise UserError(f"unexpected arguments {' '.join(words)!r} (flags are written --name=value)")
      if len(words) != len(positional):
        raise UserError(f"expected {len(positional)} arguments {' '.join(positional)}, got {len(words)}"
                        + (f": {' '.join(words)!r}" if words else ""))
      return main(argv, *args, **kwargs)
    except USER_ERRORS as e:
      if debug():
        raise
      fail(one_line(e))

  return wrapped


def run(main: Callable, define_flags: Callable[[], None] | None = None,
        flags_parser: Callable[[list[str]], list[str]] = parse_flags, positional: Sequence[str] = ()) -> None:
  """Define the tool's flags, parse them with absl (`parse_flags` unless the tool has its own) and
  run `main(argv)` guarded (with the `positional` words it takes, none by default)."""
  if define_flags is not None:
    define_flags()
  app.run(guarded(main, positional), flags_parser=flags_parser)
