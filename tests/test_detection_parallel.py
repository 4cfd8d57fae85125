"""Data-parallel detection (`training.train` / `training.detect` with a mesh, `--num_devices` in the detection
loop): on a mesh of 4 of conftest's 8 CPU devices the toy FCOS trains to the parameters one device trains to
(float32 to ~1e-6, the same batches and flips, each split over the devices) and detects what one device
detects; a short batch is replicated; a batch size that does not split is refused; the loop and the strategies
that run on the mesh (entropy, coreset, ent_gn, isal, grad_sim, localization_stability) select what one device
selects."""

import csv
import dataclasses
import json

import jax
import numpy as np
import pytest

from detection_folders import make_voc_pool
from detection_toys import ISAL, toy_fcos
from jaxal import parallel, run
from jaxal.data import boxes as boxes_lib
from jaxal.detection import active, training


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    make_voc_pool(root, train=10, test=3)
    return root


@pytest.fixture(scope="module")
def data(voc):
    return boxes_lib.load_boxes(voc, canvas=32, max_boxes=4)


def toy(data):
    """The loop tests' toy detector (its compiled init is shared with the loop test below), decoding with a
    threshold of 0: an untrained model detects too."""
    return training.Detector(toy_fcos(ISAL, data.num_classes), dataclasses.replace(ISAL, score_thresh=0.0,
                                                                                   max_per_img=10))


