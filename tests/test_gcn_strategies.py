"""CoreGCN and UncertainGCN: the factorised adjacency product, one graph convolution and the loss against
a dense NumPy transcription of the code (`aff_to_adj`, `GraphConvolution`, `BCEAdjLoss`); memory that
grows linearly with the graph (compiled memory at two sizes); the selections given fixed GCN outputs
against the code's rules written plainly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxal.config import build_config
from jaxal.strategies import StrategyContext, gcn, get_strategy


def aff_to_adj(x: np.ndarray) -> np.ndarray:
    """The code's selection_methods.aff_to_adj, in NumPy float64."""
    adj = np.matmul(x, x.transpose())
    adj += -1.0 * np.eye(adj.shape[0])
    adj_diag = np.sum(adj, axis=0)
    adj = np.matmul(adj, np.diag(1 / adj_diag))
    return adj + np.eye(adj.shape[0])


def features(n=37, d=6, seed=0):
    """Non-negative (post-ReLU) features, L2-normalised as the code does before aff_to_adj."""
    x = np.abs(np.random.default_rng(seed).normal(size=(n, d)))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_adjacency_product_equals_the_dense_adjacency(x64):
    x, m = features(), np.random.default_rng(1).normal(size=(37, 4))
    np.testing.assert_allclose(gcn.adjacency_product(jnp.asarray(x), jnp.asarray(m)), aff_to_adj(x) @ m,
                               rtol=1e-10, atol=1e-12)
    # Zero rows (padding) leave the real rows' products unchanged.
    padded = gcn.adjacency_product(jnp.asarray(np.vstack([x, np.zeros((5, 6))])), jnp.asarray(np.vstack([m, np.ones((5, 4))])))
    np.testing.assert_allclose(padded[:37], aff_to_adj(x) @ m, rtol=1e-10, atol=1e-12)


def test_graph_convolutions_and_loss_equal_numpy(x64):
    x = features()
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), gcn.init_gcn(jax.random.key(0), 6, 5))
    logits, hidden = gcn.gcn_forward(params, jnp.asarray(x))
    adj, p = aff_to_adj(x), {k: np.asarray(v) for k, v in params.items()}
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    expected_hidden = relu(adj @ (x @ p["w1"]) + p["b1"])  # GraphConvolution: adj @ (input @ W) + b
    np.testing.assert_allclose(hidden, expected_hidden, rtol=1e-10, atol=1e-12)
    expected_logits = (adj @ (expected_hidden @ p["w3"]) + p["b3"])[:, 0]
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-10, atol=1e-12)
    labeled = np.arange(37) >= 30
    s = 1 / (1 + np.exp(-expected_logits))
    bce = -np.mean(np.log(s[labeled])) - 1.2 * np.mean(np.log(1 - s[~labeled]))  # BCEAdjLoss
    assert float(gcn.gcn_loss(logits, jnp.asarray(labeled), jnp.asarray(~labeled), 1.2)) == pytest.approx(bce, rel=1e-10)


def test_initialisation_is_the_codes():
    params = gcn.init_gcn(jax.random.key(0), 512, 128)
    assert params["w1"].shape == (512, 128) and params["w3"].shape == (128, 1)
    assert float(jnp.max(jnp.abs(params["w1"]))) <= 1 / np.sqrt(128) < 2 * float(jnp.std(params["w1"])) * np.sqrt(3)


def test_training_memory_grows_linearly_never_n_squared():
    """The compiled training's temporary memory at 4096 and 16384 nodes: linear growth, far below one dense
    N x N float32 adjacency (1 GiB at 16384). (Below 4096 nodes XLA:CPU picks a leaner layout, about 640
    instead of 1130 bytes per node, so the sizes compared are both above it.)"""
    options = build_config(gcn=dict(hidden=16, steps=2)).gcn

    def temp_bytes(n):
        args = (jax.ShapeDtypeStruct((n, 64), jnp.float32), jax.ShapeDtypeStruct((n,), bool),
                jax.ShapeDtypeStruct((n,), bool), jax.random.key(0, impl="rbg"), jax.random.key(1))
        return gcn.train_gcn.lower(*args, options=options).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(4096), temp_bytes(16384)
    assert large < 16384 * 16384 * 4 / 32
    assert large / small < 6  # 4 when linear, 16 when quadratic


