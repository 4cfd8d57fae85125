"""Training: one train-state pytree, a jitted SGD step with on-device augmentation, jitted evaluation.

The optimizer is PyTorch's SGD as the reference codes use it: weight decay added to the gradient,
heavy-ball momentum, then the learning rate. The learning rates are arguments of the step rather than
a schedule baked into it, so one compiled step serves every cycle whatever the size of the labelled
set (a multi-step schedule in epochs is evaluated on the host once per epoch). The classifier and the
loss-prediction module have a learning rate each: LPLgrad's code never decays the module's.

The loss, the augmentation (applied to an image and its dense label together) and the evaluation
metrics come from the task (`jaxal.tasks`). With a loss-prediction module (LL4AL, LPLgrad) the step
trains it jointly: target loss + weight * ranking loss of the predicted losses, the block features
detached after `detach_epoch`.

Data: the labelled images stay on the host in their stored dtype (uint8); each step's batch is
gathered there and sent to the devices, each device receiving only its share of it, so training
never needs the pool (or the labelled set) on a device. The model normalises the pixels on the
device (`jaxal.models.adapt`).

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

from jaxal import parallel, tasks
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
    # A `jaxal.tasks` task (its loss, augmentation and running accuracy); None: classification.
    task: Any = flax.struct.field(pytree_node=False, default=None)
    # Segmentation: train on random crop_size x crop_size windows of the images and masks; None: whole images.
    crop_size: Optional[int] = flax.struct.field(pytree_node=False, default=None)


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


def fresh_optimizer(state: TrainState, options: TrainOptions) -> TrainState:
    """The same weights with a new optimizer (zero momentum, step 0): what the reference codes of Wang
    et al., LL4AL and LPLgrad do at every cycle of a warm-started run (a new `optim.SGD` and scheduler
    per cycle, the model kept)."""
    opt_state = sgd(options.momentum, options.weight_decay).init(state.params)
    return state.replace(step=jnp.zeros_like(state.step), opt_state=opt_state)


def multistep_lr(base_lr: float, milestones, gamma: float, epoch: int) -> float:
    """Learning rate of `epoch` (0-based) under torch's MultiStepLR."""
    return base_lr * gamma ** sum(epoch >= m for m in milestones)


def learning_rates(lr: float, milestones, gamma: float, epoch: int, lossnet_lr_decay: bool = True) -> dict:
    """{"model": lr, "lossnet": lr} of `epoch`. With `lossnet_lr_decay=False` the loss module keeps the
    base rate (LPLgrad's code creates its scheduler but only steps the backbone's)."""
    model_lr = multistep_lr(lr, milestones, gamma, epoch)
    return {"model": np.float32(model_lr), "lossnet": np.float32(model_lr if lossnet_lr_decay else lr)}


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


# The default task of `TrainOptions`: the step uses its loss, augmentation and running accuracy, none of
# which needs the number of classes.
_CLASSIFICATION = tasks.Classification(num_classes=0)


