"""The per-example gradient engine against a Python loop of `jax.grad` at batch size 1, in float64."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxal import gradnorm
from jaxal.gradnorm import cross_entropy, entropy_loss, example_loss, expected_loss, per_example_grad_norms
from jaxal.models import MLP, ModelOutput, ResNet18, SmallCNN, inference_apply, init_variables

N = 7  # examples; odd, so chunk sizes 2 and 3 leave a padded last chunk
NUM_CLASSES = 4
METHODS = ("vmap", "ghost")
RTOL = 1e-9  # float64; the brief asks for 1e-5, the engine is exact up to summation order


pytestmark = pytest.mark.usefixtures("x64")  # every test in float64 (conftest)


@functools.cache
def _setup(name):
    """(model, params, batch_stats, xs) in float64; BatchNorm averages moved away from their init values
    by one train-mode pass, so that a train-mode or init-stats scorer would give different norms."""
    model, shape = {
        "mlp": (MLP(NUM_CLASSES, hidden=(16, 8)), (6,)),
        "cnn": (SmallCNN(NUM_CLASSES, channels=(4, 6), hidden=8), (6, 6, 1)),
        "resnet": (ResNet18(NUM_CLASSES, stage_sizes=(1, 1), width=4), (6, 6, 3)),
    }[name]
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), init_variables(model, jax.random.key(0), shape))
    xs = jax.random.normal(jax.random.key(1), (N, *shape), jnp.float64)
    batch_stats = variables["batch_stats"]
    if batch_stats:
        _, updated = model.apply(variables, 3.0 * xs + 1.0, train=True, mutable=["batch_stats"])
        batch_stats = updated["batch_stats"]
        assert not all(np.allclose(a, b) for a, b in
                       zip(jax.tree.leaves(batch_stats), jax.tree.leaves(variables["batch_stats"])))
    return model, variables["params"], batch_stats, xs


@functools.cache
def _grad_fn(name, loss_of_logits):
    model, _, batch_stats, _ = _setup(name)

    def loss(p, x, *y):
        logits = model.apply({"params": p, "batch_stats": batch_stats}, x[None], train=False).logits[0]
        return loss_of_logits(logits, *y)

    return jax.jit(jax.grad(loss))


def _loop_grads(name, loss_of_logits, labels=None):
    """Reference: one `jax.grad` per example at batch size 1, inference mode."""
    _, params, _, xs = _setup(name)
    grad = _grad_fn(name, loss_of_logits)
    return [grad(params, xs[i], *([] if labels is None else [labels[i]])) for i in range(len(xs))]


def _hand_norms(grads, norm, keep=lambda path, leaf: True):
    out = []
    for g in grads:
        leaf_norms = [np.linalg.norm(np.ravel(leaf)) for path, leaf in jax.tree_util.tree_leaves_with_path(g)
                      if keep(path, leaf)]
        out.append(np.sqrt(np.sum(np.square(leaf_norms))) if norm == "global" else np.sum(leaf_norms))
    return np.array(out)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
def test_norms_equal_batch_size_one_loop(name, method):
    model, params, batch_stats, xs = _setup(name)
    loss_fn = example_loss(inference_apply(model, batch_stats), entropy_loss)
    grads = _loop_grads(name, entropy_loss)
    for norm in gradnorm.NORMS:
        got = per_example_grad_norms(loss_fn, params, xs, norm=norm, method=method)
        assert got.shape == (N,) and got.dtype == jnp.float64
        np.testing.assert_allclose(got, _hand_norms(grads, norm), rtol=RTOL)
    if batch_stats and method == "ghost":  # the running averages matter: the init averages give other norms
        init_stats = init_variables(model, jax.random.key(0), xs.shape[1:])["batch_stats"]
        init_stats = jax.tree.map(lambda a: a.astype(jnp.float64), init_stats)
        other = per_example_grad_norms(example_loss(inference_apply(model, init_stats), entropy_loss), params, xs,
                                       method=method)
        assert not np.allclose(other, _hand_norms(grads, "global"), rtol=1e-3)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_parameter_subsets_equal_loop_restricted_by_hand(name, method):
    model, params, batch_stats, xs = _setup(name)
    loss_fn = example_loss(inference_apply(model, batch_stats), entropy_loss)
    grads = _loop_grads(name, entropy_loss)
    keeps = {
        "weights": lambda path, leaf: leaf.ndim > 1,
        "last_layer": lambda path, leaf: path[0].key == "head",
        # a callable filter: kernels of the first top-level group only
        (lambda p: {k: jax.tree.map(lambda _: k == sorted(p)[0], v) for k, v in p.items()}):
            lambda path, leaf: path[0].key == sorted(params)[0],
    }
    for subset, keep in keeps.items():
        for norm in gradnorm.NORMS:
            got = per_example_grad_norms(loss_fn, params, xs, norm=norm, params_filter=subset, method=method)
            np.testing.assert_allclose(got, _hand_norms(grads, norm, keep), rtol=RTOL)


@pytest.mark.parametrize("method", METHODS)
def test_labeled_cross_entropy_equals_loop(method):
    model, params, batch_stats, xs = _setup("resnet")
    labels = jnp.arange(N) % NUM_CLASSES
    loss_fn = example_loss(inference_apply(model, batch_stats), cross_entropy, labeled=True)
    grads = _loop_grads("resnet", cross_entropy, labels)
    got = per_example_grad_norms(loss_fn, params, (xs, labels), norm="layer_sum", method=method, chunk_size=3)
    np.testing.assert_allclose(got, _hand_norms(grads, "layer_sum"), rtol=RTOL)


def test_chunks_equal_one_pass_and_trace_once():
    model, params, batch_stats, xs = _setup("cnn")
    apply_fn = inference_apply(model, batch_stats)

    @chex.assert_max_traces(n=1)
    def loss_fn(p, x):
        return entropy_loss(apply_fn(p, x[None]).logits[0])

    full = per_example_grad_norms(loss_fn, params, xs, norm="layer_sum")
    for chunk_size in (3, 2):  # three and four chunks, the last one padded, all by one compiled function
        chex.clear_trace_counter()
        for pool in (xs, np.asarray(xs), xs):  # a device pool, a host pool, and again
            got = per_example_grad_norms(loss_fn, params, pool, norm="layer_sum", chunk_size=chunk_size)
            np.testing.assert_allclose(got, full, rtol=1e-12)
    with pytest.raises(AssertionError, match="traced"):  # the counter does count: a new chunk shape retraces
        per_example_grad_norms(loss_fn, params, xs, norm="layer_sum", chunk_size=5)


def test_ghost_chunks_equal_one_pass_and_do_not_retrace():
    model, params, batch_stats, xs = _setup("cnn")
    apply_fn = inference_apply(model, batch_stats)
    traces = []

    def counted(p, x):
        traces.append(x.shape)
        return apply_fn(p, x)

    loss_fn = example_loss(counted, entropy_loss)
    full = per_example_grad_norms(loss_fn, params, xs, method="ghost")
    per_call = len(traces)
    np.testing.assert_allclose(per_example_grad_norms(loss_fn, params, xs, method="ghost", chunk_size=2), full,
                               rtol=1e-12)
    assert len(traces) == 2 * per_call  # one more trace (chunk shape 2) for four chunks


@pytest.mark.parametrize("method", METHODS)
def test_expected_loss_is_entropy_and_detached_posterior_gives_zero(method):
    model, params, batch_stats, xs = _setup("cnn")
    apply_fn = inference_apply(model, batch_stats)
    logits = apply_fn(params, xs).logits
    np.testing.assert_allclose(jax.vmap(expected_loss)(logits), jax.vmap(entropy_loss)(logits), rtol=1e-12)
    for norm in gradnorm.NORMS:
        ent = per_example_grad_norms(example_loss(apply_fn, entropy_loss), params, xs, norm=norm, method=method)
        exp = per_example_grad_norms(example_loss(apply_fn, expected_loss), params, xs, norm=norm, method=method)
        np.testing.assert_allclose(exp, ent, rtol=1e-10)
        detached = example_loss(apply_fn, lambda z: expected_loss(z, detach_posterior=True))
        assert np.all(np.abs(per_example_grad_norms(detached, params, xs, norm=norm, method=method)) < 1e-12)


def test_params_unchanged_after_scoring():
    model, params, batch_stats, xs = _setup("resnet")
    before, stats_before = jax.tree.map(np.array, params), jax.tree.map(np.array, batch_stats)
    apply_fn = inference_apply(model, batch_stats)
    for method in METHODS:
        per_example_grad_norms(example_loss(apply_fn, entropy_loss), params, xs, method=method, chunk_size=3)
    chex.assert_trees_all_equal(params, before)
    chex.assert_trees_all_equal(batch_stats, stats_before)


@pytest.mark.parametrize("config", [
    dict(kernel_size=(3, 3)),
    dict(kernel_size=(3, 2), strides=2, padding="SAME"),
    dict(kernel_size=(2, 3), strides=(1, 2), padding="VALID", kernel_dilation=(2, 1)),
    dict(kernel_size=(3, 3), padding=((2, 0), (1, 1)), use_bias=False),
    dict(kernel_size=(1, 1), strides=2),
    dict(kernel_size=(3,), strides=2, padding=1),  # 1-D
])
def test_conv_patches_reproduce_the_convolution(config):
    conv = nn.Conv(5, **config)
    spatial = (7,) if len(config["kernel_size"]) == 1 else (7, 6)
    x = jax.random.normal(jax.random.key(2), (3, *spatial, 4), jnp.float64)
    variables = conv.init(jax.random.key(3), x)
    y = conv.apply(variables, x)
    patches = gradnorm._conv_patches(conv.bind(variables), x)
    kernel = variables["params"]["kernel"]
    bias = variables["params"].get("bias", jnp.zeros(5))
    np.testing.assert_allclose(patches @ kernel.reshape(-1, 5) + bias[None, None, :], y.reshape(3, -1, 5),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [1, 3, 40])  # both the explicit and the Gram-matrix branch
def test_outer_sum_squares_equals_explicit(t):
    a = jax.random.normal(jax.random.key(4), (2, t, 6), jnp.float64)
    d = jax.random.normal(jax.random.key(5), (2, t, 3), jnp.float64)
    explicit = np.sum(np.square(np.einsum("ntk,ntf->nkf", a, d)), axis=(1, 2))
    np.testing.assert_allclose(gradnorm._outer_sum_squares(a, d), explicit, rtol=1e-12)


def test_clear_errors():
    model, params, batch_stats, xs = _setup("mlp")
    loss_fn = example_loss(inference_apply(model, batch_stats), entropy_loss)
    with pytest.raises(ValueError, match="unknown norm"):
        per_example_grad_norms(loss_fn, params, xs, norm="l1")
    with pytest.raises(ValueError, match="unknown parameter subset"):
        per_example_grad_norms(loss_fn, params, xs, params_filter="biases")
    with pytest.raises(ValueError, match="unknown method"):
        per_example_grad_norms(loss_fn, params, xs, method="fast")
    with pytest.raises(ValueError, match="example_loss"):
        per_example_grad_norms(lambda p, x: loss_fn(p, x), params, xs, method="ghost")

    class WithLayerNorm(nn.Module):  # and a grouped convolution: two layers the ghost path does not handle
        @nn.compact
        def __call__(self, x, train=False):
            h = nn.Conv(4, (3,), feature_group_count=2)(x[..., None].repeat(2, axis=-1)).reshape(x.shape[0], -1)
            h = nn.LayerNorm()(nn.Dense(5)(h))
            return MLP(NUM_CLASSES, hidden=())(h)  # ModelOutput with a head

    model = WithLayerNorm()
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0), xs)["params"])
    loss_fn = example_loss(lambda p, x: model.apply({"params": p}, x), entropy_loss)
    with pytest.raises(ValueError, match=r"Conv_0/kernel.*LayerNorm_0/scale") as error:
        per_example_grad_norms(loss_fn, params, xs, method="ghost")
    # ... which the vmap path handles, and the ghost path too when the subset leaves it out
    per_example_grad_norms(loss_fn, params, xs, method="vmap")
    assert "Dense_0" not in str(error.value)
    np.testing.assert_allclose(
        per_example_grad_norms(loss_fn, params, xs, method="ghost", params_filter=lambda p: {
            k: jax.tree.map(lambda _: k != "Conv_0" and k != "LayerNorm_0", v) for k, v in p.items()}),
        per_example_grad_norms(loss_fn, params, xs, method="vmap", params_filter=lambda p: {
            k: jax.tree.map(lambda _: k != "Conv_0" and k != "LayerNorm_0", v) for k, v in p.items()}), rtol=RTOL)


def _compiled_cost(fn, *args, static=()):
    compiled = jax.jit(fn, static_argnums=static).lower(*args).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"], compiled.memory_analysis().temp_size_in_bytes


def test_ghost_last_layer_costs_a_forward_pass_not_a_backward_through_every_layer():
    """XLA's count of the compiled programs: on a ResNet the last-layer ghost pass costs the forward pass
    (plus the head's products, ~0.01%), the all-parameter pass about three forward passes, and the
    last-layer pass holds no activation of the body for a backward pass (a fraction of the temp memory).
    The norms themselves are checked against the loop above (test_parameter_subsets_...)."""
    model = ResNet18(NUM_CLASSES, stage_sizes=(1, 1), width=8)
    variables = init_variables(model, jax.random.key(0), (16, 16, 3))
    loss_fn = example_loss(inference_apply(model, variables["batch_stats"]), entropy_loss)
    xs = jax.ShapeDtypeStruct((16, 16, 16, 3), jnp.float32)
    params = variables["params"]
    forward, _ = _compiled_cost(loss_fn.batch_losses, params, xs)
    costs = {subset: _compiled_cost(gradnorm._ghost_squares, loss_fn, params, xs,
                                    gradnorm._wanted_layers(params, subset), static=(0, 3))
             for subset in ("all", "last_layer")}
    (all_flops, all_temp), (last_flops, last_temp) = costs["all"], costs["last_layer"]
    assert forward <= last_flops < 1.01 * forward
    assert all_flops > 2.5 * last_flops
    assert last_temp < 0.2 * all_temp


class _EveryLayerKind(nn.Module):
    """The layer kinds the ghost path handles, at shapes where the per-layer rules of "ghost" and "auto" take
    the Gram matrices for some layers and the per-example gradient for others."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Conv(3, (3, 3), padding=((1, 0), (1, 1)))(x)  # 5x6 positions, asymmetric padding
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5)(h))  # scale and bias
        h = nn.Conv(8, (3, 2), strides=2, padding="VALID", kernel_dilation=(1, 2), name="strided")(h)
        h = nn.Conv(6, (1, 1), use_bias=False)(nn.relu(h))
        h = nn.relu(nn.Dense(5)(h.reshape(h.shape[0], -1, h.shape[-1])))  # a Dense over positions
        features = h.reshape(h.shape[0], -1)
        return ModelOutput(nn.Dense(NUM_CLASSES, name="head")(features), features)


