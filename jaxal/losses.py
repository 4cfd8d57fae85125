"""Losses of ONE example's logits (shape (C,)), shared by training, the gradient engine and the
influence engine. Batches take `jax.vmap` of them.

exp-gn as written equals ent-gn (docs/design.md, section 1): `expected_loss` is the reference
code's posterior-weighted cross-entropy, and with the posterior differentiated it is exactly the
entropy; the tests compare the two implementations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, label) -> jax.Array:
    """CE of one example with an integer `label`."""
    return jax.nn.logsumexp(logits) - jnp.take(logits, label)


def entropy_loss(logits: jax.Array) -> jax.Array:
    """-sum p log p (ent-gn; the query loss of LPLgrad)."""
    log_p = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.exp(log_p) * log_p)


def expected_loss(logits: jax.Array, detach_posterior: bool = False) -> jax.Array:
    """sum_i p_i CE(logits, i) (exp-gn), written as the reference code does: the posterior-weighted
    cross-entropy of every class. With the posterior differentiated (the reference) this is exactly the
    entropy; with `detach_posterior=True` its logit gradient is p - p = 0."""
    posterior = jax.nn.softmax(logits)
    if detach_posterior:
        posterior = jax.lax.stop_gradient(posterior)
    losses = jax.vmap(lambda label: cross_entropy(logits, label))(jnp.arange(logits.shape[-1]))
    return jnp.sum(posterior * losses)


def pseudo_label_cross_entropy(logits: jax.Array) -> jax.Array:
    """`CE(logits, argmax(logits))`: ISAL's loss of an unlabelled point. The arg-max is piecewise
    constant, so it carries no gradient; the result equals `logsumexp - max`."""
    return cross_entropy(logits, jax.lax.stop_gradient(jnp.argmax(logits)))
