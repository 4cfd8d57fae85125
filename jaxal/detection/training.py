"""Training and inference of an FCOS detector on a box split (`jaxal.data.boxes`), streamed per batch.

The schedule is mmdetection v2.4's as ISAL's FCOS config sets it, in ITERATIONS (mmcv's
`StepLrUpdaterHook` with `by_epoch=True` steps at epochs, warm-up counts iterations):
  lr(it) = base_lr * gamma ** (number of step epochs passed)        (`step=[8, 11]`, gamma 0.1)
  during the first `warmup_iters` iterations, warm-up "constant": lr * warmup_ratio   (FCOS: 500, 1/3)
The optimiser is torch's SGD as mmcv's `OptimizerHook` drives it: the gradient clipped to global norm
`grad_clip` (`clip_grad_norm_`, ISAL: 10), then `d = g + wd_p * p`, `buf = momentum * buf + d` (the
first step: `buf = d`), `p -= lr_p * buf`. `paramwise_cfg=dict(bias_lr_mult=2., bias_decay_mult=0.)`:
the conv biases (mmcv: every `bias` except normalisation layers') have twice the learning rate and no
weight decay; GroupNorm's scale and bias, and the Scales, have the base ones. Frozen backbone stages
(mmdet `frozen_stages=1`, `norm_eval`: `requires_grad=False`) are not in the optimiser at all: no update
and no decay (`jaxal.models.resnet.trainable_mask`).

A fresh detector each cycle (ISAL retrains from scratch each step): `init_detector` draws new weights.

Data parallel (`mesh`, `jaxal.parallel`): each batch is split over the mesh's `data` axis, the weights and
the momentum are replicated, and the jitted step is the one-device program: the loss is normalised by the
positives of the WHOLE batch (`losses.batch_parts`), which the compiler sums over the devices, so D devices
compute what one device computes for the same batch (to float rounding). mmdetection v2.4's FCOSHead
normalises by each GPU's own positives (`avg_factor=num_pos + num_imgs`, no `reduce_mean` across GPUs,
which later versions added) and DDP averages the GPUs' gradients; we follow the whole-batch count, so the
result does not depend on the device count. A bucket's last, smaller batch that does not split evenly runs
replicated (every device computes it whole): the same numbers, no padding that would change its loss.

LL4AL's loss-prediction module (`LossPrediction`, strategy `ll4al`; ISAL's appendix D.2: on the five FPN
levels, trained with the detector, its loss not back-propagated into the detector, lambda 1) trains beside
the detector when `train` is given one: jaxal's `LossNet` (Yoo & Kweon's module: per level global average
pool -> FC(128) -> ReLU, concatenated -> FC(1)) reads the FPN levels through `stop_gradient`, and its target
is each image's own detection loss (`losses.image_loss`, normalised by the image's own positives: LL4AL's
target is the per-example loss, `reduction='none'`, and this is ISAL's per-image FCOS loss), ranked by
jaxal's `train.loss_prediction_loss` (LL4AL's `LossPredLoss`: margin 1, the batch against its reverse).
Neither the reference nor ISAL's released code (which holds no LL4AL for detection) says how the module is
optimised beside mmdetection's runner; here it is an optimiser of its own, as LL4AL's code has
(`Mephisto405/Learning-Loss-for-Active-Learning` main.py:239-244: two SGDs with the same lr, momentum and
decay, two MultiStepLRs stepped together), that follows the detector's: the same learning rate at each
iteration (warm-up and steps), momentum and weight decay, the bias multipliers mmdet's
`paramwise_cfg` gives every `bias` of a model, and gradient clipping at the same norm but over the module's
own gradient, so that the detector's step is exactly that of a run without the module.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxal import parallel
from jaxal.data import Normalization
from jaxal.data import boxes as boxes_lib
from jaxal.detection import decode, losses
from jaxal.models import LossNet
from jaxal.models.fcos import FCOSConfig
from jaxal.train import loss_prediction_loss

# torchvision's ImageNet statistics (jaxal.models.resnet's weights expect them); ISAL's caffe-style
# weights used BGR means without std -- a documented deviation.
IMAGENET = Normalization(1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclasses.dataclass(frozen=True)
class Schedule:
    iterations: int
    batch_size: int = 8                       # ISAL: samples_per_gpu=2 x 4 GPUs
    base_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 1 / 3               # fcos_r50_caffe_fpn_4x4_1x_coco.py (schedule_1x.py: 0.001)
    steps: tuple[float, ...] = (8 / 12, 11 / 12)  # step=[8, 11] of 12 epochs, as fractions of the run
    gamma: float = 0.1
    bias_lr_mult: float = 2.0
    bias_decay_mult: float = 0.0
    grad_clip: Optional[float] = 10.0

    @classmethod
    def epochs(cls, epochs: int, num_images: int, **kwargs) -> "Schedule":
        """`epochs` epochs of `num_images` images at the batch size (mmdet's per-epoch iterations, ceil)."""
        batch = kwargs.get("batch_size", cls.batch_size)
        return cls(iterations=epochs * math.ceil(num_images / batch), **kwargs)


def learning_rate(schedule: Schedule, iteration: int) -> float:
    """The base lr at `iteration` (0-based), warm-up included (mmcv LrUpdaterHook `get_warmup_lr`,
    "constant": `regular_lr * warmup_ratio` while `cur_iter < warmup_iters`)."""
    passed = sum(iteration >= round(f * schedule.iterations) for f in schedule.steps)
    lr = schedule.base_lr * schedule.gamma ** passed
    return lr * schedule.warmup_ratio if iteration < schedule.warmup_iters else lr


def param_groups(params, trainable=None):
    """Per parameter (lr multiplier, decay multiplier) as two pytrees: conv/dense biases 2 and 0,
    normalisation parameters and the rest 1 and 1; `trainable` (a bool pytree or None) zeroes both."""
    flat = traverse_util.flatten_dict(params)
    train = traverse_util.flatten_dict(trainable) if trainable is not None else {}

    def is_conv_bias(path):
        return path[-1] == "bias" and "norm" not in path[-2] and "bn" not in path[-2]

    lr = {p: (2.0 if is_conv_bias(p) else 1.0) * float(train.get(p, True)) for p in flat}
    decay = {p: (0.0 if is_conv_bias(p) else 1.0) * float(train.get(p, True)) for p in flat}
    return traverse_util.unflatten_dict(lr), traverse_util.unflatten_dict(decay)


@dataclasses.dataclass(frozen=True)
class Detector:
    """A Flax detector (jaxal.models.fcos.FCOS), its config and input normalisation; hashable."""

    model: nn.Module
    config: FCOSConfig
    normalization: Optional[Normalization] = IMAGENET  # None: inputs as given (tests in float64)

    def apply(self, variables, images, train=False):
        x = images if self.normalization is None else self.normalization(images)
        return self.model.apply(variables, x, train=train)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model: nn.Module, rng, canvas):
    return model.init(rng, jnp.zeros((1, *canvas, 3), jnp.float32), train=False)


