"""Training: one train-state pytree, a jitted SGD step with on-device augmentation, jitted evaluation.

The optimizer is PyTorch's SGD as the reference codes use it: weight decay added to the gradient,
heavy-ball momentum, then the learning rate. The learning rate is an argument of the step rather
than a schedule baked into it, so one compiled step serves every cycle whatever the size of the
labelled set (a multi-step schedule in epochs is evaluated on the host once per epoch).

With a loss-prediction module (LL4AL, LPLgrad) the step trains it jointly: target loss + weight *
ranking loss of the predicted losses, the block features detached after `detach_epoch`.

Data parallel (`mesh`): the batch is split over the mesh's `data` axis and the parameters are
replicated; the jitted step is the same program, and the compiler all-reduces the gradients and the
BatchNorm batch statistics, so a step on D devices computes what one device computes for the same
global batch (to float rounding). The batch is rounded up to a multiple of D (`epoch_batches`).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxal import parallel
from jaxal.losses import cross_entropy
from jaxal.models import LossNet, init_variables


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict  # {"model": classifier parameters, "lossnet": loss-prediction module ({} if none)}
    batch_stats: Any
    opt_state: Any


@flax.struct.dataclass
class TrainOptions:
    """Everything the compiled step depends on; hashable, so it is a static argument."""

    momentum: float = flax.struct.field(pytree_node=False, default=0.9)
    weight_decay: float = flax.struct.field(pytree_node=False, default=5e-4)
    augmentation: str = flax.struct.field(pytree_node=False, default="none")
    crop_padding: int = flax.struct.field(pytree_node=False, default=4)
    lossnet_margin: float = flax.struct.field(pytree_node=False, default=1.0)
    lossnet_weight: float = flax.struct.field(pytree_node=False, default=1.0)


def sgd(momentum: float, weight_decay: float) -> optax.GradientTransformation:
    """SGD without the learning rate: g + wd * p, then momentum (torch.optim.SGD's order)."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum))


def create_train_state(model: nn.Module, lossnet: Optional[LossNet], rng: jax.Array, input_shape,
                       options: TrainOptions) -> TrainState:
    """A freshly initialised state; compiled once per (model, loss module, shape, options)."""
    return _create_train_state(model, lossnet, rng, tuple(input_shape), options)


@functools.partial(jax.jit, static_argnames=("model", "lossnet", "input_shape", "options"))
def _create_train_state(model, lossnet, rng, input_shape, options) -> TrainState:
    model_rng, lossnet_rng = jax.random.split(rng)
    variables = init_variables(model, model_rng, input_shape)
    params = {"model": variables["params"], "lossnet": {}}
    if lossnet is not None:
        blocks = model.apply(variables, jnp.zeros((1, *input_shape)), train=False).blocks
        params["lossnet"] = lossnet.init(lossnet_rng, blocks)["params"]
    opt_state = sgd(options.momentum, options.weight_decay).init(params)
    return TrainState(jnp.zeros((), jnp.int32), params, variables["batch_stats"], opt_state)


def multistep_lr(base_lr: float, milestones, gamma: float, epoch: int) -> float:
    """Learning rate of `epoch` (0-based) under torch's MultiStepLR."""
    return base_lr * gamma ** sum(epoch >= m for m in milestones)


# ---- augmentation ---------------------------------------------------------------------------------


def _random_crop(rng, image, padding: int):
    height, width = image.shape[:2]
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    dy, dx = jax.random.randint(rng, (2,), 0, 2 * padding + 1)
    return jax.lax.dynamic_slice(padded, (dy, dx, 0), (height, width, image.shape[2]))


def _random_flip(rng, image):
    return jnp.where(jax.random.bernoulli(rng), image[:, ::-1], image)


def augment(rng: jax.Array, images: jax.Array, mode: str, padding: int) -> jax.Array:
    """On-device augmentation, independent per example: "none", "crop" or "crop_flip"."""
    if mode == "none":
        return images
    crop_rngs, flip_rngs = jnp.split(jax.random.split(rng, 2 * images.shape[0]), 2)
    images = jax.vmap(functools.partial(_random_crop, padding=padding))(crop_rngs, images)
    if mode == "crop_flip":
        images = jax.vmap(_random_flip)(flip_rngs, images)
    elif mode != "crop":
        raise ValueError(f"unknown augmentation {mode!r}; choose none, crop or crop_flip")
    return images


# ---- losses ---------------------------------------------------------------------------------------


def loss_prediction_loss(predicted: jax.Array, target: jax.Array, margin: float) -> jax.Array:
    """LL4AL's pairwise margin ranking loss (`LossPredLoss` of the reference code).

    Example i is paired with example n-1-i (the batch against its reverse). The reference asserts an
    even batch; with an odd batch the middle example has no partner and is left out of the pairs,
    so any batch of two or more works. The target losses are never differentiated.
    """
    half = predicted.shape[0] // 2
    predicted_diff = (predicted - predicted[::-1])[:half]
    target_diff = jax.lax.stop_gradient((target - target[::-1])[:half])
    sign = jnp.where(target_diff > 0, 1.0, -1.0)  # 2 * sign(clamp(target, min=0)) - 1
    return jnp.sum(jnp.maximum(margin - sign * predicted_diff, 0.0)) / max(half, 1)


# ---- steps ----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model", "lossnet", "options", "mesh"), donate_argnames=("state",))
def train_step(state: TrainState, images: jax.Array, labels: jax.Array, indices: jax.Array, rng: jax.Array,
               lr: jax.Array, detach_features: jax.Array, *, model: nn.Module, lossnet: Optional[LossNet],
               options: TrainOptions, mesh=None) -> tuple[TrainState, dict]:
    """One SGD step on the examples `indices` of the (device-resident) labelled pool. With a `mesh`
    the batch is split over `data` and the new state is replicated (see the module docstring)."""
    augment_rng, dropout_rng = jax.random.split(rng)
    x, y = parallel.constrain_batch((images[indices], labels[indices]), mesh)
    x = augment(augment_rng, x, options.augmentation, options.crop_padding)

    def loss_fn(params):
        output, updates = model.apply({"params": params["model"], "batch_stats": state.batch_stats}, x,
                                      train=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
        per_example = jax.vmap(cross_entropy)(output.logits, y)
        loss = jnp.mean(per_example)
        metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(output.logits, -1) == y)}
        if lossnet is not None:
            blocks = [jnp.where(detach_features, jax.lax.stop_gradient(b), b) for b in output.blocks]
            predicted = lossnet.apply({"params": params["lossnet"]}, blocks)
            ranking = loss_prediction_loss(predicted, per_example, options.lossnet_margin)
            loss = loss + options.lossnet_weight * ranking
            metrics["ranking_loss"] = ranking
        return loss, (updates["batch_stats"], metrics)

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = sgd(options.momentum, options.weight_decay).update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
    return parallel.constrain_replicated((TrainState(state.step + 1, params, batch_stats, opt_state), metrics), mesh)


