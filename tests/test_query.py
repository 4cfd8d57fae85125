"""`python -m jaxal.query` end to end on a folder of images the test writes, with labels supplied as an
annotator would (rows appended to the labels CSV, or a second CSV), and every bad input ending in a
message, exit status 2 and an unchanged workdir."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from annotation import append_labels, copy_tree, initial_labels, read_to_label, snapshot, write_labels, write_pool
from jaxal import query

TINY = ["--epochs", "2", "--batch_size", "16", "--model", "cnn", "--progress", "false"]
BUDGET = 5


def command(pool, labels, workdir, *extra, strategy="entropy"):
    return ["--pool", str(pool), "--labels", str(labels), "--strategy", strategy, "--budget", str(BUDGET),
            "--workdir", str(workdir), *TINY, *extra]


@pytest.fixture(scope="module")
def round_zero(tmp_path_factory):
    """A pool of 60 images, 12 labels, and the workdir after round 0 (entropy)."""
    base = tmp_path_factory.mktemp("round_zero")
    truth = write_pool(base / "photos")
    write_labels(base / "labels.csv", initial_labels(truth))
    assert query.main(command(base / "photos", base / "labels.csv", base / "al")) == 0
    return base, truth


def fresh_copy(round_zero, tmp_path):
    base, truth = round_zero
    for name in ("photos", "al"):
        copy_tree(base / name, tmp_path / name)
    shutil.copy(base / "labels.csv", tmp_path / "labels.csv")
    return tmp_path, truth


def test_two_rounds_from_the_command_line(tmp_path, monkeypatch):
    truth = write_pool(tmp_path / "photos")
    labels = tmp_path / "labels.csv"
    write_labels(labels, initial_labels(truth))
    workdir = tmp_path / "al"
    # Relative paths, from the user's folder; one device, as the second run (in this process of 8 fake
    # devices) must have the settings of the first.
    args = command("photos", "labels.csv", "al", "--num_devices", "1", strategy="ent_gn")
    run = subprocess.run([sys.executable, "-m", "jaxal.query", *args], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(query.__file__).parent.parent)})
    assert run.returncode == 0, run.stderr[-3000:]
    to_label = workdir / "round_000" / "to_label.csv"
    assert str(Path("al") / "round_000" / "to_label.csv") in run.stdout
    rows = read_to_label(to_label)
    assert list(rows[0]) == ["path", "score", "rank"] and [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    labeled = {item for item, _ in initial_labels(truth)}
    assert {r["path"] for r in rows} <= set(truth) - labeled
    sheet = Image.open(workdir / "round_000" / "contact_sheet.png")
    assert sheet.size[0] >= 5 * 64 and sheet.size[1] >= 64

    # The annotator labels three of the five and one other image; the next run is round 1.
    extra = next(item for item in sorted(truth) if item not in labeled and item not in {r["path"] for r in rows})
    append_labels(labels, [(r["path"], truth[r["path"]]) for r in rows[:3]] + [(extra, truth[extra])])
    monkeypatch.chdir(tmp_path)
    assert query.main(args) == 0
    second = read_to_label(workdir / "round_001" / "to_label.csv")
    assert len(second) == BUDGET and not {r["path"] for r in second} & (labeled | {extra} | {r["path"] for r in rows[:3]})
    # The first round's list is still there, unchanged.
    assert read_to_label(to_label) == rows


def test_rerun_without_labels_reproposes_and_new_labels_file_starts_a_round(round_zero, tmp_path, capsys):
    base, truth = fresh_copy(round_zero, tmp_path)
    before = (base / "al" / "round_000" / "to_label.csv").read_bytes()
    assert query.main(command(base / "photos", base / "labels.csv", base / "al")) == 0
    assert "proposing it again" in capsys.readouterr().out
    assert (base / "al" / "round_000" / "to_label.csv").read_bytes() == before
    assert not (base / "al" / "round_001").exists()

    proposed = [r["path"] for r in read_to_label(base / "al" / "round_000" / "to_label.csv")]
    write_labels(base / "second.csv", [(item, truth[item]) for item in proposed], header=False)
    assert query.main(command(base / "photos", base / "labels.csv", base / "al", "--new-labels",
                              str(base / "second.csv"))) == 0
    out = capsys.readouterr().out
    assert "5 new: 5 of round 0's 5 proposed, 0 others" in out
    assert len(read_to_label(base / "al" / "round_001" / "to_label.csv")) == BUDGET


def add_file(base, truth):
    Image.new("L", (8, 8), 7).save(base / "photos" / "added.png")


def remove_labeled(base, truth):
    labeled = initial_labels(truth)[0][0]
    (base / "photos" / labeled).unlink()
    first = read_to_label(base / "al" / "round_000" / "to_label.csv")[0]["path"]
    append_labels(base / "labels.csv", [(first, truth[first])])  # a new label, so a new round would start


BAD_INPUTS = {
    "label for a file outside the pool": (lambda b, t: append_labels(b / "labels.csv", [("b/nope.png", "one")]), [],
                                          "labels for ids that are not in the pool: 'b/nope.png'"),
    "class outside the known set": (lambda b, t: append_labels(
        b / "labels.csv", [(next(i for i in sorted(t) if i not in dict(initial_labels(t))), "three")]), [],
        "label 'three' is not one of the known classes ('one', 'two', 'zero')"),
    "conflicting second label": (lambda b, t: append_labels(
        b / "labels.csv", [(initial_labels(t)[0][0], "two" if initial_labels(t)[0][1] != "two" else "one")]), [],
        "conflicting labels for the same id"),
    "conflict between the two files": (lambda b, t: write_labels(
        b / "second.csv", [(initial_labels(t)[0][0], "two" if initial_labels(t)[0][1] != "two" else "one")]),
        ["--new-labels", "second.csv"], "conflicting labels"),
    "file added to the pool without new labels": (add_file, [], "the pool changed under round 0 (1 added ('added.png'))"),
    "labelled file removed from the pool": (remove_labeled, [], "labelled images of earlier rounds are no longer in"),
    "malformed labels row": (lambda b, t: append_labels(b / "labels.csv", [("only-a-path.png",)]), [],
                             "row 14: expected path,label"),
    "missing labels file": (lambda b, t: None, ["--new-labels", "missing.csv"], "cannot read the labels file"),
    "budget larger than the unlabelled images": (lambda b, t: append_labels(
        b / "labels.csv", [(read_to_label(b / "al" / "round_000" / "to_label.csv")[0]["path"], "one")]),
        ["--budget", "100"], "only 47 unlabelled images are left"),
    "other settings than the rounds": (lambda b, t: None, ["--epochs", "3"], "epochs: 2 there vs 3 now"),
    "pool that does not exist": (lambda b, t: None, ["--pool", "nowhere"], "nowhere does not exist"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_exits_2_and_changes_nothing(name, round_zero, tmp_path, capsys, monkeypatch):
    base, truth = fresh_copy(round_zero, tmp_path)
    change, extra, message = BAD_INPUTS[name]
    change(base, truth)
    monkeypatch.chdir(base)
    before = snapshot(base / "al")
    assert query.main(command("photos", "labels.csv", "al") + extra) == 2
    assert message in capsys.readouterr().err
    assert snapshot(base / "al") == before
