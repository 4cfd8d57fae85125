"""Your own model: Flax modules defined here (not in jaxal.models) run every strategy they can; the
others are refused before anything runs, saying what the model lacks; the gradient strategies fall back
from the ghost engine to vmap on layers it does not know, with one warning, and their scores equal a
per-example Python loop of jax.grad in float64."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxal
from annotation import digit_pool
from jaxal import gradnorm, loop
from jaxal.config import build_config
from jaxal.data import Normalization
from jaxal.models import adapt
from jaxal.strategies import STRATEGIES, StrategyContext
from jaxal.tasks import Classification
from jaxal.train import TrainOptions, create_train_state, model_variables, train_model

from conftest import SMALL_STRATEGY_NETWORKS  # tests/conftest.py

NUM_CLASSES = 3
K = 4


class Mine(nn.Module):
    """A classifier of layers the ghost engine does not know (LayerNorm, a bare parameter), returning a
    dict with logits, features and block outputs, with dropout for MC-dropout BALD."""

    dropout_rate: float = 0.3
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, train=False, mc_dropout=False):
        conv = nn.relu(nn.LayerNorm()(nn.Conv(4, (3, 3))(x)))
        features = nn.relu(nn.Dense(16)(conv.reshape(x.shape[0], -1)))
        hidden = nn.Dropout(self.dropout_rate, deterministic=not (train or mc_dropout))(features)
        temperature = self.param("temperature", nn.initializers.ones, ())
        return {"logits": nn.Dense(self.num_classes)(hidden) * temperature, "features": features, "blocks": [conv, features]}


class LogitsOnly(nn.Module):
    """The least a model can be: logits, no keyword arguments."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(NUM_CLASSES)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def data():
    _, images, names = digit_pool(60)
    labels = np.asarray([("zero", "one", "two").index(n) for n in names], np.int32)
    return images, labels


def trained(module, images, labels, labeled, epochs=3):
    model = adapt(module, Normalization(1 / 255, (0.3,), (0.4,)))
    options = TrainOptions(augmentation="none")
    state = create_train_state(model, None, jax.random.key(0), images.shape[1:], options)
    state, _ = train_model(state, images, labels, labeled, model=model, lossnet=None, options=options, epochs=epochs,
                           batch_size=16, lr=0.05, lr_milestones=(), lr_gamma=0.1, detach_epoch=0, seed=0)
    return model, model_variables(state)


def context(model, variables, images, labels, labeled, pool, config, num_classes=NUM_CLASSES):
    sets = {name: (images[labeled], labels[labeled]) for name in ("labeled", "initial", "val")}
    return StrategyContext(model=model, variables=variables, pool_x=images[pool], labeled_x=images[labeled],
                           labeled_y=labels[labeled], num_classes=num_classes, config=config, rng=jax.random.key(1),
                           reference_sets=sets)


# Higher = chosen first: the highest entropy, the smallest gap between the two most probable classes, the
# lowest top probability.
NUMPY_SCORES = {
    "entropy": lambda p: -np.sum(p * np.log(p), 1),
    "margin": lambda p: -(np.sort(p, 1)[:, -1] - np.sort(p, 1)[:, -2]),
    "least_confidence": lambda p: -p.max(1),
}


def test_every_strategy_that_can_run_on_a_users_module_does(data, monkeypatch):
    images, labels = data
    labeled, pool = np.arange(0, 60, 2), np.arange(1, 60, 2)
    model, variables = trained(Mine(), images, labels, labeled)
    config = build_config(val_size=5, bald_samples=4, influence=dict(depth=10, repeats=1), **SMALL_STRATEGY_NETWORKS)
    monkeypatch.setattr(gradnorm, "_FALLBACK_WARNED", set())
    ran = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, strategy in sorted(STRATEGIES.items()):
            if strategy.requires.lossnet:  # trained with the loss module: below, through a whole run
                continue
            loop.check_model_outputs(model, "Mine", build_config(strategy=name), images.shape[1:], images.dtype,
                                     NUM_CLASSES)
            chosen, scores, _ = strategy.select(context(model, variables, images, labels, labeled, pool, config), K)
            assert len(set(np.asarray(chosen).tolist())) == K and 0 <= min(chosen) and max(chosen) < len(pool), name
            if scores is not None:
                assert np.all(np.isfinite(scores)), name
            if name in NUMPY_SCORES:  # the uncertainty scores, by NumPy from the module's own logits
                logits = np.asarray(model.apply(variables, images[pool], train=False).logits, np.float64)
                probs = np.exp(logits - logits.max(1, keepdims=True))
                expected = NUMPY_SCORES[name](probs / probs.sum(1, keepdims=True))
                np.testing.assert_allclose(scores, expected[chosen], rtol=1e-4, atol=1e-6, err_msg=name)
                assert set(np.asarray(chosen).tolist()) == set(np.argsort(-expected)[:K].tolist()), name
            ran.append(name)
    assert {"ent_gn", "exp_gn", "egl", "coreset", "badge", "bald", "isal", "entropy"} <= set(ran)
    fallbacks = [w for w in caught if "use method 'vmap'" in str(w.message)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]  # three gradient strategies, one warning
    assert "LayerNorm_0/scale" in str(fallbacks[0].message) and "temperature" in str(fallbacks[0].message)