def test_layer_rules_give_the_vmap_norms_for_every_layer_kind():
    model = _EveryLayerKind()
    xs = jax.random.normal(jax.random.key(6), (N, 6, 6, 2), jnp.float64)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(7), xs))
    _, updated = model.apply(variables, 2.0 * xs + 1.0, train=True, mutable=["batch_stats"])
    loss_fn = example_loss(inference_apply(model, updated["batch_stats"]), entropy_loss)
    params = variables["params"]
    engines = {method: gradnorm.layer_engines(loss_fn, params, xs, method) for method in gradnorm.LAYERWISE_METHODS}
    # The strided, dilated convolution by hand: out rows (6 - 3)//2 + 1 = 2, columns (5 - 3)//2 + 1 = 2 (the
    # output width of the first conv is 5), patches of 3 x 2 pixels x 3 channels, 8 features.
    assert engines["auto"]["strided"] == gradnorm.LayerEngine(4, 18, 8, gram=True)
    assert engines["auto"]["Conv_0"] == gradnorm.LayerEngine(30, 18, 3, gram=False)
    for method in gradnorm.LAYERWISE_METHODS:  # both branches of each rule are exercised
        assert {e.gram for e in engines[method].values()} == {True, False}, engines[method]
    for norm in gradnorm.NORMS:
        expected = per_example_grad_norms(loss_fn, params, xs, norm=norm, method="vmap")
        for method in gradnorm.LAYERWISE_METHODS:
            got = per_example_grad_norms(loss_fn, params, xs, norm=norm, method=method, chunk_size=4)
            np.testing.assert_allclose(got, expected, rtol=RTOL)


