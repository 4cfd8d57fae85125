"""Detector training: mmcv's schedule (constant warm-up, steps at epochs) and torch SGD as mmcv drives it
(clipping, bias lr x2 without decay, frozen parameters outside the optimiser), against transcriptions;
`--task detection` refusing bad input with exit 2."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from detection_toys import ISAL, toy_fcos
from jaxal import run
from jaxal.detection import losses, training


def mmcv_lr(it, per_epoch, base=0.01, steps=(8, 11), gamma=0.1, warmup_iters=500, ratio=1 / 3):
    """mmcv StepLrUpdaterHook (by_epoch) + warmup="constant" at FCOS's ratio 1/3: epoch-based steps, iteration-based
    warm-up."""
    epoch = it // per_epoch
    lr = base * gamma ** sum(epoch >= s for s in steps)
    return lr * ratio if it < warmup_iters else lr


@pytest.mark.parametrize("per_epoch,warmup", [(50, 500), (7, 20)])
def test_learning_rate_is_mmcv_schedule(per_epoch, warmup):
    schedule = training.Schedule(iterations=12 * per_epoch, warmup_iters=warmup)
    got = [training.learning_rate(schedule, it) for it in range(schedule.iterations)]
    want = [mmcv_lr(it, per_epoch, warmup_iters=warmup) for it in range(schedule.iterations)]
    np.testing.assert_allclose(got, want, rtol=1e-15)
    assert training.Schedule.epochs(12, 41, batch_size=8).iterations == 12 * 6


@pytest.mark.usefixtures("x64")
def test_sgd_step_is_torch_sgd_as_mmcv_drives_it():
    from conftest import to64

    model = toy_fcos(ISAL)
    detector = training.Detector(model, ISAL, normalization=None)  # float64 inputs as they are
    images = jax.random.uniform(jax.random.PRNGKey(0), (2, 64, 64, 3), jnp.float64) * 255
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), images[:1])
    params = to64(variables["params"])
    boxes = jnp.array([[[4, 4, 30, 26.], [20, 8, 60, 50]], [[10, 10, 50, 40], [0, 0, 0, 0]]])
    batch = {"images": images, "boxes": boxes,
             "classes": jnp.array([[0, 2], [1, -1]], jnp.int32), "difficult": jnp.zeros((2, 2), bool)}
    # freeze the toy backbone's first conv, as mmdet's frozen_stages leaves stage 1 out of the optimiser
    trainable = jax.tree_util.tree_map_with_path(lambda path, _: "Conv_0" not in str(path), params)
    schedule = training.Schedule(iterations=2, grad_clip=1e-3)  # tiny max norm: clipping is active
    multipliers = training.param_groups(params, trainable)
    state = (params, jax.tree.map(jnp.zeros_like, params), {})
    static = training._Step(detector, schedule)
    lrs = (0.01, 0.02)
    step = jax.jit(training._train_step, static_argnums=0)  # compiled once for both steps
    for lr in lrs:
        state, _ = step(static, state, batch, lr, multipliers)

    # torch transcription on flat NumPy arrays
    def loss(p):
        return losses.batch_loss(model.apply({"params": p}, images)["logits"], batch, ISAL)

    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    frozen = {k for k in flat if "Conv_0" in k}
    bufs = {k: None for k in flat}
    grad = jax.jit(jax.grad(loss))
    for lr in lrs:
        grads = traverse_util.flatten_dict(grad(traverse_util.unflatten_dict(flat)))
        grads = {k: np.asarray(g) for k, g in grads.items() if k not in frozen}
        total = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
        coef = 1e-3 / (total + 1e-6)
        for k, g in grads.items():
            g = g * min(coef, 1.0)
            conv_bias = k[-1] == "bias" and "norm" not in k[-2]
            d = g + (0.0 if conv_bias else 1e-4) * flat[k]
            bufs[k] = d if bufs[k] is None else 0.9 * bufs[k] + d
            flat[k] = flat[k] - lr * (2.0 if conv_bias else 1.0) * bufs[k]
    got = traverse_util.flatten_dict(state[0])
    for k in flat:
        np.testing.assert_allclose(np.asarray(got[k]), flat[k], rtol=1e-9, atol=1e-14, err_msg=str(k))
    before = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    assert frozen and all(np.array_equal(np.asarray(got[k]), before[k]) for k in frozen)
    assert sum(not np.array_equal(np.asarray(got[k]), before[k]) for k in flat) > len(flat) // 2


@pytest.mark.parametrize("flags,message", [
    (["--strategy", "vaal"], "; not vaal"),
    (["--model", "fcos_r999"], "unknown detection model"),
    (["--detection.config", "yolo"], "unknown FCOS config"),
    (["--warm_start", "true"], "fresh detector"),
    (["--boxes.cache_bytes", "-1"], "cache_bytes must be >= 0"),
    (["--strategy", "ll4al", "--lossnet.width", "0"], "--lossnet.width must be at least 1"),
    (["--strategy", "ll4al", "--lossnet.weight", "nan"], "--lossnet.weight finite and > 0"),
    (["--strategy", "ll4al", "--lossnet.detach_epoch", "5"], "do not apply to --task detection"),
])
def test_bad_detection_flags_exit_2(flags, message, tmp_path, capsys):
    code = run.main(["--task", "detection", "--dataset", str(tmp_path), "--workdir", str(tmp_path / "run"), *flags])
    assert code == 2
    assert message in capsys.readouterr().err


def test_train_and_detect_on_a_voc_folder(tmp_path):
    """A few iterations of the toy detector on a VOC folder streamed by the loader, then `detect` on the test
    split equals decoding the model's outputs on the images read directly; AP is computed."""
    import test_boxes as voc_files

    from jaxal.data import boxes as boxes_lib
    from jaxal.detection import decode, evaluate

    voc_files.make_voc(tmp_path / "voc")
    data = boxes_lib.load_boxes(tmp_path / "voc", canvas=64, max_boxes=4)
    config = dataclasses.replace(ISAL, score_thresh=0.0, max_per_img=10)  # an untrained model detects too
    detector = training.Detector(toy_fcos(config, data.num_classes), config)
    variables = training.init_detector(detector, jax.random.PRNGKey(0), data.canvases[0])
    schedule = training.Schedule(iterations=3, batch_size=2, warmup_iters=1)
    trained, history = training.train(detector, variables, data.train, np.arange(len(data.train)), schedule,
                                      np.random.default_rng(0), workers=0)
    assert len(history) == 3 and np.isfinite(float(history[-1]["loss"]))
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["params"], trained["params"])
    assert any(jax.tree.leaves(changed))
    test = np.arange(len(data.test))
    found = training.detect(detector, trained, data.test, test, batch_size=4, workers=0)
    # one image at a time, unpadded, outside `detect` (compiled once per canvas)
    direct_fn = jax.jit(lambda v, images, sizes: decode.decode_batch(detector.apply(v, images)["logits"], config,
                                                                     sizes))
    for i in test:
        images = data.test.read_images([i])
        direct = direct_fn(trained, jnp.asarray(images), jnp.asarray(data.test.resized_sizes[[i]], jnp.float32))
        np.testing.assert_array_equal(found["valid"][i], np.asarray(direct["valid"][0]))
        np.testing.assert_allclose(found["boxes"][i], np.asarray(direct["boxes"][0]), rtol=1e-5, atol=1e-4)
    assert found["valid"].any()
    metrics = evaluate.coco_metrics(data.test, test, found, num_classes=data.num_classes)
    assert 0.0 <= metrics["ap"] <= 1.0