# ---- the selections, given fixed GCN outputs ----------------------------------------------------------


def context(pool=29, labeled=11, mesh=None):
    xs = np.random.default_rng(3).normal(size=(pool + labeled, 3)).astype(np.float32)

    class Features:  # a "model" whose penultimate features are its inputs
        def apply(self, variables, x, train=False):
            from jaxal.models import ModelOutput
            return ModelOutput(x, x, ())

    return StrategyContext(model=Features(), variables={}, pool_x=xs[:pool], labeled_x=xs[pool:],
                           labeled_y=np.zeros(labeled, np.int32), num_classes=2, config=build_config(eval_batch_size=8),
                           rng=jax.random.key(0), mesh=mesh)


def test_uncertaingcn_selects_the_scores_closest_to_the_margin(monkeypatch):
    ctx = context()
    scores = np.random.default_rng(4).uniform(size=40).astype(np.float32)
    monkeypatch.setattr(gcn, "train_gcn", lambda x, *args, **kwargs: (jnp.asarray(np.resize(scores, x.shape[0])),
                                                                       jnp.zeros((x.shape[0], 4))))
    chosen = np.asarray(get_strategy("uncertaingcn").select(ctx, 5).chosen)
    # The code: arg = argsort(-|s - s_margin|) over the subset, then labels subset[arg][-ADDENDUM:].
    arg = np.argsort(-np.abs(scores[:29] - 0.1))
    assert sorted(chosen.tolist()) == sorted(arg[-5:].tolist())


def test_coregcn_is_greedy_k_center_from_the_labeled_embeddings(monkeypatch):
    ctx = context()
    hidden = np.random.default_rng(5).normal(size=(40, 4)).astype(np.float32)
    monkeypatch.setattr(gcn, "train_gcn", lambda x, *args, **kwargs: (jnp.zeros(x.shape[0]),
                                                                       jnp.asarray(np.resize(hidden, (x.shape[0], 4)))))
    chosen = np.asarray(get_strategy("coregcn").select(ctx, 6).chosen)
    # kCenterGreedy with already_selected = the labelled nodes: repeatedly the farthest candidate.
    distance = np.min(np.linalg.norm(hidden[:29, None] - hidden[None, 29:], axis=-1), axis=1)
    expected = []
    for _ in range(6):
        j = int(np.argmax(distance))
        expected.append(j)
        distance = np.minimum(distance, np.linalg.norm(hidden[:29] - hidden[j], axis=1))
    assert chosen.tolist() == expected


def test_the_features_reach_the_gcn_in_the_codes_order(monkeypatch):
    """Nodes: the candidates, then the labelled set, then zero padding to the bucket; the labelled mask."""
    ctx = context()
    seen = {}

    def fake(x, labeled, valid, *args, **kwargs):
        seen.update(x=np.asarray(x), labeled=np.asarray(labeled), valid=np.asarray(valid))
        return jnp.zeros(x.shape[0]), jnp.zeros((x.shape[0], 2))

    monkeypatch.setattr(gcn, "train_gcn", fake)
    get_strategy("uncertaingcn").select(ctx, 3)
    assert seen["x"].shape == (gcn.NODE_BUCKET, 3)
    np.testing.assert_array_equal(seen["x"][:40], np.concatenate([ctx.pool_x, ctx.labeled_x]))
    assert not seen["x"][40:].any() and seen["valid"].sum() == 40 and not seen["valid"][40:].any()
    assert seen["labeled"][29:40].all() and not seen["labeled"][:29].any()