def test_loss_module_strategies_on_a_users_module(tmp_path):
    """ll4al and lplgrad train the loss module on the module's block outputs: a whole simulated run."""
    records = loop.run_experiment(build_config(strategy="lplgrad,ll4al", initial_size=20, budget=5, cycles=2, epochs=1,
                                               batch_size=16, progress=False), model=Mine(num_classes=10),
                                  workdir=tmp_path / "run", log=lambda *_: None)
    assert [(r["strategy"], r["cycle"], len(r["selected"])) for r in records] == [
        ("lplgrad", 0, 5), ("lplgrad", 1, 0), ("ll4al", 0, 5), ("ll4al", 1, 0)]
    assert records[0]["selected"] != records[2]["selected"]


@pytest.mark.parametrize("strategy, missing", [
    ("coreset", "penultimate features"), ("badge", "penultimate features"), ("ll4al", "block outputs"),
    ("lplgrad", "block outputs"), ("bald", "`mc_dropout` keyword"),
])
def test_a_strategy_the_model_cannot_serve_is_refused_before_anything_runs(strategy, missing, tmp_path, data):
    images, _ = data
    model = adapt(LogitsOnly(), Normalization())
    with pytest.raises(loop.RunError, match=f"strategy {strategy} cannot run on model LogitsOnly: it needs .*{missing}"):
        loop.check_model_outputs(model, "LogitsOnly", build_config(strategy=strategy), images.shape[1:], images.dtype,
                                 NUM_CLASSES)
    learner = jaxal.ActiveLearner(model=LogitsOnly(), strategy=strategy, num_classes=NUM_CLASSES,
                                  workdir=tmp_path / "al", log=lambda *_: None)
    learner.tell(["a", "b"], [0, 1])
    with pytest.raises(loop.RunError, match=missing):
        learner.ask(["a", "b", "c", "d", "e", "f"], images[:6], k=2)
    assert not (tmp_path / "al").exists()


def test_logits_of_the_wrong_shape_are_refused(data):
    images, _ = data
    with pytest.raises(loop.RunError, match=r"returns logits of shape \(2, 3\) for 2 images; expected \(2, ..., 5\)"):
        loop.check_model_outputs(adapt(LogitsOnly(), Normalization()), "LogitsOnly", build_config(strategy="entropy"),
                                 images.shape[1:], images.dtype, 5)


def test_gradient_norms_of_a_users_module_equal_a_python_loop_in_float64(data):
    images, labels = data
    labeled, pool = np.arange(0, 40, 2), np.arange(1, 12, 2)
    with jax.enable_x64(True):
        model, variables = trained(Mine(dropout_rate=0.0), images, labels, labeled, epochs=1)
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        config = build_config(gradnorm=dict(norm="layer_sum"))
        ctx = context(model, variables, images, labels, labeled, pool, config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback warning; counted above
            scores = np.asarray(STRATEGIES["ent_gn"].score(ctx).values)
        task = Classification(NUM_CLASSES)

        # Compiled like the engine: the model normalises uint8 pixels in float32 as its first op, and XLA
        # rounds that op differently compiled than op by op (1e-7 apart); everything after it is float64.
        @jax.jit
        def entropy_gradient(params, x):
            return jax.grad(lambda p: task.entropy(model.apply({"params": p, "batch_stats": {}}, x[None],
                                                               train=False).logits[0]))(params)

        expected = []
        for x in images[pool]:  # one example at a time
            grads = entropy_gradient(variables["params"], x)
            expected.append(sum(np.linalg.norm(np.asarray(g, np.float64).ravel()) for g in jax.tree.leaves(grads)))
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=0)
