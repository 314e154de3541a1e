"""`python -m dydit_jax.bench --flag value ...`: the benchmark table (flags: `BenchConfig`)."""
from __future__ import annotations

from dydit_jax import cli
from dydit_jax.bench import BenchConfig, run


def main(argv):
  del argv  # positional words: refused by cli.guarded
  run(BenchConfig.from_flags())


if __name__ == "__main__":
  cli.run(main, BenchConfig.define_flags)
