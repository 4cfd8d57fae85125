"""The influence engine against independent references: `jax.hessian` and dense solves in float64,
a Python loop of per-example gradients, and trace counters for the jitted loops."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxal import influence
from jaxal.models import MLP, ResNet18, SmallCNN, inference_apply, init_variables
from jaxal.pytree import restrict, tree_dot

from conftest import count_traces, to64  # tests/conftest.py


pytestmark = pytest.mark.usefixtures("x64")  # every test in float64 (conftest)


def random_like(seed, tree):
    return influence._normal_like(jax.random.key(seed), tree)


def model_problem(model, input_shape, n=6, num_classes=3, subset="all", seed=0):
    """A mean-CE loss of `model` in inference mode, its (subset of) float64 parameters and a batch."""
    variables = to64(init_variables(model, jax.random.key(seed), input_shape))
    apply = inference_apply(model, variables["batch_stats"])
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.normal(size=(n, *input_shape)))
    ys = jnp.asarray(rng.integers(0, num_classes, size=n))
    loss_fn = influence.mean_loss(influence.cross_entropy_example_loss(apply))
    loss_fn, params = restrict(loss_fn, variables["params"], subset)
    return loss_fn, params, (xs, ys), apply


def softmax_regression(n=40, d=5, num_classes=3, l2=0.1, seed=0):
    """A strongly convex problem: L2-regularised softmax regression at random parameters."""
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.normal(size=(n, d)))
    ys = jnp.asarray(rng.integers(0, num_classes, size=n))
    params = {"w": jnp.asarray(0.5 * rng.normal(size=(d, num_classes))), "b": jnp.asarray(0.1 * rng.normal(size=num_classes))}

    def example_loss_fn(p, example):
        x, y = example
        return influence.cross_entropy(x @ p["w"] + p["b"], y) + 0.5 * l2 * (jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2))

    return example_loss_fn, influence.mean_loss(example_loss_fn), params, (xs, ys)


def dense_reference(loss_fn, params, batch):
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)), unravel


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


# ----------------------------------------------------------------------------- hvp


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet_bn_weights"])
def test_hvp_matches_dense_hessian_and_is_symmetric(name):
    if name == "mlp":
        problem = model_problem(MLP(3, hidden=(6, 5)), (4,))
    elif name == "cnn":
        problem = model_problem(SmallCNN(3, channels=(2, 3), hidden=8), (4, 4, 1))
    else:  # BatchNorm in inference mode, differentiated w.r.t. the rank > 1 weights only (ISAL's subset)
        model = ResNet18(3, stage_sizes=(1, 1), width=2)
        problem = model_problem(model, (4, 4, 3), subset="weights")
    loss_fn, params, batch, _ = problem
    hessian, _ = dense_reference(loss_fn, params, batch)
    u, v = random_like(1, params), random_like(2, params)
    hv = jax.jit(influence.hvp, static_argnums=0)(loss_fn, params, batch, v)
    hu = jax.jit(influence.hvp, static_argnums=0)(loss_fn, params, batch, u)
    np.testing.assert_allclose(flat(hv), hessian @ flat(v), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(float(tree_dot(u, hv)), float(tree_dot(v, hu)), rtol=1e-8)
    assert abs(float(tree_dot(u, hv))) > 1e-8  # not trivially symmetric
    # The loop-body HVP (convolutions rewritten to NHWC/HWIO for XLA:CPU) is the same function.
    loop_hvp = influence._loop_hvp(loss_fn)
    np.testing.assert_allclose(flat(jax.jit(loop_hvp)(params, batch, v)), flat(hv), rtol=1e-12, atol=1e-14)
    if name != "mlp":
        convs = lambda f: [e.params for e in jax.make_jaxpr(f)(params, batch, v).jaxpr.eqns
                           if e.primitive is jax.lax.conv_general_dilated_p]
        plain = convs(lambda p, b, w: influence.hvp(loss_fn, p, b, w))
        assert any(not influence._is_canonical_conv(c) for c in plain)
        assert convs(loop_hvp) and all(influence._is_canonical_conv(c) for c in convs(loop_hvp))


@functools.cache
def cnn_problem():
    """A small CNN's mean CE over 11 examples and its float64 `jax.hessian` (computed once)."""
    with jax.enable_x64(True):
        loss_fn, params, batch, apply = model_problem(SmallCNN(3, channels=(2, 3), hidden=8), (4, 4, 1), n=11)
        return loss_fn, params, batch, apply, dense_reference(loss_fn, params, batch)[0]


