"""BALD with MC dropout (Gal, Islam & Ghahramani, ICML 2017; Houlsby et al. 2011).

The score of x is the mutual information between its label and the model parameters, estimated from
T stochastic forward passes with dropout on (`mc_dropout=True`: dropout sampled, BatchNorm in inference
mode):

    BALD(x) = H[mean_t p_t(x)] - mean_t H[p_t(x)],    p_t = softmax(logits of pass t).

All T passes of a chunk run on device in one jitted call, and the pool is scored in fixed-size chunks
with one compilation (as `jaxal.train.predict`).

Two equivalent ways to run a pass (`method`):
  - "features" (default for the jaxal models): every jaxal classifier applies its only dropout to the
    penultimate features right before the `head` Dense layer, and BatchNorm is in inference mode in
    both regimes, so the features are deterministic. They are computed ONCE per chunk, and only
    dropout + `head` (the `head` parameters applied directly) are re-run T times, all T at once (`vmap`
    over the dropout keys): T passes cost about one forward pass plus T small matrix products.
  - "full": T full forward passes with `mc_dropout=True` (a `lax.map` over the T keys, so only one
    pass's activations are live at a time); any model whose `__call__` accepts
    `mc_dropout` works. Used automatically for models other than jaxal's MLP, SmallCNN, ResNet18, VGG16.

Dropout randomness is drawn per (pass t, pool index i) from `dropout_key(rng, t, i)` and applied to a
batch of one, so the score of an example depends neither on the chunk size nor on its chunk, and
both methods draw bit-identical masks (the tests check them against each other and against a NumPy
computation from T full passes).
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxal.config import Config
from jaxal.models import MLP, VGG16, ResNet18, SmallCNN
from jaxal.strategies.base import StrategyContext, register_scorer

# Models whose only dropout sits on the penultimate features, directly before `head`.
HEAD_DROPOUT_MODELS = (MLP, SmallCNN, ResNet18, VGG16)
METHODS = ("auto", "features", "full")


def map_pool_chunks(fn: Callable[[jax.Array, jax.Array], jax.Array], xs, chunk_size: int) -> jax.Array:
    """`fn(chunk, start)` over fixed-size chunks of `xs` (the last one zero-padded, the padding dropped)
    and concatenated, so a jitted `fn` compiles once for every pool larger than `chunk_size`. `start` is
    the pool index of the chunk's first row (an int32 scalar, traced)."""
    n = xs.shape[0]
    if n == 0:
        raise ValueError("cannot score an empty pool")
    outputs = []
    for start in range(0, n, chunk_size):
        chunk = jnp.asarray(xs[start:start + chunk_size])
        real = chunk.shape[0]
        if real < chunk_size and n > chunk_size:
            chunk = jnp.concatenate([chunk, jnp.zeros((chunk_size - real, *chunk.shape[1:]), chunk.dtype)])
        outputs.append(fn(chunk, jnp.int32(start))[:real])
    return jnp.concatenate(outputs)


def dropout_key(rng: jax.Array, t, i) -> jax.Array:
    """The dropout key of MC pass `t` for pool example `i`."""
    return jax.random.fold_in(jax.random.fold_in(rng, t), i)


def mutual_information(probs: jax.Array) -> jax.Array:
    """BALD from sampled probabilities (T, n, C): H[mean_t p_t] - mean_t H[p_t]."""
    def entropy(p):
        return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)

    return entropy(jnp.mean(probs, axis=0)) - jnp.mean(entropy(probs), axis=0)


class _DropoutHead(nn.Module):
    """The tail of every jaxal classifier: Dropout (top-level, hence `Dropout_0` as in the models, so the
    same key draws the same mask) then the Dense `head`."""

    rate: float
    num_classes: int

    @nn.compact
    def __call__(self, features):
        h = nn.Dropout(self.rate, deterministic=False)(features)
        return nn.Dense(self.num_classes, name="head")(h)