def test_engine_and_chunk_from_xla_memory_follow_the_budget():
    """`choose_engine` reads XLA's temporaries of each engine's compiled chunk program: a roomy budget gives
    the largest chunk and the engine with the fewer bytes per example; a budget between the two engines'
    chunk-1 programs leaves only the smaller one, at a chunk whose compiled program fits; a budget under
    both, chunk 1 with fits=False. The chosen engine's norms are the batch-size-one loop's."""
    model = MLP(NUM_CLASSES, hidden=(32, 32))  # wide enough that the engines' programs differ at chunk 1
    params = jax.tree.map(lambda a: a.astype(jnp.float64), init_variables(model, jax.random.key(0), (16,)))["params"]
    xs = jax.random.normal(jax.random.key(1), (N, 16), jnp.float64)
    loss_fn = example_loss(inference_apply(model, {}), entropy_loss)
    grad = jax.jit(jax.grad(lambda p, x: entropy_loss(model.apply({"params": p}, x[None]).logits[0])))
    expected = _hand_norms([grad(params, x) for x in xs], "global")
    roomy = gradnorm.choose_engine(loss_fn, params, xs, 2**30, max_chunk=2)
    assert roomy.fits and roomy.chunk_size == 2 and [e[2] for e in roomy.engines.values()] == [2, 2]
    per_example = {method: e[1] for method, e in roomy.engines.items()}
    assert roomy.method == min(per_example, key=per_example.get)
    (smaller, small_bytes), (larger, large_bytes) = sorted(((m, e[0]) for m, e in roomy.engines.items()),
                                                           key=lambda item: item[1])
    assert small_bytes < large_bytes, roomy.engines
    budget = (small_bytes + large_bytes) / 2
    tight = gradnorm.choose_engine(loss_fn, params, xs, budget, max_chunk=2)
    assert tight.fits and tight.method == smaller and tight.engines[larger][2] == 0
    assert gradnorm.compiled_temp_bytes(loss_fn, params, xs[:tight.chunk_size], tight.method) <= budget
    if tight.chunk_size < 2:  # the budget cut the chunk: the next size up does not fit
        assert gradnorm.compiled_temp_bytes(loss_fn, params, xs[:tight.chunk_size + 1], tight.method) > budget
    nothing = gradnorm.choose_engine(loss_fn, params, xs, small_bytes / 2, max_chunk=2)
    assert (nothing.method, nothing.chunk_size, nothing.fits) == (smaller, 1, False)
    for method, chunk_size in {(roomy.method, roomy.chunk_size), (tight.method, tight.chunk_size)}:
        got = per_example_grad_norms(loss_fn, params, xs, method=method, chunk_size=chunk_size)
        np.testing.assert_allclose(got, expected, rtol=RTOL)