@pytest.mark.parametrize("chunk_size", [4, 64])
def test_set_hvp_is_the_whole_set_product_for_every_chunk_size(chunk_size):
    """`set_hvp` sums chunk products inside a loop: equal to `jax.hessian` of the whole set's mean loss
    at float64 rounding, for a mean loss, a weighted loss over a padded set, a traced `num_examples`
    and an opaque mean loss (full chunks and a remainder), whatever the chunk size."""
    loss_fn, params, batch, apply, hessian = cnn_problem()  # 11 rows: chunks of 4 end with a shifted one
    v = random_like(13, params)
    expected = hessian @ flat(v)
    example_loss_fn = influence.cross_entropy_example_loss(apply)  # the subset is "all": params are the whole tree
    mean = influence.mean_loss(example_loss_fn)
    assert not isinstance(loss_fn, influence.MeanLoss)  # restrict() wraps it: an opaque mean loss
    xs, ys = batch
    padded = (jnp.concatenate([xs, 50.0 * jnp.ones((5, 4, 4, 1))]), jnp.concatenate([ys, jnp.zeros(5, ys.dtype)]))
    weights = (jnp.arange(16) < 11).astype(jnp.float64)
    product = jax.jit(influence.set_hvp, static_argnames=("loss_fn", "chunk_size"))
    results = {
        "mean": product(loss_fn=mean, params=params, data=batch, v=v, chunk_size=chunk_size),
        "opaque": product(loss_fn=loss_fn, params=params, data=batch, v=v, chunk_size=chunk_size),
        "weighted": product(loss_fn=influence.weighted_mean_loss(example_loss_fn), params=params,
                            data=(padded, weights), v=v, chunk_size=chunk_size),
        "num_examples": product(loss_fn=mean, params=params, data=padded, v=v, chunk_size=chunk_size,
                                num_examples=jnp.asarray(11)),
    }
    for name, result in results.items():
        np.testing.assert_allclose(flat(result), expected, rtol=1e-9, atol=1e-13 * np.abs(expected).max(), err_msg=name)
    one_batch = influence.hvp(loss_fn, params, batch, v)  # the unchunked product
    np.testing.assert_allclose(flat(results["mean"]), flat(one_batch), rtol=1e-11, atol=1e-15)


def test_the_exact_solvers_hessian_is_assembled_from_chunked_products_and_l2_adds_the_weight_decay():
    """The dense Hessian the exact solver factorises, against `jax.hessian` (the tests' reference)."""
    loss_fn, params, batch, _, hessian = cnn_problem()
    assemble = jax.jit(influence._dense_hessian_body, static_argnames=("loss_fn", "chunk_size", "block_size"))
    assembled = assemble(loss_fn, params, batch, chunk_size=4, block_size=7)  # 7 does not divide P
    np.testing.assert_allclose(np.asarray(assembled), 0.5 * (hessian + hessian.T), rtol=1e-9,
                               atol=1e-13 * np.abs(hessian).max())
    # l2: the Hessian of the training objective CE + l2/2 ||theta||^2, from jax.hessian of that objective.
    l2 = 0.3  # + l2*I: the Hessian of CE + l2/2 ||theta||^2 (checked against jax.hessian in the next test)
    np.testing.assert_allclose(np.asarray(assemble(loss_fn, params, batch, l2, chunk_size=4, block_size=32)),
                               0.5 * (hessian + hessian.T) + l2 * np.eye(len(hessian)), rtol=1e-9,
                               atol=1e-13 * np.abs(hessian).max())


