"""Annotation rounds through the library (`jaxal.ActiveLearner`): ask/tell over rounds, deterministic
re-proposal without training, a killed round resumed to the uninterrupted result, and every bad input
refused with AnnotationError before anything is written."""

import json

import numpy as np
import pytest

import jaxal
from annotation import digit_pool, snapshot
from jaxal import loop, run
from jaxal.config import build_config
from jaxal.learner import AnnotationError
from jaxal.strategies import Strategy

from conftest import comparable  # tests/conftest.py

SETTINGS = dict(model="cnn", strategy="ent_gn", epochs=2, batch_size=16)
K = 5


@pytest.fixture(scope="module")
def pool():
    ids, images, names = digit_pool(60)
    return ids, images, dict(zip(ids, names))


def learner(workdir, **overrides):
    return jaxal.ActiveLearner(workdir=workdir, classes=["zero", "one", "two"], log=lambda *_: None,
                               **{**SETTINGS, **overrides})


def first_labels(truth, per_class=4):
    chosen = {}
    for item in sorted(truth):
        chosen.setdefault(truth[item], [])
        if len(chosen[truth[item]]) < per_class:
            chosen[truth[item]].append(item)
    items = sorted(i for group in chosen.values() for i in group)
    return items, [truth[i] for i in items]


def annotate(truth, ids):
    return list(ids), [truth[i] for i in ids]


def no_training(*args, **kwargs):
    raise AssertionError("this round must not train")


def test_two_rounds_with_reproposal_and_determinism(tmp_path, pool, monkeypatch):
    ids, images, truth = pool
    a = learner(tmp_path / "a")
    a.tell(*first_labels(truth))
    first = a.ask(ids, images, k=K)
    assert first.round == 0 and first.retrained and len(first) == K and first.ranks == (1, 2, 3, 4, 5)
    labeled = set(first_labels(truth)[0])
    assert len(set(first.ids)) == K and not set(first.ids) & labeled and set(first.ids) <= set(ids)
    assert list(first.scores) == sorted(first.scores, reverse=True)

    # The same inputs in another workdir, the pool given in another order: the same batch, the same scores.
    order = np.random.default_rng(0).permutation(len(ids))
    b = learner(tmp_path / "b")
    b.tell(*first_labels(truth))
    assert b.ask([ids[i] for i in order], images[order], k=K) == first

    # No new labels: the same batch again, without training, also from a learner opened afresh.
    monkeypatch.setattr(loop, "train_model", no_training)
    again = a.ask(ids, images, k=K)
    assert (again.ids, again.scores, again.round, again.retrained) == (first.ids, first.scores, 0, False)
    reopened = learner(tmp_path / "a")
    assert reopened.ask(ids, images, k=K).ids == first.ids
    monkeypatch.undo()

    # The annotator labels three of the five and one image that was never proposed.
    extra = next(i for i in ids if i not in labeled and i not in first.ids)
    reopened.tell(*annotate(truth, [*first.ids[:3], extra]))
    second = reopened.ask(ids, images, k=K)
    assert second.round == 1 and second.retrained
    assert not set(second.ids) & (labeled | set(first.ids[:3]) | {extra})
    info = reopened.rounds[1]
    assert (info["proposed_labeled"], info["others_labeled"], info["record"]["num_labeled"]) == (3, 1, 16)
    assert json.loads((tmp_path / "a" / "round_001" / "round.json").read_text())["proposal"]["ids"] == list(second.ids)
    assert reopened.labels[extra] == truth[extra]


