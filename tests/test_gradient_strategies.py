"""exp_gn, ent_gn, egl and lplgrad as strategies: equal to the engine, one compilation across cycles,
and each runs in the loop on digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxal import gradnorm, loop, parallel
from jaxal.config import build_config
from jaxal.data import load_dataset
from jaxal.models import create_model, inference_apply, init_variables
from jaxal.strategies import StrategyContext, get_strategy
from jaxal.strategies.gradient import _query_norms, egl_scores, ent_gn_scores, exp_gn_scores, lplgrad_scores


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


def engine_norms(ctx, loss_of_logits, norm):
    loss = gradnorm.example_loss(inference_apply(ctx.model, ctx.variables["batch_stats"]), loss_of_logits)
    return gradnorm.per_example_grad_norms(loss, ctx.variables["params"], ctx.pool_x, norm=norm, method="vmap")


@pytest.mark.parametrize("method", ["ghost", "vmap"])
@pytest.mark.parametrize("norm", ["layer_sum", "global"])
def test_strategies_score_what_the_engine_computes(digits_pool, method, norm):
    ctx = context(digits_pool, method=method, norm=norm)
    ent = ent_gn_scores(ctx).values
    np.testing.assert_allclose(ent, engine_norms(ctx, gradnorm.entropy_loss, norm), rtol=2e-5)
    # exp_gn as written (posterior differentiated) is the entropy: the same scores to rounding.
    np.testing.assert_allclose(exp_gn_scores(ctx).values, ent, rtol=2e-5)
    np.testing.assert_allclose(lplgrad_scores(ctx).values, ent, rtol=0)
    expected = gradnorm.expected_gradient_length(inference_apply(ctx.model, ctx.variables["batch_stats"]),
                                                 ctx.variables["params"], ctx.pool_x, norm=norm)
    np.testing.assert_allclose(egl_scores(ctx).values, expected, rtol=2e-5)


def test_exp_gn_and_ent_gn_select_the_same_samples(digits_pool):
    ctx = context(digits_pool)
    assert get_strategy("exp_gn").select(ctx, 15).chosen.tolist() == get_strategy("ent_gn").select(ctx, 15).chosen.tolist()


def test_new_weights_in_a_new_cycle_compile_nothing(digits_pool):
    compiled = parallel._compiled(_query_norms)
    ctx = context(digits_pool)
    ent_gn_scores(ctx)
    before = compiled._cache_size()
    for seed in (1, 2):  # other weights and BatchNorm statistics, another pool size
        other = context(digits_pool[: 50 + seed], seed=seed)
        jax.block_until_ready(ent_gn_scores(other))
    assert compiled._cache_size() == before


def test_unknown_options_are_refused(tmp_path):
    for options, message in [(dict(norm="l1"), "--gradnorm.norm"), (dict(params="biases"), "--gradnorm.params"),
                             (dict(method="magic"), "--gradnorm.method")]:
        config = build_config(strategy="exp_gn", gradnorm=options, progress=False)
        with pytest.raises(loop.RunError, match=message):
            loop.run_experiment(config, workdir=tmp_path / "run", log=lambda *_: None)
        assert not (tmp_path / "run").exists()


def test_each_gradient_strategy_runs_in_the_loop(tmp_path):
    config = build_config(strategy="exp_gn,ent_gn,egl,lplgrad", initial_size=30, budget=10, cycles=2, epochs=2,
                          progress=False, lossnet=dict(detach_epoch=0))
    records = loop.run_experiment(config, workdir=tmp_path / "run", log=lambda *_: None)
    by_strategy = {r["strategy"]: r for r in records if r["cycle"] == 0}
    assert set(by_strategy) == {"exp_gn", "ent_gn", "egl", "lplgrad"}
    for record in by_strategy.values():
        assert len(set(record["selected"])) == 10
    # Same initial set and seed, same model: exp_gn and ent_gn select the same samples.
    assert by_strategy["exp_gn"]["selected"] == by_strategy["ent_gn"]["selected"]
