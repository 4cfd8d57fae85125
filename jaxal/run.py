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
import functools
import sys
from typing import get_args, get_origin

from jaxal import config as config_lib


def build_parser() -> argparse.ArgumentParser:
    from jaxal.strategies import STRATEGIES

    parser = argparse.ArgumentParser(
        prog="python -m jaxal.run",
        description="Run a pool-based active-learning experiment and write per-cycle results "
                    "(results.jsonl, results.csv, learning_curve.png, config.json) into --workdir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Other presets set other defaults; flags override the preset's fields.")
    parser.add_argument("--preset", default=None, choices=sorted(config_lib.PRESETS),
                        help="named protocol to start from; other flags override its fields (default: "
                             "digits_quick, or camvid_segnet with --task segmentation)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing run in --workdir instead of resuming it")
    procs = parser.add_argument_group("several processes (jax.distributed.initialize)")
    procs.add_argument("--coordinator", help="HOST:PORT of process 0, e.g. 10.0.0.1:1234")
    procs.add_argument("--num_processes", "--num-processes", type=int, help="number of processes")
    procs.add_argument("--process_id", "--process-id", type=int, help="this process's index, 0 .. N-1")
    procs.add_argument("--distributed", action="store_true",
                       help="initialize with no arguments: the cluster (TPU pod slice, SLURM, ...) tells JAX")
    groups = {}
    quick = config_lib.build_config()  # what a run without --preset uses
    for name, kind, _, section in config_lib.flat_fields():
        group = groups.setdefault(section, parser.add_argument_group(section or "experiment"))
        default = functools.reduce(getattr, name.split("."), quick)
        help_text = f"default (preset digits_quick): {default!r}"
        if name == "strategy":
            help_text += f"; one or several (comma-separated) of: {', '.join(sorted(STRATEGIES))}"
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        group.add_argument(*flags, dest=name, default=argparse.SUPPRESS, metavar=_metavar(kind), help=help_text)
    return parser


def _metavar(kind) -> str:
    """INT, FLOAT, STR, BOOL; INT|NONE for Optional fields; INT,... for tuples."""
    args = [a for a in get_args(kind) if a is not type(None)]
    if get_origin(kind) is tuple:
        return f"{_metavar(args[0])},..."
    if type(None) in get_args(kind):
        return f"{_metavar(args[0])}|NONE"
    return kind.__name__.upper()


def config_from_args(args: argparse.Namespace) -> config_lib.Config:
    kinds = {name: kind for name, kind, _, _ in config_lib.flat_fields()}
    overrides: dict = {}
    for name, text in vars(args).items():
        if name not in kinds:
            continue
        try:
            value = config_lib.parse_value(text, kinds[name])
        except ValueError as error:
            raise ValueError(f"--{name}: cannot read {text!r} ({error})") from None
        section, _, field = name.rpartition(".")
        if section:
            overrides.setdefault(section, {})[field] = value
        else:
            overrides[name] = value
    return config_lib.build_config(args.preset, **overrides)


def distributed_requested(args: argparse.Namespace) -> bool:
    return args.distributed or any(v is not None for v in (args.coordinator, args.num_processes, args.process_id))


def run_command(args: argparse.Namespace, job) -> int:
    """What every jaxal command does around its `job(config)`: start the distributed runtime before
    anything touches a device, and turn bad input into a message and exit status 2."""
    if distributed_requested(args):
        from jaxal.parallel import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from jaxal.checkpoint import CheckpointError
    from jaxal.influence import LissaDivergenceError

    try:
        job(config_from_args(args))
    except (ValueError, CheckpointError, FloatingPointError, LissaDivergenceError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxal.loop import run_experiment

    return run_command(args, lambda config: run_experiment(config, overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
