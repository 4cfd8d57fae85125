"""BALD, BADGE and LL4AL against independent references: NumPy computations from explicitly sampled
MC-dropout passes, explicitly materialised gradient embeddings (and `jax.grad` of the head), a direct
LossNet application, a Python loop for the ranking loss, and end-to-end runs of the AL loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxal import loop
from jaxal.config import build_config
from jaxal.models import LossNet, ModelOutput, ResNet18, SmallCNN, create_model, init_variables
from jaxal.strategies import StrategyContext, get_strategy, top_k
from jaxal.strategies import badge, bald, ll4al
from jaxal.train import loss_prediction_loss

from conftest import count_traces, to64  # tests/conftest.py


def np_entropy(p):
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


# ---- BALD ----------------------------------------------------------------------------------------------


def sampled_probabilities(model, variables, xs, rng, num_samples):
    """(T, n, C) by T x n separate full forward passes with mc_dropout=True, one example at a time."""
    @jax.jit
    def one_pass(x, t, i):
        return model.apply(variables, x[None], train=False, mc_dropout=True,
                           rngs={"dropout": bald.dropout_key(rng, t, i)}).logits[0]

    probs = np.zeros((num_samples, xs.shape[0], model.num_classes))
    for t in range(num_samples):
        for i in range(xs.shape[0]):
            logits = np.asarray(one_pass(xs[i], t, i), np.float64)
            probs[t, i] = np.exp(logits - logits.max()) / np.sum(np.exp(logits - logits.max()))
    return probs


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_bald_equals_numpy_from_full_mc_passes(x64, kind):
    if kind == "mlp":
        model = create_model("mlp", 4, dropout_rate=0.5)
    else:
        model = SmallCNN(num_classes=4, channels=(3, 4), hidden=8, dropout_rate=0.5)
    variables = to64(init_variables(model, jax.random.key(1), (4, 4, 1)))
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(7, 4, 4, 1)))
    rng, num_samples = jax.random.key(3), 5
    probs = sampled_probabilities(model, variables, xs, rng, num_samples)
    # The sampled passes really differ (dropout is on).
    assert np.max(np.abs(probs[0] - probs[1])) > 1e-3
    expected = np_entropy(probs.mean(0)) - np_entropy(probs).mean(0)
    assert np.all(expected > 0)
    # The features-once shortcut draws the very masks of the full passes.
    got_probs = bald.mc_dropout_probabilities(model, variables, xs, rng, num_samples, chunk_size=3)
    np.testing.assert_allclose(got_probs, probs, rtol=1e-10, atol=1e-12)
    # Several padded chunks, or one: the same scores (dropout keys are per example, not per chunk).
    runs = [("features", 3), ("features", 64)] + ([("full", 3)] if kind == "mlp" else [])
    for method, chunk_size in runs:
        scores = bald.bald_scores(model, variables, xs, rng, num_samples, chunk_size=chunk_size, method=method)
        np.testing.assert_allclose(scores, expected, rtol=1e-8, atol=1e-12)


def test_bald_is_zero_without_dropout_or_with_identical_passes():
    model = create_model("mlp", 5, dropout_rate=0.0)
    variables = init_variables(model, jax.random.key(0), (4, 4, 1))
    xs = jnp.asarray(np.random.default_rng(1).normal(size=(9, 4, 4, 1)), jnp.float32)
    for method in ("features", "full"):
        scores = bald.bald_scores(model, variables, xs, jax.random.key(0), 6, chunk_size=4, method=method)
        np.testing.assert_allclose(scores, 0.0, atol=1e-6)
    probs = jax.nn.softmax(jnp.asarray(np.random.default_rng(2).normal(size=(1, 9, 5)), jnp.float32))
    identical = jnp.broadcast_to(probs, (8, 9, 5))
    np.testing.assert_allclose(bald.mutual_information(identical), 0.0, atol=1e-6)


def test_bald_scores_compile_once_for_every_pool_size():
    model = create_model("mlp", 3, dropout_rate=0.3).clone(hidden=(11,))  # a model no other test compiles
    variables = init_variables(model, jax.random.key(0), (4, 4, 1))
    with count_traces(bald, "_bald_fn") as traces:  # the pool mapper's program for BALD
        for n in (9, 20):
            xs = jnp.ones((n, 4, 4, 1))
            assert bald.bald_scores(model, variables, xs, jax.random.key(0), 4, chunk_size=8).shape == (n,)
    assert traces.count == 1


def test_bald_registration_and_checks(tmp_path):
    strategy = get_strategy("bald")
    assert strategy.requires.dropout and not strategy.requires.lossnet
    with pytest.raises(loop.RunError, match="dropout rate 0"):
        loop.prepare(build_config(strategy="bald", dropout=0.0), tmp_path / "run")
    with pytest.raises(loop.RunError, match="bald_samples"):
        loop.prepare(build_config(strategy="bald", bald_samples=1), tmp_path / "run")
    with pytest.raises(ValueError, match="unknown BALD method"):
        bald.bald_scores(create_model("mlp", 2), {}, jnp.ones((1, 4, 4, 1)), jax.random.key(0), 2, method="bogus")
    with pytest.raises(ValueError, match="method='full'"):
        bald.bald_scores(InputDropout(2), {}, jnp.ones((1, 4, 4, 1)), jax.random.key(0), 2, method="features")


class InputDropout(nn.Module):
    """A user model whose dropout is not right before the head: BALD must run full passes."""

    num_classes: int
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x, train=False, mc_dropout=False):
        h = nn.Dropout(self.dropout_rate, deterministic=not (train or mc_dropout))(x.reshape((x.shape[0], -1)))
        h = nn.relu(nn.Dense(6)(h))
        return ModelOutput(nn.Dense(self.num_classes, name="head")(h), h, (h,))


def test_bald_falls_back_to_full_passes_for_other_models(x64):
    model = InputDropout(3)
    variables = to64(init_variables(model, jax.random.key(0), (4, 4, 1)))
    xs = jnp.asarray(np.random.default_rng(5).normal(size=(5, 4, 4, 1)))
    probs = sampled_probabilities(model, variables, xs, jax.random.key(2), 4)
    expected = np_entropy(probs.mean(0)) - np_entropy(probs).mean(0)
    scores = bald.bald_scores(model, variables, xs, jax.random.key(2), 4, chunk_size=2)
    np.testing.assert_allclose(scores, expected, rtol=1e-8, atol=1e-12)


# ---- BADGE -----------------------------------------------------------------------------------------------


def explicit_embeddings(a, h):
    return np.einsum("nc,nd->ncd", np.asarray(a), np.asarray(h)).reshape(a.shape[0], -1)


def test_badge_factorised_distances_equal_explicit(x64):
    rng = np.random.default_rng(0)
    a, h = jnp.asarray(rng.normal(size=(11, 4))), jnp.asarray(rng.normal(size=(11, 6)))
    g = explicit_embeddings(a, h)
    explicit = np.sum((g[:, None, :] - g[None, :, :]) ** 2, axis=-1)
    got = badge.factorised_squared_distances(a, h, a, h)
    np.testing.assert_allclose(got, explicit, rtol=1e-10, atol=1e-10)
    got = badge.factorised_squared_distances(a, h, a[3:5], h[3:5])
    np.testing.assert_allclose(got, explicit[:, 3:5], rtol=1e-10, atol=1e-10)


def test_badge_embedding_is_the_head_gradient_at_the_pseudo_label(x64):
    rng = np.random.default_rng(1)
    features = jnp.asarray(rng.normal(size=(6, 5)))
    kernel, bias = jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.normal(size=(3,)))
    logits = features @ kernel + bias[None]
    labels = jnp.argmax(logits, -1)

    def ce(params, f, y):
        return -jax.nn.log_softmax(f @ params[0] + params[1])[y]

    grad_kernel, grad_bias = jax.vmap(jax.grad(ce), in_axes=(None, 0, 0))((kernel, bias), features, labels)
    a, h = badge.gradient_embedding_factors(logits, features)
    np.testing.assert_allclose(explicit_embeddings(a, h), np.swapaxes(grad_kernel, 1, 2).reshape(6, -1),
                               rtol=1e-10, atol=1e-12)
    a, h = badge.gradient_embedding_factors(logits, features, include_bias=True)
    full = np.concatenate([np.swapaxes(grad_kernel, 1, 2), np.asarray(grad_bias)[:, :, None]], -1).reshape(6, -1)
    np.testing.assert_allclose(explicit_embeddings(a, h), full, rtol=1e-10, atol=1e-12)


def test_badge_selection_distinct_first_largest_norm_reproducible():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(200, 5)), jnp.float32)
    features = jnp.asarray(np.abs(rng.normal(size=(200, 8))), jnp.float32)
    a, h = badge.gradient_embedding_factors(logits, features)
    norms = np.linalg.norm(explicit_embeddings(a, h), axis=-1)
    runs = [badge.badge_select_from_outputs(logits, features, 25, jax.random.key(s)) for s in (0, 0, 1)]
    for chosen in runs:
        assert len(np.unique(chosen)) == 25 and chosen.min() >= 0 and chosen.max() < 200
        assert chosen[0] == np.argmax(norms)
    np.testing.assert_array_equal(runs[0], runs[1])
    assert set(runs[0]) != set(runs[2])
    with pytest.raises(ValueError, match="cannot select"):
        badge.badge_select_from_outputs(logits[:3], features[:3], 4, jax.random.key(0))


def test_badge_picks_a_far_point_early_and_never_repeats():
    # a = e_0 for every point, so the embedding distances are the distances between the h.
    rng = np.random.default_rng(3)
    cluster = np.array([20.0, 0.0]) + 0.1 * rng.normal(size=(40, 2))
    h = np.concatenate([cluster, [[0.0, 5.0]]]).astype(np.float32)  # index 40: far, but of small norm
    a = np.tile(np.array([[1.0, 0.0, 0.0]], np.float32), (41, 1))
    for seed in range(5):
        chosen = np.asarray(badge.kmeans_pp_seeding(jnp.asarray(a), jnp.asarray(h), 6, jax.random.key(seed)))
        assert chosen[0] == np.argmax(np.linalg.norm(h, axis=-1))
        assert chosen[1] == 40
        assert len(np.unique(chosen)) == 6
    # Duplicates: all D^2 = 0 after two picks; the rest is drawn uniformly from the unchosen.
    dup_a, dup_h = jnp.ones((6, 2)), jnp.asarray(np.repeat([[1.0], [2.0]], 3, axis=0))
    chosen = np.asarray(badge.kmeans_pp_seeding(dup_a, dup_h, 6, jax.random.key(0)))
    assert sorted(chosen) == list(range(6))


def test_badge_second_pick_is_drawn_proportionally_to_squared_distance():
    h = jnp.asarray([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.5], [0.5, 0.0]])
    a = jnp.ones((5, 1))
    d2 = np.sum((np.asarray(h) - np.asarray(h[0])) ** 2, axis=-1)
    expected = d2 / d2.sum()
    keys = jax.random.split(jax.random.key(0), 4000)
    second = np.asarray(jax.vmap(lambda key: badge.kmeans_pp_seeding(a, h, 2, key)[1])(keys))
    frequency = np.bincount(second, minlength=5) / len(keys)
    assert frequency[0] == 0.0
    np.testing.assert_allclose(frequency, expected, atol=0.03)


# ---- LL4AL -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_ll4al_scores_equal_lossnet_on_inference_blocks(kind):
    if kind == "mlp":
        model, shape = create_model("mlp", 3).clone(hidden=(8, 6)), (4, 4, 1)
    else:
        model, shape = ResNet18(num_classes=3, stage_sizes=(1,), width=4), (6, 6, 3)
    variables = init_variables(model, jax.random.key(0), shape)
    # Non-trivial running averages, so train-mode BatchNorm would give other blocks.
    variables["batch_stats"] = jax.tree.map(lambda s: s + 0.3, variables["batch_stats"])
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(10, *shape)), jnp.float32)
    lossnet = LossNet(width=8)
    blocks = jax.jit(lambda v, x: model.apply(v, x, train=False).blocks)(variables, xs)
    lossnet_params = jax.jit(lossnet.init)(jax.random.key(1), blocks)["params"]
    expected = jax.jit(lossnet.apply)({"params": lossnet_params}, blocks)
    got = ll4al.predicted_losses(model, variables, lossnet, lossnet_params, xs, chunk_size=4)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    config = build_config(strategy="ll4al", eval_batch_size=4)
    ctx = StrategyContext(model=model, variables=variables, pool_x=xs, labeled_x=xs[:0], labeled_y=jnp.zeros((0,)),
                          num_classes=3, config=config, rng=jax.random.key(0), lossnet=lossnet,
                          lossnet_params=lossnet_params)
    strategy = get_strategy("ll4al")
    assert strategy.requires.lossnet and not strategy.requires.dropout
    np.testing.assert_array_equal(strategy.select(ctx, 4).chosen, top_k(np.asarray(expected), 4))


def reference_ranking_loss(predicted, target, margin):
    n = len(predicted)
    total = 0.0
    for i in range(n // 2):
        j = n - 1 - i
        sign = 1.0 if target[i] - target[j] > 0 else -1.0  # 2 * sign(clamp(t, 0)) - 1
        total += max(0.0, margin - sign * (predicted[i] - predicted[j]))
    return total / (n // 2)


@pytest.mark.parametrize("n", [2, 4, 5, 7])
def test_loss_prediction_loss_equals_python_loop(n):
    rng = np.random.default_rng(n)
    predicted = rng.normal(size=n)
    target = rng.uniform(size=n)
    target[n - 1] = target[0]  # a tie: sign(0) counts as -1
    for margin in (1.0, 0.3):
        got = float(loss_prediction_loss(jnp.asarray(predicted, jnp.float32), jnp.asarray(target, jnp.float32), margin))
        assert got == pytest.approx(reference_ranking_loss(predicted, target, margin), rel=1e-5, abs=1e-6)


# ---- end to end ------------------------------------------------------------------------------------------


def test_strategies_run_in_the_loop_on_digits(tmp_path):
    config = build_config(strategy="bald,badge,ll4al", model="mlp", initial_size=30, budget=10, cycles=2,
                          epochs=2, batch_size=16, bald_samples=4, progress=False)
    records = loop.run_experiment(config, workdir=tmp_path / "run", log=lambda *_: None)
    exp = loop.prepare(config, tmp_path / "other")  # touches nothing on disk
    initial, _ = loop.initial_split(exp.config, 0, exp.dataset.x_train.shape[0])
    for name in ("bald", "badge", "ll4al"):
        mine = sorted((r for r in records if r["strategy"] == name), key=lambda r: r["cycle"])
        assert [r["cycle"] for r in mine] == [0, 1]
        selected = np.asarray(mine[0]["selected"])
        assert len(selected) == config.budget == len(np.unique(selected))
        assert not np.intersect1d(selected, initial).size
        assert mine[1]["num_labeled"] == config.initial_size + config.budget
        assert np.isfinite(mine[1]["test_accuracy"])
