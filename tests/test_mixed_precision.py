"""bfloat16 training (`--precision.training bfloat16`): what the lowered train step computes in, and what it
does to a digits run's accuracy."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxal import precision
from jaxal.data import load_dataset
from jaxal.models import LossNet, ResNet18, adapt, create_model
from jaxal.train import TrainOptions, create_train_state, model_variables, predict, train_model, train_step

CONVOLUTION = re.compile(r"stablehlo\.convolution.*: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)")


def _lowered_step(model, lossnet, options, x, y):
    # Shapes only: lowering traces the step, nothing is compiled.
    state = jax.eval_shape(lambda key: create_train_state(model, lossnet, key, x.shape[1:], options), jax.random.key(0))
    lr = {"model": np.float32(0.1), "lossnet": np.float32(0.1)}
    return train_step.lower(state, x, y, jax.random.key(1), lr, np.asarray(False), model=model, lossnet=lossnet,
                            options=options)


def _convolution_types(text: str) -> set[str]:
    """The element types of every convolution's operands and result in a StableHLO module."""
    types = set()
    for match in CONVOLUTION.finditer(text):
        types.update(re.search(r"x([a-z]\w*)>$", t).group(1) for t in match.groups())
    return types


def test_lowered_bf16_step_convolves_in_bf16_and_updates_float32_state():
    # A small ResNet (convolutions, BatchNorm) with the loss-prediction module, on uint8 pixels.
    data = load_dataset("digits")
    model = adapt(ResNet18(10, stage_sizes=(1, 1), width=4), data.normalization)
    x, y = data.x_train[:8], data.y_train[:8]
    lowered = {dtype: _lowered_step(model, LossNet(width=8), TrainOptions(compute_dtype=dtype), x, y)
               for dtype in (None, jnp.bfloat16)}
    texts = {dtype: lowered[dtype].as_text() for dtype in lowered}
    # Every convolution, forward and backward (data and kernel gradients), in bf16; in float32 without it.
    assert _convolution_types(texts[jnp.bfloat16]) == {"bf16"}
    assert _convolution_types(texts[None]) == {"f32"}
    assert texts[jnp.bfloat16].count("stablehlo.convolution") == texts[None].count("stablehlo.convolution") > 6
    # The new parameters, momentum buffers and BatchNorm averages, and the loss, are float32.
    (state, metrics) = lowered[jnp.bfloat16].out_info
    for leaf in jax.tree.leaves((state.params, state.opt_state, state.batch_stats, metrics)):
        assert leaf.dtype == jnp.float32
    assert jax.tree.leaves(state.batch_stats) and jax.tree.leaves(state.params["lossnet"])
    # The update p - lr * u of the stem's kernel is a float32 subtraction (the kernel's bf16 gradient is
    # converted to float32 before weight decay and momentum).
    assert re.search(r"stablehlo\.subtract .*: tensor<3x3x1x4xf32>", texts[jnp.bfloat16])
    assert re.search(r"stablehlo\.convert .*: \(tensor<3x3x1x4xbf16>\) -> tensor<3x3x1x4xf32>", texts[jnp.bfloat16])


def test_bf16_digits_run_ends_within_two_points_of_float32():
    """The same digits run (small CNN, same initial weights, 5 epochs, same batches) in float32 and in bf16:
    test accuracies within 0.02 of each other (9 of the 450 test images; seeds 0-3 measured gaps of at
    most 0.007), both above 0.95."""
    data = load_dataset("digits")
    model = adapt(create_model("cnn", data.num_classes), data.normalization)
    initial = create_train_state(model, None, jax.random.key(0), data.image_shape, TrainOptions())
    results = {}
    for dtype in (None, jnp.bfloat16):
        options = TrainOptions(compute_dtype=dtype)
        state, _ = train_model(jax.tree.map(jnp.copy, initial), data.x_train, data.y_train,
                               np.arange(len(data.x_train)), model=model, lossnet=None, options=options, epochs=5,
                               batch_size=64, lr=0.1, lr_milestones=(), lr_gamma=0.1, detach_epoch=0, seed=0)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
        logits, _ = predict(model, model_variables(state), data.x_test, 512)
        results[dtype] = float(np.mean(np.argmax(np.asarray(logits), -1) == data.y_test))
    assert min(results.values()) > 0.95, results
    assert abs(results[jnp.bfloat16] - results[None]) <= 0.02, results


def test_training_precision_flag():
    assert precision.compute_dtype("bfloat16") == jnp.bfloat16 and precision.compute_dtype("default") is None
    assert precision.matmul_precision("bfloat16") == "default"
    with pytest.raises(ValueError, match="--precision.solvers must be one of default, highest, got 'bfloat16'"):
        precision.check("bfloat16", "--precision.solvers")