def init_detector(detector: Detector, rng, canvas) -> dict:
    """Fresh weights (compiled once per model and canvas)."""
    variables = _init(detector.model, rng, tuple(canvas))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


@dataclasses.dataclass(frozen=True)
class LossPrediction:
    """LL4AL's loss-prediction module as the detector's training runs it (module docstring): the net, the
    ranking loss's margin and its weight lambda in `detection loss + lambda * ranking loss`."""

    net: LossNet = LossNet()
    margin: float = 1.0   # LL4AL config.py MARGIN
    weight: float = 1.0   # LL4AL config.py WEIGHT; ISAL appendix D.2: lambda = 1


def init_loss_prediction(detector: Detector, module: LossPrediction, variables: dict, rng, canvas) -> dict:
    """Fresh weights of the module for the detector's FPN levels on `canvas` (torch's Linear init aside:
    Flax's defaults, as jaxal's classification LossNet); the levels' shapes without running the detector."""
    images = jax.ShapeDtypeStruct((1, *tuple(canvas), 3), jnp.float32)
    levels = jax.eval_shape(lambda v, x: detector.apply(v, x)["blocks"], variables, images)
    return module.net.init(rng, [jnp.zeros(level.shape, jnp.float32) for level in levels])["params"]


def predicted_losses(detector: Detector, module: LossPrediction, variables: dict, images) -> jax.Array:
    """(n,) losses the module predicts from the detector's FPN levels (inference mode)."""
    levels = detector.apply(variables, images)["blocks"]
    return module.net.apply({"params": variables["lossnet"]}, list(levels))


@dataclasses.dataclass(frozen=True)
class _Step:
    detector: Detector
    schedule: Schedule
    mesh: Optional[jax.sharding.Mesh] = None
    loss_prediction: Optional[LossPrediction] = None


