"""Every preset's comment in jaxal/config.py holds the command that runs it (as big_vision's configs
do), and that command parses into the preset it documents: a renamed preset or flag breaks this test,
not a user's copy of the command."""

import importlib
import re
import shlex
from pathlib import Path

import pytest

from jaxal import cli
from jaxal import config as config_lib

CONFIG_SOURCE = Path(config_lib.__file__).read_text()


def documented_command(preset: str) -> list[str]:
    """The `#   python -m jaxal.X ...` line of the comment block right above the preset's key."""
    lines = CONFIG_SOURCE.splitlines()
    key = next(i for i, line in enumerate(lines) if line.lstrip().startswith(f'"{preset}": '))
    comment = []
    for line in reversed(lines[:key]):
        if not line.lstrip().startswith("#"):
            break
        comment.append(line.lstrip().lstrip("#").strip())
    commands = [c for c in comment if c.startswith("python -m jaxal.")]
    assert commands, f"preset {preset!r} has no command in its comment in jaxal/config.py"
    return shlex.split(commands[0])


@pytest.mark.parametrize("preset", sorted(config_lib.PRESETS))
def test_preset_comment_holds_a_command_that_selects_it(preset):
    argv = documented_command(preset)
    assert argv[:2] == ["python", "-m"]
    module = importlib.import_module(argv[2])
    args = module.build_parser().parse_args(argv[3:])
    config = cli.config_from_args(args)
    # The preset the command selects: named with --preset, or the command's default.
    chosen = args.preset if args.preset is not None else config_lib.DEFAULT_PRESETS[getattr(args, "task", None)]
    assert chosen == preset
    assert config == config_lib.build_config(preset, **_flag_overrides(argv))


def _flag_overrides(argv: list[str]) -> dict:
    """The config fields a command's flags set, read independently of jaxal.cli: `--a.b v` -> {a: {b: v}}."""
    kinds = {name: kind for name, kind, _, _ in config_lib.flat_fields()}
    overrides: dict = {}
    for flag, value in zip(argv, argv[1:]):
        name = re.sub(r"^--", "", flag).replace("-", "_") if flag.startswith("--") else None
        if name not in kinds:
            continue
        section, _, field = name.rpartition(".")
        parsed = config_lib.parse_value(value, kinds[name])
        (overrides.setdefault(section, {}) if section else overrides)[field or name] = parsed
    return overrides
