"""The detection loop (`jaxal.detection.active`): a run killed with SIGKILL in the middle of a cycle resumes
at its last finished cycle and ends with the records of an uninterrupted run; the per-cycle cost fields
(boxes and images selected) against the box counts the test wrote; images without boxes never enter the
simulated pool; --stop_at_metric; a workdir of another config refused. The detector is the toy FCOS
(`toy_detection_run`), the data a small VOC folder written here."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detection_folders import make_voc_pool
from jaxal import checkpoint, cli, run, workdir as workdir_lock
from jaxal.detection import evaluate, strategies
from jaxal.strategies.base import Selection
from toy_detection_run import use_toy_detector

TOY_FLAGS = ["--task", "detection", "--boxes.canvas", "64", "--detection.channels", "32",
             "--detection.iterations", "2", "--detection.warmup_iters", "1", "--batch_size", "2",
             "--eval_batch_size", "4", "--initial_size", "3", "--budget", "2", "--cycles", "3", "--progress", "false"]
TIMINGS = ("train_seconds", "train_cpu_seconds", "evaluate_seconds", "selection_seconds")


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    return root, make_voc_pool(root)


@pytest.fixture(autouse=True)
def toy(monkeypatch):
    use_toy_detector(monkeypatch.setattr)


def args(root: Path, workdir: Path, *extra) -> list[str]:
    return ["--dataset", str(root), "--workdir", str(workdir), *TOY_FLAGS, *extra]


def read_records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def test_a_run_killed_mid_cycle_resumes_at_its_last_finished_cycle(voc, tmp_path, capsys):
    root, truth = voc
    assert run.main(args(root, tmp_path / "whole")) == 0
    whole = read_records(tmp_path / "whole")
    capsys.readouterr()
    # killed in cycle 1's evaluation: cycle 1 has trained (and drawn its batches from the trial's generator)
    env = {**os.environ, "KILL_AT_EVALUATION": "2", "JAX_PLATFORMS": "cpu"}
    killed = subprocess.run([sys.executable, "tests/toy_detection_run.py", *args(root, tmp_path / "killed")],
                            env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    step, meta = checkpoint.read_meta(checkpoint.manager(tmp_path / "killed" / "checkpoints" / "random" / "trial_0"))
    assert step == 0 and [r["cycle"] for r in meta["records"]] == [0]
    assert run.main(args(root, tmp_path / "killed")) == 0
    out = capsys.readouterr().out
    assert "cycle 0:" not in out and "cycle 1:" in out and "cycle 2:" in out  # resumed, cycle 0 not rerun
    resumed = read_records(tmp_path / "killed")
    assert [r["cycle"] for r in resumed] == [0, 1, 2]
    assert without_timings(resumed) == without_timings(whole)
    # the selections are real: each cycle adds `budget` images, and the records count their boxes
    ids = sorted(i for i, objects in truth.items() if i in _split(root, "train"))
    for r in whole[:-1]:
        assert r["num_selected"] == 2 == len(r["selected"]) and r["num_scored"] == 10 - r["num_labeled"]
        assert r["boxes_selected"] == sum(len(truth[ids[i]]) for i in r["selected"])
    assert whole[-1]["selected"] == [] and whole[-1]["num_selected"] == 0
    for before, after in zip(whole, whole[1:]):
        assert after["num_boxes"] == before["num_boxes"] + before["boxes_selected"]


def _split(root: Path, name: str) -> list[str]:
    return (root / "ImageSets" / "Main" / f"{name}.txt").read_text().split()


def test_images_without_boxes_are_never_in_the_pool_and_strategy_info_is_recorded(voc, tmp_path, monkeypatch,
                                                                                  capsys):
    root, truth = voc
    train = _split(root, "train")
    empty = {k for k, i in enumerate(train) if not truth[i]}
    assert len(empty) == 2
    seen = []

    def everything_left(ctx, k):  # picks the first k candidates and says how many it saw
        seen.append(ctx.candidates.copy())
        return Selection(np.arange(k), info={"candidates": int(len(ctx.candidates))})

    monkeypatch.setitem(strategies.DETECTION_STRATEGIES, "everything_left", everything_left)
    assert run.main(args(root, tmp_path / "run", "--strategy", "everything_left", "--cycles", "4")) == 0
    assert "2 pool images without boxes dropped" in capsys.readouterr().out
    records = read_records(tmp_path / "run")
    assert [r["num_labeled"] for r in records] == [3, 5, 7, 9]
    assert all(not empty & set(c.tolist()) for c in seen)
    assert [r["strategy_info"] for r in records[:-1]] == [{"candidates": n} for n in (7, 5, 3)]


def test_stop_at_metric_ends_the_trial_without_a_selection(voc, tmp_path, monkeypatch):
    root, _ = voc
    aps = iter([0.1, 0.3, 0.5])
    coco = evaluate.coco_metrics

    def scripted_ap(*a, **k):  # the loop's decision is what is tested here, so the AP is scripted
        return {**coco(*a, **k), "ap": next(aps)}

    monkeypatch.setattr(evaluate, "coco_metrics", scripted_ap)
    assert run.main(args(root, tmp_path / "run", "--stop_at_metric", "0.25")) == 0
    records = read_records(tmp_path / "run")
    assert [r["test_ap"] for r in records] == [0.1, 0.3]
    assert records[0]["num_selected"] == 2 and records[1]["selected"] == [] and records[1]["num_selected"] == 0
    # a rerun resumes a stopped trial as finished
    assert run.main(args(root, tmp_path / "run", "--stop_at_metric", "0.25")) == 0
    assert len(read_records(tmp_path / "run")) == 2


@pytest.mark.parametrize("flags,message", [
    (["--budget", "3"], "holds a run with another config (budget: 2 there vs 3 now"),
    (["--stop_at_metric", "22"], "--stop_at_metric is a fraction in (0, 1]"),
    (["--cycles", "6"], "the budget is larger than the pool"),
    (["--detection.channels", "16"], "multiple of the head's 32 GroupNorm groups"),
    (["--val_size", "2"], "--val_size does not apply"),
])
def test_bad_input_exits_2_and_changes_nothing(voc, tmp_path, capsys, flags, message):
    root, _ = voc
    workdir = tmp_path / "run"
    workdir.mkdir()
    saved = cli.config_from_args(run.build_parser().parse_args(args(root, workdir))).to_json()
    (workdir / "config.json").write_text(saved)  # a run of the toy flags was started here
    assert run.main(args(root, workdir, *flags)) == 2
    assert message in capsys.readouterr().err
    assert [p.name for p in workdir_lock.contents(workdir)] == ["config.json"]
    assert (workdir / "config.json").read_text() == saved
