"""Baselines the papers compare against: random, uncertainty (entropy, margin, least confidence) and
coreset (greedy k-center of Sener & Savarese on penultimate features).

coreset compiles its selection loop once per run: the pool and the labelled features are padded to
fixed sizes (`jaxal.parallel.bucket`: the scored subset, the run's largest labelled set) with masks and
a traced count, and its distances run at `--precision.solvers` ("highest": a TF32 `a.b` in
`|a|^2 + |b|^2 - 2 a.b` loses the distance between nearby points)."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxal import parallel
from jaxal import precision as precision_lib
from jaxal.config import max_labeled
from jaxal.padding import pad_rows
from jaxal.strategies.base import ALL_TASKS, Scores, Selection, StrategyContext, register_scorer, register_selector
from jaxal.train import features


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
    # Drawn at a bucketed size (one program per run) and cut: threefry's bits are per element, so the
    # first n draws are those of a draw of n.
    n = ctx.pool_x.shape[0]
    return Scores(np.asarray(jax.random.uniform(ctx.rng, (parallel.bucket(n, ctx.config.subset_size),)))[:n])


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
    return Scores(uncertainty_scores(ctx, entropy_of))


@register_scorer("margin", tasks=ALL_TASKS)
def margin_scores(ctx: StrategyContext):
    """Smallest gap between the two most probable classes."""
    return Scores(-uncertainty_scores(ctx, margin_of))


@register_scorer("least_confidence", tasks=ALL_TASKS)
def least_confidence_scores(ctx: StrategyContext):
    """Lowest probability of the predicted class."""
    return Scores(-uncertainty_scores(ctx, confidence_of))


# ---- coreset -------------------------------------------------------------------------------------


def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    sq = jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :] - 2.0 * a @ b.T
    return jnp.maximum(sq, 0.0)


def min_squared_distances(points: jax.Array, centers: jax.Array, chunk_size: int = 512, num_centers=None) -> jax.Array:
    """For every point, the squared distance to its nearest center among the first `num_centers` rows of
    `centers` (default: all; traced: the loop runs over the chunks holding real centers only), scanning
    the centers in chunks so that at most (n_points x chunk_size) distances exist at once (never n x n).
    The last chunk is shifted back to end at the array's end, never padded: a center seen twice changes
    no minimum. For use inside jitted functions; +inf where there is no center."""
    m = centers.shape[0]
    real = m if num_centers is None else num_centers
    size = min(chunk_size, m)

    def body(i, best):
        start = jnp.minimum(i * size, m - size)
        chunk = jax.lax.dynamic_slice_in_dim(centers, start, size)
        d2 = jnp.where((start + jnp.arange(size))[None, :] < real, _squared_distances(points, chunk), jnp.inf)
        return jnp.minimum(best, jnp.min(d2, axis=1))

    init = jnp.full((points.shape[0],), jnp.inf, points.dtype)
    return jax.lax.fori_loop(0, (real + size - 1) // size, body, init) if m else init


def greedy_k_center(pool_features: jax.Array, labeled_features: jax.Array, k: int, mesh=None, *,
                    pool_capacity: Optional[int] = None, labeled_capacity: Optional[int] = None,
                    precision: str = precision_lib.SOLVERS_DEFAULT) -> jax.Array:
    """Sener & Savarese's greedy 2-approximation: repeatedly take the pool point farthest from every
    labelled or already chosen point. One jitted loop over k; O(n_pool * d) per pick. The pool and the
    labelled features enter padded (`jaxal.parallel.bucket` with the capacities, e.g. the scored subset
    and the run's largest labelled set: one compilation per run), the padding masked out (never picked,
    never a center). With a mesh the pool features are split over devices. Distances at `precision`."""
    n = pool_features.shape[0]
    if k > n:
        raise ValueError(f"cannot select {k} samples from a pool of {n}")
    padded = parallel.round_up(parallel.bucket(n, pool_capacity), parallel.mesh_size(mesh))
    pool, weights = pad_rows(np.asarray(pool_features), padded)
    pool, valid = parallel.shard_batch((pool, weights > 0), mesh)
    m = labeled_features.shape[0]
    centers, _ = pad_rows(np.asarray(labeled_features), parallel.bucket(m, labeled_capacity))
    return _greedy_k_center(pool, valid, *parallel.replicate((centers, m), mesh), k, mesh, precision)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _greedy_k_center(pool_features, valid, labeled_features, num_labeled, k, mesh, precision):
    with precision_lib.scope(precision):
        distances = min_squared_distances(pool_features, labeled_features, num_centers=num_labeled)
        distances = jnp.where(valid, distances, -jnp.inf)  # below every chosen point's -1
        rows = jnp.arange(pool_features.shape[0])

        def pick(i, carry):
            distances, chosen = carry
            j = jnp.argmax(distances)
            new = jnp.sum((pool_features - parallel.select_row(pool_features, j)[None, :]) ** 2, axis=-1)
            return jnp.where(rows == j, -1.0, jnp.minimum(distances, new)), chosen.at[i].set(j.astype(chosen.dtype))  # argmax is int64 under x64

        _, chosen = jax.lax.fori_loop(0, k, pick, (distances, jnp.zeros((k,), jnp.int32)))
        return parallel.constrain_replicated(chosen, mesh)


@register_selector("coreset", needs=("features",), tasks=ALL_TASKS)
def coreset_select(ctx: StrategyContext, k: int) -> np.ndarray:
    """Greedy k-center on penultimate features (Sener & Savarese)."""
    # Segmentation models' features are their last feature map averaged over its pixels.
    pool_features = features(ctx.model, ctx.variables, ctx.pool_x, ctx.config.eval_batch_size, mesh=ctx.mesh)
    labeled_features = features(ctx.model, ctx.variables, ctx.labeled_x, ctx.config.eval_batch_size,
                                mesh=ctx.mesh)
    return Selection(np.asarray(greedy_k_center(pool_features, labeled_features, k, ctx.mesh,
                                      pool_capacity=ctx.config.subset_size, labeled_capacity=max_labeled(ctx.config),
                                      precision=ctx.config.precision.solvers)))
