"""exp_gn, ent_gn, egl and lplgrad as strategies: equal to a Python loop of jax.grad, one compilation across cycles.
(Each runs in the loop on digits in test_loop's run of every strategy.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxal import loop
from jaxal.config import build_config
from jaxal.data import load_dataset
from jaxal.models import create_model, init_variables
from jaxal.strategies import StrategyContext, get_strategy
from jaxal.strategies import gradient
from jaxal.strategies.gradient import egl_scores, ent_gn_scores, exp_gn_scores, lplgrad_scores

from conftest import count_traces, to64  # tests/conftest.py


@pytest.fixture(scope="module")
def digits_pool():
    data = load_dataset("digits")
    return data.normalization(data.x_train[:70])  # the model inputs of 70 digits


def context(pool, seed=0, **gradnorm_options):
    model = create_model("cnn", 10)
    variables = init_variables(model, jax.random.key(seed), (8, 8, 1))
    config = build_config(gradnorm=dict(chunk_size=32, **gradnorm_options))
    return StrategyContext(model=model, variables=variables, pool_x=pool, labeled_x=pool[:0],
                           labeled_y=jnp.zeros(0, jnp.int32), num_classes=10, config=config, rng=jax.random.key(0))


def loop_norms(ctx, loss_of_logits, norm, label=None):
    """Reference: one `jax.grad` per example at batch size 1 in inference mode (the running BatchNorm
    statistics), the loss written here from the logits and the norm taken in NumPy: no engine code."""
    def loss(params, x, y):
        logits = ctx.model.apply({"params": params, "batch_stats": ctx.variables["batch_stats"]}, x[None],
                                 train=False).logits[0]
        return loss_of_logits(logits) if label is None else loss_of_logits(logits, y)

    grad = jax.jit(jax.grad(loss))
    squares = [[np.sum(np.square(np.asarray(g))) for g in jax.tree.leaves(grad(ctx.variables["params"], x, label))]
               for x in ctx.pool_x]
    # layer_sum: the sum of each tensor's L2 norm (the reference codes); global: one L2 norm.
    return np.array([np.sum(np.sqrt(s)) if norm == "layer_sum" else np.sqrt(np.sum(s)) for s in squares])


def entropy(logits):
    p = jax.nn.softmax(logits)
    return -jnp.sum(p * jnp.log(p))


def cross_entropy(logits, label):
    return -jax.nn.log_softmax(logits)[label]


@pytest.mark.parametrize("method", ["ghost", "vmap"])
@pytest.mark.parametrize("norm", ["layer_sum", "global"])
def test_strategies_score_what_a_loop_of_jax_grad_computes(digits_pool, x64, method, norm):
    """Every gradient strategy against a per-example (for EGL, per example and class) loop of `jax.grad`,
    in float64."""
    ctx = context(digits_pool[:12], method=method, norm=norm)
    ctx = dataclasses.replace(ctx, variables=to64(ctx.variables), pool_x=to64(ctx.pool_x))
    ent = loop_norms(ctx, entropy, norm)
    for scorer in (ent_gn_scores, exp_gn_scores, lplgrad_scores):  # exp_gn: the entropy's gradient too
        np.testing.assert_allclose(scorer(ctx).values, ent, rtol=1e-9, err_msg=scorer.__name__)
    probs = jax.nn.softmax(ctx.model.apply(ctx.variables, ctx.pool_x, train=False).logits)
    per_class = np.stack([loop_norms(ctx, cross_entropy, norm, label=c) for c in range(10)], axis=1)
    np.testing.assert_allclose(egl_scores(ctx).values, np.sum(np.asarray(probs) * per_class, axis=1), rtol=1e-9)


def test_exp_gn_and_ent_gn_select_the_same_samples(digits_pool):
    ctx = context(digits_pool)
    assert get_strategy("exp_gn").select(ctx, 15).chosen.tolist() == get_strategy("ent_gn").select(ctx, 15).chosen.tolist()


def test_new_weights_in_a_new_cycle_compile_nothing(digits_pool):
    with count_traces(gradient, "_query_norms") as traces:
        jax.block_until_ready(ent_gn_scores(context(digits_pool)))
        for seed in (1, 2):  # other weights and BatchNorm statistics, another pool size
            other = context(digits_pool[: 50 + seed], seed=seed)
            jax.block_until_ready(ent_gn_scores(other))
    assert traces.count == 1


def test_unknown_options_are_refused(tmp_path):
    for options, message in [(dict(norm="l1"), "--gradnorm.norm"), (dict(params="biases"), "--gradnorm.params"),
                             (dict(method="magic"), "--gradnorm.method"),
                             (dict(method="mixed"), "--gradnorm.memory_budget_mib")]:
        config = build_config(strategy="exp_gn", gradnorm=options, progress=False)
        with pytest.raises(loop.RunError, match=message):
            loop.run_experiment(config, workdir=tmp_path / "run", log=lambda *_: None)
        assert not (tmp_path / "run").exists()