def test_killed_round_resumes_to_the_uninterrupted_result(tmp_path, pool, monkeypatch):
    ids, images, truth = pool
    labels = first_labels(truth)
    whole = learner(tmp_path / "whole", strategy="badge", warm_start=True)  # BADGE draws from the round's key
    whole.tell(*labels)
    expected = [whole.ask(ids, images, k=K)]
    whole.tell(*annotate(truth, expected[0].ids[:2]))
    expected.append(whole.ask(ids, images, k=K))

    # Round 0 is killed during training (nothing checkpointed), round 1 after training (during scoring).
    real_train, real_select = loop.train_model, Strategy.select

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    killed_run = learner(tmp_path / "killed", strategy="badge", warm_start=True)
    killed_run.tell(*labels)
    monkeypatch.setattr(loop, "train_model", killed)
    with pytest.raises(KeyboardInterrupt):
        killed_run.ask(ids, images, k=K)
    monkeypatch.setattr(loop, "train_model", real_train)
    assert learner(tmp_path / "killed", strategy="badge", warm_start=True).rounds == []
    resumed = learner(tmp_path / "killed", strategy="badge", warm_start=True)
    resumed.tell(*labels)
    assert resumed.ask(ids, images, k=K) == expected[0]

    resumed.tell(*annotate(truth, expected[0].ids[:2]))
    monkeypatch.setattr(Strategy, "select", killed)
    with pytest.raises(KeyboardInterrupt):
        resumed.ask(ids, images, k=K)
    assert (tmp_path / "killed" / "checkpoints" / "trained" / "1").exists()
    monkeypatch.setattr(Strategy, "select", real_select)
    monkeypatch.setattr(loop, "train_model", no_training)  # the resumed round starts at the scoring
    again = learner(tmp_path / "killed", strategy="badge", warm_start=True)
    again.tell(*labels)
    again.tell(*annotate(truth, expected[0].ids[:2]))
    assert again.ask(ids, images, k=K) == expected[1]
    assert not (tmp_path / "killed" / "checkpoints" / "trained" / "1").exists()
    assert comparable([r["record"] for r in again.rounds]) == comparable([r["record"] for r in whole.rounds])


def test_bad_input_is_refused_and_changes_nothing(tmp_path, pool):
    ids, images, truth = pool
    workdir = tmp_path / "al"
    first = learner(workdir)
    first.tell(*first_labels(truth))
    proposal = first.ask(ids, images, k=K)
    before = snapshot(workdir)

    def fresh():
        return learner(workdir)

    other = next(i for i in ids if truth[i] == "one" and i not in first.labels)
    labeled = first_labels(truth)[0][0]
    cases = [
        ("a label for an id outside the pool", lambda l: (l.tell(["nowhere.png"], ["one"]), l.ask(ids, images, K)),
         "labels for ids that are not in the pool: 'nowhere.png'"),
        ("a class outside the known set", lambda l: l.tell([other], ["three"]), "'three' is not one of the known classes"),
        ("a conflicting second label", lambda l: l.tell([labeled], [next(c for c in truth.values() if c != truth[labeled])]),
         "conflicting labels for the same id"),
        ("two labels within one call", lambda l: l.tell([other, other], ["one", "two"]), "conflicting labels"),
        ("a file added to the pool, no new label", lambda l: l.ask([*ids, "new.png"], np.concatenate([images, images[:1]]), K),
         "the pool changed under round 0 (1 added ('new.png'))"),
        ("pixels changed, no new label", lambda l: l.ask(ids, 255 - images, K), "the same ids with other pixels"),
        ("a labelled image removed", lambda l: (l.tell([other], ["one"]), l.ask(ids[1:], images[1:], K)),
         "no longer in the pool"),
        ("another k without new labels", lambda l: l.ask(ids, images, K + 1), "proposed 5 images"),
        ("ids of no JSON type", lambda l: l.tell([1.5], ["one"]), "ids must be str, int or tuples"),
        ("duplicate pool ids", lambda l: l.ask([ids[0], *ids[:-1]], images, K), "more than once"),
        ("images of another size", lambda l: (l.tell([other], ["one"]), l.ask(ids, np.repeat(images, 2, axis=1), K)),
         "use the same size"),
    ]
    for name, action, message in cases:
        candidate = fresh()
        labels_before = candidate.labels
        with pytest.raises(AnnotationError) as error:
            action(candidate)
        assert message in str(error.value), (name, str(error.value))
        assert isinstance(error.value, ValueError)
        assert snapshot(workdir) == before, name
        if "conflicting" in message or "not one of" in message:
            assert candidate.labels == labels_before, name
    with pytest.raises(loop.RunError, match="other settings .*epochs: 2 there vs 3 now"):
        learner(workdir, epochs=3)
    assert snapshot(workdir) == before
    # Nothing was lost: the same call still re-proposes round 0.
    assert fresh().ask(ids, images, K) == proposal.__class__(0, proposal.ids, proposal.scores, proposal.ranks, False)