def epoch_batches(rng: np.random.Generator, labeled: np.ndarray, batch_size: int, multiple: int = 1) -> np.ndarray:
    """(num_batches, batch) indices covering a shuffled labelled set once.

    Like a PyTorch DataLoader without drop_last, every example is seen once per epoch; the last
    batch is filled up from the start of the permutation so that every batch has the same shape
    and the step compiles once. The batch is rounded up to a multiple of `multiple` (the device
    count of a data-parallel run), so a few examples of the epoch may be seen twice.
    """
    order = rng.permutation(labeled)
    batch = parallel.round_up(min(batch_size, len(order)), multiple)
    num_batches = -(-len(order) // batch)
    return np.resize(order, num_batches * batch).reshape(num_batches, batch).astype(np.int32)


def train_model(state: TrainState, images: jax.Array, labels: jax.Array, labeled: np.ndarray, *,
                model: nn.Module, lossnet: Optional[LossNet], options: TrainOptions, epochs: int,
                batch_size: int, lr: float, lr_milestones, lr_gamma: float, detach_epoch: int,
                seed: int, mesh=None) -> tuple[TrainState, dict]:
    """Train for `epochs` over the labelled indices; returns the state and the last epoch's metrics.
    With a `mesh`: data parallel, the state comes back replicated over it."""
    host_rng = np.random.default_rng(seed)
    # The whole pool on every device (the step gathers its batch there); the state replicated.
    state, images, labels = parallel.replicate((state, images, labels), mesh)
    key = jax.random.key(seed)
    metrics = {}
    for epoch in range(epochs):
        epoch_lr = jnp.float32(multistep_lr(lr, lr_milestones, lr_gamma, epoch))
        detach = jnp.asarray(epoch > detach_epoch)  # the reference's `epoch > epoch_loss`
        sums = {}
        batches = epoch_batches(host_rng, labeled, batch_size, parallel.mesh_size(mesh))
        for batch in batches:
            key, step_key = jax.random.split(key)
            batch, step_key, epoch_lr, detach = parallel.replicate((batch, step_key, epoch_lr, detach), mesh)
            state, step_metrics = train_step(state, images, labels, batch, step_key, epoch_lr, detach,
                                             model=model, lossnet=lossnet, options=options, mesh=mesh)
            sums = {k: sums.get(k, 0.0) + v for k, v in step_metrics.items()}
        metrics = {k: float(v) / len(batches) for k, v in sums.items()}
        if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(f"training diverged: the mean loss of epoch {epoch} is {metrics['loss']}; "
                                     f"lower --lr (now {lr}) or check the data")
    return state, metrics


# ---- inference ------------------------------------------------------------------------------------


def _predict_chunk(model: nn.Module, variables, xs) -> tuple[jax.Array, jax.Array]:
    output = model.apply(variables, xs, train=False)
    return output.logits, output.features


def predict(model: nn.Module, variables: dict, xs, batch_size: int = 512, *, mesh=None) -> tuple[jax.Array, jax.Array]:
    """(logits, penultimate features) in inference mode, in fixed-size chunks through
    `parallel.map_chunks` (one compilation; the padding dropped; with a mesh, sharded over devices)."""
    if xs.shape[0] == 0:
        shapes = jax.eval_shape(lambda x: model.apply(variables, x, train=False), jnp.zeros((1, *xs.shape[1:])))
        return jnp.zeros((0, *shapes.logits.shape[1:])), jnp.zeros((0, *shapes.features.shape[1:]))
    return parallel.map_chunks(_predict_chunk, model, variables, xs, chunk_size=batch_size, mesh=mesh)


def accuracy(model: nn.Module, variables: dict, xs, ys, batch_size: int = 512, *, mesh=None) -> float:
    logits, _ = predict(model, variables, xs, batch_size, mesh=mesh)
    return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(ys)))


def model_variables(state: TrainState) -> dict:
    return {"params": state.params["model"], "batch_stats": state.batch_stats}
