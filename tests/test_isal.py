"""ISAL and grad_sim against independent references: a Python loop of per-example `jax.grad`s dotted
with a dense `jnp.linalg.solve` of the `jax.hessian` of the labelled loss (float64), an explicit loop
over classes for the top-K expected gradient; LiSSA and CG rankings against the exact solve; the
config checks, the test-reference warning, divergence; and every variant end to end on digits."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from conftest import count_traces
from jaxal import influence
from jaxal.config import build_config
from jaxal.loop import run_experiment
from jaxal.models import MLP, ModelOutput, init_variables
from jaxal.strategies import StrategyContext, get_strategy
from jaxal.strategies import isal

NUM_CLASSES = 3


class TinyBN(nn.Module):
    """Dense -> BatchNorm -> relu -> head: BatchNorm must be in inference mode and its scale/offset
    (rank 1) outside the "weights" subset."""

    @nn.compact
    def __call__(self, x, train: bool = False, mc_dropout: bool = False):
        h = nn.Dense(4)(x.reshape((x.shape[0], -1)))
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(h))
        return ModelOutput(nn.Dense(NUM_CLASSES, name="head")(h), h, (h,))


def to64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def make_context(model, variables, *, n_labeled=12, n_pool=9, n_ref=7, input_shape=(2, 2, 1), seed=0,
                 reference="val", **influence_options):
    rng = np.random.default_rng(seed)
    draw_x = lambda n: jnp.asarray(rng.normal(size=(n, *input_shape)))
    draw_y = lambda n: jnp.asarray(rng.integers(0, NUM_CLASSES, size=n))
    labeled_x, labeled_y = draw_x(n_labeled), draw_y(n_labeled)
    ref = (draw_x(n_ref), draw_y(n_ref))
    config = build_config(strategy="isal", val_size=5,
                          influence=dict(reference=reference, chunk_size=4, **influence_options))
    return StrategyContext(model=model, variables=variables, pool_x=draw_x(n_pool), labeled_x=labeled_x,
                           labeled_y=labeled_y, num_classes=NUM_CLASSES, config=config, rng=jax.random.key(seed),
                           reference_sets={"val": ref, "labeled": (labeled_x, labeled_y),
                                           "initial": ref, "test": ref})


def tiny_bn_problem(seed=0):
    model = TinyBN()
    variables = to64(init_variables(model, jax.random.key(seed), (2, 2, 1)))
    rng = np.random.default_rng(seed + 100)  # non-trivial running averages
    stats = variables["batch_stats"]["BatchNorm_0"]
    variables["batch_stats"] = {"BatchNorm_0": {"mean": jnp.asarray(0.3 * rng.normal(size=stats["mean"].shape)),
                                                "var": jnp.asarray(rng.uniform(0.5, 2.0, size=stats["var"].shape))}}
    params = variables["params"]
    variables["params"] = {**params, "BatchNorm_0": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, size=4)),
                                                     "bias": jnp.asarray(0.2 * rng.normal(size=4))}}
    return model, variables


class Reference:
    """Independent per-example quantities on the flattened rank > 1 weights (built by hand, without
    `jaxal.pytree.restrict` or `jaxal.influence`)."""

    def __init__(self, model, variables):
        params = variables["params"]
        weights = {"Dense_0": params["Dense_0"]["kernel"], "head": params["head"]["kernel"]}
        self.flat, self.unravel = ravel_pytree(weights)

        def logits(flat, x):
            w = self.unravel(flat)
            full = {**params, "Dense_0": {**params["Dense_0"], "kernel": w["Dense_0"]},
                    "head": {**params["head"], "kernel": w["head"]}}
            return model.apply({"params": full, "batch_stats": variables["batch_stats"]}, x[None], train=False).logits[0]

        self.logits = logits
        self.ce = lambda flat, x, y: -jax.nn.log_softmax(logits(flat, x))[y]
        self._grad = jax.jit(jax.grad(self.ce))  # one example at a time, compiled once

    def mean_loss(self, flat, xs, ys):
        return jnp.mean(jax.vmap(self.ce, (None, 0, 0))(flat, xs, ys))

    def hessian(self, xs, ys):
        return np.asarray(jax.jit(jax.hessian(self.mean_loss))(self.flat, xs, ys))

    def v(self, xs, ys):
        return np.asarray(jax.jit(jax.grad(self.mean_loss))(self.flat, xs, ys))

    def grad(self, x, y):
        return np.asarray(self._grad(self.flat, x, int(y)))

    def probs(self, x):
        return np.asarray(jax.nn.softmax(self.logits(self.flat, x)))

    def pseudo_label_gradients(self, xs):
        return np.stack([self.grad(x, np.argmax(self.probs(x))) for x in xs])

    def top_k_gradients(self, xs, k):
        rows = []
        for x in xs:
            p = self.probs(x)
            top = np.argsort(-p)[:k]
            q = p[top] / p[top].sum()
            rows.append(sum(q_j * self.grad(x, j) for q_j, j in zip(q, top)))
        return np.stack(rows)


# ----------------------------------------------------------------------------- exact references


@pytest.mark.usefixtures("x64")
def test_exact_isal_grad_sim_and_top_k_equal_explicit_loops_and_select_most_negative_influence():
    model, variables = tiny_bn_problem()
    damping, scale = 0.01, 10.0
    ctx = make_context(model, variables, solver="exact", damping=damping, scale=scale)
    ref = Reference(model, variables)
    hessian = ref.hessian(ctx.labeled_x, ctx.labeled_y)
    v = ref.v(*ctx.reference_sets["val"])
    s_test = np.asarray(jnp.linalg.solve(hessian + damping * scale * np.eye(len(v)), v))
    gradients = ref.pseudo_label_gradients(ctx.pool_x)
    influence_values = -gradients @ s_test  # I(z, R) = -grad L(R)^T H^-1 G_z

    scores, info = isal.isal_scores(ctx)
    np.testing.assert_allclose(np.asarray(scores), -influence_values, rtol=1e-9)
    assert info["num_params"] == len(v) == 4 * 4 + 4 * NUM_CLASSES  # kernels only, no bias / BN scale
    np.testing.assert_allclose(info["cosine_s_test_v"], s_test @ v / np.linalg.norm(s_test) / np.linalg.norm(v),
                               rtol=1e-8)
    assert info["cosine_s_test_v"] < 0.999  # the Hessian matters here: not a trivial check

    # The selected points are those of the most negative influence.
    chosen = get_strategy("isal").select(ctx, 3).chosen
    np.testing.assert_array_equal(np.sort(chosen), np.sort(np.argsort(influence_values)[:3]))

    grad_sim, grad_sim_info = isal.grad_sim_scores(ctx)
    np.testing.assert_allclose(np.asarray(grad_sim), gradients @ v, rtol=1e-9)
    assert grad_sim_info["cosine_s_test_v"] == 1.0
    np.testing.assert_allclose(info["spearman_vs_grad_sim"], isal.spearman(-influence_values, gradients @ v))

    top2 = dataclasses.replace(ctx, config=build_config(strategy="isal", val_size=5, influence=dict(
        solver="exact", damping=damping, scale=scale, top_k_classes=2, chunk_size=4)))
    expected = ref.top_k_gradients(ctx.pool_x, 2) @ s_test
    scores2, info2 = isal.isal_scores(top2)
    np.testing.assert_allclose(np.asarray(scores2), expected, rtol=1e-9)
    assert info2["top_k_classes"] == 2
    assert not np.allclose(expected, -influence_values)  # the variant differs from the pseudo-label


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_hessian_weight_decay_adds_the_training_objectives_l2_term(solver):
    """--influence.hessian_weight_decay: s_test = (H + wd*I + damping*scale*I)^-1 v, H from jax.hessian of
    the reference's CE; without it (ISAL's code) the wd term is absent. Chunks of 5 labelled examples."""
    model, variables = tiny_bn_problem()
    damping, scale, wd = 0.05, 10.0, 0.3  # a shift of 0.5 makes H + shift*I positive definite (for cg)
    ref = Reference(model, variables)
    options = dict(solver=solver, damping=damping, scale=scale, hvp_chunk_size=5, cg_tol=1e-12, cg_maxiter=200)
    ctx = make_context(model, variables, **options)
    hessian = ref.hessian(ctx.labeled_x, ctx.labeled_y)
    v = ref.v(*ctx.reference_sets["val"])
    eye = np.eye(len(v))
    gradients = ref.pseudo_label_gradients(ctx.pool_x)
    for decay, shift in ((True, wd + damping * scale), (False, damping * scale)):
        config = build_config(strategy="isal", val_size=5, weight_decay=wd,
                              influence=dict(chunk_size=4, hessian_weight_decay=decay, **options))
        scores, _ = isal.isal_scores(dataclasses.replace(ctx, config=config))
        np.testing.assert_allclose(np.asarray(scores), gradients @ np.linalg.solve(hessian + shift * eye, v), rtol=1e-8)


@pytest.mark.usefixtures("x64")
def test_top_k_loss_is_one_jvp_of_renormalised_detached_weights():
    logits = jnp.asarray([2.0, 0.5, -1.0, 1.0])
    np.testing.assert_allclose(isal.top_k_expected_cross_entropy(logits, 1),
                               influence.pseudo_label_cross_entropy(logits), rtol=1e-12)
    p = np.asarray(jax.nn.softmax(logits))
    top = [0, 3]
    q = p[top] / p[top].sum()
    expected_grad = p - np.bincount(top, weights=q, minlength=4)  # sum_k q_k (p - e_k)
    np.testing.assert_allclose(jax.grad(isal.top_k_expected_cross_entropy)(logits, 2), expected_grad, rtol=1e-10)
    # Over all classes the expected gradient vanishes, so K must stay below C.
    np.testing.assert_allclose(jax.grad(isal.top_k_expected_cross_entropy)(logits, 4), 0.0, atol=1e-12)
    model, variables = tiny_bn_problem()
    ctx = make_context(model, variables, top_k_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="top_k_classes"):
        isal.isal_scores(ctx)


@pytest.mark.usefixtures("x64")
def test_lissa_and_cg_rank_like_exact_on_a_convex_problem():
    # Softmax regression (an MLP without hidden layers): a convex loss, PSD Hessian.
    model = MLP(NUM_CLASSES, hidden=(), dropout_rate=0.0)
    rng = np.random.default_rng(3)
    variables = to64(init_variables(model, jax.random.key(3), (6,)))
    variables["params"] = {"head": {"kernel": jnp.asarray(rng.normal(size=(6, NUM_CLASSES))),
                                    "bias": jnp.zeros(NUM_CLASSES)}}
    base = make_context(model, variables, n_labeled=40, n_pool=60, n_ref=15, input_shape=(6,), seed=3)
    # Anisotropic inputs, so that H^-1 reorders the pool.
    stretch = jnp.asarray([[3.0, 2.0, 1.0, 0.5, 0.3, 0.2]])
    ctx = dataclasses.replace(base, labeled_x=base.labeled_x * stretch, pool_x=base.pool_x * stretch,
                              reference_sets={"val": (base.reference_sets["val"][0] * stretch,
                                                      base.reference_sets["val"][1])})
    loss_fn, params = influence.mean_loss(influence.cross_entropy_example_loss(lambda p, x: model.apply({"params": p}, x))), \
        variables["params"]
    lam_max = float(influence.power_iteration(loss_fn, params, (ctx.labeled_x, ctx.labeled_y),
                                              rng=jax.random.key(0), iters=200))
    settings = dict(damping=0.02, scale=2.0 * lam_max, chunk_size=16)  # shift 0.04 lambda_max

    def run(**options):
        config = build_config(strategy="isal", val_size=5, influence={**settings, **options})
        return isal.isal_scores(dataclasses.replace(ctx, config=config))

    exact, exact_info = run(solver="exact")
    cg, cg_info = run(solver="cg", cg_maxiter=200)
    lissa, lissa_info = run(solver="lissa", depth=300, repeats=8, batch_size=8)  # 0.98^300 ~ 0.2%
    exact, cg, lissa = map(np.asarray, (exact, cg, lissa))
    assert exact_info["spearman_vs_grad_sim"] < 0.95  # the Hessian changes the ranking
    np.testing.assert_allclose(cg, exact, rtol=1e-4, atol=1e-6 * np.abs(exact).max())
    assert isal.spearman(cg, exact) > 0.999
    assert isal.spearman(lissa, exact) > 0.95, isal.spearman(lissa, exact)
    assert cg_info["cg_iterations"] > 0 and lissa_info["lissa_final_norm"] > 0
    assert abs(lissa_info["cosine_s_test_v"] - exact_info["cosine_s_test_v"]) < 0.05
    # One CG step cannot solve an anisotropic 66-parameter system: the warning names ISAL's flags.
    with pytest.warns(RuntimeWarning, match=r"cg stopped after 1 iterations .*; raise --influence.cg_maxiter "
                                            r"\(now 1\) or --influence.cg_tol \(now 1e-12\)"):
        run(solver="cg", cg_maxiter=1, cg_tol=1e-12)


# ----------------------------------------------------------------------------- checks, warnings, errors


def test_check_rejects_missing_validation_split_and_unknown_names():
    strategy = get_strategy("isal")
    with pytest.raises(ValueError, match=r"needs a validation split: pass --val_size N .* --influence.reference labeled"):
        strategy.requires.check(build_config(strategy="isal", val_size=0))
    get_strategy("grad_sim").requires.check(build_config(val_size=0, influence=dict(reference="labeled")))
    for name in ("isal_v2", "isal_v3"):  # their reference set is fixed, not the validation split
        get_strategy(name).requires.check(build_config(val_size=0))
    cases = [(dict(reference="train"), "val, initial, labeled, test"), (dict(solver="newton"), "lissa, cg, exact"),
             (dict(params="biases"), "all, weights, last_layer"), (dict(depth=0), "depth"),
             (dict(damping=1.5), "damping"), (dict(scale=0.0), "scale")]
    for options, listed in cases:
        for name in ("isal", "isal_v2", "grad_sim"):
            if name == "isal_v2" and "reference" in options:
                continue
            with pytest.raises(ValueError, match=listed):
                get_strategy(name).requires.check(build_config(val_size=5, influence=options))


def test_test_reference_warns_and_lissa_divergence_propagates():
    model = MLP(NUM_CLASSES, hidden=(5,), dropout_rate=0.0)
    variables = init_variables(model, jax.random.key(0), (2, 2, 1))
    ctx = make_context(model, variables, reference="test", depth=10, repeats=1)
    ctx = dataclasses.replace(ctx, labeled_x=ctx.labeled_x.astype(jnp.float32),
                              pool_x=ctx.pool_x.astype(jnp.float32),
                              reference_sets={k: (x.astype(jnp.float32), y) for k, (x, y) in ctx.reference_sets.items()})
    with pytest.warns(UserWarning, match="TEST LABELS"):
        get_strategy("isal").select(ctx, 2)
    diverging = dataclasses.replace(ctx, config=build_config(strategy="isal", val_size=5, influence=dict(
        depth=200, repeats=1, scale=1e-3, damping=0.0)))
    with pytest.raises(influence.LissaDivergenceError, match="LiSSA diverged"):
        get_strategy("isal").select(diverging, 2)
    no_val = dataclasses.replace(ctx, reference_sets={k: v for k, v in ctx.reference_sets.items() if k != "val"},
                                 config=build_config(strategy="isal", val_size=5))
    with pytest.raises(ValueError, match="needs a validation split"):
        get_strategy("isal").select(no_val, 2)


# ----------------------------------------------------------------------------- end to end


def test_every_variant_runs_in_the_loop_on_digits(tmp_path):
    names = ("isal", "isal_v2", "isal_v3", "grad_sim")
    config = build_config(strategy=",".join(names), initial_size=30, val_size=5, budget=10, cycles=2, epochs=2,
                          progress=False, influence=dict(depth=20, repeats=2))
    records = run_experiment(config, workdir=tmp_path / "run", log=lambda *_: None)
    expected_reference = {"isal": "val", "isal_v2": "initial", "isal_v3": "labeled", "grad_sim": "val"}
    for name in names:
        mine = [r for r in records if r["strategy"] == name]
        assert [r["cycle"] for r in mine] == [0, 1]
        first, last = mine
        assert len(set(first["selected"])) == 10 and first["num_scored"] > 0
        assert "strategy_info" not in last and last["num_labeled"] == 40
        info = first["strategy_info"]
        assert info["reference"] == expected_reference[name]
        assert -1.0 <= info["cosine_s_test_v"] <= 1.0
        assert info["spearman_vs_grad_sim"] is None or -1.0 <= info["spearman_vs_grad_sim"] <= 1.0
        assert info["solver"] == ("identity" if name == "grad_sim" else "lissa")
    assert {r["strategy_info"]["reference_size"] for r in records if r["strategy"] in ("isal", "grad_sim")
            and r["cycle"] == 0} == {5}


# ----------------------------------------------------------------------------- compilation and padding


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("solver", ["lissa", "cg", "exact"])
def test_new_weights_and_a_growing_labeled_set_compile_nothing(solver):
    """Three cycles: re-initialised weights and BatchNorm statistics, a labelled set growing within one
    bucket, another pool size. The solver, the mean gradient and the pool scores compile once."""
    options = dict(solver=solver, depth=20, repeats=2, batch_size=3, damping=0.01, scale=100.0)
    scores, sizes = [], None
    # The functions the compiled bodies call run only while a program is traced: the solve's body
    # (`influence.inverse_hvp`) calls `solve_traced`, the pool scores `jvp_scores`, v `weighted_gradient`.
    with count_traces(influence, "solve_traced") as solve, count_traces(influence, "jvp_scores") as pool, \
            count_traces(influence, "weighted_gradient") as gradient:
        for cycle, n_labeled in enumerate((12, 20, 31)):
            model, variables = tiny_bn_problem(seed=cycle)
            ctx = make_context(model, variables, n_labeled=n_labeled, n_pool=9 + cycle, seed=cycle,
                               reference="labeled", **options)
            result, info = isal.isal_scores(ctx)
            scores.append(np.asarray(jax.block_until_ready(result)))
            assert info["solver"] == solver
            if sizes is None:
                sizes = (solve.count, pool.count, gradient.count)  # pool and v may be cached by earlier tests
                assert solve.count == 1  # its settings are this test's own
        assert (solve.count, pool.count, gradient.count) == sizes
    assert isal.labeled_bucket(12, ctx.config) == isal.labeled_bucket(31, ctx.config) == 345  # the run's largest
    assert not np.allclose(scores[0], scores[1][:9])  # the new weights were used


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("solver", ["lissa", "cg", "exact"])
def test_padding_the_labeled_set_never_changes_the_scores(monkeypatch, solver):
    """Padded to its bucket (weights 0, LiSSA drawing among the real rows with the same rng) or not
    padded at all, the labelled set gives the same s_test and scores: the same minibatches for LiSSA."""
    model, variables = tiny_bn_problem(seed=4)
    ctx = make_context(model, variables, n_labeled=13, seed=4, solver=solver, depth=30, repeats=2, batch_size=2,
                       damping=0.01, scale=100.0, cg_maxiter=200)
    padded, padded_info = isal.isal_scores(ctx)
    assert isal.labeled_bucket(13, ctx.config) == 345  # 100 initial - 5 validation + 50 x 5 cycles
    monkeypatch.setattr(isal, "labeled_bucket", lambda n, config: n)  # no padding at all
    unpadded, unpadded_info = isal.isal_scores(ctx)
    np.testing.assert_allclose(np.asarray(padded), np.asarray(unpadded), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(padded_info["s_test_norm"], unpadded_info["s_test_norm"], rtol=1e-9)


@pytest.mark.usefixtures("x64")
def test_lissa_num_examples_draws_among_the_real_rows_only():
    model = MLP(NUM_CLASSES, hidden=(4,), dropout_rate=0.0)
    variables = to64(init_variables(model, jax.random.key(5), (6,)))
    loss_fn = influence.mean_loss(influence.cross_entropy_example_loss(lambda p, x: model.apply({"params": p}, x)))
    params = variables["params"]
    rng = np.random.default_rng(5)
    xs, ys = jnp.asarray(rng.normal(size=(10, 6))), jnp.asarray(rng.integers(0, NUM_CLASSES, 10))
    v = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
    # Padding that would change every HVP it entered: huge inputs, other labels.
    padded = (jnp.concatenate([xs, 100.0 * jnp.ones((6, 6))]), jnp.concatenate([ys, jnp.zeros(6, ys.dtype)]))
    kwargs = dict(rng=jax.random.key(0), depth=40, repeats=3, damping=0.05, scale=20.0, batch_size=3)
    plain = influence.lissa(loss_fn, params, (xs, ys), v, **kwargs)
    masked = influence.lissa(loss_fn, params, padded, v, num_examples=10, **kwargs)
    unmasked = influence.lissa(loss_fn, params, padded, v, check=False, **kwargs)
    flat = lambda tree: ravel_pytree(tree)[0]
    np.testing.assert_allclose(flat(masked), flat(plain), rtol=1e-12)
    assert not np.allclose(flat(unmasked), flat(plain))
    # The weighted mean over the real rows is the mean of the unpadded set (the full-batch mode).
    weights = jnp.arange(16) < 10
    weighted = influence.weighted_mean_loss(influence.cross_entropy_example_loss(lambda p, x: model.apply({"params": p}, x)))
    full = dict(kwargs, batch_size=None)
    np.testing.assert_allclose(flat(influence.lissa(weighted, params, (padded, weights), v, **full)),
                               flat(influence.lissa(loss_fn, params, (xs, ys), v, **full)), rtol=1e-10)


def test_a_run_saved_before_the_solver_options_grew_still_resumes():
    """config.json of an earlier run lacks the fields added since (`--influence.nan_reset`): they held
    their defaults there, so the same flags resume it; a changed field still differs."""
    import json

    from jaxal.loop import config_differences

    config = build_config(strategy="isal", val_size=5)
    saved = json.loads(config.to_json())
    del saved["influence"]["nan_reset"]
    assert config_differences(saved, config) == ""
    assert "nan_reset" in config_differences(saved, build_config(strategy="isal", val_size=5,
                                                                  influence=dict(nan_reset=True)))
