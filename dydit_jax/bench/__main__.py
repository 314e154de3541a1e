"""`python -m dydit_jax.bench --flag value ...`: the benchmark table (flags: `BenchConfig`)."""
from __future__ import annotations

from dydit_jax import cli
from dydit_jax.bench import BenchConfig, run
from dydit_jax.errors import UserError


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  run(BenchConfig.from_flags())


if __name__ == "__main__":
  cli.run(main, BenchConfig.define_flags)