# ---- the mixed engine: each layer by vmap or by ghost factors, chosen from XLA's memory analysis --------


class _Volumes(nn.Module):
    """A tiny 3-D CNN: a convolution over many voxels (small kernel gradient, large patches), BatchNorm,
    and a wide dense head on the flattened volume (large kernel gradient, one position)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Conv(4, (3, 3, 3), padding="SAME", name="conv")(x)
        h = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(h)).reshape(x.shape[0], -1)
        return ModelOutput(nn.Dense(NUM_CLASSES, name="head")(h), h, ())


class _Images(nn.Module):
    """A tiny 2-D CNN with GroupNorm and a strided convolution."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.GroupNorm(num_groups=2, name="gn")(nn.Conv(4, (3, 3), name="conv1")(x)))
        h = nn.relu(nn.Conv(6, (3, 3), strides=2, name="conv2")(h))
        h = nn.relu(nn.Dense(8, name="dense")(h.reshape(h.shape[0], -1)))
        return ModelOutput(nn.Dense(NUM_CLASSES, name="head")(h), h, ())


@functools.cache
def _mixed_setup(name):
    """(loss_fn, params, xs, per-example gradients by a jax.grad loop at batch size 1) in float64, the
    BatchNorm averages moved by a train-mode pass."""
    model, shape = {"volumes": (_Volumes(), (5, 5, 5, 1)), "images": (_Images(), (7, 7, 2))}[name]
    xs = 2.0 * jax.random.normal(jax.random.key(3), (N, *shape), jnp.float64)
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), jax.jit(model.init)(jax.random.key(4), xs))
    batch_stats = variables.get("batch_stats", {})
    if batch_stats:
        update = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1]["batch_stats"])
        batch_stats = update(variables, 3.0 * xs + 1.0)
    params = variables["params"]
    apply_fn = inference_apply(model, batch_stats)
    grad = jax.jit(jax.grad(lambda p, x: entropy_loss(apply_fn(p, x[None]).logits[0])))
    return example_loss(apply_fn, entropy_loss), params, xs, [grad(params, x) for x in xs]