def _resolve_method(model: nn.Module, method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown BALD method {method!r}; choose one of: {', '.join(METHODS)}")
    if method == "auto":
        return "features" if type(model) in HEAD_DROPOUT_MODELS else "full"
    if method == "features" and type(model) not in HEAD_DROPOUT_MODELS:
        raise ValueError(f"method='features' needs dropout directly before `head` as in "
                         f"{', '.join(m.__name__ for m in HEAD_DROPOUT_MODELS)}; use method='full'")
    return method


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "method"))
def _mc_probabilities_chunk(variables, xs, start, rng, *, model: nn.Module, num_samples: int,
                            method: str) -> jax.Array:
    """(T, chunk, C) softmax outputs of T MC-dropout passes over one chunk."""
    indices = start + jnp.arange(xs.shape[0], dtype=jnp.int32)
    passes = jnp.arange(num_samples, dtype=jnp.int32)
    keys = jax.vmap(lambda t: jax.vmap(lambda i: dropout_key(rng, t, i))(indices))(passes)  # (T, chunk)
    if method == "features":
        features = model.apply(variables, xs, train=False).features
        tail = _DropoutHead(model.dropout_rate, variables["params"]["head"]["bias"].shape[-1])
        head = {"params": {"head": variables["params"]["head"]}}

        def one(key, f):
            return tail.apply(head, f[None], rngs={"dropout": key})[0]

        logits = jax.vmap(jax.vmap(one, in_axes=(0, 0)), in_axes=(0, None))(keys, features)
    else:
        def one(key, x):
            return model.apply(variables, x[None], train=False, mc_dropout=True, rngs={"dropout": key}).logits[0]

        # One pass at a time over the chunk (a scan over T): T full activations never coexist.
        logits = jax.lax.map(lambda pass_keys: jax.vmap(one)(pass_keys, xs), keys)
    return jax.nn.softmax(logits)


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "method"))
def _bald_chunk(variables, xs, start, rng, *, model, num_samples, method):
    return mutual_information(_mc_probabilities_chunk(variables, xs, start, rng, model=model,
                                                      num_samples=num_samples, method=method))


def mc_dropout_probabilities(model: nn.Module, variables: dict, xs, rng: jax.Array, num_samples: int, *,
                             chunk_size: int = 512, method: str = "auto") -> jax.Array:
    """(T, n, C) class probabilities of T MC-dropout passes over `xs`."""
    method = _resolve_method(model, method)
    fn = functools.partial(_mc_probabilities_chunk, model=model, num_samples=num_samples, method=method)
    chunks = map_pool_chunks(lambda c, s: jnp.moveaxis(fn(variables, c, s, rng), 0, 1), xs, chunk_size)
    return jnp.moveaxis(chunks, 1, 0)


def bald_scores(model: nn.Module, variables: dict, xs, rng: jax.Array, num_samples: int, *,
                chunk_size: int = 512, method: str = "auto") -> jax.Array:
    """(n,) BALD mutual information of every example of `xs` from `num_samples` MC-dropout passes."""
    method = _resolve_method(model, method)
    fn = functools.partial(_bald_chunk, model=model, num_samples=num_samples, method=method)
    return map_pool_chunks(lambda c, s: fn(variables, c, s, rng), xs, chunk_size)


def _check(config: Config) -> None:
    if config.bald_samples < 2:
        raise ValueError(f"--bald_samples must be at least 2 (with one pass BALD is 0), got {config.bald_samples}")


@register_scorer("bald", needs_dropout=True, check=_check)
def bald(ctx: StrategyContext):
    """Largest mutual information between label and weights under MC dropout (BALD, Gal et al. 2017)."""
    return bald_scores(ctx.model, ctx.variables, ctx.pool_x, ctx.rng, ctx.config.bald_samples,
                       chunk_size=ctx.config.eval_batch_size)
