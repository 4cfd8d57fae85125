"""Strategies on volumes: ent_gn's per-volume gradient norms (ghost and vmap engines, Conv3D layers)
against a per-example jax.grad loop in float64, exp_gn = ent_gn, AITom's models' flatten at other sizes,
every strategy that does not assume 2-D images selecting from a volume pool (VAAL and SRAAL refused
before the run, with Wang et al.'s reason), and the axis flips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxal import gradnorm, loop, tasks
from jaxal.config import build_config
from jaxal.data.volumes import volume_dataset
from jaxal.models import LossNet, create_model, init_variables, inference_apply
from jaxal.models.volumes import SubtomogramCNN, flatten_size
from jaxal.strategies import STRATEGIES, StrategyContext, get_strategy
from jaxal.strategies.vaal import IMAGE_ONLY
from jaxal.train import TrainOptions, create_train_state, model_variables

from conftest import SMALL_STRATEGY_NETWORKS, to64  # tests/conftest.py

SHAPE = (4, 5, 6, 1)  # (D, H, W, C): a different size per axis
# AITom's layer types (two Conv3D, a pool, dense, dropout, head) at test size: one stage, so compiling is quick.
TINY_CNN = dict(channels=(2,), hidden=(5,), dropout_rate=0.5)


def volumes(n, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    x = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    x[..., 0] += labels[:, None, None, None] * 0.7  # learnable, a little
    return x, labels.astype(np.int32)


def test_ent_gn_on_volumes_equals_a_per_example_grad_loop_in_float64(x64):
    model = SubtomogramCNN(3, **TINY_CNN)
    xs = jnp.asarray(volumes(5)[0], jnp.float64)
    params = to64(init_variables(model, jax.random.key(0), SHAPE))["params"]
    task = tasks.Classification(3)

    @jax.jit
    def gradient_of_entropy(p, x):  # one example, no vmap: the reference
        return jax.grad(lambda q: task.entropy(model.apply({"params": q}, x[None], train=False).logits[0]))(p)

    per_leaf = np.array([[np.linalg.norm(np.ravel(g)) for g in jax.tree.leaves(gradient_of_entropy(params, x))]
                         for x in xs])
    reference = {"global": np.sqrt(np.sum(per_leaf**2, 1)), "layer_sum": per_leaf.sum(1)}
    apply = inference_apply(model, {})
    entropy = gradnorm.example_loss(apply, task.entropy)
    assert gradnorm.ghost_or_vmap(entropy, params, xs) == "ghost"  # the ghost engine covers the Conv3D layers
    for method, norm in (("ghost", "layer_sum"), ("vmap", "global")):
        got = gradnorm.per_example_grad_norms(entropy, params, xs, norm=norm, method=method, chunk_size=2)
        np.testing.assert_allclose(np.asarray(got), reference[norm], rtol=1e-9, err_msg=f"{method} {norm}")
    # exp_gn's loss (the posterior differentiated) has ent_gn's gradient: the same norms.
    expected = gradnorm.example_loss(apply, task.expected_loss)
    got = gradnorm.per_example_grad_norms(expected, params, xs, norm="layer_sum", method="ghost", chunk_size=2)
    np.testing.assert_allclose(np.asarray(got), reference["layer_sum"], rtol=1e-9)


def test_cpu_variant_averages_the_last_stage_and_its_ghost_norms_equal_the_loop(x64):
    """dsrf3d_half_cpu's layers at test size (BatchNorm after each convolution, the mean over the last stage's
    voxels in place of the flatten): the first dense layer reads the NumPy mean of the pooled stage, and the
    ghost engine (Conv3D and BatchNorm with moved running averages) gives the per-example loop's norms."""
    model = SubtomogramCNN(3, **TINY_CNN, batch_norm=True, pooling="average")
    xs = jnp.asarray(volumes(5)[0], jnp.float64)
    variables = to64(init_variables(model, jax.random.key(0), SHAPE))
    _, moved = model.apply(variables, 2.0 * xs + 1.0, train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(1)})
    variables = {"params": variables["params"], "batch_stats": moved["batch_stats"]}
    assert variables["params"]["fc1"]["kernel"].shape == (TINY_CNN["channels"][-1], TINY_CNN["hidden"][0])
    output = model.apply(variables, xs, train=False)
    stage = np.asarray(output.blocks[0])  # (N, D/2, H/2, W/2, C): the pooled stage
    fc1 = variables["params"]["fc1"]
    expected = np.maximum(stage.mean(axis=(1, 2, 3)) @ np.asarray(fc1["kernel"]) + np.asarray(fc1["bias"]), 0)
    np.testing.assert_allclose(np.asarray(output.features), expected, rtol=1e-12, atol=1e-14)
    task = tasks.Classification(3)

    @jax.jit
    def gradient_of_entropy(p, x):
        return jax.grad(lambda q: task.entropy(model.apply({"params": q, "batch_stats": variables["batch_stats"]},
                                                           x[None], train=False).logits[0]))(p)

    grads = [jax.tree.leaves(gradient_of_entropy(variables["params"], x)) for x in xs]
    reference = [np.sqrt(sum(np.sum(np.square(g)) for g in leaves)) for leaves in grads]
    entropy = gradnorm.example_loss(inference_apply(model, variables["batch_stats"]), task.entropy)
    assert gradnorm.ghost_or_vmap(entropy, variables["params"], xs) == "ghost"
    got = gradnorm.per_example_grad_norms(entropy, variables["params"], xs, method="ghost", chunk_size=2)
    np.testing.assert_allclose(np.asarray(got), reference, rtol=1e-9)


