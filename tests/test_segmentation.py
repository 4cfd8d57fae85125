"""Semantic segmentation against independent references: NumPy losses and confusion matrices over pixels
(void left out), an enumeration of every label map of a small image (the expected loss of independent
pixels), a Python loop of `jax.grad` per image (gradient norms), NumPy BALD from stacked MC passes,
`jax.grad` loops for ISAL's gradient similarity, coordinates carried through the paired augmentation,
and end-to-end runs of the loop on a synthetic SegNet folder (and on the shared CamVid when present)."""

import functools
import itertools
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxal import data, diagnostics, gradnorm, loop, models, tasks
from jaxal.config import build_config
from jaxal.models import DRNSegmenter, ModelOutput, inference_apply, init_variables
from jaxal.strategies import StrategyContext, get_strategy
from jaxal.strategies import bald, isal
from jaxal.train import evaluate

from conftest import shared_archive  # tests/conftest.py

C, VOID = 4, 255
TASK = tasks.Segmentation(C, VOID)
# A stem, a plain convolution, a strided residual level, a dilated one and a dilated plain convolution: output
# stride 2, so an 8x8 image has a 4x4 feature map (its pixels differ).
TINY_LAYERS = (1, 1, 1, 0, 1, 0, 1, 0)
TINY_CHANNELS = (3, 4, 4, 6, 6, 6, 6, 6)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def random_labels(rng, shape, num_classes=C, void=VOID, void_fraction=0.2):
    labels = rng.integers(0, num_classes, shape)
    return np.where(rng.random(shape) < void_fraction, void, labels).astype(np.uint8)


# ---- losses of one image -------------------------------------------------------------------------