def _sgd(schedule: Schedule, params, momentum, grads, lr, multipliers):
    """mmcv's OptimizerHook + torch SGD on one parameter set (module docstring): (params, momentum)."""
    lr_mult, decay_mult = multipliers
    grads = jax.tree.map(lambda g, m: g * (m > 0), grads, lr_mult)  # frozen: not in the optimiser
    if schedule.grad_clip is not None:  # torch clip_grad_norm_: scale by max_norm / (norm + 1e-6) if larger
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, schedule.grad_clip / (norm + 1e-6)), grads)
    d = jax.tree.map(lambda g, p, m: g + schedule.weight_decay * m * p, grads, params, decay_mult)
    momentum = jax.tree.map(lambda b, di: schedule.momentum * b + di, momentum, d)
    params = jax.tree.map(lambda p, b, m: p - lr * m * b, params, momentum, lr_mult)
    return params, momentum


def _train_step(static: _Step, state, batch, lr, multipliers):
    detector, schedule, module = static.detector, static.schedule, static.loss_prediction
    params, momentum, batch_stats = state[:3]

    def loss_fn(p, module_params=None):
        out = detector.apply({"params": p, "batch_stats": batch_stats}, batch["images"], train=False)
        parts = losses.batch_parts(out["logits"], batch, detector.config, image_losses=module is not None)
        image = parts.pop("image", None)  # each image's own loss (`losses.image_loss`): the module's target
        loss = parts["cls"] + parts["box"] + parts["ctr"]
        if module is None:
            return loss, parts
        # LL4AL main.py:103-114 with the features always detached (ISAL D.2): the ranking loss reaches the
        # module only; the per-image targets are detached in `loss_prediction_loss` (main.py:67)
        levels = [jax.lax.stop_gradient(level) for level in out["blocks"]]
        predicted = module.net.apply({"params": module_params}, levels)
        ranking = loss_prediction_loss(predicted, image, module.margin)
        return loss + module.weight * ranking, {**parts, "detection_loss": loss, "ranking_loss": ranking}

    if module is None:
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params, momentum = _sgd(schedule, params, momentum, grads, lr, multipliers)
        return parallel.constrain_replicated(((params, momentum, batch_stats), {"loss": loss, **parts}), static.mesh)
    module_params, module_momentum = state[3:]
    (_, parts), (grads, module_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, module_params)
    params, momentum = _sgd(schedule, params, momentum, grads, lr, multipliers)
    # mmdet paramwise_cfg on the module's layers too: its biases 2x lr, no decay (constants of the tree's paths)
    module_params, module_momentum = _sgd(schedule, module_params, module_momentum, module_grads, lr,
                                          param_groups(module_params))
    metrics = {"loss": parts.pop("detection_loss"), **parts}  # "loss": the detector's, as without the module
    return parallel.constrain_replicated(((params, momentum, batch_stats, module_params, module_momentum), metrics),
                                         static.mesh)


_train_step_jit = jax.jit(_train_step, static_argnums=0, donate_argnums=1)


def train(detector: Detector, variables: dict, split, indices, schedule: Schedule, rng: np.random.Generator, *,
          trainable=None, flip: bool = True, log_every: int = 0, workers: Optional[int] = None,
          mesh: Optional[jax.sharding.Mesh] = None,
          loss_prediction: Optional[LossPrediction] = None) -> tuple[dict, list]:
    """`schedule.iterations` SGD steps on batches of `indices` (reshuffled each epoch, flipped at random),
    from `variables`. BatchNorm statistics stay frozen (mmdet `norm_eval=True`; GroupNorm has none).
    With a `mesh`: data parallel (module docstring); the batch size must be a multiple of its device count.
    With `loss_prediction`: LL4AL's module trains beside the detector (module docstring) from
    `variables["lossnet"]` (`init_loss_prediction`); the detector trains as without it.
    Returns the trained variables (replicated over the mesh; with the module's under "lossnet") and the
    per-iteration losses (with the module: its "ranking_loss" too)."""
    indices = np.asarray(indices)
    if len(indices) == 0:
        raise ValueError("no labelled images to train the detector on")
    check_batch_size(schedule.batch_size, mesh)
    if loss_prediction is not None and "lossnet" not in variables:
        raise ValueError("training the loss-prediction module needs its initial weights in variables['lossnet'] "
                         "(training.init_loss_prediction)")
    params = variables["params"]
    # torch's first momentum step is buf = d; starting from buf = 0 with `momentum * 0 + d` is the same.
    # (a copy: the step donates its state, and the caller keeps `variables`)
    state = (jax.tree.map(jnp.copy, params), jax.tree.map(jnp.zeros_like, params), variables["batch_stats"])
    if loss_prediction is not None:
        module_params = variables["lossnet"]
        state += (jax.tree.map(jnp.copy, module_params), jax.tree.map(jnp.zeros_like, module_params))
    state = parallel.replicate(state, mesh)
    multipliers = param_groups(params, trainable)
    history = []
    static = _Step(detector, schedule, mesh, loss_prediction)
    for it, batch in enumerate(training_batches(split, indices, schedule, rng, flip=flip, workers=workers)):
        batch = place_batch({k: batch[k] for k in ("images", "boxes", "classes", "difficult")}, mesh)
        state, metrics = _train_step_jit(static, state, batch, jnp.float32(learning_rate(schedule, it)),
                                         multipliers)
        loss = float(metrics["loss"]) if log_every or it == schedule.iterations - 1 else None
        if loss is not None and not np.isfinite(loss):
            raise FloatingPointError(f"detector training diverged at iteration {it}: loss {loss}")
        if log_every and it % log_every == 0:
            print(f"  iteration {it}: loss {loss:.4f} lr {learning_rate(schedule, it):.2e}", flush=True)
        history.append(metrics)
    trained = {"params": state[0], "batch_stats": state[2]}
    return (trained if loss_prediction is None else {**trained, "lossnet": state[3]}), history