@pytest.mark.parametrize("chunk_size", [7, 256])
def test_every_solver_solves_the_objective_with_weight_decay(chunk_size):
    """cg, exact and full-batch LiSSA with `l2` against a dense solve of `jax.hessian` of the objective
    CE + l2/2 ||theta||^2 (plus the damping): 40 examples in chunks of 7 (a remainder of 5) or one chunk."""
    _, loss_fn, params, batch = softmax_regression()
    l2, mu = 0.2, 0.1
    objective = lambda p, b: loss_fn(p, b) + 0.5 * l2 * tree_dot(p, p)  # noqa: E731
    hessian, _ = dense_reference(objective, params, batch)
    v = random_like(14, params)
    expected = np.linalg.solve(hessian + mu * np.eye(len(hessian)), flat(v))
    common = dict(l2=l2, chunk_size=chunk_size)
    exact = influence.exact_inverse_hvp(loss_fn, params, batch, v, damping=mu, block_size=5, **common)
    conj = influence.cg(loss_fn, params, batch, v, damping=mu, tol=1e-12, maxiter=300, **common)
    scale = 2.0 * np.linalg.eigvalsh(hessian)[-1]
    stochastic = influence.lissa(loss_fn, params, batch, v, rng=jax.random.key(0), depth=2000, repeats=2,
                                 damping=mu / scale, scale=scale, batch_size=None, **common)
    np.testing.assert_allclose(flat(exact), expected, rtol=1e-9)
    np.testing.assert_allclose(flat(conj), expected, rtol=1e-8)
    np.testing.assert_allclose(flat(stochastic), expected, rtol=1e-8)


def test_power_iteration_finds_largest_eigenvalue():
    _, loss_fn, params, batch = softmax_regression()
    hessian, _ = dense_reference(loss_fn, params, batch)
    eig = np.linalg.eigvalsh(hessian)
    estimate = float(influence.power_iteration(loss_fn, params, batch, rng=jax.random.key(0), iters=300))
    np.testing.assert_allclose(estimate, eig[-1], rtol=1e-4)


# ----------------------------------------------------------------------------- solvers


def test_exact_and_cg_match_dense_solve():
    _, loss_fn, params, batch = softmax_regression()
    hessian, _ = dense_reference(loss_fn, params, batch)
    v = random_like(3, params)
    for damping in (0.0, 0.3):
        expected = np.linalg.solve(hessian + damping * np.eye(len(hessian)), flat(v))
        exact = influence.exact_inverse_hvp(loss_fn, params, batch, v, damping=damping)
        result = influence.cg(loss_fn, params, batch, v, damping=damping, tol=1e-12, maxiter=200,
                              return_diagnostics=True)
        np.testing.assert_allclose(flat(exact), expected, rtol=1e-9)
        np.testing.assert_allclose(flat(result.solution), expected, rtol=1e-8)
        assert bool(result.converged) and int(result.iterations) <= len(hessian) + 5


def test_cg_rejects_indefinite_and_exact_rejects_large():
    concave = lambda p, batch: -jnp.sum(p["w"] ** 2)
    params = {"w": jnp.ones(4)}
    # H = -2 I: with the shift 1 every direction has curvature -1, and the shift must exceed 2.
    with pytest.raises(ValueError, match=r"not positive definite \(found curvature -1 <= 0 .* the shift must "
                                         r"exceed 2 at least; now 1\); increase damping"):
        influence.cg(concave, params, None, params, damping=1.0)
    big = {"w": jnp.zeros(20000)}  # 2 x 20000^2 float64 entries: 6 GiB, above the 1 GiB default
    with pytest.raises(ValueError, match=r"dense 20000 x 20000 Hessian .* 5.97 GiB, above the limit of 1 GiB"):
        influence.exact_inverse_hvp(lambda p, b: jnp.sum(p["w"] ** 2), big, None, big)