def test_ids_of_any_json_type_and_inferred_classes(tmp_path, pool):
    _, images, truth = pool
    names = list(truth.values())
    ids = [("scan", i) if i % 3 else i for i in range(len(names))]  # tuple keys and plain integers
    rounds = jaxal.ActiveLearner(workdir=tmp_path / "al", log=lambda *_: None, **{**SETTINGS, "strategy": "entropy"})
    labeled = [i for i in range(len(names)) if i % 5 == 0]
    rounds.tell([ids[i] for i in labeled], [names[i] for i in labeled])
    proposal = rounds.ask(ids, images, k=K)
    assert all(item in ids for item in proposal.ids) and not set(proposal.ids) & {ids[i] for i in labeled}
    assert rounds.classes == ("one", "two", "zero")  # inferred from the first round's labels, sorted
    reopened = jaxal.ActiveLearner(workdir=tmp_path / "al", log=lambda *_: None, **{**SETTINGS, "strategy": "entropy"})
    assert reopened.labels == {ids[i]: names[i] for i in labeled}
    with pytest.raises(AnnotationError, match="'four' is not one of the known classes"):
        reopened.tell([ids[1]], ["four"])


def test_import_and_a_digits_run_without_tensorflow_datasets(tmp_path):
    import subprocess
    import sys

    script = f"""
import sys
sys.modules["tensorflow_datasets"] = None  # any import of it fails
import jaxal
from jaxal import learner, loop, query, run
from jaxal.config import build_config
records = loop.run_experiment(build_config(strategy="entropy", model="mlp", initial_size=20, budget=5, cycles=2,
                                           epochs=1, progress=False, num_devices=1),
                              workdir={str(tmp_path / "run")!r}, log=lambda *_: None)
assert [r["cycle"] for r in records] == [0, 1] and len(records[0]["selected"]) == 5, records
try:
    loop.prepare(build_config(dataset="mnist"))
except ValueError as error:
    print("mnist:", error)
print("ok", jaxal.ActiveLearner.__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok ActiveLearner" in result.stdout
    assert "tensorflow-datasets" in result.stdout  # asking for a tfds dataset says what to install


def test_predict_gives_the_last_rounds_model_in_the_order_asked(tmp_path, pool):
    ids, images, truth = pool
    a = learner(tmp_path / "a")
    a.tell(*first_labels(truth))
    with pytest.raises(AnnotationError, match="no finished round yet"):
        a.predict(ids, images)
    a.ask(ids, images, k=K)
    probabilities = a.predict(ids, images)
    assert probabilities.shape == (len(ids), 3) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    # The round's own evaluation (a confusion matrix summed over chunks) counted the same train accuracy.
    held_out = {i for i in a.rounds[0]["val"]}
    trained = [i for i in first_labels(truth)[0] if i not in held_out]
    classes = ["zero", "one", "two"]
    hits = [int(np.argmax(probabilities[ids.index(i)])) == classes.index(truth[i]) for i in trained]
    assert abs(sum(hits) / len(hits) - a.rounds[0]["record"]["train_accuracy"]) < 1e-9
    # A learner opened afresh on the workdir, the ids in another order: the same rows, in that order.
    order = np.random.default_rng(1).permutation(len(ids))
    again = learner(tmp_path / "a").predict([ids[i] for i in order], images[order])
    np.testing.assert_allclose(again, probabilities[order], atol=1e-6)
# ---- the same images, the same defaults, in a folder run and in a learner ---------------------------


class Captured(Exception):
    """Stops an entry point once it has built its experiment: the defaults are chosen by then."""


def write_image_folder(root, channels: int, side: int, per_class: int = 4):
    """A train/<class>/ + test/<class>/ folder of random images; returns the train images in the order a
    learner's pool gets them (sorted ids) and their ids."""
    from PIL import Image

    rng = np.random.default_rng(side + channels)
    ids, images = [], []
    for split, count in (("train", per_class), ("test", 2)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 256, (side, side, channels), np.uint8)
                Image.fromarray(image[..., 0] if channels == 1 else image).save(root / split / name / f"{i}.png")
                if split == "train":
                    ids.append(f"{name}/{i}.png")
                    images.append(image)
    return ids, np.stack(images)