def training_batches(split, indices, schedule: Schedule, rng: np.random.Generator, *, flip: bool = True,
                     workers: Optional[int] = None):
    """The `schedule.iterations` batches `train` steps on, in its order: epochs of `indices` reshuffled
    (and flipped at random) from `rng`, the last epoch cut short. Also what an experiment replays into
    another trainer (experiments/train_torchvision_fcos.py)."""
    it = 0
    while it < schedule.iterations:
        for batch in boxes_lib.batches(split, indices, schedule.batch_size, rng=rng, flip=flip, workers=workers):
            if it >= schedule.iterations:
                return
            yield batch
            it += 1


def check_batch_size(batch_size: int, mesh: Optional[jax.sharding.Mesh]) -> None:
    devices = parallel.mesh_size(mesh)
    if batch_size % devices:
        raise ValueError(f"the detector's batch size {batch_size} is not a multiple of the mesh's {devices} devices "
                         f"(data parallel: each device takes an equal share); use a multiple of {devices}")


def place_batch(batch: dict, mesh: Optional[jax.sharding.Mesh]) -> dict:
    """A training batch on the device(s): split over the mesh's `data` axis when it splits evenly, else
    replicated (a bucket's last, smaller batch: every device computes it whole, the same numbers)."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    split = len(batch["images"]) % parallel.mesh_size(mesh) == 0
    return parallel.shard_batch(batch, mesh) if split else parallel.replicate(batch, mesh)


def _detect_batch(detector: Detector, variables, images, sizes):
    out = detector.apply(variables, images)
    return decode.decode_batch(out["logits"], detector.config, sizes)


def _detect_chunk(detector: Detector, variables, chunk):
    return _detect_batch(detector, variables, *chunk)


def detect(detector: Detector, variables: dict, split, indices, batch_size: int = 8, *,
           workers: Optional[int] = None, mesh: Optional[jax.sharding.Mesh] = None) -> dict:
    """Detections of `indices` in their order: {"boxes" (n, M, 4) canvas pixels, "scores", "classes",
    "valid"} (M = max_per_img); memory of the detections only (M x images). Each streamed batch goes through
    `parallel.map_chunks`: padded to `batch_size` (rounded up to a multiple of the mesh's devices), so one
    program serves every batch of a canvas, split over the mesh's `data` axis, the padding dropped."""
    indices = np.asarray(indices)
    position = {int(i): k for k, i in enumerate(indices)}
    m = detector.config.max_per_img
    out = {"boxes": np.zeros((len(indices), m, 4), np.float32), "scores": np.zeros((len(indices), m), np.float32),
           "classes": np.zeros((len(indices), m), np.int32), "valid": np.zeros((len(indices), m), bool)}
    variables = parallel.replicate(variables, mesh)
    for batch in boxes_lib.batches(split, indices, batch_size, workers=workers):
        sizes = split.resized_sizes[batch["indices"]].astype(np.float32)
        found = jax.device_get(parallel.map_chunks(_detect_chunk, detector, variables, (batch["images"], sizes),
                                                   chunk_size=batch_size, mesh=mesh))
        rows = [position[int(i)] for i in batch["indices"]]
        for key in out:
            out[key][rows] = found[key]
    return out
