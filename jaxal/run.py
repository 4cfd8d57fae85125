"""Command line: `python -m jaxal.run --strategy exp_gn` runs an active-learning experiment.

Flags map one to one onto `jaxal.config.Config` (see `--help`); `--preset` picks a published
protocol first, and the other flags override it. Bad input exits with status 2 and a message that
names the problem; nothing is written for it.

Several processes (hosts, or processes on one host): start the same command in every process with
`--coordinator HOST:PORT --num_processes N --process_id I` (process 0 listens on PORT), or with
`--distributed` where the cluster tells JAX itself (TPU pod slices, SLURM, Open MPI). Each process
loads the data and computes the same selections; process 0 writes the results and the config, and
all of them write their part of each checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from jaxal import cli
from jaxal.cli import config_from_args  # noqa: F401  (part of this command's interface)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.config_parser(
        "python -m jaxal.run",
        "Run a pool-based active-learning experiment and write per-cycle results "
        "(results.jsonl, results.csv, learning_curve.png, config.json) into --workdir.",
        default_preset=None)
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing run in --workdir instead of resuming it")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxal.loop import run_experiment

    return cli.run_command(args, lambda config: run_experiment(config, overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
