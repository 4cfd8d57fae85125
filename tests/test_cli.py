"""The command line: an end-to-end run on digits, and every bad input ending in a clear message, exit
status 2 and no run directory (or the existing one untouched)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
try:
    import tensorflow_datasets as tfds
except ImportError:  # jaxal imports it only for a tfds dataset; its tests skip where it is absent
    tfds = None
needs_tfds = pytest.mark.skipif(tfds is None, reason="tensorflow-datasets is not installed")

from jaxal import run

TINY = ["--initial_size", "30", "--budget", "10", "--cycles", "2", "--epochs", "2", "--progress", "false"]


def snapshot(directory: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()} if directory.exists() else {}


def test_cli_end_to_end_on_digits(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "jaxal.run", "--strategy", "least_confidence", "--workdir",
                             str(workdir), *TINY], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr
    assert "least_confidence on digits" in result.stdout
    records = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    assert [r["cycle"] for r in records] == [0, 1]
    assert {"cycle", "num_labeled", "test_accuracy", "train_accuracy", "train_seconds", "evaluate_seconds",
            "selection_seconds", "selected"} <= set(records[0])
    assert (workdir / "learning_curve.png").exists() and (workdir / "results.csv").exists()
    assert json.loads((workdir / "config.json").read_text())["strategy"] == "least_confidence"


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--strategy", "--dataset", "--budget", "--influence.depth", "--gradnorm.norm", "--preset"):
        assert flag in text


def test_flags_override_the_preset():
    args = run.build_parser().parse_args(["--preset", "lplgrad_cifar10", "--budget", "7", "--influence.depth", "9",
                                          "--lr-milestones", "3,5", "--subset-size", "none"])
    config = run.config_from_args(args)
    assert (config.strategy, config.budget, config.influence.depth) == ("lplgrad", 7, 9)
    assert config.lr_milestones == (3, 5) and config.subset_size is None and config.initial_size == 1000


def write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.normal(size=(40, 8, 8, 1)).astype(np.float32), y_train=rng.integers(0, 3, 40),
                  x_test=rng.normal(size=(10, 8, 8, 1)).astype(np.float32), y_test=rng.integers(0, 3, 10))
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


BAD_INPUTS = {
    "unknown strategy": (["--strategy", "nope"], "unknown strategy 'nope'; choose one of:"),
    "one unknown among several": (["--strategy", "entropy,nope"], "unknown strategy 'nope'"),
    "unknown dataset": (["--dataset", "imagenet21k"], "unknown dataset 'imagenet21k'"),
    "unknown model": (["--model", "transformer"], "unknown model 'transformer'; choose one of:"),
    "budget larger than the pool": (["--budget", "400", "--cycles", "5"], "budget is larger than the pool"),
    "initial set larger than the data": (["--initial_size", "5000"], "larger than the 1347 training samples"),
    "validation split as large as the initial set": (["--val_size", "30", "--initial_size", "30"], "--val_size"),
    "subset smaller than the budget": (["--subset_size", "5"], "--subset_size (5) must be at least --budget"),
    "unreadable number": (["--budget", "ten"], "--budget: cannot read 'ten'"),
    "zero cycles": (["--cycles", "0"], "--cycles must be at least 1"),
    "negative seed": (["--seed", "-1"], "--seed must be a non-negative integer"),
    "dropout of 1 or more": (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    "loss module of width 0": (["--strategy", "ll4al", "--lossnet.width", "0"], "--lossnet.width must be at least 1"),
    "model too deep for the images": (["--model", "vgg16"], "model vgg16 needs larger images than digits's 8x8"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_exits_2_with_a_message_and_writes_nothing(name, tmp_path, capsys):
    args, message = BAD_INPUTS[name]
    workdir = tmp_path / "run"
    flags = {"--strategy": "entropy", **dict(zip(TINY[::2], TINY[1::2]))}
    flags.update(dict(zip(args[::2], args[1::2])))
    assert run.main(["--workdir", str(workdir), *[x for kv in flags.items() for x in kv]]) == 2
    assert message in capsys.readouterr().err
    assert not workdir.exists()


@pytest.mark.parametrize("problem, overrides, message", [
    ("missing key", dict(y_test=None), "y_test"),
    ("lengths differ", dict(y_train=np.zeros(39, int)), "40"),
    ("non-finite values", dict(x_test=np.full((10, 8, 8, 1), np.nan, np.float32)), "finite"),
])
def test_malformed_npz_is_refused(problem, overrides, message, tmp_path, capsys):
    path = write_npz(tmp_path / "data.npz", **overrides)
    assert run.main(["--dataset", str(path), "--strategy", "random", "--workdir", str(tmp_path / "run"), *TINY]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_corrupt_npz_is_refused(tmp_path, capsys):
    path = tmp_path / "data.npz"
    path.write_bytes(os.urandom(300))
    assert run.main(["--dataset", str(path), "--strategy", "random", "--workdir", str(tmp_path / "run"), *TINY]) == 2
    assert "data.npz" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_users_npz_runs(tmp_path):
    path = write_npz(tmp_path / "mine.npz")
    assert run.main(["--dataset", str(path), "--strategy", "margin", "--model", "mlp", "--workdir",
                     str(tmp_path / "run"), *TINY]) == 0
    assert len((tmp_path / "run" / "results.jsonl").read_text().splitlines()) == 2


def test_checkpoint_of_another_config_is_refused_and_left_untouched(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert run.main(["--strategy", "entropy", "--workdir", str(workdir), *TINY]) == 0
    before = snapshot(workdir)
    assert run.main(["--strategy", "entropy", "--workdir", str(workdir), *TINY, "--seed", "3"]) == 2
    assert "holds a run with another config (seed: 0 there vs 3 now)" in capsys.readouterr().err
    assert snapshot(workdir) == before
    # The same command resumes: everything was finished, so nothing changes but the result files.
    assert run.main(["--strategy", "entropy", "--workdir", str(workdir), *TINY]) == 0


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    workdir = tmp_path / "thesis"
    workdir.mkdir()
    (workdir / "chapter1.tex").write_text("years of work")
    assert run.main(["--strategy", "entropy", "--workdir", str(workdir), "--overwrite", *TINY]) == 2
    assert "--overwrite deletes only jaxal run directories" in capsys.readouterr().err
    assert (workdir / "chapter1.tex").read_text() == "years of work"


def test_corrupt_checkpoint_is_reported(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert run.main(["--strategy", "entropy", "--workdir", str(workdir), *TINY, "--cycles", "3"]) == 0
    for path in (workdir / "checkpoints").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "meta" not in path.parts:
            path.write_bytes(b"garbage" * 10)
    assert run.main(["--strategy", "entropy", "--workdir", str(workdir), *TINY, "--cycles", "3"]) == 2
    assert "cannot be read" in capsys.readouterr().err


@needs_tfds
def test_tensorflow_datasets_path_through_the_cli(tmp_path):
    with tfds.testing.mock_data(num_examples=60):
        assert run.main(["--dataset", "mnist", "--strategy", "entropy", "--workdir", str(tmp_path / "run"),
                         *TINY]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["dataset"] == "mnist" and config["model"] == "cnn"