def test_supervised_loss_is_the_cross_entropy_of_the_labeled_pixels(x64):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 6, C))
    labels = random_labels(rng, (5, 6))
    labels[0, 0] = 9  # a value outside [0, C) that is not the void label: left out too
    log_p = np_log_softmax(logits)
    terms = [-log_p[i, j, labels[i, j]] for i in range(5) for j in range(6) if labels[i, j] < C]
    got = TASK.supervised_loss(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(got, np.mean(terms), rtol=1e-12)
    assert float(TASK.supervised_loss(jnp.asarray(logits), jnp.full((5, 6), VOID, jnp.uint8))) == 0.0


def test_label_free_losses_are_means_over_pixels(x64):
    logits = np.random.default_rng(1).normal(size=(3, 4, C)) * 2
    log_p = np_log_softmax(logits)
    p = np.exp(log_p)
    entropy = -(p * log_p).sum(-1).mean()
    pseudo = -log_p.max(-1).mean()
    z = jnp.asarray(logits)
    np.testing.assert_allclose(TASK.entropy(z), entropy, rtol=1e-12)
    np.testing.assert_allclose(TASK.expected_loss(z), entropy, rtol=1e-12)
    np.testing.assert_allclose(TASK.pseudo_label_loss(z), pseudo, rtol=1e-12)
    np.testing.assert_allclose(TASK.reduce_outputs(jnp.asarray(p[None, ..., 0])), p[..., 0].mean()[None], rtol=1e-12)


def enumerated_expected_loss(logits):
    """E_{y ~ p}[mean_t CE(z_t, y_t)] over EVERY label map y of the image (C^T of them), each weighted by
    its joint probability prod_t p_t(y_t) (pixels independent); differentiable in the logits (the
    posterior differentiated, as Wang et al.'s code does)."""
    flat = logits.reshape(-1, logits.shape[-1])
    log_p = jax.nn.log_softmax(flat)
    pixels = jnp.arange(flat.shape[0])
    total = 0.0
    for label_map in itertools.product(range(flat.shape[1]), repeat=flat.shape[0]):
        y = jnp.array(label_map)
        joint = jnp.exp(jnp.sum(log_p[pixels, y]))
        total = total + joint * jnp.mean(-log_p[pixels, y])
    return total


def test_expected_loss_of_independent_pixels_equals_the_enumeration_and_its_gradient_the_entropys(x64):
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(2, 2, 3)) * 1.5)  # 3^4 = 81 label maps
    np.testing.assert_allclose(TASK_3.expected_loss(logits), enumerated_expected_loss(logits), rtol=1e-12)
    by_enumeration = jax.grad(enumerated_expected_loss)(logits)
    np.testing.assert_allclose(jax.grad(TASK_3.expected_loss)(logits), by_enumeration, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(jax.grad(TASK_3.entropy)(logits), by_enumeration, rtol=1e-10, atol=1e-14)
    assert np.abs(np.asarray(by_enumeration)).max() > 1e-3  # not trivially zero


TASK_3 = tasks.Segmentation(3, VOID)


# ---- metrics -------------------------------------------------------------------------------------


class LogitsAreInputs(nn.Module):
    """A 'model' whose logits are its inputs: evaluation and strategies on hand-made dense predictions."""

    @nn.compact
    def __call__(self, x, train=False, mc_dropout=False):
        return ModelOutput(x, jnp.mean(x, axis=(1, 2)), (x,))


def numpy_metrics(logits, labels, num_classes, void):
    confusion = np.zeros((num_classes, num_classes))
    predictions = logits.argmax(-1)
    for true, predicted in zip(labels.ravel(), predictions.ravel()):
        if true != void:
            confusion[true, predicted] += 1
    ious = []
    for c in range(num_classes):
        union = confusion[c].sum() + confusion[:, c].sum() - confusion[c, c]
        ious.append(confusion[c, c] / union if union else None)
    present = [v for v in ious if v is not None]
    return confusion, {"miou": sum(present) / len(present), "pixel_accuracy": np.trace(confusion) / confusion.sum(),
                       "iou": ious}


def test_miou_equals_a_numpy_confusion_matrix_with_void_left_out():
    rng = np.random.default_rng(3)
    num_classes = 5
    logits = rng.normal(size=(11, 6, 7, num_classes)).astype(np.float32)
    logits[..., 4] -= 100.0  # class 4 is never predicted ...
    labels = random_labels(rng, (11, 6, 7), num_classes=4, void=11)  # ... nor labelled: no IoU
    labels[0, 0, :3] = 3
    task = tasks.Segmentation(num_classes, 11)
    confusion, expected = numpy_metrics(logits, labels, num_classes, 11)
    np.testing.assert_array_equal(task.confusion(jnp.asarray(logits), jnp.asarray(labels), jnp.ones(11)), confusion)
    # Chunks of 4 (the last one padded, weight 0) through the evaluation the loop runs.
    got = evaluate(LogitsAreInputs(), {"params": {}}, logits, labels, task, batch_size=4)
    assert expected["iou"][4] is None and got["iou"][4] is None
    np.testing.assert_allclose(got["miou"], expected["miou"], rtol=1e-12)
    np.testing.assert_allclose(got["pixel_accuracy"], expected["pixel_accuracy"], rtol=1e-12)
    np.testing.assert_allclose(got["iou"][:4], expected["iou"][:4], rtol=1e-12)
    fractions = task.correct_fraction(jnp.asarray(logits), jnp.asarray(labels))
    valid = labels != 11
    np.testing.assert_allclose(fractions, ((logits.argmax(-1) == labels) & valid).sum((1, 2)) / valid.sum((1, 2)),
                               rtol=1e-6)


# ---- paired augmentation -------------------------------------------------------------------------


@pytest.mark.parametrize("mode,window", [("crop", None), ("crop_flip", None), ("crop_flip", 5), ("none", 6)])
def test_paired_augmentation_keeps_masks_on_their_pixels(mode, window):
    """Each pixel's value encodes its coordinates (image: row+1, column+1; mask: row*W+column): after the
    augmentation every image pixel still sits on the mask pixel of the same coordinates, and padding sits
    on the fill label."""
    n, h, w, fill = 16, 7, 9, 250
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    image = np.stack([rows + 1, cols + 1, np.zeros_like(rows)], -1).astype(np.uint8)
    mask = (rows * w + cols).astype(np.uint8)
    images, masks = np.repeat(image[None], n, 0), np.repeat(mask[None], n, 0)
    out_images, out_masks = tasks.augment_pairs(jax.random.key(0), jnp.asarray(images), jnp.asarray(masks), mode,
                                                padding=2, label_fill=fill, window=window)
    out_images, out_masks = np.asarray(out_images).astype(int), np.asarray(out_masks).astype(int)
    size = (h, w) if window is None else (window, window)
    assert out_images.shape == (n, *size, 3) and out_masks.shape == (n, *size)
    padded = out_images[..., 0] == 0
    np.testing.assert_array_equal(out_masks[padded], fill)
    np.testing.assert_array_equal(out_masks[~padded], (out_images[..., 0] - 1)[~padded] * w
                                  + (out_images[..., 1] - 1)[~padded])
    assert (padded.any() if window is None else not padded.any())
    assert any(not np.array_equal(out_masks[i], out_masks[0]) for i in range(n))  # different crops
    # Mirrored examples: along a row, neighbouring image pixels' columns decrease.
    steps = np.diff(out_images[..., 1], axis=2)[~(padded[:, :, 1:] | padded[:, :, :-1])]
    assert set(np.unique(steps)) == ({-1, 1} if mode == "crop_flip" else {1})


# ---- per-image gradient norms --------------------------------------------------------------------


@functools.cache
def tiny_segmenter():
    """(model, params, batch_stats, xs) in float64, the BatchNorm averages moved by a train-mode pass."""
    with jax.enable_x64(True):
        model = DRNSegmenter(C, layers=TINY_LAYERS, channels=TINY_CHANNELS)
        variables = jax.tree.map(lambda a: a.astype(jnp.float64), init_variables(model, jax.random.key(0), (8, 8, 3)))
        xs = jax.random.normal(jax.random.key(1), (5, 8, 8, 3), jnp.float64)
        _, updated = model.apply(variables, 2.0 * xs + 0.5, train=True, mutable=["batch_stats"])
        return model, variables["params"], updated["batch_stats"], xs


@functools.cache
def loop_leaf_norms():
    """Reference: one `jax.grad` of the entropy per image of `tiny_segmenter` (batch size 1, inference
    mode); (images, tensors) norms by NumPy."""
    model, params, batch_stats, xs = tiny_segmenter()
    with jax.enable_x64(True):
        grad = jax.jit(jax.grad(lambda p, x: TASK.entropy(
            model.apply({"params": p, "batch_stats": batch_stats}, x[None], train=False).logits[0])))
        return np.array([[np.linalg.norm(np.ravel(g)) for g in jax.tree.leaves(grad(params, x))] for x in xs])


def loop_norms(norm):
    leaves = loop_leaf_norms()
    return np.sqrt(np.sum(np.square(leaves), 1)) if norm == "global" else np.sum(leaves, 1)


@pytest.mark.parametrize("method", gradnorm.METHODS)
@pytest.mark.parametrize("norm", gradnorm.NORMS)
def test_entropy_gradient_norms_per_image_equal_a_loop_of_jax_grad(x64, method, norm):
    model, params, batch_stats, xs = tiny_segmenter()
    expected = loop_norms(norm)
    loss = gradnorm.example_loss(inference_apply(model, batch_stats), TASK.entropy)
    got = gradnorm.per_example_grad_norms(loss, params, xs, norm=norm, method=method, chunk_size=2)
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert np.ptp(expected) > 1e-3 * expected.max()  # the images differ


@pytest.mark.parametrize("method", gradnorm.METHODS)
def test_exp_gn_equals_ent_gn_for_independent_pixels(x64, method):
    """The strategies themselves, through the loop's context: the expected loss (posterior differentiated)
    ranks every image exactly as the entropy."""
    model, params, batch_stats, xs = tiny_segmenter()
    config = build_config(gradnorm=dict(method=method, chunk_size=3))
    ctx = StrategyContext(model=model, variables={"params": params, "batch_stats": batch_stats}, pool_x=xs,
                          labeled_x=xs[:0], labeled_y=jnp.zeros((0, 8, 8), jnp.uint8), num_classes=C, config=config,
                          rng=jax.random.key(0), task=TASK)
    from jaxal.strategies.gradient import ent_gn_scores, exp_gn_scores

    ent, exp = np.asarray(ent_gn_scores(ctx).values), np.asarray(exp_gn_scores(ctx).values)
    np.testing.assert_allclose(exp, ent, rtol=1e-9)
    np.testing.assert_allclose(ent, loop_norms("layer_sum"), rtol=1e-9)
    assert list(get_strategy("exp_gn").select(ctx, 5).chosen) == list(get_strategy("ent_gn").select(ctx, 5).chosen)


# ---- BALD and influence on dense outputs ---------------------------------------------------------


def test_bald_is_the_per_pixel_mutual_information_averaged_over_pixels(x64):
    model = DRNSegmenter(C, layers=TINY_LAYERS, channels=TINY_CHANNELS, dropout_rate=0.4)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), init_variables(model, jax.random.key(2), (8, 8, 3)))
    xs = jax.random.normal(jax.random.key(3), (5, 8, 8, 3), jnp.float64)
    rng, samples = jax.random.key(4), 4
    probs = np.asarray(bald.mc_dropout_probabilities(model, variables, xs, rng, samples, chunk_size=2))  # stacked
    assert probs.shape == (samples, 5, 8, 8, C)
    entropy = lambda p: -np.sum(p * np.log(p), -1)  # noqa: E731
    expected = (entropy(probs.mean(0)) - entropy(probs).mean(0)).mean((1, 2))
    got = bald.bald_scores(model, variables, xs, rng, samples, chunk_size=2, task=TASK)  # running sums
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert np.all(expected > 0)


