"""CoreGCN and UncertainGCN: Sequential GCN for Active Learning (Caramalau, Bhattarai & Kim, CVPR 2021).

Followed: the authors' code, razvancaramalau/Sequential-GCN-for-Active-Learning (selection_methods.py,
models/query_models.py, main.py, config.py). Each cycle:

  1. the task model's penultimate features of the candidates and of the labelled set (the code's nodes
     are `subset + labeled_set`, in that order), each row L2-normalised;
  2. the graph of the code's `aff_to_adj`: S = X X^T, then A = (S - I) D^-1 + I with D the diagonal of
     the column sums of S - I (every column divided by its sum, self-loops of weight 1 added after);
  3. a GCN of two graph convolutions, `H = relu(A X W1 + b1)`, dropout 0.3 on H while training, then
     `s = sigmoid(A H W3 + b3)` (the code's GCN also holds a `gc2` and a `linear` layer its forward never
     uses; they change nothing and are left out), weights and biases U(+-1/sqrt(fan_out)); trained from
     scratch for 200 full-graph steps of Adam (lr 1e-3, weight decay 5e-4 added to the gradient, as
     torch's) on `-mean_labelled log s - lambda_loss * mean_unlabelled log(1 - s)`, lambda_loss 1.2;
  4. UncertainGCN: the candidates whose score is closest to `margin` (s_margin 0.1): the code sorts
     |s - margin| in descending order and labels the last `budget`. CoreGCN: greedy k-center on H (the
     GCN's hidden embedding, in inference mode) with the labelled nodes as the initial centres (the code
     runs its k-center on `feat` with `already_selected` = the labelled nodes); this is
     `baselines.greedy_k_center`, the coreset strategy's selection.

Memory: the code builds A as a dense N x N matrix, N = candidates + labelled (20000 nodes: 1.6 GB in
float32, 3.2 GB in the code's float64 NumPy). It is never formed here: A is X X^T rescaled plus diagonal
terms, so

    A M = X (X^T (D^-1 M)) - D^-1 M + M,    D = diag(X (X^T 1) - 1),

costs O(N d h) time and O(N (d + h)) memory for d feature and h hidden dimensions, exactly the same
product (tests/test_gcn_strategies.py checks it and one GCN layer against a dense NumPy adjacency, and
the compiled memory at two graph sizes). Products run at `highest` precision. The nodes are split over
the mesh's devices (the X^T products are sums over nodes: the compiler all-reduces them), and dropout
draws each node's mask from its own key, so the draws do not depend on the split.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxal import parallel
from jaxal.config import Config, GCNOptions
from jaxal.strategies.base import Scores, Selection, StrategyContext, register_scorer, register_selector
from jaxal.strategies.baselines import greedy_k_center
from jaxal.strategies.vaal import initialization_key
from jaxal.train import predict

_HIGHEST = jax.lax.Precision.HIGHEST
NODE_BUCKET = 512


def normalize_rows(x: jax.Array) -> jax.Array:
    """torch.nn.functional.normalize: each row divided by max(its L2 norm, 1e-12)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def adjacency_product(x: jax.Array, m: jax.Array) -> jax.Array:
    """A @ m for the code's adjacency A = (X X^T - I) D^-1 + I of the rows of `x` (zero rows: padding,
    absent from every other node's sums), without forming A (see the module docstring)."""
    degree = jnp.dot(x, jnp.sum(x, axis=0), precision=_HIGHEST) - 1.0
    scaled = m / degree[:, None]
    return jnp.dot(x, jnp.dot(x.T, scaled, precision=_HIGHEST), precision=_HIGHEST) - scaled + m


def init_gcn(key, num_features: int, hidden: int) -> dict:
    """The code's GraphConvolution initialisation: weight and bias U(+-1/sqrt(out_features))."""
    keys = jax.random.split(key, 4)

    def uniform(k, shape, fan_out):
        bound = 1.0 / math.sqrt(fan_out)
        return jax.random.uniform(k, shape, jnp.float32, -bound, bound)

    return {"w1": uniform(keys[0], (num_features, hidden), hidden), "b1": uniform(keys[1], (hidden,), hidden),
            "w3": uniform(keys[2], (hidden, 1), 1), "b3": uniform(keys[3], (1,), 1)}


def gcn_forward(params: dict, x: jax.Array, dropout: float = 0.0, key=None) -> tuple[jax.Array, jax.Array]:
    """(logits (N,), hidden embedding H (N, h)). `key` given: dropout on H, node i's mask drawn from
    fold_in(key, i)."""
    hidden = jax.nn.relu(adjacency_product(x, jnp.dot(x, params["w1"], precision=_HIGHEST)) + params["b1"][None])
    kept = hidden
    if key is not None and dropout > 0:
        nodes = jnp.arange(x.shape[0], dtype=jnp.uint32)
        masks = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - dropout,
                                                        hidden.shape[1:]))(nodes)
        kept = jnp.where(masks, hidden / (1.0 - dropout), 0.0)
    logits = adjacency_product(x, jnp.dot(kept, params["w3"], precision=_HIGHEST)) + params["b3"][None]
    return logits[:, 0], hidden


