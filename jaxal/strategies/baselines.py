"""Baselines the papers compare against: random, uncertainty (entropy, margin, least confidence) and
coreset (greedy k-center of Sener & Savarese on penultimate features)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxal import parallel
from jaxal.strategies.base import ALL_TASKS, StrategyContext, register_scorer, register_selector
from jaxal.train import features, predict


def pool_probabilities(ctx: StrategyContext) -> jax.Array:
    """(n, *outputs, C) softmax outputs of the whole pool (for per-example outputs; the scores below never
    hold a pool's dense outputs, see `uncertainty_scores`)."""
    logits, _ = predict(ctx.model, ctx.variables, ctx.pool_x, ctx.config.eval_batch_size, mesh=ctx.mesh)
    return jax.nn.softmax(logits)


def entropy_of(probs: jax.Array) -> jax.Array:
    return -jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-12)), axis=-1)


def margin_of(probs: jax.Array) -> jax.Array:
    """Gap between the two largest class probabilities."""
    top2 = jax.lax.top_k(probs, 2)[0]
    return top2[..., 0] - top2[..., 1]


def confidence_of(probs: jax.Array) -> jax.Array:
    """Probability of the predicted class."""
    return jnp.max(probs, axis=-1)


@register_scorer("random", tasks=ALL_TASKS)
def random_scores(ctx: StrategyContext):
    """Uniformly random samples."""
    return jax.random.uniform(ctx.rng, (ctx.pool_x.shape[0],))


# Each uncertainty score is computed per output (an example's class vector, or each pixel's) and reduced
# to one score per example by the task (`reduce_outputs`: identity, or the mean over pixels) inside the
# chunk, so a pool's dense outputs never exist at once.


def _uncertainty_chunk(static, variables, xs):
    model, task, score_of_probs = static
    return task.reduce_outputs(score_of_probs(jax.nn.softmax(model.apply(variables, xs, train=False).logits)))


def uncertainty_scores(ctx: StrategyContext, score_of_probs) -> jax.Array:
    """(n,) `score_of_probs` (a module-level function of (..., C) probabilities -> (...)) of every pool
    example, reduced over its outputs by the task."""
    return parallel.map_chunks(_uncertainty_chunk, (ctx.model, ctx.task, score_of_probs), ctx.variables,
                               ctx.pool_x, chunk_size=ctx.config.eval_batch_size, mesh=ctx.mesh)


@register_scorer("entropy", tasks=ALL_TASKS)
def entropy_scores(ctx: StrategyContext):
    """Highest predictive entropy."""
    return uncertainty_scores(ctx, entropy_of)


@register_scorer("margin", tasks=ALL_TASKS)
def margin_scores(ctx: StrategyContext):
    """Smallest gap between the two most probable classes."""
    return -uncertainty_scores(ctx, margin_of)


@register_scorer("least_confidence", tasks=ALL_TASKS)
def least_confidence_scores(ctx: StrategyContext):
    """Lowest probability of the predicted class."""
    return -uncertainty_scores(ctx, confidence_of)


# ---- coreset -------------------------------------------------------------------------------------


def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    sq = jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :] - 2.0 * a @ b.T
    return jnp.maximum(sq, 0.0)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def min_squared_distances(points: jax.Array, centers: jax.Array, chunk_size: int = 512) -> jax.Array:
    """For every point, the squared distance to its nearest center, scanning the centers in chunks so
    that at most (n_points x chunk_size) distances exist at once (never n x n)."""
    num_chunks = -(-centers.shape[0] // chunk_size)
    # Padding repeats the first center, which changes no minimum.
    padded = jnp.concatenate([centers, jnp.broadcast_to(centers[:1], (num_chunks * chunk_size - centers.shape[0],
                                                                       centers.shape[1]))])

    def body(best, chunk):
        return jnp.minimum(best, jnp.min(_squared_distances(points, chunk), axis=1)), None

    init = jnp.full((points.shape[0],), jnp.inf, points.dtype)
    best, _ = jax.lax.scan(body, init, padded.reshape(num_chunks, chunk_size, -1))
    return best


def greedy_k_center(pool_features: jax.Array, labeled_features: jax.Array, k: int, mesh=None) -> jax.Array:
    """Sener & Savarese's greedy 2-approximation: repeatedly take the pool point farthest from every
    labelled or already chosen point. One jitted loop over k; O(n_pool * d) per pick. With a mesh the
    pool features are split over devices (padding rows masked out: never picked)."""
    if k > pool_features.shape[0]:
        raise ValueError(f"cannot select {k} samples from a pool of {pool_features.shape[0]}")
    pool, valid = parallel.pad_and_shard(pool_features, mesh)
    return _greedy_k_center(pool, valid, parallel.replicate(labeled_features, mesh), k, mesh)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _greedy_k_center(pool_features, valid, labeled_features, k, mesh):
    if labeled_features.shape[0]:
        distances = min_squared_distances(pool_features, labeled_features)
    else:
        distances = jnp.full((pool_features.shape[0],), jnp.inf)
    distances = jnp.where(valid, distances, -jnp.inf)  # below every chosen point's -1
    rows = jnp.arange(pool_features.shape[0])

    def pick(i, carry):
        distances, chosen = carry
        j = jnp.argmax(distances)
        new = jnp.sum((pool_features - parallel.select_row(pool_features, j)[None, :]) ** 2, axis=-1)
        return jnp.where(rows == j, -1.0, jnp.minimum(distances, new)), chosen.at[i].set(j)

    _, chosen = jax.lax.fori_loop(0, k, pick, (distances, jnp.zeros((k,), jnp.int32)))
    return parallel.constrain_replicated(chosen, mesh)


@register_selector("coreset", tasks=ALL_TASKS)
def coreset_select(ctx: StrategyContext, k: int) -> np.ndarray:
    """Greedy k-center on penultimate features (Sener & Savarese)."""
    # Segmentation models' features are their last feature map averaged over its pixels.
    pool_features = features(ctx.model, ctx.variables, ctx.pool_x, ctx.config.eval_batch_size, mesh=ctx.mesh)
    labeled_features = features(ctx.model, ctx.variables, ctx.labeled_x, ctx.config.eval_batch_size,
                                mesh=ctx.mesh)
    return np.asarray(greedy_k_center(pool_features, labeled_features, k, ctx.mesh))
