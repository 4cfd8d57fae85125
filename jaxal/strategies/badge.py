"""BADGE: Batch Active learning by Diverse Gradient Embeddings (Ash et al., ICLR 2020).

Each pool example is embedded by the gradient of the cross-entropy at its pseudo-label
y^ = argmax p with respect to the weight of the last layer (`head`):

    g_i = a_i (x) h_i,    a_i = p_i - e_{y^_i} (C,),    h_i = penultimate features (d,),

(the reference code stores -g_i, which changes no distance). As in the reference code only the weight
is used; `include_bias=True` appends 1 to h_i, which adds the bias gradient a_i to the embedding.
The batch is the k-means++ seeding of the g_i, exactly as the reference's `init_centers`: the first
center is the embedding of largest norm, each next one is drawn with probability proportional to
D(x)^2, its squared distance to the nearest chosen center, and no point is chosen twice.

The C*d-dimensional embeddings are never built: squared distances factorise as
    ||g_i - g_j||^2 = ||a_i||^2 ||h_i||^2 + ||a_j||^2 ||h_j||^2 - 2 (a_i . a_j)(h_i . h_j),
so each pick costs O(n (C + d)). The seeding is one jitted `fori_loop` over k on device, sampling with
`jax.random.categorical` on log D^2, compiled once per run (the pool padded to a fixed size with a mask),
its products at `--precision.solvers` ("highest").
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxal import parallel
from jaxal import precision as precision_lib
from jaxal.strategies.base import Selection, StrategyContext, register_selector
from jaxal.train import predict

def gradient_embedding_factors(logits: jax.Array, features: jax.Array, include_bias: bool = False
                               ) -> tuple[jax.Array, jax.Array]:
    """(a, h) with g_i = a_i (x) h_i the last-layer gradient at the arg-max pseudo-label."""
    probs = jax.nn.softmax(logits)
    a = probs - jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=probs.dtype)
    h = features
    if include_bias:
        h = jnp.concatenate([h, jnp.ones((h.shape[0], 1), h.dtype)], axis=-1)
    return a, h


def factorised_squared_distances(a: jax.Array, h: jax.Array, center_a: jax.Array, center_h: jax.Array) -> jax.Array:
    """(n, m) squared distances between the embeddings a_i (x) h_i and center_a_j (x) center_h_j,
    without building any embedding. Clamped at 0 against rounding."""
    sq_a = jnp.sum(a * a, -1) * jnp.sum(h * h, -1)
    sq_c = jnp.sum(center_a * center_a, -1) * jnp.sum(center_h * center_h, -1)
    cross = jnp.dot(a, center_a.T) * jnp.dot(h, center_h.T)
    return jnp.maximum(sq_a[:, None] + sq_c[None, :] - 2.0 * cross, 0.0)


def kmeans_pp_seeding(a: jax.Array, h: jax.Array, k: int, rng: jax.Array, mesh=None, *,
                      capacity: Optional[int] = None, precision: str = precision_lib.SOLVERS_DEFAULT) -> jax.Array:
    """k distinct indices: k-means++ seeding of the embeddings a_i (x) h_i, first the largest norm.

    If every unchosen point lies on a chosen center (D^2 = 0 everywhere, e.g. duplicates), the next
    center is drawn uniformly from the unchosen points (where the reference would loop forever).
    The factors enter padded to `jaxal.parallel.bucket(n, capacity)` rows (one compilation per run for
    a pool of up to `capacity`), rounded up to the device count of a mesh, over which they are split;
    padding rows start out "chosen" (probability 0). The draws do not depend on the padding: with -inf
    logits appended, `jax.random.categorical` draws what it draws without them (threefry bits are per
    element). Distances at `precision` (the products a.a' and h.h' of the factorised distance)."""
    n = a.shape[0]
    padded = parallel.round_up(parallel.bucket(n, capacity), parallel.mesh_size(mesh))
    rows = np.minimum(np.arange(padded), n - 1)
    (a, h), valid = parallel.shard_batch(((np.asarray(a)[rows], np.asarray(h)[rows]), np.arange(padded) < n), mesh)
    return _kmeans_pp_seeding(a, h, valid, k, parallel.replicate(rng, mesh), mesh, precision)


@functools.partial(jax.jit, static_argnums=(3, 5, 6))
def _kmeans_pp_seeding(a, h, valid, k, rng, mesh, precision):
    with precision_lib.scope(precision):
        rows = jnp.arange(a.shape[0])
        norms = jnp.where(valid, jnp.sum(a * a, -1) * jnp.sum(h * h, -1), -jnp.inf)
        first = jnp.argmax(norms)

        def distances_to(j):
            center_a, center_h = parallel.select_row(a, j), parallel.select_row(h, j)
            return factorised_squared_distances(a, h, center_a[None], center_h[None])[:, 0]

        def pick(i, carry):
            min_d2, chosen, indices, key = carry
            key, sub = jax.random.split(key)
            d2 = jnp.where(chosen, 0.0, min_d2)
            positive = jnp.sum(d2) > 0
            logits = jnp.where(chosen, -jnp.inf,
                               jnp.where(positive, jnp.log(jnp.where(d2 > 0, d2, 0.0)), 0.0))
            j = jax.random.categorical(sub, logits)
            return (jnp.minimum(min_d2, distances_to(j)), chosen | (rows == j), indices.at[i].set(j), key)

        init = (distances_to(first), ~valid | (rows == first),
                jnp.zeros((k,), jnp.int32).at[0].set(first.astype(jnp.int32)), rng)
        _, _, indices, _ = jax.lax.fori_loop(1, k, pick, init)
        return parallel.constrain_replicated(indices, mesh)


def badge_select_from_outputs(logits: jax.Array, features: jax.Array, k: int, rng: jax.Array,
                              include_bias: bool = False, mesh=None, *, capacity: Optional[int] = None,
                              precision: str = precision_lib.SOLVERS_DEFAULT) -> np.ndarray:
    if k > logits.shape[0]:
        raise ValueError(f"cannot select {k} samples from a pool of {logits.shape[0]}")
    a, h = gradient_embedding_factors(logits, features, include_bias)
    return np.asarray(kmeans_pp_seeding(a, h, k, rng, mesh, capacity=capacity, precision=precision))


@register_selector("badge", needs=("features",), task_note=(
    "BADGE's embedding is the last layer's gradient at the pseudo-label, one rank-one C x d matrix per "
    "example, which its distances factorise; an image's is a sum over its pixels (full rank), not implemented"))
def badge(ctx: StrategyContext, k: int) -> np.ndarray:
    """k-means++ seeding on last-layer gradient embeddings at the pseudo-label (BADGE, Ash et al. 2020)."""
    logits, features = predict(ctx.model, ctx.variables, ctx.pool_x, ctx.config.eval_batch_size, mesh=ctx.mesh)
    return Selection(badge_select_from_outputs(logits, features, k, ctx.rng, mesh=ctx.mesh, capacity=ctx.config.subset_size,
                                     precision=ctx.config.precision.solvers))
