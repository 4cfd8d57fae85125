"""What jaxal's command lines share: a flag for every config field, the distributed start-up, and bad
input turned into a message and exit status 2.

`jaxal.run` (simulated experiments), `jaxal.diagnostics` (the same with the bound diagnostics) and
`jaxal.query` (annotation rounds on a user's images) build their parsers from `config_parser` and run
their job through `run_command`.

Several processes (hosts, or processes on one host): start the same command in every process with
`--coordinator HOST:PORT --num_processes N --process_id I` (process 0 listens on PORT), or with
`--distributed` where the cluster tells JAX itself (TPU pod slices, SLURM, Open MPI).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from typing import Callable, Optional, get_args, get_origin, get_type_hints

from jaxal import config as config_lib


def config_parser(prog: str, description: str, *, default_preset: str = "digits_quick",
                  epilog: str = "Other presets set other defaults; flags override the preset's fields."
                  ) -> argparse.ArgumentParser:
    """A parser with --preset, the distributed flags and one flag per config field (`--field`, and
    `--section.field` for a section's fields), each defaulting to the preset's value."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default=default_preset, choices=sorted(config_lib.PRESETS),
                        help="named protocol to start from; other flags override its fields")
    add_distributed_flags(parser)
    add_config_flags(parser, default_preset)
    return parser


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    procs = parser.add_argument_group("several processes (jax.distributed.initialize)")
    procs.add_argument("--coordinator", help="HOST:PORT of process 0, e.g. 10.0.0.1:1234")
    procs.add_argument("--num_processes", "--num-processes", type=int, help="number of processes")
    procs.add_argument("--process_id", "--process-id", type=int, help="this process's index, 0 .. N-1")
    procs.add_argument("--distributed", action="store_true",
                       help="initialize with no arguments: the cluster (TPU pod slice, SLURM, ...) tells JAX")


def add_config_flags(parser: argparse.ArgumentParser, preset: str = "digits_quick") -> None:
    from jaxal.strategies import STRATEGIES

    groups = {}
    defaults = config_lib.build_config(preset)
    for name, kind, _, section in config_lib.flat_fields():
        group = groups.setdefault(section, parser.add_argument_group(section or "experiment"))
        default = functools.reduce(getattr, name.split("."), defaults)
        help_text = f"default (preset {preset}): {default!r}"
        if name == "strategy":
            help_text += f"; one or several (comma-separated) of: {', '.join(sorted(STRATEGIES))}"
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        group.add_argument(*flags, dest=name, default=argparse.SUPPRESS, metavar=metavar(kind), help=help_text)


def metavar(kind) -> str:
    """INT, FLOAT, STR, BOOL; INT|NONE for Optional fields; INT,... for tuples."""
    args = [a for a in get_args(kind) if a is not type(None)]
    if get_origin(kind) is tuple:
        return f"{metavar(args[0])},..."
    if type(None) in get_args(kind):
        return f"{metavar(args[0])}|NONE"
    return kind.__name__.upper()


def _flag_values(args: argparse.Namespace, kinds: dict) -> dict:
    """{dotted name: value} for every flag of `kinds` (dotted name -> type) given on the command line: the
    one reading of flag text into values, for the config and for a command's own options."""
    values = {}
    for name, text in vars(args).items():
        if name in kinds:
            try:
                values[name] = config_lib.parse_value(text, kinds[name])
            except ValueError as error:
                raise ValueError(f"--{name}: cannot read {text!r} ({error})") from None
    return values


def config_from_args(args: argparse.Namespace) -> config_lib.Config:
    """The preset's config with every config flag given on the command line applied."""
    overrides: dict = {}
    for name, value in _flag_values(args, {name: kind for name, kind, _, _ in config_lib.flat_fields()}).items():
        section, _, field = name.rpartition(".")
        if section:
            overrides.setdefault(section, {})[field] = value
        else:
            overrides[name] = value
    return config_lib.build_config(args.preset, **overrides)


def add_options_flags(parser: argparse.ArgumentParser, prefix: str, options_type: type, title: str,
                      retired: Optional[dict] = None) -> None:
    """A flag `--{prefix}.{field}` for every field of the dataclass `options_type` (a command's own options,
    outside the config), and hidden flags for the `retired` names, which `options_from_args` answers with
    their message."""
    group = parser.add_argument_group(title)
    hints, defaults = get_type_hints(options_type), options_type()
    for field in dataclasses.fields(options_type):
        group.add_argument(f"--{prefix}.{field.name}", dest=f"{prefix}.{field.name}", default=argparse.SUPPRESS,
                           metavar=metavar(hints[field.name]), help=f"default: {getattr(defaults, field.name)!r}")
    for name in retired or {}:
        group.add_argument(f"--{prefix}.{name}", dest=f"{prefix}.{name}", default=argparse.SUPPRESS,
                           help=argparse.SUPPRESS)


def options_from_args(args: argparse.Namespace, prefix: str, options_type: type, retired: Optional[dict] = None):
    """`options_type` with every `--{prefix}.*` flag given applied; ValueError with the message of a
    retired flag (what to use instead)."""
    for name, message in (retired or {}).items():
        if f"{prefix}.{name}" in vars(args):
            raise ValueError(f"--{prefix}.{name}: {message}")
    hints = get_type_hints(options_type)
    kinds = {f"{prefix}.{field.name}": hints[field.name] for field in dataclasses.fields(options_type)}
    values = _flag_values(args, kinds)
    return options_type(**{name[len(prefix) + 1:]: value for name, value in values.items()})


def distributed_requested(args: argparse.Namespace) -> bool:
    return args.distributed or any(v is not None for v in (args.coordinator, args.num_processes, args.process_id))


def run_command(args: argparse.Namespace, job: Callable[[config_lib.Config], object]) -> int:
    """What every jaxal command does around its `job(config)`: start the distributed runtime before
    anything touches a device, and turn bad input into a message and exit status 2, and an
    out-of-memory error into a report of the sizes and what to lower (`jaxal.memory`), exit status 2,
    a filesystem error into a message naming the file (exit status 2), and Ctrl-C into a line saying
    where a rerun resumes (exit status 130, as shells report SIGINT)."""
    if distributed_requested(args):
        from jaxal.parallel import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from jaxal.checkpoint import CheckpointError
    from jaxal.influence import LissaDivergenceError
    from jaxal.memory import is_out_of_memory, out_of_memory_report

    config = None
    try:
        config = config_from_args(args)
        job(config)
    except KeyboardInterrupt as interrupt:  # Ctrl-C: every finished cycle or round is checkpointed
        where = getattr(interrupt, "resume_from", None)
        print(f"\ninterrupted; rerun the same command to resume{f' from {where}' if where else ''}", file=sys.stderr)
        return 130
    except (ValueError, CheckpointError, FloatingPointError, LissaDivergenceError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the disk: full, gone read-only, a file removed under the run
        print(f"error: {describe_os_error(error)}; what was finished before is checkpointed: rerun the same "
              "command once the cause is fixed", file=sys.stderr)
        return 2
    except RuntimeError as error:  # XLA's RESOURCE_EXHAUSTED is a JaxRuntimeError
        if config is None or not is_out_of_memory(error):
            raise
        print(f"error: {out_of_memory_report(error, config)}", file=sys.stderr)
        return 2
    return 0


def describe_os_error(error: OSError) -> str:
    """'<strerror>: <file>' (both files of a rename): what a person needs, without the traceback."""
    names = [str(n) for n in (error.filename, error.filename2) if n is not None]
    return f"{error.strerror or error}" + (f": {' -> '.join(names)}" if names else "")
