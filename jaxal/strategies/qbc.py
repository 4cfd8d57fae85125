"""QBC: query by committee (Seung et al. 1992), as Wang et al. (AAAI 2022) compare with it after Kuo et
al. (MICCAI 2018).

Sources: Wang et al.'s released code (AL-GradNorm, in xulabs/aitom) has no QBC; Kuo et al. released no
code. Their paper trains an ensemble of models on the labelled set and ranks by the ensemble's
Jensen-Shannon divergence. jaxal's committee: M copies of the task model that differ in initialisation
and in the order of their data (and their dropout and augmentation draws), each trained from scratch on
the labelled set with the loop's recipe (epochs, learning rates, batch size, augmentation) every cycle,
rebuilt from the cycle's strategy key (nothing extra in the checkpoint). The M trainings are ONE jitted
step: `jax.vmap` of `jaxal.train.train_step` over the members (their states stacked on a leading axis),
each member's batch split over the mesh's devices as in the task model's training.

Disagreement over the candidates, p_m the members' class probabilities:
  - "vote_entropy" (default; Dagan & Engelson 1995): the entropy of the vote distribution
    v_c = (number of members whose arg-max is c) / M;
  - "consensus_kl" (McCallum & Nigam 1998): the mean KL divergence of the members from their consensus,
    (1/M) sum_m KL(p_m || mean_m p_m). It equals the generalised Jensen-Shannon divergence
    H(mean p) - mean H(p) that Kuo et al. use (and BALD's formula over committee members), and is
    computed by `bald.mutual_information`.
The members score the pool together in fixed-size chunks (`parallel.map_chunks`, one compilation).
Memory: M train states (parameters and momentum) and M models' activations for a batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxal import parallel
from jaxal.config import Config
from jaxal.strategies.bald import mutual_information
from jaxal.strategies.base import Scores, StrategyContext, register_scorer
from jaxal.train import TrainOptions, create_train_state, epoch_batches, learning_rates, model_variables, train_step

DISAGREEMENTS = ("vote_entropy", "consensus_kl")


def vote_entropy(probs: jax.Array) -> jax.Array:
    """(n,) entropy of the members' votes; `probs` (M, n, C)."""
    num_members, _, num_classes = probs.shape
    votes = jnp.sum(jax.nn.one_hot(jnp.argmax(probs, axis=-1), num_classes, dtype=probs.dtype), axis=0) / num_members
    return -jnp.sum(jnp.where(votes > 0, votes * jnp.log(jnp.where(votes > 0, votes, 1.0)), 0.0), axis=-1)


def consensus_kl(probs: jax.Array) -> jax.Array:
    """(n,) mean KL divergence of the members from their mean; `probs` (M, n, C)."""
    return mutual_information(probs)


DISAGREEMENT_FUNCTIONS = {"vote_entropy": vote_entropy, "consensus_kl": consensus_kl}


# ---- the committee's training -------------------------------------------------------------------------


def create_committee(model, keys: jax.Array, input_shape, options: TrainOptions):
    """M freshly initialised train states stacked on a leading axis, one per key."""
    return jax.vmap(lambda key: create_train_state(model, None, key, input_shape, options))(keys)


@functools.partial(jax.jit, static_argnames=("model", "options", "mesh"), donate_argnames=("states",))
def committee_step(states, x, y, member_keys, step, lr, *, model, options: TrainOptions, mesh=None):
    """`jaxal.train.train_step` of every member at once (vmapped): member m takes its batch `x[m], y[m]`
    and the key fold_in(member_keys[m], step)."""
    def one(state, xs, ys, key):
        return train_step(state, xs, ys, jax.random.fold_in(key, step), lr, jnp.asarray(False), model=model,
                          lossnet=None, options=options, mesh=mesh)

    return jax.vmap(one)(states, x, y, member_keys)


def train_committee(model, states, images, labels, *, member_keys, seeds, options: TrainOptions, config: Config,
                    mesh=None):
    """Train every member for `config.epochs` on all of `images`/`labels` (host arrays), with the loop's
    learning-rate schedule; member m shuffles with its own host generator (seeds[m]). Returns the states."""
    generators = [np.random.default_rng(seed) for seed in seeds]
    states = parallel.replicate(states, mesh)
    member_keys = parallel.replicate(member_keys, mesh)
    stacked = None if mesh is None else NamedSharding(mesh, P(None, parallel.DATA_AXIS))  # members whole
    indices, step = np.arange(len(images)), 0
    for epoch in range(config.epochs):
        lr = learning_rates(config.lr, config.lr_milestones, config.lr_gamma, epoch)
        lr = parallel.replicate(lr, mesh)
        batches = np.stack([epoch_batches(g, indices, config.batch_size, parallel.mesh_size(mesh)) for g in generators])
        for b in range(batches.shape[1]):
            x, y = parallel.put((images[batches[:, b]], labels[batches[:, b]]), stacked)
            states, metrics = committee_step(states, x, y, member_keys, parallel.replicate(np.int32(step), mesh), lr,
                                             model=model, options=options, mesh=mesh)
            step += 1
    if not np.all(np.isfinite(np.asarray(metrics["loss"]))):
        raise FloatingPointError(f"a committee member's training diverged (losses {np.asarray(metrics['loss'])}); "
                                 f"lower --lr (now {config.lr})")
    return states


# ---- scoring ------------------------------------------------------------------------------------------


def _disagreement_chunk(static, member_variables, xs):
    model, disagreement = static
    logits = jax.vmap(lambda variables: model.apply(variables, xs, train=False).logits)(member_variables)
    return DISAGREEMENT_FUNCTIONS[disagreement](jax.nn.softmax(logits))


def committee_disagreement(model, member_variables, xs, disagreement: str, chunk_size: int, mesh=None) -> jax.Array:
    """(n,) disagreement of the members (variables stacked on a leading axis) over `xs`."""
    return parallel.map_chunks(_disagreement_chunk, (model, disagreement), member_variables, xs,
                               chunk_size=chunk_size, mesh=mesh)


def _check(config: Config) -> None:
    if config.qbc.members < 2:
        raise ValueError(f"--qbc.members must be at least 2 (one member cannot disagree), got {config.qbc.members}")
    if config.qbc.disagreement not in DISAGREEMENTS:
        raise ValueError(f"unknown --qbc.disagreement {config.qbc.disagreement!r}; choose one of: "
                         f"{', '.join(DISAGREEMENTS)}")


@register_scorer("qbc", check=_check)
def qbc_scores(ctx: StrategyContext):
    """Largest disagreement of a committee of task models, vote entropy by default (QBC; Kuo et al. 2018)."""
    config, options = ctx.config, ctx.config.qbc
    train_options = ctx.train_options or TrainOptions(config.momentum, config.weight_decay, task=ctx.task,
                                                             optimizer=config.optimizer)
    init_key, step_key, host_key = jax.random.split(ctx.rng, 3)
    states = create_committee(ctx.model, jax.random.split(init_key, options.members), ctx.pool_x.shape[1:],
                              train_options)
    seeds = np.random.default_rng(np.asarray(jax.random.key_data(host_key))).integers(2**31, size=options.members)
    states = train_committee(ctx.model, states, np.asarray(ctx.labeled_x), np.asarray(ctx.labeled_y),
                             member_keys=jax.random.split(step_key, options.members), seeds=seeds,
                             options=train_options, config=config, mesh=ctx.mesh)
    member_variables = parallel.local(model_variables(states))
    return Scores(committee_disagreement(ctx.model, member_variables, ctx.pool_x, options.disagreement,
                                         config.eval_batch_size, ctx.mesh))