def flat(tree):
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_training_and_detection_on_a_mesh_equal_one_device(data):
    detector = toy(data)
    variables = training.init_detector(detector, jax.random.PRNGKey(0), data.canvases[0])
    # 8 images in one bucket, two batches of 4, each split over the 4 devices (one compilation per path: a
    # bucket's last, smaller batch runs the same program replicated, test_full_batches_split_...)
    schedule = training.Schedule(iterations=2, batch_size=4, warmup_iters=1, base_lr=0.02)
    indices = np.arange(8)
    mesh = parallel.make_mesh(4)

    def train(mesh):
        return training.train(detector, variables, data.train, indices, schedule, np.random.default_rng(7),
                              workers=0, mesh=mesh)

    one, one_history = train(None)
    four, four_history = train(mesh)
    assert next(iter(jax.tree.leaves(four))).sharding.is_equivalent_to(parallel.replicated(mesh), 1)
    before, after_one, after_four = flat(variables["params"]), flat(one["params"]), flat(four["params"])
    assert sum(not np.allclose(after_one[k], before[k], rtol=1e-6, atol=0) for k in before) > len(before) // 2
    for k in before:
        np.testing.assert_allclose(after_four[k], after_one[k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose([float(m["loss"]) for m in four_history], [float(m["loss"]) for m in one_history],
                               rtol=1e-6)

    # detection: batches of 3 (rounded up to 4 on the mesh, the padding dropped), 10 images -> 3, 3, 3, 1
    images = np.arange(10)
    on_one = training.detect(detector, one, data.train, images, batch_size=3, workers=0)
    on_mesh = training.detect(detector, one, data.train, images, batch_size=3, workers=0, mesh=mesh)
    assert on_one["valid"].any()
    for key in ("valid", "classes"):
        np.testing.assert_array_equal(on_mesh[key], on_one[key], err_msg=key)
    for key in ("boxes", "scores"):
        np.testing.assert_allclose(on_mesh[key], on_one[key], rtol=1e-6, atol=1e-5, err_msg=key)


def test_full_batches_split_over_the_mesh_and_a_short_one_is_replicated():
    mesh = parallel.make_mesh(4)
    batch = lambda n: {"images": np.zeros((n, 8, 8, 3), np.uint8), "classes": np.zeros((n, 2), np.int32)}  # noqa: E731
    full, short = training.place_batch(batch(8), mesh), training.place_batch(batch(3), mesh)
    assert full["images"].sharding.is_equivalent_to(parallel.data_sharded(mesh), 4)
    assert {s.data.shape[0] for s in full["images"].addressable_shards} == {2}
    assert short["classes"].sharding.is_equivalent_to(parallel.replicated(mesh), 2)


def test_a_batch_size_that_does_not_split_is_refused(data):
    with pytest.raises(ValueError, match="batch size 6 is not a multiple of the mesh's 4 devices"):  # before any work
        training.train(toy(data), None, data.train, np.arange(4), training.Schedule(iterations=1, batch_size=6),
                       np.random.default_rng(0), workers=0, mesh=parallel.make_mesh(4))


def toy_detector_with_spies(monkeypatch, data) -> dict:
    """Runs build this module's toy detector (its compiled detection on the mesh is the first test's), and
    each call of `training.train` / `training.detect` is recorded as (mesh, train batch size or None)."""
    monkeypatch.setattr(active, "build_detector", lambda config, num_classes: toy(data))
    calls = {"train": [], "detect": []}
    for name in calls:
        def spy(*args, _wrapped=getattr(training, name), _name=name, **kwargs):
            calls[_name].append((kwargs.get("mesh"), args[4].batch_size if _name == "train" else None))
            return _wrapped(*args, **kwargs)

        monkeypatch.setattr(training, name, spy)
    return calls


def test_the_detection_loop_trains_and_evaluates_on_num_devices(voc, data, tmp_path, monkeypatch, capsys):
    """`--num_devices 4`: the loop trains and evaluates on a mesh of 4 (the batch of 2 rounded up to 4, as the
    classification loop does), and records the resolved count in config.json; 99 devices are refused."""
    meshes = toy_detector_with_spies(monkeypatch, data)
    flags = ["--dataset", str(voc), "--task", "detection", "--boxes.canvas", "32", "--detection.iterations", "2",
             "--detection.warmup_iters", "1", "--eval_batch_size", "3", "--initial_size", "4", "--budget", "2",
             "--cycles", "1", "--progress", "false", "--batch_size", "2"]
    assert run.main([*flags, "--workdir", str(tmp_path / "four"), "--num_devices", "4"]) == 0
    assert "4 cpu devices, mesh (data=4)" in capsys.readouterr().out
    assert json.loads((tmp_path / "four" / "config.json").read_text())["num_devices"] == 4
    (train_mesh, batch_size), = meshes["train"]
    (detect_mesh, _), = meshes["detect"]
    assert train_mesh.shape == detect_mesh.shape == {"data": 4} and batch_size == 4
    record = json.loads((tmp_path / "four" / "results.jsonl").read_text().splitlines()[0])
    assert record["num_labeled"] == 4 and np.isfinite(record["final_loss"]) and 0 <= record["test_ap"] <= 1
    assert run.main([*flags, "--workdir", str(tmp_path / "bad"), "--num_devices", "99"]) == 2
    assert "--num_devices: asked for 99 devices, 8 available" in capsys.readouterr().err


def test_an_annotation_round_with_boxes_runs_on_num_devices(data, tmp_path, monkeypatch, capsys):
    """`jaxal.query --task detection --num_devices 4`: the round trains, scores (entropy) and draws its sheet on
    a mesh of 4 (this module's toy detector and programs: the pool has the module's classes and canvas), and
    config.json records 4; 99 devices are refused, nothing written."""
    from test_detection_loop import export_labels, write_pool

    from jaxal import query

    calls = toy_detector_with_spies(monkeypatch, data)
    from jaxal.detection import strategies
    selections = []

    def recorded_select(*args, _select=strategies.select):
        selections.append(_select(*args))
        return selections[-1]

    monkeypatch.setattr(strategies, "select", recorded_select)
    truth = write_pool(tmp_path / "photos", 6)
    labels = export_labels("coco", tmp_path / "labels.json", {n: truth[n] for n in ("photo_0.png", "photo_1.png")})
    argv = ["--pool", str(tmp_path / "photos"), "--labels", str(labels), "--task", "detection", "--strategy",
            "entropy", "--boxes.canvas", "32", "--detection.iterations", "2", "--detection.warmup_iters", "1",
            "--eval_batch_size", "3", "--batch_size", "2", "--budget", "2"]
    assert query.main([*argv, "--workdir", str(tmp_path / "bad"), "--num_devices", "99"]) == 2
    assert "--num_devices: asked for 99 devices, 8 available" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not calls["train"]
    assert query.main([*argv, "--workdir", str(tmp_path / "al"), "--num_devices", "4"]) == 0
    assert "4 cpu devices, mesh (data=4)" in capsys.readouterr().out
    (train_mesh, batch_size), = calls["train"]
    assert train_mesh.shape == {"data": 4} and batch_size == 4
    assert calls["detect"] and all(mesh.shape == {"data": 4} for mesh, _ in calls["detect"])
    assert json.loads((tmp_path / "al" / "config.json").read_text())["num_devices"] == 4
    assert len(json.loads((tmp_path / "al" / "rounds.json").read_text())["rounds"][0]["proposal"]) == 2
    # the proposal lists the chosen images' own scores (the strategy scores every candidate), best first
    (selection,) = selections
    rows = list(csv.DictReader((tmp_path / "al" / "round_000" / "to_label.csv").open()))
    np.testing.assert_allclose([float(r["score"]) for r in rows], np.asarray(selection.scores)[selection.chosen])
    assert float(rows[0]["score"]) >= float(rows[1]["score"])


@pytest.mark.parametrize("name", ["entropy", "coreset", "ent_gn", "isal", "grad_sim", "localization_stability"])
def test_strategies_on_the_mesh_select_what_one_device_selects(name, data):
    """The strategies whose per-image passes go through `parallel.map_chunks` (`detect`, the towers' features,
    the gradient norms, the reference gradient and the pool's influence, the noisy detections), batches of 3
    padded to 4 on the mesh, and isal's s_test with its 2 LiSSA chains (padded to 4) split over the devices:
    the same values and the same choice."""
    from jaxal import config as config_lib
    from jaxal.detection import strategies
    from jaxal.tasks import Detection

    detector = toy(data)
    variables = training.init_detector(detector, jax.random.PRNGKey(0), data.canvases[0])
    # every detection a pseudo-box (an untrained detector scores low), s_test 2 chains x 2 steps, 2 noise levels
    config = config_lib.build_config("bccd_fcos", eval_batch_size=3, influence=dict(repeats=2),
                                     boxal=dict(top_k=20, pseudo_score=0.0, s_test_images=2,
                                                stability_noise=(0.1, 0.3)))
    task = Detection(data.num_classes, config=detector.config)

    def select(mesh):
        ctx = strategies.DetectionContext(detector, variables, data.train, np.arange(3, 10), np.arange(3), task,
                                          config, np.random.default_rng(0), reference=(data.val, np.arange(2)),
                                          mesh=mesh)
        return strategies.select(name, ctx, 3)

    one, four = select(None), select(parallel.make_mesh(4))
    np.testing.assert_array_equal(four.chosen, one.chosen)
    if one.scores is not None:
        assert np.isfinite(one.scores).any()
        np.testing.assert_allclose(four.scores, one.scores, rtol=1e-5, atol=1e-7)
    if name == "isal":  # the solve ran: 2 steps per chain, and its s_test is the same
        assert one.info["lissa_depth"] == 2 and one.info["num_scored"] == 7
        assert four.info["s_test_norm"] == pytest.approx(one.info["s_test_norm"], rel=1e-5)
