"""BALD with MC dropout (Gal, Islam & Ghahramani, ICML 2017; Houlsby et al. 2011).

The score of x is the mutual information between its label and the model parameters, estimated from
T stochastic forward passes with dropout on (`mc_dropout=True`: dropout sampled, BatchNorm in inference
mode):

    BALD(x) = H[mean_t p_t(x)] - mean_t H[p_t(x)],    p_t = softmax(logits of pass t).

All T passes of a chunk run on device in one jitted call, and the pool is scored in fixed-size chunks
with one compilation by `jaxal.parallel.map_chunks` (sharded over the devices of a mesh).

Two equivalent ways to run a pass (`method`):
  - "features" (default for the jaxal models): every jaxal classifier applies its only dropout to the
    penultimate features right before the `head` Dense layer, and BatchNorm is in inference mode in
    both regimes, so the features are deterministic. They are computed ONCE per chunk, and only
    dropout + `head` (the `head` parameters applied directly) are re-run T times, all T at once (`vmap`
    over the dropout keys): T passes cost about one forward pass plus T small matrix products.
  - "full": T full forward passes with `mc_dropout=True` (a scan over the T keys that keeps running sums
    of the probabilities and their entropies, so only one pass's activations and outputs are live at a
    time); any model whose `__call__` accepts `mc_dropout` works. Used automatically for models other
    than jaxal's MLP, SmallCNN, ResNet18, VGG16 (the DRN segmenter's dropout is on its last feature map,
    per pixel, so its passes are full passes).

Segmentation: the mutual information is computed per pixel and averaged over the image's pixels (the
task's `reduce_outputs`).

Dropout randomness is drawn per (pass t, pool index i) from `dropout_key(rng, t, i)` and applied to a
batch of one, so the score of an example depends neither on the chunk size nor on its chunk, and
both methods draw bit-identical masks (the tests check them against each other and against a NumPy
computation from T full passes).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxal import parallel
from jaxal.config import Config
from jaxal.models import MLP, VGG16, ResNet18, SmallCNN, base_model
from jaxal.strategies.base import ALL_TASKS, Scores, StrategyContext, register_scorer
from jaxal.tasks import Classification

# Models whose only dropout sits on the penultimate features, directly before `head`.
HEAD_DROPOUT_MODELS = (MLP, SmallCNN, ResNet18, VGG16)
METHODS = ("auto", "features", "full")


def dropout_key(rng: jax.Array, t, i) -> jax.Array:
    """The dropout key of MC pass `t` for pool example `i`."""
    return jax.random.fold_in(jax.random.fold_in(rng, t), i)


def _entropy(p: jax.Array) -> jax.Array:
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


def mutual_information(probs: jax.Array) -> jax.Array:
    """BALD from sampled probabilities (T, n, ..., C): H[mean_t p_t] - mean_t H[p_t], per output."""
    return _entropy(jnp.mean(probs, axis=0)) - jnp.mean(_entropy(probs), axis=0)


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
        return "features" if type(base_model(model)) in HEAD_DROPOUT_MODELS else "full"
    if method == "features" and type(base_model(model)) not in HEAD_DROPOUT_MODELS:
        raise ValueError(f"method='features' needs dropout directly before `head` as in "
                         f"{', '.join(m.__name__ for m in HEAD_DROPOUT_MODELS)}; use method='full'")
    return method


def _mc_probabilities_chunk(variables, xs, indices, rng, *, model: nn.Module, num_samples: int,
                            method: str) -> jax.Array:
    """(T, chunk, C) softmax outputs of T MC-dropout passes over one chunk; `indices`: the pool index
    of every row (the padding repeats the last one; its result is dropped)."""
    passes = jnp.arange(num_samples, dtype=jnp.int32)
    keys = jax.vmap(lambda t: jax.vmap(lambda i: dropout_key(rng, t, i))(indices))(passes)  # (T, chunk)
    if method == "features":
        features = model.apply(variables, xs, train=False).features
        tail = _DropoutHead(base_model(model).dropout_rate, variables["params"]["head"]["bias"].shape[-1])
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


def _probabilities_fn(static, consts, chunk):  # map_chunks' contract: the example axis first
    (model, num_samples, method), (variables, rng), (xs, indices) = static, consts, chunk
    probs = _mc_probabilities_chunk(variables, xs, indices, rng, model=model, num_samples=num_samples, method=method)
    return jnp.moveaxis(probs, 0, 1)


def _full_pass_mutual_information(variables, xs, indices, rng, *, model: nn.Module, num_samples: int) -> jax.Array:
    """`mutual_information` of T full MC-dropout passes as running sums over the passes (a scan), so
    memory holds one pass's outputs, not T: a chunk of segmentation outputs is (chunk, H, W, C) per pass.
    The same dropout keys as `_mc_probabilities_chunk`."""
    def one(key, x):
        return model.apply(variables, x[None], train=False, mc_dropout=True, rngs={"dropout": key}).logits[0]

    def add_pass(sums, t):
        keys = jax.vmap(lambda i: dropout_key(rng, t, i))(indices)
        probs = jax.nn.softmax(jax.vmap(one)(keys, xs))
        return (sums[0] + probs, sums[1] + _entropy(probs)), None

    shapes = jax.eval_shape(lambda: jax.vmap(one)(jax.vmap(lambda i: dropout_key(rng, 0, i))(indices), xs))
    init = (jnp.zeros(shapes.shape, shapes.dtype), jnp.zeros(shapes.shape[:-1], shapes.dtype))
    (total, total_entropy), _ = jax.lax.scan(add_pass, init, jnp.arange(num_samples, dtype=jnp.int32))
    return _entropy(total / num_samples) - total_entropy / num_samples


def _bald_fn(static, consts, chunk):
    """Per-example BALD: per-output mutual information, reduced by the task (the mean over pixels)."""
    model, num_samples, method, task = static
    if method == "full":
        (variables, rng), (xs, indices) = consts, chunk
        information = _full_pass_mutual_information(variables, xs, indices, rng, model=model,
                                                    num_samples=num_samples)
    else:
        information = mutual_information(jnp.moveaxis(_probabilities_fn(static[:3], consts, chunk), 1, 0))
    return task.reduce_outputs(information)


def _map_pool(fn, model, variables, xs, rng, num_samples, chunk_size, method, mesh, task=None):
    static = (model, num_samples, _resolve_method(model, method)) + (() if task is None else (task,))
    indices = jnp.arange(xs.shape[0], dtype=jnp.int32)
    return parallel.map_chunks(fn, static, (variables, rng), (xs, indices), chunk_size=chunk_size, mesh=mesh)


def mc_dropout_probabilities(model: nn.Module, variables: dict, xs, rng: jax.Array, num_samples: int, *,
                             chunk_size: int = 512, method: str = "auto", mesh=None) -> jax.Array:
    """(T, n, C) class probabilities of T MC-dropout passes over `xs`."""
    probs = _map_pool(_probabilities_fn, model, variables, xs, rng, num_samples, chunk_size, method, mesh)
    return jnp.moveaxis(probs, 1, 0)


def bald_scores(model: nn.Module, variables: dict, xs, rng: jax.Array, num_samples: int, *,
                chunk_size: int = 512, method: str = "auto", mesh=None, task=None) -> jax.Array:
    """(n,) BALD mutual information of every example of `xs` from `num_samples` MC-dropout passes;
    for a segmentation `task` the per-pixel mutual information averaged over each image's pixels."""
    task = Classification(0) if task is None else task  # its reduction over outputs: the identity
    return _map_pool(_bald_fn, model, variables, xs, rng, num_samples, chunk_size, method, mesh, task)


def _check(config: Config) -> None:
    if config.bald_samples < 2:
        raise ValueError(f"--bald_samples must be at least 2 (with one pass BALD is 0), got {config.bald_samples}")


@register_scorer("bald", needs_dropout=True, check=_check, tasks=ALL_TASKS)
def bald(ctx: StrategyContext):
    """Largest mutual information between label and weights under MC dropout (BALD, Gal et al. 2017)."""
    return Scores(bald_scores(ctx.model, ctx.variables, ctx.pool_x, ctx.rng, ctx.config.bald_samples,
                       chunk_size=ctx.config.eval_batch_size, mesh=ctx.mesh, task=ctx.task))
