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

Data: the images stay in their stored dtype (uint8) until a batch is on the device, where the model
normalises the pixels (`jaxal.models.adapt`); training never needs the pool on a device. How a step
gets its batch (`train_model`'s `input_pipeline`, `INPUT_PIPELINES`):
  - "resident": the labelled set (images and labels) is copied to the device once per `train_model`
    call, padded to a bucket (`parallel.bucket`) so the gather compiles for few sizes, and each step's
    batch is gathered there from one index array sent per epoch: no host gather or copy per step;
  - "prefetch": each batch is gathered on the host and sent to the device one step ahead, so its copy
    overlaps the step before it;
  - "host": gathered and sent when its step is dispatched (what jaxal did before);
  - "auto" (default): "resident" when the labelled set takes at most `RESIDENT_MAX_FRACTION` of a device's
    memory (`RESIDENT_MAX_BYTES` where the backend does not say, as on a CPU), else "prefetch"; "host"
    when several processes drive the devices (each batch with its step: the two-process tests deadlocked
    in Gloo with batches sent ahead). A CIFAR-size labelled set (20000 x 3 KiB = 61 MB) is resident.
All four give the same batches in the same order, so the same training to the bit.

Data parallel (`mesh`): the batch is split over the mesh's `data` axis and the parameters are
replicated; the jitted step is the same program, and the compiler all-reduces the gradients and the
BatchNorm batch statistics, so a step on D devices computes what one device computes for the same
global batch (to float rounding). The batch is rounded up to a multiple of D (`epoch_batches`).
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxal import parallel, precision, tasks
from jaxal.models import Adapted, LossNet, init_variables


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
    # Mixed precision (`--precision.training bfloat16`, `jaxal.precision`): the dtype of the step's
    # activations and products; the parameters, optimizer state and BatchNorm statistics stay float32.
    compute_dtype: Any = flax.struct.field(pytree_node=False, default=None)
    optimizer: str = flax.struct.field(pytree_node=False, default="sgd")  # OPTIMIZERS


OPTIMIZERS = ("sgd", "adam")


def optimizer(options: TrainOptions) -> optax.GradientTransformation:
    """The update direction before the learning rate: `sgd`, or Adam (weight decay added to the gradient
    first, as torch.optim.Adam)."""
    if options.optimizer == "adam":
        return optax.chain(optax.add_decayed_weights(options.weight_decay), optax.scale_by_adam())
    return sgd(options.momentum, options.weight_decay)


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
    opt_state = optimizer(options).init(params)
    return TrainState(jnp.zeros((), jnp.int32), params, variables["batch_stats"], opt_state)


def fresh_optimizer(state: TrainState, options: TrainOptions) -> TrainState:
    """The same weights with a new optimizer (zero momentum, step 0): what the reference codes of Wang
    et al., LL4AL and LPLgrad do at every cycle of a warm-started run (a new `optim.SGD` and scheduler
    per cycle, the model kept)."""
    opt_state = optimizer(options).init(state.params)
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


def at_least_float32(a: jax.Array) -> jax.Array:
    """bf16 activations up to float32 for the loss; float32 and float64 (the tests' x64) unchanged."""
    return a.astype(jnp.promote_types(a.dtype, jnp.float32))


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

    compute_model, x = in_compute_dtype(model, x, options.compute_dtype)

    def loss_fn(params):
        model_params = precision.cast_floating(params["model"], options.compute_dtype)
        output, updates = compute_model.apply({"params": model_params, "batch_stats": state.batch_stats}, x,
                                              train=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
        # The loss and its softmax in float32 (a detector's logits are a tree of per-level maps).
        logits = jax.tree.map(at_least_float32, output.logits)
        if hasattr(task, "batch_loss"):  # detection: normalised by the whole batch's positives, not a mean
            loss = task.batch_loss(logits, y)
            per_example = jax.vmap(task.supervised_loss)(logits, y) if lossnet is not None else None
            metrics = {"loss": loss}
        else:
            per_example = jax.vmap(task.supervised_loss)(logits, y)
            loss = jnp.mean(per_example)
            metrics = {"loss": loss, "accuracy": jnp.mean(task.correct_fraction(logits, y))}
        if lossnet is not None:
            # The loss module (a few small dense layers) reads the blocks in float32.
            blocks = [at_least_float32(jnp.where(detach_features, jax.lax.stop_gradient(b), b))
                      for b in output.blocks]
            predicted = lossnet.apply({"params": params["lossnet"]}, blocks)
            ranking = loss_prediction_loss(predicted, per_example, options.lossnet_margin)
            loss = loss + options.lossnet_weight * ranking
            metrics["ranking_loss"] = ranking
        return loss, (updates["batch_stats"], metrics)

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer(options).update(grads, state.opt_state, state.params)
    params = {part: jax.tree.map(lambda p, u: p - lr[part] * u, state.params[part], updates[part])
              for part in state.params}
    return parallel.constrain_replicated((TrainState(state.step + 1, params, batch_stats, opt_state), metrics), mesh)


def in_compute_dtype(model: nn.Module, x: jax.Array, dtype) -> tuple[nn.Module, jax.Array]:
    """(model, batch) that compute in `dtype` (None: unchanged): an `Adapted` model casts its normalised
    input (the stored pixels stay as they are until then); a bare module gets its floating batch cast."""
    if dtype is None:
        return model, x
    if isinstance(model, Adapted):
        return model.clone(compute_dtype=dtype), x
    return model, x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x


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


# ---- input pipeline -------------------------------------------------------------------------------

INPUT_PIPELINES = ("auto", "resident", "prefetch", "host")
RESIDENT_MAX_FRACTION = 0.1  # "auto": the labelled set stays on a device if it takes at most this share
RESIDENT_MAX_BYTES = 1 << 30  # ... or at most this, where the backend does not report its memory (CPU)


def resolve_input_pipeline(pipeline: str, nbytes: int, mesh=None) -> str:
    """The pipeline "auto" stands for with a labelled set of `nbytes` (see the module docstring)."""
    if pipeline not in INPUT_PIPELINES:
        raise ValueError(f"input_pipeline must be one of {', '.join(INPUT_PIPELINES)}, got {pipeline!r}")
    if pipeline != "auto":
        return pipeline
    if jax.process_count() > 1:  # several processes: each batch goes with its step, in the same order everywhere
        return "host"
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    stats = device.memory_stats() or {}
    limit = RESIDENT_MAX_FRACTION * stats["bytes_limit"] if stats.get("bytes_limit") else RESIDENT_MAX_BYTES
    return "resident" if nbytes <= limit else "prefetch"


@functools.lru_cache(maxsize=None)
def _gather_batch(sharding) -> Any:
    """A jitted `(resident set, (steps, batch) positions, step) -> that step's batch`, placed as `sharding`
    (split over a mesh's `data` axis; None: one device)."""
    def gather(resident, positions, step):
        rows = jax.lax.dynamic_index_in_dim(positions, step, keepdims=False)
        return jax.tree.map(lambda a: jnp.take(a, rows, axis=0), resident)

    return jax.jit(gather, out_shardings=sharding)


def _to_devices(tree, mesh):
    """`tree` on the device (replicated over a mesh): sent now, asynchronously."""
    return jax.device_put(tree) if mesh is None else parallel.replicate(tree, mesh)


class _ResidentBatches:
    """The labelled set on the device(s), replicated over a mesh; `epoch(batches)` yields each batch of
    dataset indices gathered there."""

    def __init__(self, images, labels, labeled: np.ndarray, mesh):
        self.order = np.sort(labeled)
        rows = np.resize(self.order, parallel.bucket(len(self.order)))  # padding repeats real rows, never read
        self.data = _to_devices((images[rows], labels[rows]), mesh)
        self.mesh = mesh
        self.gather = _gather_batch(parallel.data_sharded(mesh))

    def epoch(self, batches: np.ndarray):
        positions = _to_devices(np.searchsorted(self.order, batches).astype(np.int32), self.mesh)
        for step in range(len(batches)):
            yield self.gather(self.data, positions, np.int32(step))


def _host_batches(images, labels, batches: np.ndarray, mesh, ahead: int):
    """Each batch gathered on the host and sent to the device(s) `ahead` steps before its own (0: as its
    step is dispatched, the batch going with the call). The copies are asynchronous, so a batch sent
    ahead travels while the steps before it run."""
    def send(batch):
        placed = parallel.shard_batch((images[batch], labels[batch]), mesh)
        return jax.device_put(placed) if mesh is None and ahead else placed

    queue = collections.deque(send(batch) for batch in batches[:ahead])
    for i in range(len(batches)):
        if i + ahead < len(batches):
            queue.append(send(batches[i + ahead]))
        yield queue.popleft()


def _nbytes(*arrays, rows: int) -> int:
    return sum(rows * int(np.prod(a.shape[1:])) * np.dtype(a.dtype).itemsize for a in arrays)


def train_model(state: TrainState, images, labels, labeled: np.ndarray, *, model: nn.Module,
                lossnet: Optional[LossNet], options: TrainOptions, epochs: int, batch_size: int, lr: float,
                lr_milestones, lr_gamma: float, detach_epoch: int, seed: int, mesh=None,
                lossnet_lr_decay: bool = True, input_pipeline: str = "auto") -> tuple[TrainState, dict]:
    """Train for `epochs` over the labelled indices of `images`/`labels` (host arrays in their stored
    dtype; device arrays work too); returns the state and the last epoch's metrics. `input_pipeline`:
    how each step's batch reaches the devices (`INPUT_PIPELINES`, the module docstring); every choice
    trains alike. With a `mesh`: data parallel, the state comes back replicated over it."""
    resident_rows = parallel.bucket(len(labeled))  # what the resident copy holds, padding included
    pipeline = resolve_input_pipeline(input_pipeline, _nbytes(images, labels, rows=resident_rows), mesh)
    resident = _ResidentBatches(images, labels, labeled, mesh) if pipeline == "resident" else None
    host_rng = np.random.default_rng(seed)
    state = parallel.replicate(state, mesh)
    key = jax.random.key(seed)
    metrics = {}
    for epoch in range(epochs):
        epoch_lr = learning_rates(lr, lr_milestones, lr_gamma, epoch, lossnet_lr_decay)
        detach = np.asarray(epoch > detach_epoch)  # the reference's `epoch > epoch_loss`
        sums = {}
        batches = epoch_batches(host_rng, labeled, batch_size, parallel.mesh_size(mesh))
        placed = (resident.epoch(batches) if resident is not None
                  else _host_batches(images, labels, batches, mesh, ahead=int(pipeline == "prefetch")))
        for x, y in placed:
            key, step_key = jax.random.split(key)
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