def gcn_loss(logits, labeled, unlabeled, lambda_loss: float):
    """The code's BCEAdjLoss: -mean_labelled log s - lambda * mean_unlabelled log(1 - s), s = sigmoid."""
    def masked_mean(values, mask):
        return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

    return (-masked_mean(jax.nn.log_sigmoid(logits), labeled)
            - lambda_loss * masked_mean(jax.nn.log_sigmoid(-logits), unlabeled))


def _adam(options: GCNOptions) -> optax.GradientTransformation:
    # torch.optim.Adam(weight_decay=wd): wd * p added to the gradient before the moments.
    return optax.chain(optax.add_decayed_weights(options.weight_decay), optax.scale_by_adam())


@functools.partial(jax.jit, static_argnames=("options", "mesh"))
def train_gcn(x, labeled, valid, init_key, dropout_key, *, options: GCNOptions, mesh=None):
    """The trained GCN's (scores s (N,), hidden embedding H (N, h)) in inference mode, after
    `options.steps` full-graph Adam steps in one `fori_loop`. `x`: (N, d) features split over the mesh,
    `labeled`/`valid`: (N,) masks (invalid rows are padding)."""
    x = jnp.where(valid[:, None], normalize_rows(x), 0.0)
    labeled, unlabeled = valid & labeled, valid & ~labeled
    params = parallel.constrain_replicated(init_gcn(init_key, x.shape[1], options.hidden), mesh)
    optimizer = _adam(options)

    def step(i, carry):
        params, opt_state = carry
        grads = jax.grad(lambda p: gcn_loss(gcn_forward(p, x, options.dropout, jax.random.fold_in(dropout_key, i))[0],
                                            labeled, unlabeled, options.lambda_loss))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return jax.tree.map(lambda p, u: p - options.lr * u, params, updates), opt_state

    params, _ = jax.lax.fori_loop(0, options.steps, step, (params, optimizer.init(params)))
    logits, hidden = gcn_forward(params, x)
    return parallel.constrain_replicated((jax.nn.sigmoid(logits), hidden), mesh)


def gcn_outputs(ctx: StrategyContext) -> tuple[np.ndarray, np.ndarray, dict]:
    """(scores of the candidates, hidden embeddings of every node: candidates, then labelled; info)."""
    features = [predict(ctx.model, ctx.variables, xs, ctx.config.eval_batch_size, mesh=ctx.mesh)[1]
                for xs in (ctx.pool_x, ctx.labeled_x)]
    num_pool, num_nodes = features[0].shape[0], features[0].shape[0] + features[1].shape[0]
    is_labeled = np.arange(num_nodes) >= num_pool
    # The graph grows with the labelled set: zero rows (masked out) pad it to a multiple of NODE_BUCKET
    # nodes (and of the device count), so that a run compiles the training once per bucket, not per cycle.
    size = parallel.round_up(parallel.round_up(num_nodes, NODE_BUCKET), parallel.mesh_size(ctx.mesh))
    rows = np.arange(size)
    x = jnp.concatenate(features + [jnp.zeros((size - num_nodes, features[0].shape[1]), features[0].dtype)])
    x, labeled, valid = parallel.shard_batch((x, rows >= num_pool, rows < num_nodes), ctx.mesh)
    init_key, dropout_key = jax.random.split(ctx.rng)
    keys = parallel.replicate((initialization_key(init_key), dropout_key), ctx.mesh)
    scores, hidden = train_gcn(x, labeled, valid, *keys, options=ctx.config.gcn, mesh=ctx.mesh)
    scores, hidden = np.asarray(scores)[:num_nodes], np.asarray(hidden)[:num_nodes]
    # How well the GCN tells the two sets apart (the code prints the same).
    info = {"gcn_labeled_recognised": float(np.mean(scores[is_labeled] > 0.5)),
            "gcn_unlabeled_recognised": float(np.mean(scores[~is_labeled] <= 0.5))}
    return scores[:num_pool], hidden, info


def _check(config: Config) -> None:
    options = config.gcn
    if options.hidden < 1 or options.steps < 0:
        raise ValueError(f"--gcn.hidden must be at least 1 and --gcn.steps non-negative, got {options.hidden} "
                         f"and {options.steps}")
    if not 0.0 <= options.dropout < 1.0:
        raise ValueError(f"--gcn.dropout must be in [0, 1), got {options.dropout}")
    if not options.lr > 0 or options.weight_decay < 0 or options.lambda_loss < 0:
        raise ValueError("--gcn.lr must be positive, --gcn.weight_decay and --gcn.lambda_loss non-negative")


@register_scorer("uncertaingcn", check=_check, needs=("features",))
def uncertaingcn_scores(ctx: StrategyContext):
    """GCN labelled-vs-unlabelled scores closest to the margin (UncertainGCN, Caramalau et al. 2021)."""
    scores, _, info = gcn_outputs(ctx)
    return Scores(-np.abs(scores - ctx.config.gcn.margin), info)


@register_selector("coregcn", check=_check, needs=("features",))
def coregcn_select(ctx: StrategyContext, k: int):
    """Greedy k-center on a labelled-vs-unlabelled GCN's embeddings (CoreGCN, Caramalau et al. 2021)."""
    _, hidden, info = gcn_outputs(ctx)
    num_pool = ctx.pool_x.shape[0]
    return Selection(np.asarray(greedy_k_center(hidden[:num_pool], hidden[num_pool:], k, ctx.mesh)), info=info)