def test_grad_sim_on_segmentation_equals_loops_of_jax_grad(x64):
    """grad_sim's score of z is grad L(R) . G_z with the task's losses: R's pixel-averaged CE and z's
    pixel-averaged pseudo-label CE, on the weights (rank > 1) as ISAL; the reference takes one jax.grad
    per image."""
    model, params, batch_stats, xs = tiny_segmenter()
    rng = np.random.default_rng(5)
    ref_x = jax.random.normal(jax.random.key(6), (3, 8, 8, 3), jnp.float64)
    ref_y = jnp.asarray(random_labels(rng, (3, 8, 8)))

    def logits(p, x):
        return model.apply({"params": p, "batch_stats": batch_stats}, x[None], train=False).logits[0]

    weights = lambda tree: [g for g in jax.tree.leaves(tree) if g.ndim > 1]  # noqa: E731
    v = [np.mean(parts, 0) for parts in zip(*[weights(jax.grad(lambda p: TASK.supervised_loss(logits(p, x), y))(params))
                                              for x, y in zip(ref_x, ref_y)])]
    expected = [sum(np.vdot(a, b) for a, b in zip(v, weights(jax.grad(lambda p: TASK.pseudo_label_loss(logits(p, x)))(
        params)))) for x in xs]
    config = build_config(val_size=2, influence=dict(chunk_size=2))
    ctx = StrategyContext(model=model, variables={"params": params, "batch_stats": batch_stats}, pool_x=xs,
                          labeled_x=ref_x, labeled_y=ref_y, num_classes=C, config=config, rng=jax.random.key(0),
                          task=TASK, reference_sets={"val": (ref_x, ref_y)})
    scores, info = isal.influence_selection_scores(ctx, "val", hessian=False)
    np.testing.assert_allclose(scores, expected, rtol=1e-9)
    assert info["reference_size"] == 3