def test_lissa_full_batch_converges_to_damped_solve():
    """Deterministic recursion (batch_size=None): the error vs (H + d*s*I)^-1 v falls geometrically
    with depth at the predicted rate max|1 - d - lambda/s|."""
    _, loss_fn, params, batch = softmax_regression()
    hessian, _ = dense_reference(loss_fn, params, batch)
    eig = np.linalg.eigvalsh(hessian)
    damping, scale = 0.05, 2.0 * eig[-1]
    v = random_like(4, params)
    expected = np.linalg.solve(hessian + damping * scale * np.eye(len(hessian)), flat(v))
    errors = []
    for depth in (10, 50, 200):
        estimate = influence.lissa(loss_fn, params, batch, v, rng=jax.random.key(0), depth=depth, repeats=1,
                                   damping=damping, scale=scale, batch_size=None)
        errors.append(np.linalg.norm(flat(estimate) - expected) / np.linalg.norm(expected))
    rate = np.max(np.abs(1 - damping - eig / scale))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-4 and errors[2] <= 2 * rate ** 200


def test_lissa_cnn_matches_dense_solve():
    """A network with convolutions (whose loop-body HVP is rewritten on CPU), deterministic recursion."""
    loss_fn, params, batch, _ = model_problem(SmallCNN(3, channels=(2, 3), hidden=8), (4, 4, 1))
    hessian, _ = dense_reference(loss_fn, params, batch)
    eig = np.linalg.eigvalsh(hessian)
    damping, scale = 0.2, 2.0 * np.max(np.abs(eig))  # damping*scale > -lambda_min: a contraction
    assert damping * scale > -eig[0]
    v = random_like(12, params)
    expected = np.linalg.solve(hessian + damping * scale * np.eye(len(hessian)), flat(v))
    depth = 1000
    estimate = influence.lissa(loss_fn, params, batch, v, rng=jax.random.key(0), depth=depth, repeats=1,
                               damping=damping, scale=scale, batch_size=None)
    rate = np.max(np.abs(1 - damping - eig / scale))
    assert rate ** depth < 1e-15  # so the recursion has converged to rounding
    np.testing.assert_allclose(flat(estimate), expected, rtol=1e-9, atol=1e-12 * np.max(np.abs(expected)))


def test_lissa_minibatch_converges_to_damped_solve():
    """Stochastic minibatch Hessians, averaged over chains: the expectation is the same fixed point."""
    _, loss_fn, params, batch = softmax_regression()
    hessian, _ = dense_reference(loss_fn, params, batch)
    damping, scale = 0.05, 20.0  # scale above every single-example Hessian's lambda_max here
    v = random_like(5, params)
    expected = np.linalg.solve(hessian + damping * scale * np.eye(len(hessian)), flat(v))
    errors = []
    for depth in (5, 300):
        result = influence.lissa(loss_fn, params, batch, v, rng=jax.random.key(1), depth=depth, repeats=32,
                                 damping=damping, scale=scale, batch_size=8, return_diagnostics=True)
        errors.append(np.linalg.norm(flat(result.inverse_hvp) - expected) / np.linalg.norm(expected))
    assert result.norms.shape == (32, 301)
    assert errors[1] < 0.05 < errors[0]
    np.testing.assert_allclose(float(result.cosine_to_v), flat(result.inverse_hvp) @ flat(v) / (
        np.linalg.norm(flat(result.inverse_hvp)) * np.linalg.norm(flat(v))), rtol=1e-8)


def test_lissa_isal_defaults_solve_hessian_plus_100():
    """With damping=0.01, scale=1e4 the fixed point is (H + 100 I)^-1 v, not H^-1 v; depth 250 reaches
    1 - 0.99^251 ~ 92% of it, as documented."""
    _, loss_fn, params, batch = softmax_regression()
    hessian, _ = dense_reference(loss_fn, params, batch)
    v = random_like(6, params)
    eye = np.eye(len(hessian))
    damped = np.linalg.solve(hessian + 100.0 * eye, flat(v))
    deep = influence.lissa(loss_fn, params, batch, v, rng=jax.random.key(0), depth=2000, repeats=1, batch_size=None)
    np.testing.assert_allclose(flat(deep), damped, rtol=1e-6)
    assert np.linalg.norm(flat(deep) - np.linalg.solve(hessian, flat(v))) > 0.5 * np.linalg.norm(np.linalg.solve(hessian, flat(v)))
    default = influence.lissa(loss_fn, params, batch, v, rng=jax.random.key(0), batch_size=None, repeats=1)
    reached = flat(default) @ damped / (damped @ damped)
    np.testing.assert_allclose(reached, 1 - 0.99 ** 251, atol=5e-3)
    cosine = flat(default) @ flat(v) / (np.linalg.norm(flat(default)) * np.linalg.norm(flat(v)))
    assert cosine > 0.999  # ISAL's defaults: s_test is nearly a multiple of v here