@pytest.mark.parametrize("size, flat", [((40, 40, 40), 16000), ((24, 24, 24), 3456), ((28, 20, 33), 3 * 2 * 4 * 128)])
def test_aitom_models_flatten_follows_the_input_size(size, flat):
    assert flatten_size(size) == flat
    variables = jax.eval_shape(lambda k: init_variables(create_model("dsrf3d", 4), k, (*size, 1)), jax.random.key(0))
    assert variables["params"]["fc1"]["kernel"].shape == (flat, 1024)
    hal = jax.eval_shape(lambda k: init_variables(create_model("hal3d", 4), k, (*size, 1)), jax.random.key(0))
    assert [hal["params"][n]["kernel"].shape[-1] for n in ("fc1", "fc2", "head")] == [1024, 256, 4]


def test_axis_flips_reverse_whole_axes_only():
    x = jnp.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5, 1).astype(jnp.float32)
    flipped, _ = tasks.axis_flips(jax.random.key(3), x)
    seen = set()
    for i in range(2):
        matches = [axes for axes in [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]
                   if np.array_equal(np.asarray(flipped[i]), np.flip(np.asarray(x[i]), [k for k in range(3) if axes[k]]))]
        assert len(matches) == 1  # exactly one combination of whole-axis flips, nothing else (no rotation)
        seen.add(matches[0])
    many, _ = tasks.axis_flips(jax.random.key(4), jnp.broadcast_to(x[:1], (64, 3, 4, 5, 1)))
    firsts = np.asarray(many[:, 0, 0, 0, 0])
    assert len(set(firsts.tolist())) == 8  # all eight flip combinations occur


@pytest.fixture(scope="module")
def volume_context():
    x, y = volumes(48, seed=1)
    model = SubtomogramCNN(3, **TINY_CNN)
    lossnet = LossNet(width=4)
    options = TrainOptions(augmentation="flip")
    state = create_train_state(model, lossnet, jax.random.key(0), SHAPE, options)  # untrained: selection only
    config = build_config(epochs=1, batch_size=8, eval_batch_size=16, bald_samples=3,
                          gradnorm=dict(chunk_size=8), influence=dict(chunk_size=8, hvp_chunk_size=8, depth=3,
                                                                      repeats=1, batch_size=4),
                          **SMALL_STRATEGY_NETWORKS)
    return StrategyContext(model=model, variables=model_variables(state), pool_x=x[24:], labeled_x=x[:24],
                           labeled_y=y[:24], num_classes=3, config=config, rng=jax.random.key(1), lossnet=lossnet,
                           lossnet_params=state.params["lossnet"],
                           reference_sets={"val": (x[:6], y[:6]), "initial": (x[:12], y[:12]),
                                           "labeled": (x[:24], y[:24])},
                           train_options=options)


VOLUME_STRATEGIES = sorted(set(STRATEGIES) - set(IMAGE_ONLY))


@pytest.mark.parametrize("name", VOLUME_STRATEGIES)
def test_every_strategy_but_vaal_and_sraal_selects_from_volumes(volume_context, name):
    result = get_strategy(name).select(volume_context, 5)
    chosen = np.asarray(result[0] if isinstance(result, tuple) else result)
    assert chosen.shape == (5,) and len(set(chosen.tolist())) == 5 and chosen.max() < 24


@pytest.mark.parametrize("name", IMAGE_ONLY)
def test_vaal_and_sraal_are_refused_on_volumes_before_the_run(tmp_path, name):
    x, y = volumes(20)
    data = volume_dataset("vols", x, y, x[:6], y[:6])
    config = build_config(strategy=f"ent_gn,{name}", initial_size=6, val_size=0, budget=2, cycles=2)
    with pytest.raises(loop.RunError, match="need to be redesigned if using 3D data"):
        loop.validate(config, data)
