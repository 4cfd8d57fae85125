"""Interruptions, a busy workdir, damaged files and odd input: each ends with a short message and exit
status 2 (130 for Ctrl-C), and nothing of a finished round or cycle is lost. The lock, Ctrl-C and
kill -9 are tried on real processes (`interrupt_at.py` stops one at a chosen checkpoint)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from annotation import digit_pool, initial_labels, read_to_label, write_labels, write_pool
from jaxal import ActiveLearner, checkpoint, cli, folders, query, run, workdir as workdir_lock
from jaxal.learner import AnnotationError, round_folder
from jaxal.loop import RunError
from jaxal.memory import is_out_of_memory
from processes import finish, launch

QUERY_FLAGS = ["--strategy", "entropy", "--budget", "5", "--epochs", "2", "--batch_size", "16", "--model", "cnn",
               "--progress", "false", "--num_devices", "1"]
RUN_FLAGS = ["--strategy", "entropy", "--initial_size", "30", "--budget", "10", "--epochs", "1", "--progress",
             "false", "--num_devices", "1"]


def query_args(base: Path, workdir: Path, *extra) -> list[str]:
    return ["--pool", str(base / "photos"), "--labels", str(base / "labels.csv"), "--workdir", str(workdir),
            *QUERY_FLAGS, *extra]


def make_annotation_base(base: Path) -> Path:
    truth = write_pool(base / "photos")
    write_labels(base / "labels.csv", initial_labels(truth))
    return base


def wait_for(path: Path, process) -> None:
    """Until the stopped process has touched `path` (it is at its stopping point)."""
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the process ended before its stopping point:\n{process.communicate()[0][-3000:]}")
        time.sleep(0.1)


def interrupted(point: str, action: str, module: str, args: list):
    return launch(["tests/interrupt_at.py", point, action, module, *args], devices=1)


def output_or_stacks(process, timeout: float) -> str:
    """The output of an `interrupted` process once it ends; if it has not ended within `timeout` s, a failure
    that shows where each of its threads is (faulthandler's dump on SIGUSR1) instead of a bare timeout."""
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(2)
        process.kill()
        pytest.fail(f"the process did not end within {timeout} s; its output and stacks:\n{process.communicate()[0]}")


def check_round_files(workdir: Path, number: int) -> dict:
    """Every file of round `number` is there and agrees with the rounds checkpoint; returns round.json."""
    folder = workdir / round_folder(number)
    info = json.loads((folder / "round.json").read_text())
    step, meta = checkpoint.read_meta(checkpoint.manager(workdir / "checkpoints" / "rounds"))
    assert step == number and meta["rounds"][number] == info
    assert [row["path"] for row in read_to_label(folder / "to_label.csv")] == info["proposal"]["ids"]
    assert (folder / "contact_sheet.png").stat().st_size > 0
    assert (workdir / "learner.json").exists()
    return info


# ---- the lock, Ctrl-C and kill -9, on real processes -------------------------------------------------


def test_a_second_query_on_a_busy_workdir_is_refused_and_the_first_round_stays_whole(tmp_path):
    base = make_annotation_base(tmp_path)
    args = query_args(base, tmp_path / "al")
    go = tmp_path / "go"
    first = interrupted("trained", str(go), "jaxal.query", args)  # stops mid-round, holding the lock
    try:
        wait_for(Path(f"{go}.paused"), first)
        second = launch(["-m", "jaxal.query", *args], devices=1)
        out = second.communicate(timeout=300)[0]
        assert second.returncode == 2, out
        assert f"is in use by another jaxal process (pid {first.pid} " in out and "Traceback" not in out
        assert first.poll() is None  # refused while the first still held the workdir, not after
        go.touch()
    finally:
        go.touch()
        finish([first])
    check_round_files(tmp_path / "al", 0)


def test_ctrl_c_says_where_a_rerun_resumes_and_the_rerun_finishes(tmp_path):
    workdir, go = tmp_path / "run", tmp_path / "go"
    args = ["--workdir", str(workdir), *RUN_FLAGS, "--cycles", "2"]
    first = interrupted("trial_0", str(go), "jaxal.run", args)  # stops after cycle 0's checkpoint
    try:
        wait_for(Path(f"{go}.paused"), first)
        second = launch(["-m", "jaxal.run", *args], devices=1)  # the lock in jaxal.run too
        out = second.communicate(timeout=300)[0]
        assert second.returncode == 2 and f"(pid {first.pid} " in out, out
        first.send_signal(signal.SIGINT)
        out = output_or_stacks(first, timeout=120)
    finally:
        go.touch()
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, out
    assert "interrupted; rerun the same command to resume from cycle 1" in out and "Traceback" not in out
    step, meta = checkpoint.read_meta(checkpoint.manager(workdir / "checkpoints" / "entropy" / "trial_0"))
    assert step == 0 and [r["cycle"] for r in meta["records"]] == [0]
    assert run.main(args) == 0
    records = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    assert [r["cycle"] for r in records] == [0, 1] and records[0] == meta["records"][0]


def test_kill_9_just_after_a_rounds_checkpoint_then_the_rerun_writes_every_file(tmp_path):
    base = make_annotation_base(tmp_path)
    workdir = tmp_path / "al"
    killed = interrupted("rounds", "kill", "jaxal.query", query_args(base, workdir))
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert (workdir / "checkpoints" / "rounds" / "0").exists() and not (workdir / round_folder(0)).exists()
    assert query.main(query_args(base, workdir)) == 0
    assert check_round_files(workdir, 0)["k"] == 5


# ---- the workdir's filesystem and damaged files ---------------------------------------------------


def unwritable_workdirs(tmp_path: Path) -> dict:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    return {"a file": a_file, "under a file": a_file / "run", "under /proc": Path("/proc/jaxal-test/run"),
            # /sys refuses new folders to root as well: a read-only directory whoever runs the tests
            "under /sys": Path("/sys/jaxal-test"), "read-only folder": read_only / "run"}


@pytest.mark.parametrize("command", ["run", "query"])
@pytest.mark.parametrize("case", ["a file", "under a file", "under /proc", "under /sys", "read-only folder"])
def test_a_workdir_that_cannot_be_written_is_refused(case, command, tmp_path, capsys):
    if case == "read-only folder" and os.geteuid() == 0:
        pytest.skip("root writes into a chmod 555 folder; the /sys case covers a read-only folder for root")
    if case == "under /sys" and not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    workdir = unwritable_workdirs(tmp_path)[case]
    if command == "run":
        status = run.main(["--workdir", str(workdir), *RUN_FLAGS, "--cycles", "2"])
    else:
        status = query.main(query_args(make_annotation_base(tmp_path / "base"), workdir))
    assert status == 2
    err = capsys.readouterr().err
    assert f"cannot create the workdir {workdir}" in err and "choose another --workdir" in err
    assert (tmp_path / "notes.txt").read_text() == "not a folder"


@pytest.mark.parametrize("damage, message", [
    ('{\n  "augmentation": null,\n  "batch_size": ', "is damaged (not JSON: Expecting value"),
    ("[1, 2]", "is damaged (a JSON list, not an object)")])
def test_a_damaged_config_json_is_named(damage, message, tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(damage)
    assert run.main(["--workdir", str(workdir), *RUN_FLAGS, "--cycles", "2"]) == 2
    assert f"{workdir / 'config.json'} {message}" in capsys.readouterr().err
    assert (workdir / "config.json").read_text() == damage
    assert workdir_lock.contents(workdir) == [workdir / "config.json"]


@pytest.mark.parametrize("damage, message", [('{"version": 1, "config": {', "is damaged (not JSON"),
                                             ("[1, 2]", "is damaged (a JSON list, not an object)"),
                                             ('{"version": 1}', "is damaged (no config or classes)")])
def test_a_damaged_learner_json_is_named(damage, message, tmp_path, capsys):
    workdir = tmp_path / "al"
    workdir.mkdir()
    (workdir / "learner.json").write_text(damage)
    assert query.main(query_args(make_annotation_base(tmp_path), workdir)) == 2
    assert f"{workdir / 'learner.json'} {message}" in capsys.readouterr().err
    assert workdir_lock.contents(workdir) == [workdir / "learner.json"]


def test_a_zeroed_checkpoint_gives_one_short_message(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    args = ["--workdir", str(workdir), *RUN_FLAGS, "--cycles", "2"]
    assert run.main(args) == 0
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    capsys.readouterr()
    data = [p for p in (workdir / "checkpoints").rglob("*") if p.is_file() and p.parent.name == "d"]
    for files in (data, [p for p in (workdir / "checkpoints").rglob("*") if p.is_file()]):  # arrays, then all
        for path in files:
            path.write_bytes(bytes(path.stat().st_size))
        assert run.main(args) == 2
        time.sleep(0.5)  # TensorStore's abandoned reads end after the error
        err = capsys.readouterr().err
        assert "checkpoint" in err and "cannot be read" in err and "tensorstore_spec" not in err
        assert len(err.strip().splitlines()) == 1 and len(err) < 700, err
    assert not [u for u in reported if "Event loop is closed" in str(u.exc_value)]


def test_only_the_abandoned_reads_are_silenced(monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    checkpoint._silence_abandoned_reads()

    class Unraisable:
        def __init__(self, error):
            self.exc_value = error

    for error in (RuntimeError("Event loop is closed"), RuntimeError("something else"), OSError("disk")):
        sys.unraisablehook(Unraisable(error))
    assert [str(u.exc_value) for u in reported] == ["something else", "disk"]


# ---- memory and labels --------------------------------------------------------------------------


def test_a_real_cpu_out_of_memory_ends_with_the_report(capsys):
    args = run.build_parser().parse_args(["--strategy", "entropy"])

    def job(config):  # 2**46 float32 = 256 TiB, more than a 47-bit address space: refused up front, never touched
        grow = jax.jit(lambda a: jnp.broadcast_to(a, (2**46,)) + jnp.arange(2**46, dtype=jnp.float32))
        float(jax.jit(lambda b: b[:4].sum())(grow(jnp.ones(()))))  # dispatched asynchronously: XLA says INTERNAL

    assert cli.run_command(args, job) == 2
    err = capsys.readouterr().err
    assert "error: out of memory on cpu" in err and "Out of memory allocating 281474976710656 bytes" in err
    assert "--eval_batch_size [" in err and "Traceback" not in err
    try:  # the other form: an allocation refused in the call itself
        jnp.zeros((2**46,), jnp.float32).block_until_ready()
    except RuntimeError as error:
        assert "RESOURCE_EXHAUSTED" in str(error) and is_out_of_memory(error)
    else:
        pytest.fail("a 256 TiB array was allocated")


def test_a_disk_error_during_a_run_names_the_file(tmp_path, capsys):
    args = run.build_parser().parse_args(["--strategy", "entropy"])
    assert cli.run_command(args, lambda config: (tmp_path / "gone" / "results.csv").write_text("x")) == 2
    err = capsys.readouterr().err
    assert f"error: No such file or directory: {tmp_path / 'gone' / 'results.csv'}; what was finished" in err


def write_npz(path: Path, y_train, y_test, x=None) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(y_train) + len(y_test), 8, 8, 1)).astype(np.float32) if x is None else x
    np.savez(path, x_train=x[:len(y_train)], y_train=np.asarray(y_train), x_test=x[len(y_train):],
             y_test=np.asarray(y_test))
    return path


THREE = [0, 1, 2] * 14


@pytest.mark.parametrize("y_train, y_test, message", [
    (THREE[:-1] + [2_000_000_000], [0, 1, 2] * 4, "y_train holds 4 distinct labels up to 2000000000 (none of 3, 4, 5"),
    (THREE, [0, 1, 3] * 4, "y_test holds labels that y_train does not (3)"),
    ([0] * 42, [0] * 12, "y_train holds one class (0); classification needs at least 2"),
])
def test_class_labels_are_checked_before_the_run(y_train, y_test, message, tmp_path, capsys):
    path = write_npz(tmp_path / "data.npz", y_train, y_test)
    assert run.main(["--dataset", str(path), "--workdir", str(tmp_path / "run"), *RUN_FLAGS, "--cycles", "2"]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_strategy_named_twice_and_resnet18_on_1x1_images_are_refused(tmp_path, capsys):
    twice = ["--strategy", "entropy,entropy"]
    assert run.main(["--workdir", str(tmp_path / "a"), *RUN_FLAGS, "--cycles", "2", *twice]) == 2
    assert "--strategy names entropy more than once" in capsys.readouterr().err
    features = np.random.default_rng(0).normal(size=(54, 5)).astype(np.float32)  # (N, D): 1x1 images, D channels
    path = write_npz(tmp_path / "features.npz", THREE, [0, 1, 2] * 4, x=features)
    assert run.main(["--dataset", str(path), "--workdir", str(tmp_path / "b"), *RUN_FLAGS, "--cycles", "2",
                     "--model", "resnet18"]) == 2
    assert "model resnet18 needs images of at least 8x8 pixels" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- the labels CSV and file names ---------------------------------------------------------------


def test_a_labels_csv_in_another_encoding_and_decomposed_file_names(tmp_path, capsys):
    """The pool spells one labelled file decomposed (NFD, as macOS writes names), the labels CSV spells
    it composed and in cp1252: refused naming the line and byte, then read with --labels-encoding."""
    base = tmp_path
    rows = initial_labels(write_pool(base / "photos"))
    composed = "a/café.png"
    (base / "photos" / rows[0][0]).rename(base / "photos" / unicodedata.normalize("NFD", composed))
    rows[0] = (composed, rows[0][1])
    with open(base / "labels.csv", "w", newline="", encoding="cp1252") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    workdir = tmp_path / "al"
    assert query.main(query_args(base, workdir)) == 2
    err = capsys.readouterr().err
    assert f"{base / 'labels.csv'}, line 2: byte 0xe9 (byte 6 of the line) is not valid utf-8" in err
    assert "--labels-encoding" in err and not workdir.exists()
    assert query.main(query_args(base, workdir, "--labels-encoding", "nonsense")) == 2
    assert "unknown encoding 'nonsense'" in capsys.readouterr().err
    assert query.main(query_args(base, workdir, "--labels-encoding", "cp1252")) == 0
    info = json.loads((workdir / round_folder(0) / "round.json").read_text())
    assert unicodedata.normalize("NFD", composed) in [item for item, _ in info["new_labels"]]


def test_image_read_errors_name_the_file(tmp_path):
    write_pool(tmp_path / "photos", count=4)
    (tmp_path / "photos" / "a" / "img_000.png").write_bytes(b"not a png")
    with pytest.raises(ValueError) as error:
        folders.read_images(tmp_path / "photos", folders.list_images(tmp_path / "photos"), cache_dir=tmp_path / "c")
    assert str(tmp_path / "photos" / "a" / "img_000.png") in str(error.value)
    assert "BytesIO" not in str(error.value) and str(error.value).endswith("cannot identify image file")


# ---- the learner's API ---------------------------------------------------------------------------


def test_a_misspelt_override_names_the_field_and_its_close_matches(tmp_path):
    with pytest.raises(RunError, match=r"unknown config field 'epoch'; did you mean epochs\?"):
        ActiveLearner("cnn", "entropy", 3, workdir=tmp_path / "al", epoch=3)
    with pytest.raises(RunError, match=r"unknown config field 'nrom'; did you mean norm\?"):
        ActiveLearner("cnn", "ent_gn", 3, workdir=tmp_path / "al", gradnorm=dict(nrom="global"))
    assert not (tmp_path / "al").exists()


def test_learner_refuses_k_true_and_two_spellings_of_a_number_and_forgets_unknown_ids(tmp_path):
    ids, images, names = digit_pool(30)
    learner = ActiveLearner("cnn", "entropy", workdir=tmp_path / "al", epochs=1, batch_size=16, num_devices=1,
                            log=lambda *_: None)
    rows = initial_labels(dict(zip(ids, names)), per_class=3)
    learner.tell([i for i, _ in rows], [n for _, n in rows])
    with pytest.raises(AnnotationError, match="k must be a positive integer, got True"):
        learner.ask(ids, images, k=True)
    spelt = ActiveLearner("cnn", "entropy", workdir=tmp_path / "numbers", log=lambda *_: None)
    spelt.tell(ids[:4], ["8", "08", "1", "1"])
    with pytest.raises(AnnotationError, match="the labels '08' and '8' are one number written two ways"):
        spelt.ask(ids, images, k=2)
    learner.tell(["elsewhere.png"], [names[0]])  # an id that is not in the pool
    with pytest.raises(AnnotationError, match=r"not in the pool: 'elsewhere.png'; .* forget\(ids\)"):
        learner.ask(ids, images, k=3)
    learner.forget(["elsewhere.png"])
    assert "elsewhere.png" not in learner.labels and len(learner.labels) == len(rows)
    assert learner.ask(ids, images, k=3).round == 0
    with pytest.raises(AnnotationError, match="labelled in finished rounds and stay labelled"):
        learner.forget([rows[0][0]])
    assert not (tmp_path / "numbers").exists()