# ---- datasets ------------------------------------------------------------------------------------


def write_segnet(root: Path, counts: dict, size=(12, 16), void=VOID, seed=0, classes=3) -> None:
    """A SegNet-layout folder of learnable scenes: a grey background (class 0) with rectangles of the
    classes 1.. in their own colours, noise, and 5% void pixels."""
    rng = np.random.default_rng(seed)
    colours = np.array([[60, 60, 60], [200, 40, 40], [40, 40, 200], [40, 200, 40]])
    for split, n in counts.items():
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(n):
            mask = np.zeros(size, np.uint8)
            for c in range(1, classes):
                top, left = rng.integers(0, size[0] - 4), rng.integers(0, size[1] - 4)
                mask[top:top + rng.integers(3, 6), left:left + rng.integers(3, 7)] = c
            image = np.clip(colours[mask] + rng.normal(0, 20, (*size, 3)), 0, 255).astype(np.uint8)
            if void is not None:
                mask[rng.random(size) < 0.05] = void
            Image.fromarray(image).save(root / split / f"{i:03d}.png")
            Image.fromarray(mask).save(root / f"{split}annot" / f"{i:03d}.png")


def test_segnet_folder_is_a_dataset_of_masks(tmp_path):
    write_segnet(tmp_path / "seg", {"train": 6, "val": 2, "test": 3})
    ds = data.load_dataset(str(tmp_path / "seg"), task="segmentation", cache_dir=tmp_path / "cache")
    assert (ds.task, ds.num_classes, ds.ignore_label) == ("segmentation", 3, 255)
    assert ds.x_train.shape == (6, 12, 16, 3) and ds.y_train.shape == (6, 12, 16) and ds.y_train.dtype == np.uint8
    assert ds.x_test.shape == (3, 12, 16, 3) and ds.augmentation == "crop_flip" and ds.crop_padding == 1
    stored = np.stack([np.asarray(Image.open(tmp_path / "seg" / "trainannot" / f"{i:03d}.png")) for i in range(6)])
    np.testing.assert_array_equal(ds.y_train, stored)


