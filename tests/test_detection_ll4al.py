"""`ll4al` on detection (LL4AL's loss-prediction module on FCOS's FPN levels, ISAL's appendix D.2) against
independent references: the ranking loss against a NumPy transcription of LL4AL's `LossPredLoss` (value and
gradient, float64); the strategy's predicted losses against a per-image loop with the module written in
NumPy (float64); the scoring on a 4-device mesh against one device. The module's training with the detector
(the detachment) and ll4al in the detection loop: tests/test_detection_loop.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import to64
from detection_folders import make_voc_pool
from detection_toys import ISAL, toy_fcos
from jaxal import config as config_lib
from jaxal import parallel
from jaxal.data import boxes as boxes_lib
from jaxal.detection import losses, strategies, training
from jaxal.models import LossNet
from jaxal.tasks import Detection
from jaxal.train import loss_prediction_loss


def loss_pred_loss(predicted, target, margin=1.0):
    """LL4AL's `LossPredLoss` (Mephisto405/Learning-Loss-for-Active-Learning main.py:61-79, reduction='mean')
    in NumPy, and its (sub)gradient with respect to `predicted` (autograd's: the clamp's is 0 at the kink)."""
    assert len(predicted) % 2 == 0, "the batch size is not even."
    half = len(predicted) // 2
    diff = (predicted - predicted[::-1])[:half]
    target = (target - target[::-1])[:half]
    one = 2 * np.sign(np.clip(target, 0, None)) - 1
    hinge = margin - one * diff
    loss = np.sum(np.clip(hinge, 0, None)) / half
    d_diff = np.where(hinge > 0, -one, 0.0) / half
    grad = np.zeros_like(predicted)
    grad[:half] += d_diff
    grad[::-1][:half] -= d_diff  # predicted[n-1-i] enters diff_i with a minus sign
    return loss, grad


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("n,margin", [(2, 1.0), (10, 0.5)])
def test_ranking_loss_is_ll4als_loss_pred_loss(n, margin):
    rng = np.random.default_rng(n)
    predicted, target = rng.normal(size=n), rng.uniform(size=n)
    target[-1] = target[0]  # a tie: sign(clamp(0)) = 0, so "one" is -1
    expected, expected_grad = loss_pred_loss(predicted, target, margin)
    p, t = jnp.asarray(predicted), jnp.asarray(target)
    got = loss_prediction_loss(p, t, margin)
    grad_p, grad_t = jax.grad(loss_prediction_loss, argnums=(0, 1))(p, t, margin)
    assert got.dtype == jnp.float64 and float(got) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(np.asarray(grad_p), expected_grad, rtol=1e-12, atol=1e-12)
    assert not np.any(np.asarray(grad_t))  # the target losses are detached (main.py:67)
    assert np.any(expected_grad)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    make_voc_pool(root, train=10, test=3)
    return boxes_lib.load_boxes(root, canvas=32, max_boxes=4)


MODULE = training.LossPrediction(LossNet(16))


@pytest.fixture(scope="module")
def world(data):
    """The toy detector and a module, weights drawn and perturbed (no training: the scores' arithmetic is what
    is tested; the module's training with the detector: tests/test_detection_loop.py)."""
    detector = training.Detector(toy_fcos(ISAL, data.num_classes), ISAL)
    variables = training.init_detector(detector, jax.random.PRNGKey(0), data.canvases[0])
    variables["lossnet"] = training.init_loss_prediction(detector, MODULE, variables, jax.random.PRNGKey(1),
                                                         data.canvases[0])
    rng = np.random.default_rng(2)
    return detector, jax.tree.map(lambda leaf: np.asarray(leaf) + np.float32(0.1) * rng.normal(size=leaf.shape).astype(
        np.float32), variables)


def context(detector, variables, data, mesh=None):
    config = config_lib.build_config("bccd_fcos", strategy="ll4al", eval_batch_size=3, lossnet=dict(width=16))
    return strategies.DetectionContext(detector, variables, data.train, np.arange(3, 10), np.arange(3),
                                       Detection(data.num_classes, config=ISAL), config, np.random.default_rng(0),
                                       mesh=mesh)


def numpy_loss_net(levels, params):
    """LL4AL's LossNet (models/lossnet.py:27-45) in NumPy: per level GAP -> FC -> ReLU, concatenated -> FC."""
    hidden = [np.maximum(level.mean(axis=(0, 1)) @ params[f"fc{i}"]["kernel"] + params[f"fc{i}"]["bias"], 0)
              for i, level in enumerate(levels)]
    return float(np.concatenate(hidden) @ params["out"]["kernel"][:, 0] + params["out"]["bias"][0])


@pytest.mark.usefixtures("x64")
def test_ll4al_scores_are_the_modules_prediction_per_image_and_the_highest_are_chosen(world, data):
    # float64 throughout: the pixels as they are (the ImageNet normalisation computes in float32)
    detector = dataclasses.replace(world[0], normalization=None)
    variables = to64(world[1])
    selection = strategies.select("ll4al", context(detector, variables, data), 3)  # batches of 3, the last padded
    params = jax.tree.map(np.asarray, variables["lossnet"])
    expected, forward = [], jax.jit(lambda v, x: detector.apply(v, x)["blocks"])
    for i in range(3, 10):  # one image at a time, read directly
        image = jnp.asarray(boxes_lib.batches(data.train, [i], 1).__next__()["images"])
        levels = forward(variables, image)
        assert len(levels) == len(ISAL.strides) and levels[0].dtype == jnp.float64
        expected.append(numpy_loss_net([np.asarray(level[0]) for level in levels], params))
    np.testing.assert_allclose(selection.scores, expected, rtol=1e-9, atol=1e-12)
    assert np.ptp(expected) > 0
    np.testing.assert_array_equal(selection.chosen, np.argsort(-np.asarray(expected), kind="stable")[:3])


def test_ll4al_scores_on_a_mesh_as_on_one_device(world, data):
    """Each batch of 3 padded to 4 and split over the 4 devices (`parallel.map_chunks`)."""
    detector, one = world
    on_one = strategies.select("ll4al", context(detector, one, data), 3)
    on_four = strategies.select("ll4al", context(detector, one, data, parallel.make_mesh(4)), 3)
    np.testing.assert_allclose(on_four.scores, on_one.scores, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(on_four.chosen, on_one.chosen)


def test_ll4al_without_its_trained_module_is_refused(world, data):
    detector, variables = world
    without = {k: v for k, v in variables.items() if k != "lossnet"}
    with pytest.raises(ValueError, match="needs the loss-prediction module"):
        strategies.select("ll4al", context(detector, without, data), 3)


@pytest.mark.usefixtures("x64")
def test_the_modules_target_is_each_images_own_loss(world, data):
    """The training step's per-image target (`losses.batch_parts(..., image_losses=True)`, from the batch's
    terms) against `losses.image_loss` of each image alone; the batch's own parts unchanged."""
    detector = dataclasses.replace(world[0], normalization=None)
    variables = to64(world[1])
    batch = next(boxes_lib.batches(data.train, np.arange(4), 4))
    labels = {k: jnp.asarray(batch[k]) for k in ("boxes", "classes", "difficult")}
    outputs = jax.jit(lambda v, x: detector.apply(v, x)["logits"])(variables, jnp.asarray(batch["images"]))
    parts, batch_only = jax.jit(lambda o, y: (losses.batch_parts(o, y, ISAL, image_losses=True),
                                              losses.batch_parts(o, y, ISAL)))(outputs, labels)
    one = jax.jit(lambda o, y: losses.image_loss(o, y, ISAL))
    expected = [float(one(jax.tree.map(lambda a: a[i], outputs), jax.tree.map(lambda a: a[i], labels)))
                for i in range(4)]
    np.testing.assert_allclose(parts["image"], expected, rtol=1e-10)
    assert np.ptp(expected) > 0 and int(labels["classes"].max()) >= 0  # the images have boxes, losses differ
    assert set(batch_only) == {"cls", "box", "ctr"}
    for k in batch_only:
        np.testing.assert_allclose(parts[k], batch_only[k], rtol=1e-12)
