"""The bound diagnostics against independent references: a Python loop of `jax.grad` and a dense solve of
`jax.hessian` in float64 (Target and Approx-1/2/3), the Cauchy-Schwarz inequality sample by sample, NumPy
`intersect1d` overlaps, the identity exp-gn = ent-gn, one compilation of the pool passes for a whole run,
bad options rejected before training, and end-to-end runs of the command on digits (one process, two)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import processes  # tests/processes.py: the multi-process helpers
from jax.flatten_util import ravel_pytree

from conftest import count_traces
from jaxal import diagnostics, gradnorm, influence, parallel
from jaxal.diagnostics import BoundOptions
from jaxal.diagnostics.__main__ import main
from jaxal.diagnostics import bounds as bounds_lib
from jaxal.models import MLP, SmallCNN, init_variables

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIELDS = ("target", "approx1", "approx2", "approx3", "grad_norm_next", "grad_norm_prev")


def to64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def problem(model, input_shape, num_classes, dtype, n_pool=7, n_train=6, n_test=4):
    """Two different models (cycles c and c+1), a pool, a labelled training set and a test set."""
    cast = to64 if dtype == jnp.float64 else (lambda t: t)
    prev = cast(init_variables(model, jax.random.key(0), input_shape))
    nxt = cast(init_variables(model, jax.random.key(1), input_shape))
    rng = np.random.default_rng(0)
    data = lambda n: jnp.asarray(rng.normal(size=(n, *input_shape)), dtype)  # noqa: E731
    labels = lambda n: jnp.asarray(rng.integers(0, num_classes, size=n))  # noqa: E731
    return prev, nxt, data(n_pool), (data(n_train), labels(n_train)), (data(n_test), labels(n_test))


# ---- references, written without the library's losses or engines ----------------------------------


def ref_entropy(logits):
    p = jax.nn.softmax(logits)
    return -jnp.sum(p * jnp.log(p))


def ref_ce(logits, y):
    return -jnp.log(jax.nn.softmax(logits)[y])


def reference_bounds(model, prev, nxt, pool_x, train, test, *, subset, test_loss, damping):
    """Target and Approx-1/2/3 from explicit per-example gradients (a loop of jax.grad) and a dense inverse
    of jax.hessian, on the flattened parameter subset."""

    def split(params):
        selected = {"head": params["head"]} if subset == "last_layer" else params
        flat, unravel = ravel_pytree(selected)
        full = lambda f: {**params, **unravel(f)}  # noqa: E731
        return flat, full

    def logits(params, x):
        return model.apply({"params": params}, x[None], train=False).logits[0]

    flat_n, full_n = split(nxt["params"])
    flat_p, full_p = split(prev["params"])
    train_x, train_y = train
    test_x, test_y = test
    train_loss = lambda f: jnp.mean(jnp.stack([ref_ce(logits(full_n(f), x), y)  # noqa: E731
                                               for x, y in zip(train_x, train_y)]))
    hessian = jax.jit(jax.hessian(train_loss))(flat_n) + damping * jnp.eye(flat_n.size)
    ce_grad = jax.jit(jax.grad(lambda f, x, y: ref_ce(logits(full_n(f), x), y)))
    ent_grad_n = jax.jit(jax.grad(lambda f, x: ref_entropy(logits(full_n(f), x))))
    ent_grad_p = jax.jit(jax.grad(lambda f, x: ref_entropy(logits(full_p(f), x))))
    if test_loss == "true":
        v = sum(ce_grad(flat_n, x, y) for x, y in zip(test_x, test_y))
    else:
        v = sum(ent_grad_n(flat_n, x) for x in test_x)
    s = jnp.linalg.solve(hessian, v)
    g_next = np.stack([ent_grad_n(flat_n, x) for x in pool_x])  # one example at a time
    g_prev = np.stack([ent_grad_p(flat_p, x) for x in pool_x])
    s_norm = np.linalg.norm(s)
    target = g_next @ np.asarray(s)
    norm_next, norm_prev = np.linalg.norm(g_next, axis=1), np.linalg.norm(g_prev, axis=1)
    return dict(target=target, approx1=np.abs(target), approx2=norm_next * s_norm, approx3=norm_prev * s_norm,
                grad_norm_next=norm_next, grad_norm_prev=norm_prev), s_norm


@pytest.mark.parametrize("subset,test_loss", [("all", "theory"), ("last_layer", "theory"), ("all", "true")])
def test_exact_target_and_approximations_match_explicit_gradients_and_dense_inverse(subset, test_loss):
    with jax.enable_x64(True):
        model = MLP(num_classes=3, hidden=(5,))
        prev, nxt, pool_x, train, test = problem(model, (2, 2, 2), 3, jnp.float64)
        options = BoundOptions(solver="exact", params=subset, test_loss=test_loss)
        bounds = diagnostics.cycle_bounds(model, prev, nxt, pool_x, train, test, options=options, l2=0.05)
        expected, s_norm = reference_bounds(model, prev, nxt, pool_x, train, test, subset=subset,
                                            test_loss=test_loss, damping=0.05)
        # Approx-1 is checked here against |explicit gradients . dense solve|, independently of Target.
        for name in ("exp", "ent"):  # both equal the entropy reference: exp-gn is ent-gn
            for field in FIELDS:
                np.testing.assert_allclose(getattr(bounds[name], field), expected[field], rtol=1e-9, atol=1e-12,
                                           err_msg=f"{name} {field}")
            np.testing.assert_allclose(bounds[name].s_norm, s_norm, rtol=1e-9)
        assert np.any(expected["target"] != 0) and np.any(expected["approx3"] != expected["approx2"])


@pytest.mark.parametrize("solver", ["cg", "lissa"])
def test_iterative_solvers_agree_with_the_exact_solve(solver):
    """The same damped system (H + mu I) s = v by every solver (LiSSA deterministic: full batch per step),
    the shift mu = 0.5 given as the weight-decay term l2 or as damping x scale (the one convention)."""
    with jax.enable_x64(True):
        model = MLP(num_classes=3, hidden=(5,))
        prev, nxt, pool_x, train, test = problem(model, (2, 2, 2), 3, jnp.float64)
        run = lambda l2=0.5, **kw: diagnostics.cycle_bounds(model, prev, nxt, pool_x, train, test, l2=l2,  # noqa: E731
                                                            options=BoundOptions(params="last_layer", **kw))["ent"]
        exact = run(solver="exact")
        other = run(solver=solver, scale=5.0, depth=400, cg_tol=1e-10)
        np.testing.assert_allclose(other.target, exact.target, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(other.s_norm, exact.s_norm, rtol=1e-6)
        relative = run(l2=0.0, solver=solver, damping=0.1, scale=5.0, depth=400, cg_tol=1e-10)
        np.testing.assert_allclose(relative.target, other.target, rtol=1e-9, atol=1e-12)


def test_cg_that_stops_early_names_the_diagnostics_flags():
    with jax.enable_x64(True):
        model = MLP(num_classes=3, hidden=(5,))
        prev, nxt, pool_x, train, test = problem(model, (2, 2, 2), 3, jnp.float64)
        options = BoundOptions(params="last_layer", solver="cg", cg_maxiter=1, cg_tol=1e-10)
        with pytest.warns(RuntimeWarning, match=r"cg stopped after 1 iterations .*; raise --diag.cg_maxiter "
                                                r"\(now 1\) or --diag.cg_tol \(now 1e-10\)"):
            diagnostics.cycle_bounds(model, prev, nxt, pool_x, train, test, l2=0.5, options=options)


@pytest.fixture(scope="module")
def cnn_bounds():
    """float32 bounds of a small CNN, all parameters of rank > 1, H^-1 by CG."""
    model = SmallCNN(num_classes=4, channels=(4, 8), hidden=16)
    prev, nxt, pool_x, train, test = problem(model, (6, 6, 1), 4, jnp.float32, n_pool=40, n_train=12, n_test=10)
    options = BoundOptions(solver="cg", params="weights", cg_maxiter=300, cg_tol=1e-5)
    return diagnostics.cycle_bounds(model, prev, nxt, pool_x, train, test, options=options, l2=5.0)


def test_cauchy_schwarz_holds_for_every_sample(cnn_bounds):
    """Approx-2 = ||g_{c+1}|| ||s|| comes from the per-example norms, Approx-1 = |s . g_{c+1}| from the jvp:
    two independent computations that must satisfy |g . s| <= ||g|| ||s|| sample by sample."""
    for name, b in cnn_bounds.items():
        assert b.approx1.min() > 0 and b.s_norm > 0
        assert np.all(b.approx2 >= b.approx1 * (1 - 1e-5)), name  # up to float32 rounding
        assert np.any(b.approx2 > 1.5 * b.approx1), name  # the bound is not met with equality everywhere
        row = diagnostics.summarise({name: b}, k=5)
        assert row[f"{name}_cauchy_schwarz_violations"] == 0


def test_expected_loss_is_the_entropy_in_value_and_gradient():
    """exp-gn's L_exp = sum_i p_i CE(logits, i) with the posterior differentiated IS the entropy: the
    library's two losses (`gradnorm.expected_loss`, `gradnorm.entropy_loss`) agree to float64 rounding in
    value and logit gradient; with the posterior detached the gradient of L_exp is p - p = 0."""
    with jax.enable_x64(True):
        logits = jnp.asarray(np.random.default_rng(4).normal(scale=3.0, size=(16, 6)), jnp.float64)
        for z in logits:
            np.testing.assert_allclose(gradnorm.expected_loss(z), gradnorm.entropy_loss(z), rtol=1e-9)
            np.testing.assert_allclose(gradnorm.entropy_loss(z), ref_entropy(z), rtol=1e-9)
            np.testing.assert_allclose(jax.grad(gradnorm.expected_loss)(z), jax.grad(gradnorm.entropy_loss)(z),
                                       rtol=1e-9, atol=1e-14)
            detached = jax.grad(lambda a: gradnorm.expected_loss(a, detach_posterior=True))(z)
            np.testing.assert_allclose(detached, 0.0, atol=1e-14)


def test_expected_and_entropy_columns_agree():
    """So the two columns of the diagnostics agree too (float64, exact solve, on a CNN)."""
    with jax.enable_x64(True):
        model = SmallCNN(num_classes=4, channels=(4, 8), hidden=16)
        prev, nxt, pool_x, train, test = problem(model, (6, 6, 1), 4, jnp.float64, n_pool=20, n_train=12,
                                                 n_test=10)
        bounds = diagnostics.cycle_bounds(model, prev, nxt, pool_x, train, test, l2=0.1,
                                          options=BoundOptions(solver="exact", params="last_layer"))
        exp, ent = bounds["exp"], bounds["ent"]
        for field in FIELDS:
            np.testing.assert_allclose(getattr(exp, field), getattr(ent, field), rtol=1e-9, atol=1e-14,
                                       err_msg=field)
        np.testing.assert_allclose(exp.s_norm, ent.s_norm, rtol=1e-9)


def test_the_pool_passes_and_the_solve_compile_once_for_a_whole_run():
    """New weights (another cycle), a larger labelled set and another pool size reuse the compiled pool and
    test passes and the solve: the variables are traced arguments, not constants of a program built around
    a closure, and the labelled set is padded to a fixed size with weights. Traces are counted by the
    functions the compiled bodies call: the pool pass and Table 1's norms call `per_example_grad_norms`
    (twice and once), the test gradient `weighted_gradient`, the solve `solve_traced`."""
    model = MLP(num_classes=3, hidden=(5,))
    options = BoundOptions(params="last_layer", chunk_size=4)
    prev, nxt, pool_x, train, test = problem(model, (2, 2, 2), 3, jnp.float32, n_pool=7, n_train=9)
    smaller = jax.tree.map(lambda a: a[:6], train)
    newer = init_variables(model, jax.random.key(7), (2, 2, 2))
    with count_traces(bounds_lib.gradnorm, "per_example_grad_norms") as norms, \
            count_traces(influence, "weighted_gradient") as gradient, count_traces(influence, "solve_traced") as solve:
        diagnostics.cycle_bounds(model, prev, nxt, pool_x, smaller, test, options=options, l2=0.1)
        diagnostics.true_label_grad_norms(model, nxt, pool_x, jnp.zeros(7, jnp.int32), chunk_size=4)
        # one pool pass per loss (exp, ent: two norms each), one norm pass, one gradient per loss, one solve
        assert (norms.count, gradient.count, solve.count) == (2 * 2 + 1, 2, 1)
        first = diagnostics.cycle_bounds(model, nxt, newer, pool_x[:5], train, test, options=options, l2=0.1)
        diagnostics.true_label_grad_norms(model, newer, pool_x[:5], jnp.zeros(5, jnp.int32), chunk_size=4)
        assert (norms.count, gradient.count, solve.count) == (5, 2, 1)
    # ... and the results are those of the new weights, not of weights baked into the first program.
    again = diagnostics.cycle_bounds(model, nxt, newer, pool_x[:5], train, test, l2=0.1,
                                     options=BoundOptions(params="last_layer", chunk_size=5))
    np.testing.assert_allclose(first["ent"].target, again["ent"].target, rtol=1e-5)
    np.testing.assert_allclose(first["ent"].grad_norm_prev, again["ent"].grad_norm_prev, rtol=1e-5)


def test_true_label_grad_norms_match_a_python_loop():
    model = MLP(num_classes=3, hidden=(5,))
    variables = init_variables(model, jax.random.key(2), (2, 2, 2))
    rng = np.random.default_rng(1)
    xs, ys = jnp.asarray(rng.normal(size=(5, 2, 2, 2)), jnp.float32), jnp.asarray(rng.integers(0, 3, size=5))
    norms = diagnostics.true_label_grad_norms(model, variables, xs, ys)
    loss = lambda p, x, y: ref_ce(model.apply({"params": p}, x[None], train=False).logits[0], y)  # noqa: E731
    expected = [np.linalg.norm(ravel_pytree(jax.grad(loss)(variables["params"], x, y))[0]) for x, y in zip(xs, ys)]
    np.testing.assert_allclose(norms, expected, rtol=1e-5)


def test_overlaps_match_numpy_intersect1d():
    rng = np.random.default_rng(3)
    for trial in range(20):
        n = int(rng.integers(5, 60))
        a, b = rng.normal(size=n), rng.normal(size=n)
        k = int(rng.integers(1, n + 1))
        expected = np.intersect1d(np.argsort(a)[::-1][:k], np.argsort(b)[::-1][:k]).size
        assert diagnostics.top_k_overlap(a, b, k) == expected
        selected = rng.choice(n, k, replace=False)
        assert diagnostics.selection_overlap(selected, b) == np.intersect1d(selected, np.argsort(b)[::-1][:k]).size
    # Hand-made: the top-2 by Target (largest = most beneficial) are positions 0 and 3; by Approx-3, 3 and 4.
    target, approx3 = np.array([5.0, -9.0, 1.0, 4.0, 0.5]), np.array([0.1, 0.2, 0.3, 0.9, 0.8])
    assert diagnostics.top_k_overlap(target, approx3, 2) == 1
    assert diagnostics.top_k_overlap(np.abs(target), approx3, 2) == 0  # |Target| top-2: positions 1 and 0
    assert diagnostics.selection_overlap([3, 4], approx3) == 2 and diagnostics.selection_overlap([0, 1], approx3) == 0
    bounds = {"ent": diagnostics.Bounds(target, np.abs(target), approx3 * 10, approx3, approx3 * 10, approx3, 1.0)}
    row = diagnostics.summarise(bounds, k=2)
    assert row["ent_overlap_target_approx3"] == 1 and row["ent_overlap_abs_target_approx3"] == 0
    assert row["ent_target_mean"] == pytest.approx(np.mean(target))
    assert row["ent_ratio_approx3_target"] == pytest.approx(np.mean(approx3) / np.mean(target))


def test_command_end_to_end_on_digits(tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = ["--dataset", "digits", "--strategy", "entropy,random", "--cycles", "2", "--epochs", "2",
            "--initial_size", "40", "--budget", "15", "--subset_size", "100", "--progress", "false",
            "--workdir", str(workdir), "--diag.k", "10"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for title in ("Fig. 3 (entropy)", "Table 1", "Table 2", "Table 3"):
        assert title in printed
    rows = [json.loads(line) for line in (workdir / "diagnostics.jsonl").read_text().splitlines()]
    assert [(r["strategy"], r["cycle"]) for r in rows] == [(s, c) for s in ("entropy", "random") for c in range(2)]
    pairs = [r for r in rows if r["cycle"] == 0]
    assert all("exp_target_mean" in r and r["table2_k"] == 10 and r["table1_k"] == 15 for r in pairs)
    assert all("exp_target_mean" not in r for r in rows if r["cycle"] == 1)  # the last cycle has only the gap
    for r in rows:
        assert r["gap"] == pytest.approx(r["train_accuracy"] - r["test_accuracy"])
    for r in pairs:
        assert r["ent_cauchy_schwarz_violations"] == 0 and r["num_pool"] == 100
        assert 0 <= r["ent_overlap_target_approx3"] <= 10 and 0 <= r["table1_overlap"] <= 15
        assert r["solver"] == "exact" and r["params"] == "last_layer" and r["hessian_shift"] == 5e-4
    header = (workdir / "diagnostics.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["strategy", "trial", "cycle", "num_labeled"] and "ent_approx3_mean" in header
    assert (workdir / "diagnostics_fig3.png").read_bytes().startswith(PNG_MAGIC)
    assert "Table 3" in (workdir / "diagnostics_tables.txt").read_text()
    assert (workdir / "results.csv").exists()  # the experiment's own results, next to the diagnostics
    with np.load(workdir / "diagnostics_samples" / "entropy_trial0_cycle0.npz") as z:
        assert z["candidates"].shape == (100,) and z["selected"].sum() == 15
        np.testing.assert_array_equal(z["ent_approx1"], np.abs(z["ent_target"]))
        assert np.all(z["ent_approx2"] >= z["ent_approx1"] * (1 - 1e-4))
        row = next(r for r in rows if r["strategy"] == "entropy" and r["cycle"] == 0)
        assert np.mean(z["ent_approx3"]) == pytest.approx(row["ent_approx3_mean"], rel=1e-6)


@pytest.mark.parametrize("flags,message", [
    (["--diag.params", "all", "--diag.solver", "exact"], "cg or lissa"),
    (["--diag.solver", "newton"], "--diag.solver"),
    (["--diag.params", "some"], "--diag.params"),
    (["--diag.test_loss", "val"], "--diag.test_loss"),
    (["--diag.table1_norm", "max"], "--diag.table1_norm"),
    (["--diag.table1_params", "head"], "--diag.table1_params"),
    (["--diag.k", "0"], "--diag.k"),
    (["--diag.k", "500", "--subset_size", "100"], "--diag.k"),
    (["--diag.damping", "-1", "--diag.scale", "10"], "--diag.damping"),
    (["--diag.damping", "nan", "--diag.scale", "10"], "--diag.damping"),
    (["--diag.damping", "1", "--diag.scale", "10"], "--diag.damping must be in [0, 1)"),
    # The old absolute --diag.damping, and the old LiSSA flags: what to use instead, not another system.
    (["--diag.damping", "0.1"], "the old --diag.damping MU is --diag.hessian_weight_decay false"),
    (["--diag.lissa_scale", "20"], "--diag.lissa_scale: now --diag.scale"),
    (["--diag.lissa_depth", "10"], "--diag.lissa_depth: now --diag.depth"),
    (["--diag.lissa_repeats", "2"], "--diag.lissa_repeats: now --diag.repeats"),
    (["--diag.lissa_batch_size", "4"], "--diag.lissa_batch_size: now --diag.batch_size"),
    (["--diag.cg_maxiter", "0"], "--diag.cg_maxiter"),
    (["--diag.cg_tol=-1e-3"], "--diag.cg_tol"),
    (["--diag.scale", "0"], "--diag.scale"),
    (["--diag.depth", "0"], "--diag.depth"),
    (["--diag.repeats", "0"], "--diag.repeats"),
    (["--diag.batch_size", "0"], "--diag.batch_size"),
    (["--diag.hvp_chunk_size", "0"], "--diag.hvp_chunk_size"),
    (["--diag.chunk_size", "0"], "--diag.chunk_size"),
    (["--diag.seed", "-1"], "--diag.seed"),
    (["--diag.chunk_size", "many"], "--diag.chunk_size"),
    (["--diag.exact_max_gib", "0"], "--diag.exact_max_gib"),
    (["--diag.exact_max_gib", "1e-6"], "above the limit of 9.99e-07 GiB (--diag.exact_max_gib)"),
    (["--diag.exact_block_size", "0"], "--diag.exact_block_size"),
    (["--diag.grad_method", "loop"], "--diag.grad_method"),
    (["--precision.solvers", "tf32"], "--precision.solvers"),
    (["--cycles", "1"], "--cycles"),
])
def test_command_rejects_bad_options_before_training(tmp_path, capsys, flags, message):
    workdir = tmp_path / "run"
    assert main([*flags, "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not workdir.exists()


def test_the_earlier_options_type_says_what_replaced_it():
    with pytest.raises(ImportError, match="DiagnosticsOptions is now BoundOptions.*damping is relative"):
        from jaxal.diagnostics import DiagnosticsOptions  # noqa: F401


def test_command_initialises_several_processes_first(tmp_path, capsys, monkeypatch):
    """--coordinator/--num_processes/--process_id reach `jaxal.parallel.initialize_distributed` (as in
    `jaxal.run.main`), before the options are even read."""
    calls = []
    monkeypatch.setattr(parallel, "initialize_distributed", lambda *a: calls.append(a))
    argv = ["--coordinator", "127.0.0.1:1", "--num_processes", "2", "--process_id", "1", "--diag.k", "0",
            "--workdir", str(tmp_path / "run")]
    assert main(argv) == 2
    assert calls == [("127.0.0.1:1", 2, 1)] and "--diag.k" in capsys.readouterr().err
    assert main(["--diag.k", "0", "--workdir", str(tmp_path / "run")]) == 2
    assert len(calls) == 1  # no flag, no initialisation


def test_two_processes_compute_the_rows_of_one_and_only_process_0_writes(tmp_path):
    """Two processes of 2 CPU devices each (one mesh of 4) against one process of 4 devices: the same
    rows; process 1 prints nothing of the diagnostics and writes none of their files."""
    common = ["-m", "jaxal.diagnostics", "--dataset", "digits", "--strategy", "entropy", "--cycles", "2",
              "--epochs", "1", "--initial_size", "30", "--budget", "10", "--subset_size", "60", "--progress",
              "false", "--diag.k", "5", "--diag.save_samples", "false", "--diag.chunk_size", "32"]
    port = processes.free_port()

    def launch(workdir, devices, *extra):
        return processes.launch([*common, "--workdir", str(workdir), *extra], devices)

    started = [launch(tmp_path / "two", 2, "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
                      "--process_id", str(i)) for i in range(2)]
    started.append(launch(tmp_path / "one", 4))
    outputs = processes.finish(started, timeout=400)
    first, second, single = outputs
    assert "2 process(es)" in first and "Table 2" in first and "diagnostics:" in first
    assert "Table" not in second and "diagnostics" not in second and "jaxal:" not in second

    def rows(workdir):
        read = [json.loads(line) for line in (workdir / "diagnostics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "diagnostics_seconds"} for r in read]

    two, one = rows(tmp_path / "two"), rows(tmp_path / "one")
    assert [(r["strategy"], r["cycle"]) for r in two] == [("entropy", 0), ("entropy", 1)]
    assert two[0].keys() == one[0].keys()
    for a, b in zip(two, one):
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
            else:
                assert a[key] == b[key], key