@pytest.mark.parametrize("values,ignore,expected", [
    ((0, 1, 2, 255), None, (3, 255)),  # 255 present: the void
    ((0, 1, 2, 3), None, (4, None)),  # no void
    ((0, 1, 2, 3, 11), 11, (4, 11)),  # SegNet's CamVid: void 11
    ((0, 2, 11), 11, (3, 11)),  # a class absent from the masks still counts below the largest
])
def test_classes_and_void_of_mask_values(values, ignore, expected):
    assert data.segmentation_classes(values, ignore, "x") == expected


@pytest.mark.parametrize("values,ignore,message", [
    ((0, 1, 12, 11), 11, "values above the ignore label 11 \\(12\\)"),
    ((0, 255), None, "at least 2 classes"),
])
def test_bad_mask_values_are_refused(values, ignore, message):
    with pytest.raises(ValueError, match=message):
        data.segmentation_classes(values, ignore, "x")


def test_cityscapes_label_ids_map_to_the_19_training_classes():
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    got = data.cityscapes_train_ids(ids)
    expected = np.full(256, 255)
    for train_id, label_id in enumerate(data.CITYSCAPES_TRAIN_IDS):
        expected[label_id] = train_id
    np.testing.assert_array_equal(got.ravel(), expected)
    assert sorted(set(got.ravel()) - {255}) == list(range(19))


def test_segmentation_sources_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXAL_SHARED_DATA", raising=False)
    with pytest.raises(ValueError, match="pass --dataset PATH .* or set JAXAL_SHARED_DATA"):
        data.load_dataset("camvid", task="segmentation")
    with pytest.raises(ValueError, match="SegNet's CamVid layout"):
        data.load_dataset("digits", task="segmentation")
    with pytest.raises(ValueError, match="pass --task segmentation"):
        data.load_dataset("digits", ignore_label=3)
    write_segnet(tmp_path / "seg", {"train": 2, "test": 1})
    with pytest.raises(ValueError, match="pass --task segmentation"):
        data.load_dataset(str(tmp_path / "seg"), cache_dir=tmp_path / "cache")


def test_cityscapes_without_the_manual_download_says_how(tmp_path):
    pytest.importorskip("tensorflow_datasets")  # without it, the message says to install it instead
    with pytest.raises(RuntimeError, match="(?s)cityscapes-dataset.com.*gtFine_trainvaltest.zip.*--data_dir"):
        data.load_dataset("cityscapes", task="segmentation", data_dir=str(tmp_path / "tfds"), download=False)


# ---- whole runs ----------------------------------------------------------------------------------


@pytest.fixture
def tiny_model(monkeypatch):
    monkeypatch.setitem(models.MODELS, "drn_tiny",
                        functools.partial(DRNSegmenter, layers=TINY_LAYERS, channels=(4, 4, 8, 8, 8, 8, 8, 8)))


def segmentation_config(folder, **overrides):
    """A tiny run on the digits_quick preset's base (a segmentation run without a preset gets camvid_segnet)."""
    fields = dict(dataset=str(folder), task="segmentation", model="drn_tiny", initial_size=8, budget=4, cycles=2,
                  val_size=0, epochs=2, batch_size=4, eval_batch_size=8, lr=0.05,
                  gradnorm=dict(method="vmap", chunk_size=8), progress=False)
    return build_config("digits_quick", **{**fields, **overrides})


