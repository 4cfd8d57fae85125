"""QBC: vote entropy and the consensus KL against NumPy written from their definitions, the vmapped
committee step against M separate `train_step` calls, and the committee's scores against each member's
predictions computed apart."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxal.config import build_config
from jaxal.data import load_dataset
from jaxal.models import adapt, create_model
from jaxal.strategies import qbc
from jaxal.train import TrainOptions, create_train_state, model_variables, train_step


def committee_probabilities(members=4, n=30, classes=5, seed=0):
    probs = np.random.default_rng(seed).dirichlet(np.full(classes, 0.5), size=(members, n))
    probs[:, 0] = np.eye(classes)[2]  # unanimous, certain
    probs[:, 1] = np.eye(classes)[np.arange(members) % classes]  # every member its own class
    return probs


def test_vote_entropy_equals_counted_votes(x64):
    probs = committee_probabilities()
    expected = []
    for i in range(probs.shape[1]):
        counts = collections.Counter(int(np.argmax(probs[m, i])) for m in range(probs.shape[0]))
        shares = np.array(list(counts.values())) / probs.shape[0]
        expected.append(-np.sum(shares * np.log(shares)))
    np.testing.assert_allclose(qbc.vote_entropy(jnp.asarray(probs)), expected, rtol=1e-12, atol=1e-15)
    assert expected[0] == 0 and expected[1] == pytest.approx(np.log(4))


def test_consensus_kl_is_the_mean_kl_from_the_mean(x64):
    probs = committee_probabilities(seed=1)
    mean = probs.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(probs > 0, probs * np.log(probs / mean), 0.0).sum(-1)  # KL(p_m || mean), 0 log 0 = 0
    np.testing.assert_allclose(qbc.consensus_kl(jnp.asarray(probs)), kl.mean(0), rtol=1e-10, atol=1e-14)


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    return data, adapt(create_model("cnn", 10, 0.25), data.normalization)


def test_the_vmapped_committee_step_equals_separate_steps(digits):
    data, model = digits
    options = TrainOptions(augmentation="crop_flip", crop_padding=1)  # dropout and augmentation draw keys
    keys = jax.random.split(jax.random.key(0), 3)
    states = qbc.create_committee(model, keys, data.image_shape, options)
    batches = np.arange(3 * 16).reshape(3, 16)  # a different batch per member
    x, y = data.x_train[batches], data.y_train[batches]
    member_keys = jax.random.split(jax.random.key(1), 3)
    lr = {"model": jnp.float32(0.1), "lossnet": jnp.float32(0.1)}
    separate = []
    for m in range(3):
        state = create_train_state(model, None, keys[m], data.image_shape, options)
        state, _ = train_step(state, x[m], y[m], jax.random.fold_in(member_keys[m], 7), lr, jnp.asarray(False),
                              model=model, lossnet=None, options=options)
        separate.append(state)
    together, metrics = qbc.committee_step(states, x, y, member_keys, jnp.int32(7), lr, model=model, options=options)
    assert metrics["loss"].shape == (3,)
    for m in range(3):
        for a, b in zip(jax.tree.leaves(separate[m]), jax.tree.leaves(jax.tree.map(lambda leaf: leaf[m], together))):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    # The members really differ (initialisation, data and keys).
    assert not np.allclose(separate[0].params["model"]["head"]["kernel"], separate[1].params["model"]["head"]["kernel"])


@pytest.mark.parametrize("disagreement", qbc.DISAGREEMENTS)
def test_committee_scores_equal_the_members_predictions_taken_apart(digits, disagreement):
    data, model = digits
    states = qbc.create_committee(model, jax.random.split(jax.random.key(2), 3), data.image_shape, TrainOptions())
    variables = model_variables(states)
    xs = data.x_train[:21]
    scores = qbc.committee_disagreement(model, variables, xs, disagreement, chunk_size=8)
    probs = []
    for m in range(3):
        member = jax.tree.map(lambda leaf: leaf[m], variables)
        logits = np.asarray(model.apply(member, xs, train=False).logits, np.float64)
        p = np.exp(logits - logits.max(1, keepdims=True))
        probs.append(p / p.sum(1, keepdims=True))
    probs = np.stack(probs)
    if disagreement == "vote_entropy":
        votes = np.stack([np.bincount(np.argmax(probs[:, i], -1), minlength=10) for i in range(21)]) / 3
        expected = -np.sum(np.where(votes > 0, votes * np.log(np.where(votes > 0, votes, 1)), 0), -1)
    else:
        expected = np.mean(np.sum(probs * np.log(probs / probs.mean(0)), -1), 0)
    np.testing.assert_allclose(scores, expected, rtol=2e-4, atol=1e-6)


def test_bad_committee_settings_are_refused():
    with pytest.raises(ValueError, match="qbc.members must be at least 2"):
        qbc._check(build_config(qbc=dict(members=1)))
    with pytest.raises(ValueError, match="unknown --qbc.disagreement"):
        qbc._check(build_config(qbc=dict(disagreement="jsd")))
