"""Command line: `python -m jaxal.run --strategy exp_gn` runs an active-learning experiment.

Flags map one to one onto `jaxal.config.Config` (see `--help`); `--preset` picks a published
protocol first, and the other flags override it. Bad input exits with status 2 and a message that
names the problem; nothing is written for it.
"""

from __future__ import annotations

import argparse
import sys

from jaxal import config as config_lib


def build_parser() -> argparse.ArgumentParser:
    from jaxal.strategies import STRATEGIES

    parser = argparse.ArgumentParser(
        prog="python -m jaxal.run",
        description="Run a pool-based active-learning experiment and write per-cycle results "
                    "(results.jsonl, results.csv, learning_curve.png, config.json) into --workdir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="digits_quick", choices=sorted(config_lib.PRESETS),
                        help="named protocol to start from; other flags override its fields")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing run in --workdir instead of resuming it")
    groups = {}
    for name, kind, default, section in config_lib.flat_fields():
        group = groups.setdefault(section, parser.add_argument_group(section or "experiment"))
        help_text = f"default: {default!r}"
        if name == "strategy":
            help_text += f"; one or several (comma-separated) of: {', '.join(sorted(STRATEGIES))}"
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        group.add_argument(*flags, dest=name, default=argparse.SUPPRESS, metavar=_metavar(kind), help=help_text)
    return parser


def _metavar(kind) -> str:
    return getattr(kind, "__name__", str(kind).replace("typing.", "")).upper()


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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxal.checkpoint import CheckpointError
    from jaxal.influence import LissaDivergenceError
    from jaxal.loop import run_experiment

    try:
        config = config_from_args(args)
        run_experiment(config, overwrite=args.overwrite)
    except (ValueError, CheckpointError, FloatingPointError, LissaDivergenceError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