def test_a_segmentation_run_records_miou_and_selects_images(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("JAXAL_CACHE_DIR", str(tmp_path / "cache"))
    write_segnet(tmp_path / "seg", {"train": 24, "val": 2, "test": 6})
    config = segmentation_config(tmp_path / "seg", strategy="ent_gn,coreset", crop_size=8)
    records = loop.run_experiment(config, workdir=tmp_path / "run", log=lambda *_: None)
    assert [(r["strategy"], r["num_labeled"]) for r in records] == [("ent_gn", 8), ("ent_gn", 12),
                                                                    ("coreset", 8), ("coreset", 12)]
    for r in records:
        assert 0.0 <= r["test_miou"] <= 1.0 and 0.0 <= r["test_pixel_accuracy"] <= 1.0
        assert len(r["test_iou"]) == 3 and "test_accuracy" not in r
    for r in records[::2]:
        assert len(set(r["selected"])) == 4 and r["num_scored"] == 16
    header = (tmp_path / "run" / "results.csv").read_text().splitlines()[0].split(",")
    assert header[4:8] == ["test_miou", "test_pixel_accuracy", "train_miou", "train_pixel_accuracy"]
    assert [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()] == records
    assert (tmp_path / "run" / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("strategy,reason", [
    ("badge", "rank-one"), ("egl", "C\\^\\(H\\*W\\) label maps")])
def test_strategies_that_cannot_segment_refuse_before_anything_is_written(tmp_path, tiny_model, strategy, reason):
    write_segnet(tmp_path / "seg", {"train": 12, "test": 2})
    config = segmentation_config(tmp_path / "seg", strategy=f"random,{strategy}")
    with pytest.raises(loop.RunError, match=f"{strategy} does not support the segmentation task .*{reason}"):
        loop.run_experiment(config, workdir=tmp_path / "run", log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_segmentation_settings_that_cannot_run_are_refused(tmp_path, tiny_model):
    write_segnet(tmp_path / "seg", {"train": 12, "test": 2})
    cases = [(dict(strategy="isal", val_size=2, influence=dict(top_k_classes=2)), "top_k_classes"),
             (dict(crop_size=13), "--crop_size"), (dict(dataset="digits"), "SegNet's CamVid layout")]
    for overrides, message in cases:
        with pytest.raises(loop.RunError, match=message):
            loop.prepare(segmentation_config(tmp_path / "seg", **overrides))
    with pytest.raises(loop.RunError, match="--crop_size"):
        loop.prepare(build_config(crop_size=4))  # classification
    with pytest.raises(ValueError, match="implemented for classification, not segmentation"):
        diagnostics.run_diagnostics(segmentation_config(tmp_path / "seg", strategy="ent_gn"),
                                    workdir=tmp_path / "diag", log=lambda *_: None)
    assert not (tmp_path / "diag").exists()


def test_shared_camvid_runs(tmp_path, tiny_model, monkeypatch):
    """The named dataset "camvid" (the shared archive) through a whole run, resized to 48x48 so that the
    suite can afford two cycles (test_folders checks the archive's native 180x240 arrays)."""
    monkeypatch.setenv("JAXAL_SHARED_DATA", str(shared_archive("camvid-segnet-180x240.tar.gz").parent))
    monkeypatch.setenv("JAXAL_CACHE_DIR", str(tmp_path / "cache"))
    config = segmentation_config("camvid", strategy="ent_gn", subset_size=8, crop_size=32, epochs=1,
                                 eval_batch_size=32, num_devices=1, image_size=48)
    exp = loop.prepare(config, tmp_path / "run")
    assert (exp.dataset.x_train.shape, exp.dataset.x_test.shape) == ((367, 48, 48, 3), (233, 48, 48, 3))
    assert (exp.task.num_classes, exp.task.ignore_label) == (11, 11) and exp.dataset.class_names[0] == "sky"
    records = loop.run_prepared(exp, log=lambda *_: None)
    assert len(records) == 2 and len(records[0]["selected"]) == 4 and len(records[0]["test_iou"]) == 11
    assert records[0]["class_names"][:2] == ["sky", "building"]  # what the 11 IoUs are of


def test_cityscapes_from_tfds_maps_label_ids_and_keeps_pixels(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load_dataset("cityscapes", task="segmentation", data_dir=str(tmp_path))
        raw = tfds.data_source("cityscapes/semantic_segmentation", split="validation")
        images = np.stack([raw[i]["image_left"] for i in range(len(raw))])
        label_ids = np.stack([raw[i]["segmentation_label"][..., 0] for i in range(len(raw))])
    assert (ds.num_classes, ds.ignore_label, ds.class_names[0], ds.task) == (19, 255, "road", "segmentation")
    assert ds.x_train.shape == (2, 1024, 2048, 3) and ds.y_train.shape == (2, 1024, 2048)
    assert ds.y_train.dtype == np.uint8
    np.testing.assert_array_equal(ds.x_test, images)
    table = dict(zip(data.CITYSCAPES_TRAIN_IDS, range(19)))
    expected = np.vectorize(lambda label_id: table.get(int(label_id), 255))(label_ids[:, ::64, ::64])
    np.testing.assert_array_equal(ds.y_test[:, ::64, ::64], expected)