def test_solve_methods_agree():
    _, loss_fn, params, batch = softmax_regression()
    v = random_like(7, params)
    kwargs = dict(damping=0.05, scale=20.0)
    exact = influence.solve("exact", loss_fn, params, batch, v, **kwargs)
    conj = influence.solve("cg", loss_fn, params, batch, v, tol=1e-10, **kwargs)
    stochastic = influence.solve("lissa", loss_fn, params, batch, v, rng=jax.random.key(2), depth=300,
                                 repeats=8, batch_size=None, **kwargs)
    np.testing.assert_allclose(flat(conj), flat(exact), rtol=1e-7)
    np.testing.assert_allclose(flat(stochastic), flat(exact), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown influence solver"):
        influence.solve("newton", loss_fn, params, batch, v)


def test_lissa_small_scale_raises_divergence_with_advice():
    _, loss_fn, params, batch = softmax_regression()
    hessian, _ = dense_reference(loss_fn, params, batch)
    lam_max = np.linalg.eigvalsh(hessian)[-1]
    v = random_like(8, params)
    with pytest.raises(influence.LissaDivergenceError, match="diverged") as info:
        influence.lissa(loss_fn, params, batch, v, rng=jax.random.key(0), depth=100, repeats=2,
                        scale=lam_max / 4, batch_size=4)
    message = str(info.value)
    assert "scale must exceed" in message or "converges only if scale exceeds" in message
    suggested = float(re.search(r"try scale >= ([0-9.e+-]+)", message).group(1))
    assert suggested > lam_max
    # The suggested scale works.
    influence.lissa(loss_fn, params, batch, v, rng=jax.random.key(0), depth=100, repeats=2, scale=suggested,
                    batch_size=4)
    assert issubclass(influence.LissaDivergenceError, RuntimeError)


def test_lissa_compiles_once_and_side_by_side_chains_equal_a_python_loop_of_the_recursion():
    """The vmapped chains against the recursion written out in NumPy with the same minibatch draws and
    each minibatch's dense `jax.hessian`; a second call with new v and rng compiles nothing."""
    _, loss, params, batch = softmax_regression(n=12)
    depth, repeats, batch_size, damping, scale = 15, 3, 4, 0.05, 20.0
    kwargs = dict(depth=depth, repeats=repeats, damping=damping, scale=scale, batch_size=batch_size)
    v, rng = random_like(9, params), jax.random.key(0)
    with count_traces(influence, "_lissa_chain") as traces:  # called only while `lissa`'s program is traced
        result = influence.lissa(loss, params, batch, v, rng=rng, return_diagnostics=True, **kwargs)
        assert traces.count == 1
        other = influence.lissa(loss, params, batch, random_like(10, params), rng=jax.random.key(1), **kwargs)
        assert traces.count == 1
    assert not np.allclose(flat(result.inverse_hvp), flat(other))

    flat_params, unravel = ravel_pytree(params)
    hessian_of = jax.jit(lambda xs, ys: jax.hessian(lambda f: loss(unravel(f), (xs, ys)))(flat_params))
    xs, ys = map(np.asarray, batch)
    estimates, norms = [], []
    for key in jax.random.split(rng, repeats):
        h = flat(v)
        chain_norms = [np.linalg.norm(h)]
        for step_key in jax.random.split(key, depth):
            idx = np.asarray(jax.random.randint(step_key, (batch_size,), 0, len(ys)))
            h = flat(v) + (1 - damping) * h - np.asarray(hessian_of(xs[idx], ys[idx])) @ h / scale
            chain_norms.append(np.linalg.norm(h))
        estimates.append(h / scale)
        norms.append(chain_norms)
    np.testing.assert_allclose(flat(result.inverse_hvp), np.mean(estimates, axis=0), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(result.norms), np.asarray(norms), rtol=1e-10)


# ----------------------------------------------------------------------------- influence scores


def test_influence_scores_match_per_example_gradient_loop():
    loss_fn, params, batch, apply = model_problem(SmallCNN(3, channels=(2, 3), hidden=8), (4, 4, 1), n=11)
    example_loss_fn = influence.cross_entropy_example_loss(apply)
    s = random_like(11, params)
    grad = jax.jit(jax.grad(example_loss_fn))
    expected = np.array([float(tree_dot(s, grad(params, jax.tree.map(lambda a: a[i], batch)))) for i in range(11)])
    counted = chex.assert_max_traces(example_loss_fn, n=1)
    chunked = influence.influence_scores(counted, params, batch, s, chunk_size=4)  # 3 chunks, last padded
    again = influence.influence_scores(counted, params, jax.tree.map(lambda a: a[:6], batch), s, chunk_size=4)
    whole = influence.influence_scores(example_loss_fn, params, batch, s)
    assert chunked.shape == (11,) and again.shape == (6,)
    np.testing.assert_allclose(np.asarray(whole), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(np.asarray(again), np.asarray(whole[:6]), rtol=1e-10, atol=1e-14)


def test_pseudo_label_loss_and_mean_gradient():
    loss_fn, params, batch, apply = model_problem(MLP(3, hidden=(6,)), (4,), n=9)
    xs, _ = batch
    pseudo = influence.cross_entropy_example_loss(apply, pseudo_label=True)
    argmax = jnp.argmax(apply(params, xs).logits, axis=-1)
    true_at_argmax = influence.cross_entropy_example_loss(apply)
    for i in range(3):
        np.testing.assert_allclose(float(pseudo(params, xs[i])), float(true_at_argmax(params, (xs[i], argmax[i]))))
        np.testing.assert_allclose(flat(jax.grad(pseudo)(params, xs[i])),
                                   flat(jax.grad(true_at_argmax)(params, (xs[i], argmax[i]))), rtol=1e-12)
    expected = flat(jax.grad(loss_fn)(params, batch))
    example_loss_fn = influence.cross_entropy_example_loss(apply)
    np.testing.assert_allclose(flat(influence.mean_gradient(example_loss_fn, params, batch)), expected, rtol=1e-10)
    np.testing.assert_allclose(flat(influence.mean_gradient(example_loss_fn, params, batch, chunk_size=4)), expected,
                               rtol=1e-10)


# ----------------------------------------------------------------------------- per-tensor scales, NaN reset


def test_lissa_per_tensor_scales_converge_to_the_block_shifted_dense_solve():
    """With scale s_k on tensor k (D = diag of the scales), the deterministic recursion
    h <- v + (1 - d) h - D^-1 H h has the fixed point h* = (H + d D)^-1 D v, and the result (each tensor
    of h_T over its own scale) D^-1 h*: against `jnp.linalg.solve` of the dense `jax.hessian`. It is
    neither scalar-scale solution, and a scale of one number per tensor equal everywhere is the scalar."""
    _, loss_fn, params, batch = softmax_regression()
    hessian, unravel = dense_reference(loss_fn, params, batch)
    lam_max = np.linalg.eigvalsh(hessian)[-1]
    scales = {"b": 1.5 * lam_max, "w": 6.0 * lam_max}  # both above lambda_max: a contraction in ||.||_D
    d_diag = flat(jax.tree.map(lambda p, s: jnp.full(p.shape, s), params, scales))
    damping, v = 0.2, random_like(21, params)
    expected = np.linalg.solve(hessian + damping * np.diag(d_diag), d_diag * flat(v)) / d_diag
    result = influence.lissa(loss_fn, params, batch, v, rng=jax.random.key(0), depth=600, repeats=1,
                             damping=damping, scale=scales, batch_size=None, return_diagnostics=True)
    np.testing.assert_allclose(flat(result.inverse_hvp), expected, rtol=1e-9, atol=1e-13)
    for s in scales.values():  # not a scalar-scale solution
        assert not np.allclose(expected, np.linalg.solve(hessian + damping * s * np.eye(len(v_ := flat(v))), v_),
                               rtol=1e-3)
    same = influence.lissa(loss_fn, params, batch, v, rng=jax.random.key(0), depth=50, repeats=1, damping=damping,
                           scale={"b": 4.0 * lam_max, "w": 4.0 * lam_max}, batch_size=None)
    scalar = influence.lissa(loss_fn, params, batch, v, rng=jax.random.key(0), depth=50, repeats=1, damping=damping,
                             scale=4.0 * lam_max, batch_size=None)
    np.testing.assert_allclose(flat(same), flat(scalar), rtol=1e-12)
    with pytest.raises(ValueError, match="per-tensor scales are LiSSA's"):
        influence.solve_traced("cg", loss_fn, params, batch, v, damping=damping, scale=scales)


def separable_example_loss(params, example):
    """Two least-squares problems, one per tensor: a NaN input of the first touches only `a`'s products."""
    x1, x2, y1, y2 = example
    return 0.5 * (x1 @ params["a"] - y1) ** 2 + 0.5 * (x2 @ params["b"] - y2) ** 2 + 0.05 * jnp.sum(params["a"] ** 2)


def test_lissa_nan_reset_restarts_the_tensor_from_v_as_a_python_loop_of_isals_rule():
    """ISAL's rule: at a step where tensor k's Hessian-vector product holds a NaN, h_k = v_k; the other
    tensors update as usual. One sample gives NaN products for `a` only; the chains against the rule
    written out with the same draws and each minibatch's dense `jax.hessian` blocks, per-tensor scales."""
    rng = np.random.default_rng(3)
    n, depth, repeats, batch_size, damping = 8, 30, 3, 2, 0.1
    x1 = rng.normal(size=(n, 3))
    x1[5, 1] = np.nan  # sample 5: its loss, and every product of `a` it enters, is NaN
    data = (jnp.asarray(x1), jnp.asarray(rng.normal(size=(n, 2))), jnp.asarray(rng.normal(size=n)),
            jnp.asarray(rng.normal(size=n)))
    params = {"a": jnp.asarray(rng.normal(size=3)), "b": jnp.asarray(rng.normal(size=2))}
    scales = {"a": 10.0, "b": 25.0}
    v, key = {"a": jnp.asarray(rng.normal(size=3)), "b": jnp.asarray(rng.normal(size=2))}, jax.random.key(4)
    loss_fn = influence.mean_loss(separable_example_loss)
    kwargs = dict(rng=key, depth=depth, repeats=repeats, damping=damping, scale=scales, batch_size=batch_size)
    # By default a NaN propagates: non-finite norms, which `check_lissa` turns into LissaDivergenceError.
    default = influence.lissa(loss_fn, params, data, v, check=False, return_diagnostics=True, **kwargs)
    assert not np.isfinite(np.asarray(default.norms)).all() and int(np.sum(default.nan_resets)) == 0
    result = influence.lissa(loss_fn, params, data, v, nan_reset=True, return_diagnostics=True, **kwargs)

    hessian_of = jax.jit(jax.hessian(lambda p, batch: loss_fn(p, batch)))
    v64 = {k: np.asarray(x) for k, x in v.items()}
    estimates, resets = [], []
    for chain_key in jax.random.split(key, repeats):
        h, count = dict(v64), 0
        for step_key in jax.random.split(chain_key, depth):
            idx = np.asarray(jax.random.randint(step_key, (batch_size,), 0, n))
            blocks = hessian_of(params, tuple(a[idx] for a in data))
            hv = {k: sum(np.asarray(blocks[k][j]) @ h[j] for j in h) for k in h}
            for k in h:
                if np.isnan(hv[k]).any():
                    h[k], count = v64[k], count + 1
                else:
                    h[k] = v64[k] + (1 - damping) * h[k] - hv[k] / scales[k]
        estimates.append({k: h[k] / scales[k] for k in h})
        resets.append(count)
    expected = {k: np.mean([e[k] for e in estimates], axis=0) for k in v64}
    assert min(resets) > 0 and np.isfinite(flat(result.inverse_hvp)).all()
    np.testing.assert_array_equal(np.asarray(result.nan_resets), resets)
    for k in expected:
        np.testing.assert_allclose(np.asarray(result.inverse_hvp[k]), expected[k], rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- the entry point


def mlp_loss(variables, example):
    """A caller's `example_loss(variables, example)` (hashable: module-level)."""
    x, y = example
    logits = MLP(3, hidden=(4,), dropout_rate=0.0).apply(variables, x[None], train=False).logits[0]
    return influence.cross_entropy(logits, y)


def head_kernel(params):
    """A caller's subset: the head's kernel only (a function params -> mask)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: jax.tree_util.keystr(path) == "['head']['kernel']",
                                            params)


def test_inverse_hvp_takes_the_callers_loss_subset_and_per_tensor_scales():
    """`inverse_hvp` on a caller's loss and subset (a mask function and a name), padded to a capacity,
    against a dense solve of `jax.hessian` on the subset written out by hand; `reference_gradient`'s sum
    and mean against a Python loop of `jax.grad`."""
    from jaxal.config import SolverOptions

    model = MLP(3, hidden=(4,), dropout_rate=0.0)
    variables = {"params": to64(init_variables(model, jax.random.key(2), (5,)))["params"]}
    rng = np.random.default_rng(2)
    data = (jnp.asarray(rng.normal(size=(10, 5))), jnp.asarray(rng.integers(0, 3, size=10)))
    ref = (jnp.asarray(rng.normal(size=(7, 5))), jnp.asarray(rng.integers(0, 3, size=7)))
    params = variables["params"]

    def with_head_kernel(kernel):
        return {**params, "head": {**params["head"], "kernel": kernel}}

    kernel = params["head"]["kernel"]
    mean_of = lambda k, xs, ys: jnp.mean(jax.vmap(lambda x, y: mlp_loss({"params": with_head_kernel(k)}, (x, y)))(xs, ys))
    hessian = np.asarray(jax.hessian(mean_of)(kernel, *data)).reshape(kernel.size, kernel.size)
    grads = [np.asarray(jax.grad(lambda k: mlp_loss({"params": with_head_kernel(k)}, (x, y)))(kernel)).ravel()
             for x, y in zip(*ref)]
    total = influence.reference_gradient(mlp_loss, variables, ref, subset=head_kernel, chunk_size=3, reduce="sum")
    mean = influence.reference_gradient(mlp_loss, variables, ref, subset=head_kernel, chunk_size=3)
    np.testing.assert_allclose(flat(total), np.sum(grads, axis=0), rtol=1e-10)
    np.testing.assert_allclose(flat(mean), np.mean(grads, axis=0), rtol=1e-10)

    options = SolverOptions(solver="exact", params="all", damping=0.1, scale=2.0)
    exact = influence.inverse_hvp(mlp_loss, variables, data, mean, options=options, rng=jax.random.key(0),
                                  subset=head_kernel, l2=0.05, capacity=16).solution
    expected = np.linalg.solve(hessian + (0.05 + 0.2) * np.eye(len(hessian)), flat(mean))
    np.testing.assert_allclose(flat(exact), expected, rtol=1e-9)
    assert exact["head"]["bias"] is None and exact["Dense_0"]["kernel"] is None
    # LiSSA, full batch, the scale given per tensor by a function of its path (one tensor here: the scalar).
    lam = np.linalg.eigvalsh(hessian)[-1]
    lissa = SolverOptions(solver="lissa", damping=0.1, scale=1.0, batch_size=None, depth=400, repeats=1)
    solution, info = influence.inverse_hvp(mlp_loss, variables, data, mean, options=lissa, rng=jax.random.key(0),
                                           subset=head_kernel, scale=lambda path, _: 3.0 * lam, capacity=16)
    np.testing.assert_allclose(flat(solution), np.linalg.solve(hessian + 0.3 * lam * np.eye(len(hessian)), flat(mean)),
                               rtol=1e-9)
    assert info["lissa_depth"] == 400 and np.isfinite(info["lissa_final_norm"])
    with pytest.raises(ValueError, match="--influence.damping must be in"):
        influence.inverse_hvp(mlp_loss, variables, data, mean, options=SolverOptions(damping=2.0),
                              rng=jax.random.key(0))