# The defaults table (README, "Your own images"): grey -> cnn, no augmentation; RGB -> resnet18 with random
# crop and flip (the small CNN below 32 pixels); pycls_cifar and pytorch_cifar accepted for RGB only.
@pytest.mark.parametrize("channels,side,model,augmentation", [
    (1, 32, "cnn", "none"), (3, 32, "resnet18", "crop_flip"), (3, 16, "cnn", "crop_flip")])
def test_a_folder_run_and_a_learner_choose_the_same_defaults(tmp_path, monkeypatch, channels, side, model,
                                                             augmentation):
    ids, images = write_image_folder(tmp_path / "images", channels, side)
    built = {}

    def capture(name):
        def stop(exp, *args, **kwargs):
            built[name] = exp
            raise Captured

        return stop

    for normalization in ("dataset", "pycls_cifar"):
        monkeypatch.setattr(loop, "run_prepared", capture("run"))
        monkeypatch.setattr("jaxal.learner.run_round", capture("learner"))
        flags = ["--dataset", str(tmp_path / "images"), "--normalization", normalization, "--progress", "false",
                 "--workdir", str(tmp_path / f"run-{normalization}"), "--initial_size", "4", "--val_size", "0",
                 "--budget", "2", "--cycles", "2"]
        a = jaxal.ActiveLearner(strategy="random", classes=["cat", "dog"], workdir=tmp_path / f"al-{normalization}",
                                config=build_config("annotation", normalization=normalization), log=lambda *_: None)
        a.tell(ids[:2] + ids[-2:], ["cat", "cat", "dog", "dog"])
        if normalization == "pycls_cifar" and channels != 3:  # refused by both, with the same reason
            assert run.main(flags) == 2
            with pytest.raises(loop.RunError, match="'pycls_cifar' is for RGB images"):
                a.ask(ids, images, k=2)
            continue
        with pytest.raises(Captured):
            run.main(flags)
        with pytest.raises(Captured):
            a.ask(ids, images, k=2)
        run_exp, learner_exp = built["run"], built["learner"]
        for exp in (run_exp, learner_exp):
            assert (exp.config.model, exp.dataset.augmentation) == (model, augmentation)
            assert exp.dataset.crop_padding == (side // 8 if augmentation != "none" else 0)
        # The pool is the folder's train split: the same channel statistics, or the same named constants.
        np.testing.assert_allclose(learner_exp.dataset.normalization.mean, run_exp.dataset.normalization.mean,
                                   rtol=1e-12)
        np.testing.assert_allclose(learner_exp.dataset.normalization.std, run_exp.dataset.normalization.std,
                                   rtol=1e-12)
        pixels = images.reshape(-1, channels) / 255.0
        expected = ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)) \
            if normalization == "pycls_cifar" else (pixels.mean(0), pixels.std(0))
        np.testing.assert_allclose(run_exp.dataset.normalization.mean, expected[0], rtol=1e-6)
        np.testing.assert_allclose(run_exp.dataset.normalization.std, expected[1], rtol=1e-6)