@functools.partial(jax.jit, static_argnames=("model", "lossnet", "options", "mesh"), donate_argnames=("state",))
def train_step(state: TrainState, x: jax.Array, y: jax.Array, rng: jax.Array, lr: dict,
               detach_features: jax.Array, *, model: nn.Module, lossnet: Optional[LossNet],
               options: TrainOptions, mesh=None) -> tuple[TrainState, dict]:
    """One SGD step on the batch `(x, y)` (stored pixels and labels); `lr` is {"model": ..., "lossnet":
    ...} (`learning_rates`). With a `mesh` the batch is split over `data` and the new state is replicated
    (see the module docstring)."""
    augment_rng, dropout_rng = jax.random.split(rng)
    x, y = parallel.constrain_batch((x, y), mesh)
    task = options.task if options.task is not None else _CLASSIFICATION
    x, y = task.augment(augment_rng, x, y, options.augmentation, options.crop_padding, options.crop_size)

    def loss_fn(params):
        output, updates = model.apply({"params": params["model"], "batch_stats": state.batch_stats}, x,
                                      train=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
        per_example = jax.vmap(task.supervised_loss)(output.logits, y)
        loss = jnp.mean(per_example)
        metrics = {"loss": loss, "accuracy": jnp.mean(task.correct_fraction(output.logits, y))}
        if lossnet is not None:
            blocks = [jnp.where(detach_features, jax.lax.stop_gradient(b), b) for b in output.blocks]
            predicted = lossnet.apply({"params": params["lossnet"]}, blocks)
            ranking = loss_prediction_loss(predicted, per_example, options.lossnet_margin)
            loss = loss + options.lossnet_weight * ranking
            metrics["ranking_loss"] = ranking
        return loss, (updates["batch_stats"], metrics)

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = sgd(options.momentum, options.weight_decay).update(grads, state.opt_state, state.params)
    params = {part: jax.tree.map(lambda p, u: p - lr[part] * u, state.params[part], updates[part])
              for part in state.params}
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


def train_model(state: TrainState, images, labels, labeled: np.ndarray, *, model: nn.Module,
                lossnet: Optional[LossNet], options: TrainOptions, epochs: int, batch_size: int, lr: float,
                lr_milestones, lr_gamma: float, detach_epoch: int, seed: int, mesh=None,
                lossnet_lr_decay: bool = True) -> tuple[TrainState, dict]:
    """Train for `epochs` over the labelled indices of `images`/`labels` (host arrays in their stored
    dtype; device arrays work too); returns the state and the last epoch's metrics. Each step's batch is
    gathered on the host and split over the devices (see the module docstring). With a `mesh`: data
    parallel, the state comes back replicated over it."""
    host_rng = np.random.default_rng(seed)
    state = parallel.replicate(state, mesh)
    key = jax.random.key(seed)
    metrics = {}
    for epoch in range(epochs):
        epoch_lr = learning_rates(lr, lr_milestones, lr_gamma, epoch, lossnet_lr_decay)
        detach = np.asarray(epoch > detach_epoch)  # the reference's `epoch > epoch_loss`
        sums = {}
        batches = epoch_batches(host_rng, labeled, batch_size, parallel.mesh_size(mesh))
        for batch in batches:
            key, step_key = jax.random.split(key)
            x, y = parallel.shard_batch((images[batch], labels[batch]), mesh)
            step_key, step_lr, step_detach = parallel.replicate((step_key, epoch_lr, detach), mesh)
            state, step_metrics = train_step(state, x, y, step_key, step_lr, step_detach,
                                             model=model, lossnet=lossnet, options=options, mesh=mesh)
            sums = {k: sums.get(k, 0.0) + v for k, v in step_metrics.items()}
        metrics = {k: float(v) / len(batches) for k, v in sums.items()}
        if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(f"training diverged: the mean loss of epoch {epoch} is {metrics['loss']}; "
                                     f"lower --lr (now {lr}) or check the data")
    return state, metrics


# ---- inference ------------------------------------------------------------------------------------


def _predict_chunk(static, variables, xs) -> tuple[jax.Array, ...]:
    model, outputs = static
    output = model.apply(variables, xs, train=False)
    return tuple(getattr(output, name) for name in outputs)


def _map_outputs(model: nn.Module, variables: dict, xs, outputs: tuple[str, ...], batch_size: int, mesh):
    """The `outputs` fields of the inference-mode `ModelOutput` of every example, in fixed-size chunks
    through `parallel.map_chunks` (one compilation; the padding dropped; with a mesh, sharded)."""
    if xs.shape[0] == 0:
        shapes = jax.eval_shape(lambda x: model.apply(variables, x, train=False), jnp.zeros((1, *xs.shape[1:])))
        return tuple(jnp.zeros((0, *getattr(shapes, name).shape[1:])) for name in outputs)
    return parallel.map_chunks(_predict_chunk, (model, outputs), variables, xs, chunk_size=batch_size, mesh=mesh)


def predict(model: nn.Module, variables: dict, xs, batch_size: int = 512, *, mesh=None) -> tuple[jax.Array, jax.Array]:
    """(logits, penultimate features) in inference mode (`_map_outputs`)."""
    return _map_outputs(model, variables, xs, ("logits", "features"), batch_size, mesh)


def features(model: nn.Module, variables: dict, xs, batch_size: int = 512, *, mesh=None) -> jax.Array:
    """(n, d) penultimate features in inference mode, without the logits, which for dense outputs are
    (n, H, W, C): a pool's would not fit."""
    return _map_outputs(model, variables, xs, ("features",), batch_size, mesh)[0]


def _confusion_sum(static, variables, chunk):
    model, task = static
    (xs, ys), weights = chunk
    return task.confusion(model.apply(variables, xs, train=False).logits, ys, weights)


def evaluate(model: nn.Module, variables: dict, xs, ys, task, batch_size: int = 512, *, mesh=None) -> dict:
    """The task's metrics of the model in inference mode on `(xs, ys)`: a confusion matrix summed over
    fixed-size chunks (`parallel.sum_chunks`: one compilation, memory set by the chunk, padding
    weighted 0), then `task.metrics` of it."""
    confusion = parallel.sum_chunks(_confusion_sum, (model, task), variables, (xs, ys), chunk_size=batch_size,
                                    mesh=mesh)
    return task.metrics(confusion)


def model_variables(state: TrainState) -> dict:
    return {"params": state.params["model"], "batch_stats": state.batch_stats}