def _layer_of(path) -> str:
    return path[0].key


def _conv_and_bn(params):
    """A callable subset: the parameters of the layers "conv" and "bn"."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _layer_of(path) in ("conv", "bn"), params)


@pytest.mark.parametrize("name, ghost_layers, subset", [
    ("volumes", {"bn", "head"}, _conv_and_bn),
    ("images", {"gn", "conv2", "head"}, "weights")])
def test_mixed_engine_equals_batch_size_one_loop(name, ghost_layers, subset):
    """Some layers by ghost factors, the others by vmap, in one pass: the norms of the per-example loop,
    for both reductions, every parameter or a subset (a callable mask over two layers; weights only)."""
    loss_fn, params, xs, grads = _mixed_setup(name)
    layers = {_layer_of(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
    assert set(ghost_layers) < layers  # both engines in play
    keep_subset = ((lambda path, leaf: _layer_of(path) in ("conv", "bn")) if callable(subset)
                   else (lambda path, leaf: leaf.ndim > 1))
    for subset, keep in {"all": (lambda path, leaf: True), subset: keep_subset}.items():
        chosen = frozenset(ghost_layers) & gradnorm._wanted_layers(params, subset)
        for norm in gradnorm.NORMS:
            got = per_example_grad_norms(loss_fn, params, xs, norm=norm, params_filter=subset, method="mixed",
                                         ghost_layers=chosen, chunk_size=3)
            np.testing.assert_allclose(got, _hand_norms(grads, norm, keep), rtol=RTOL, err_msg=f"{subset} {norm}")


def test_mixed_engine_refuses_layers_it_cannot_score():
    loss_fn, params, xs, _ = _mixed_setup("volumes")
    for ghost_layers, message in [({"nowhere"}, "nowhere"), ("head", "collection of layer paths")]:
        with pytest.raises(ValueError, match=message):
            per_example_grad_norms(loss_fn, params, xs, method="mixed", ghost_layers=ghost_layers)
    with pytest.raises(ValueError, match="ghost_layers"):  # a selected layer only: "conv" is not in "last_layer"
        per_example_grad_norms(loss_fn, params, xs, method="mixed", params_filter="last_layer",
                               ghost_layers={"conv"})
    with pytest.raises(ValueError, match="method='mixed'"):
        per_example_grad_norms(loss_fn, params, xs, method="vmap", ghost_layers={"head"})
    with pytest.raises(ValueError, match="inside a jitted function needs ghost_layers"):  # choosing compiles
        jax.jit(lambda p: per_example_grad_norms(loss_fn, p, xs, method="mixed"))(params)


def test_layer_choice_and_budget_follow_xla_memory():
    """Each layer gets the engine with which XLA gives the program fewer temporary bytes per example (the
    dense head: ghost factors, 500 + 4 values, instead of its 500 x 4 per-example kernel gradient; the
    convolution over 125 voxels: vmap, 27 x 4, instead of 125 x 27 patches). Combined, the mixed program
    needs fewer
    bytes per example than either engine, so a budget that fits 3 of its examples gives mixed the larger
    chunk; its norms are the loop's."""
    loss_fn, params, xs, grads = _mixed_setup("volumes")
    costs = gradnorm.layer_costs(loss_fn, params, xs)
    assert list(costs) == ["conv", "bn", "head"]  # the forward pass' order
    for layer, cost in costs.items():
        assert cost.engine == ("ghost" if cost.ghost < cost.vmap else "vmap"), (layer, cost)
    assert costs["head"].ghost < costs["head"].vmap and costs["conv"].vmap < costs["conv"].ghost, costs
    ghost_layers = gradnorm.mixed_ghost_layers(costs)
    budget = gradnorm.compiled_temp_bytes(loss_fn, params, xs[:3], "mixed", ghost_layers=ghost_layers)
    choice = gradnorm.choose_engine(loss_fn, params, xs, budget, methods=("vmap", "ghost", "mixed"), max_chunk=3)
    assert (choice.method, choice.chunk_size, choice.fits, choice.ghost_layers) == ("mixed", 3, True, ghost_layers)
    assert choice.layers == costs and max(choice.engines["vmap"][2], choice.engines["ghost"][2]) < 3, choice
    assert f"mixed: {gradnorm.describe_assignment(costs)}" in choice.describe() and "ghost for " in choice.describe()
    got = per_example_grad_norms(loss_fn, params, xs, method="mixed", ghost_layers=choice.ghost_layers,
                                 chunk_size=choice.chunk_size)
    np.testing.assert_allclose(got, _hand_norms(grads, "global"), rtol=RTOL)
