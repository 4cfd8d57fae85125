"""The detection loop (`jaxal.detection.active`): a run killed with SIGKILL in the middle of a cycle resumes
at its last finished cycle and ends with the records of an uninterrupted run; the per-cycle cost fields
(boxes and images selected) against the box counts the test wrote; images without boxes never enter the
simulated pool; --stop_at_metric; a workdir of another config refused. The detector is the toy FCOS
(`toy_detection_run`), the data a small VOC folder written here."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from detection_folders import make_voc_pool
from jaxal import checkpoint, cli, query, run, workdir as workdir_lock
from jaxal.detection import evaluate, strategies, training
from jaxal.strategies.base import Selection
from toy_detection_run import use_toy_detector

TOY_FLAGS = ["--task", "detection", "--boxes.canvas", "64", "--detection.channels", "32",
             "--detection.iterations", "2", "--detection.warmup_iters", "1", "--batch_size", "2",
             "--eval_batch_size", "4", "--initial_size", "3", "--budget", "2", "--cycles", "3", "--progress", "false",
             "--num_devices", "1",  # one device, as the killed subprocess has (the mesh: test_detection_parallel)
             "--detection.grad_clip", "1"]  # clipping active (the toy's gradient norm is about 7)
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
    rows = list(csv.DictReader((tmp_path / "whole" / "results.csv").open()))
    assert [int(r["boxes_selected"]) for r in rows] == [r["boxes_selected"] for r in whole]
    assert (tmp_path / "whole" / "learning_curve_boxes.png").read_bytes()[:4] == b"\x89PNG"


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


def test_ll4al_trains_its_module_without_changing_the_detector_and_selects_the_highest_predicted_losses(
        voc, tmp_path, monkeypatch):
    """ll4al in the loop: each cycle's detector trains LL4AL's module beside it, and trains to the weights a run
    without the module (random, the same seed: the same initial set, key and batches) trains to, with the
    gradient clipping active (ISAL D.2: the module's loss is not back-propagated into the detector); the
    selection is the highest predicted losses."""
    root, _ = voc
    ll4al, train, trained, seen = strategies.DETECTION_STRATEGIES["ll4al"], training.train, [], []

    def spy_train(detector, variables, *a, **k):
        out = train(detector, variables, *a, **k)
        trained.append((jax.device_get(variables["params"]), jax.device_get(out[0])))
        return out

    def spy_select(ctx, k):
        selection = ll4al(ctx, k)
        seen.append((ctx.candidates.copy(), selection))
        return selection

    monkeypatch.setattr(training, "train", spy_train)
    monkeypatch.setitem(strategies.DETECTION_STRATEGIES, "ll4al", spy_select)
    # TOY_FLAGS clip the gradient (the module's must not enter the detector's norm); lambda 1000 makes any leak
    # of the ranking loss into the detector's update (through the levels or the clipping) show
    assert run.main(args(root, tmp_path / "off", "--strategy", "random", "--cycles", "1")) == 0
    lambda_1000 = ["--lossnet.weight", "1000"]
    assert run.main(args(root, tmp_path / "on", "--strategy", "ll4al", "--cycles", "2", *lambda_1000)) == 0
    ((initial, off), (initial_on, on), _), records = trained, read_records(tmp_path / "on")
    assert "lossnet" not in off and sorted(on) == ["batch_stats", "lossnet", "params"]
    flat = lambda tree: {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}  # noqa: E731
    start, start_on, without, with_module = flat(initial), flat(initial_on), flat(off["params"]), flat(on["params"])
    assert with_module.keys() == without.keys() == start.keys()
    for k in without:  # the same start, and the same update (the update's, not the weights', precision)
        np.testing.assert_array_equal(start_on[k], start[k])
        np.testing.assert_allclose(with_module[k] - start[k], without[k] - start[k], rtol=1e-5, atol=1e-9, err_msg=k)
    assert sum(np.any(without[k] != start[k]) for k in start) > len(start) // 2  # the detector trained
    (record_off,) = read_records(tmp_path / "off")
    for field in ("first_loss", "final_loss", "test_ap"):
        assert records[0][field] == pytest.approx(record_off[field], rel=1e-6, abs=1e-7)
    assert [r["num_labeled"] for r in records] == [3, 5] and len(seen) == 1
    assert all(np.isfinite(r["final_ranking_loss"]) and r["final_ranking_loss"] >= 0 for r in records)
    (candidates, selection), = seen
    assert len(selection.scores) == len(candidates) and np.ptp(selection.scores) > 0
    np.testing.assert_array_equal(selection.chosen, np.argsort(-selection.scores, kind="stable")[:2])
    assert records[0]["selected"] == candidates[selection.chosen].tolist()


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
    # --overwrite starts a run of another config afresh
    aps = iter([0.1, 0.2, 0.3])
    assert run.main(args(root, tmp_path / "run", "--budget", "1", "--overwrite")) == 0
    assert [(r["test_ap"], r["num_labeled"]) for r in read_records(tmp_path / "run")] == [(0.1, 3), (0.2, 4), (0.3, 5)]


def test_ctrl_c_says_which_cycle_a_rerun_resumes_from(voc, tmp_path, monkeypatch, capsys):
    root, _ = voc
    from jaxal.detection import training

    train, calls = training.train, []

    def interrupted_in_cycle_1(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train(*a, **k)

    monkeypatch.setattr(training, "train", interrupted_in_cycle_1)
    assert run.main(args(root, tmp_path / "run")) == 130
    assert "interrupted; rerun the same command to resume from cycle 1" in capsys.readouterr().err
    assert [r["cycle"] for r in read_records(tmp_path / "run")] == [0]


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


# ---- the ISAL presets, one cycle each at their image size (1333x800), on mock data --------------------

PRESET_SHRINK = ["--initial_size", "2", "--budget", "1", "--cycles", "1", "--trials", "1", "--detection.iterations",
                 "1", "--batch_size", "1", "--eval_batch_size", "2", "--progress", "false", "--num_devices", "1"]


def voc2012_examples(count: int, seed: int) -> list[dict]:
    """tfds voc/2012 examples (image bytes, as read with SkipDecoding) of VOC's usual 500x375, the first
    without boxes."""
    import io

    from PIL import Image

    examples = []
    for k in range(count):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed + k).integers(0, 256, (375, 500, 3), np.uint8)).save(buffer, "PNG")
        boxes = np.zeros((0, 4), np.float32) if k == 0 else np.array([[0.1, 0.2, 0.6, 0.7], [0.3, 0.1, 0.9, 0.4]],
                                                                     np.float32)
        examples.append({"image": buffer.getvalue(), "image/filename": f"2012_{seed + k:06d}.jpg".encode(),
                         "objects": {"bbox": boxes, "label": np.arange(len(boxes)) + 14 * (k % 2),
                                     "is_difficult": np.zeros(len(boxes), bool)}})
    return examples


def test_isal2021_voc_runs_a_cycle_at_1333x800_on_mock_voc2012(tmp_path, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    splits = {"train": voc2012_examples(3, 0), "validation": voc2012_examples(2, 10)}

    def as_data_source(self, split, **kwargs):
        return splits[split]

    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=as_data_source):
        assert run.main(["--preset", "isal2021_voc", "--workdir", str(tmp_path / "run"), *PRESET_SHRINK]) == 0
    out = capsys.readouterr().out
    # mmdet's img_scale=(1333, 800): a landscape canvas of 800x1333, padded to a multiple of 32
    assert "canvases ((800, 1344),)" in out and "1 pool images without boxes dropped" in out
    [record] = read_records(tmp_path / "run")
    assert (record["num_labeled"], record["num_boxes"], record["iterations"]) == (2, 4, 1)
    assert len(record["test_per_class_ap"]) == 20


def test_isal2021_coco_runs_a_cycle_at_1333x800_on_a_coco_folder(tmp_path, capsys):
    # tfds' coco builder imports TensorFlow (not a dependency), so the preset reads a COCO folder here
    from detection_folders import make_coco

    make_coco(tmp_path / "coco", {"train2017": 3, "val2017": 2}, size=(480, 640))
    assert run.main(["--preset", "isal2021_coco", "--dataset", str(tmp_path / "coco"), "--workdir",
                     str(tmp_path / "run"), *PRESET_SHRINK]) == 0
    out = capsys.readouterr().out
    assert "canvases ((800, 1344),)" in out and "1 pool images without boxes dropped" in out
    [record] = read_records(tmp_path / "run")
    assert record["num_labeled"] == 2 and record["iterations"] == 1
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["stop_at_metric"] == 0.22 and saved["detection"]["grad_clip"] == 10.0


# ---- annotation rounds with boxes: jaxal.query --task detection -----------------------------------------

QUERY_FLAGS = ["--task", "detection", "--preset", "bccd_fcos", "--strategy", "random", "--boxes.canvas", "64",
               "--detection.channels", "32", "--detection.iterations", "2", "--detection.warmup_iters", "1",
               "--batch_size", "2", "--eval_batch_size", "4", "--budget", "2",
               "--num_devices", "1"]  # one device (the mesh: test_detection_parallel)


def write_pool(folder: Path, count: int = 10) -> dict:
    """`count` photos; returns {path: objects}: the boxes an annotator would draw on each."""
    from detection_folders import image_objects
    from test_boxes import write_image

    truth = {}
    for k in range(count):
        write_image(folder / f"photo_{k}.png", 48, 64, "RGB", k)
        truth[f"photo_{k}.png"] = image_objects(k, 48, 64)
    return truth


def export_labels(fmt: str, path: Path, boxes: dict) -> Path:
    """What an annotation tool exports for the images labelled so far: a COCO JSON file or a VOC folder."""
    from detection_folders import coco_json
    from test_boxes import voc_xml

    if fmt == "coco":
        path.write_text(json.dumps(coco_json({name: (48, 64, objects) for name, objects in boxes.items()})))
        return path
    (path / "Annotations").mkdir(parents=True, exist_ok=True)
    for name, objects in boxes.items():
        (path / "Annotations" / f"{Path(name).stem}.xml").write_text(voc_xml(name, 48, 64, objects))
    return path


def proposal(folder: Path) -> list[str]:
    return [row["path"] for row in csv.DictReader((folder / "to_label.csv").open())]


@pytest.mark.parametrize("fmt", ["coco", "voc"])
def test_two_annotation_rounds_with_boxes(fmt, tmp_path, capsys):
    truth = write_pool(tmp_path / "photos")
    labelled = {name: truth[name] for name in ("photo_0.png", "photo_3.png", "photo_7.png")}
    labels = tmp_path / ("labels.json" if fmt == "coco" else "voc")
    argv = ["--pool", str(tmp_path / "photos"), "--labels", str(labels), "--workdir", str(tmp_path / "al"),
            *QUERY_FLAGS]
    for number in (0, 1):
        export_labels(fmt, labels, labelled)
        assert query.main(argv) == 0
        folder = tmp_path / "al" / f"round_{number:03d}"
        proposed = proposal(folder)
        assert len(proposed) == 2 and not set(proposed) & set(labelled) and set(proposed) <= set(truth)
        assert (folder / "contact_sheet.png").read_bytes()[:4] == b"\x89PNG"
        rounds = json.loads((tmp_path / "al" / "rounds.json").read_text())["rounds"]
        assert rounds[-1]["labelled"] == sorted(labelled)
        assert rounds[-1]["num_boxes"] == sum(len(objects) for objects in labelled.values())
        labelled.update({name: truth[name] for name in proposed})  # the annotator draws the proposed boxes
    capsys.readouterr()
    assert query.main(argv) == 0  # the same labels again: the last proposal, no new round
    assert "no new labels since round 1" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "al" / "rounds.json").read_text())["rounds"]) == 2


@pytest.mark.parametrize("damage,message", [
    ("unknown_image", "the image 'ghost.png' is not in the pool"),
    ("outside", "which is empty or outside the 64x48 image"),
    ("unknown_class", "has a box of class 'blob', not one of the classes cell, dot"),
])
def test_bad_box_labels_exit_2_and_write_nothing(damage, message, tmp_path, capsys):
    truth = write_pool(tmp_path / "photos", 4)
    boxes = {"photo_0.png": truth["photo_0.png"], "photo_1.png": truth["photo_1.png"]}
    if damage == "unknown_image":
        boxes["ghost.png"] = truth["photo_2.png"]
    elif damage == "outside":
        boxes["photo_1.png"] = [("cell", False, (30, 10, 70, 20))]  # xmax 70 > 64
    else:
        boxes["photo_1.png"] = [("blob", False, (3, 3, 20, 20))]
    labels = tmp_path / "labels.json"
    from detection_folders import coco_json
    exported = coco_json({n: (48, 64, o) for n, o in boxes.items()}, classes=("cell", "dot", "blob"))
    labels.write_text(json.dumps(exported))
    argv = ["--pool", str(tmp_path / "photos"), "--labels", str(labels), "--workdir", str(tmp_path / "al"),
            "--classes", "cell,dot", *QUERY_FLAGS]
    assert query.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "al").exists()


def test_the_contact_sheet_draws_the_confident_detections():
    from jaxal.detection import rounds

    image = np.zeros((40, 60, 3), np.uint8)
    found = {"boxes": np.array([[[10, 5, 30, 25], [40, 10, 55, 30]]], np.float32),
             "scores": np.array([[0.9, 0.1]], np.float32), "classes": np.array([[1, 0]]),
             "valid": np.array([[True, True]])}
    drawn = rounds.draw_detections(image, found, 0, ("cell", "dot"))
    red = (drawn[..., 0] == 255) & (drawn[..., 1] == 0)
    assert red[5, 10:31].all() and red[25, 10:31].all() and red[5:26, 10].all()  # the 0.9 box's outline
    assert not red[:, 36:].any()  # the 0.1 box (x 40..55) is below DRAW_SCORE
