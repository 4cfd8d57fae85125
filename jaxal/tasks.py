"""Tasks: what differs between classification and dense prediction, and nothing else.

Training, evaluation, the strategies and the diagnostics go through a `Task`; none of them assumes one
logit vector per example. A task defines, for ONE example's logits (shape `(C,)` for classification,
`(H, W, C)` for segmentation):
  - `supervised_loss(logits, label)`: the training loss (cross-entropy; pixels with the ignore label
    excluded);
  - the label-free losses of the query strategies, reduced over the example's outputs:
    `entropy(logits)` (ent-gn) and `expected_loss(logits)` (exp-gn, the posterior differentiated as in
    the reference code, so it equals the entropy), and `pseudo_label_loss(logits)` (ISAL's loss at the
    arg-max class);
  - `reduce_outputs(values)`: per-output scores `(n, *outputs)` -> one score per example `(n,)`
    (identity for classification; the mean over pixels for segmentation), for the uncertainty baselines;
  - evaluation: `confusion(logits, labels, weights)`, a `(C, C)` count matrix of a batch (true class x
    predicted class; summed over chunks, so memory never depends on the test set), and `metrics` of it;
  - `augment(rng, images, labels, mode, padding)`: the training augmentation, applied to an image and
    its label together (a dense label moves with its image).
Tasks are frozen dataclasses: hashable, so their methods are valid static arguments of jitted code.

Segmentation's reductions over pixels (the choice, and what the references do)
--------------------------------------------------------------------------------
- The supervised loss is the cross-entropy averaged over the image's labelled pixels (the ignore label,
  and any value outside [0, C), left out), as `nn.CrossEntropyLoss(ignore_index=...)` in DRN's
  `segment.py` averages over a batch's labelled pixels; a training batch then averages the images' means
  (every image weighs the same, however many of its pixels are void).
- The label-free losses (entropy, expected loss, pseudo-label loss) are the MEAN over pixels of the
  per-pixel loss. Wang et al. released no segmentation code (xulabs/aitom `al_gradnorm` holds the CIFAR-10
  code only, whose `Categorical(probs).entropy()` and `nn.CrossEntropyLoss()` would reduce a dense output
  by the mean if ported); the paper gives no reduction. Sum or mean ranks identically: every image of a
  pool has the same H x W pixels and no label, so the two differ by the constant H*W (gradient norms
  scale with it). The mean keeps the magnitudes of the scores those of one classification example.
- With independent pixels the expected loss of the whole label map, `E_{y ~ p}[mean_t CE(z_t, y_t)]`,
  is the mean over pixels of each pixel's `sum_i p_ti CE(z_t, i)` (linearity of expectation): computable
  (Wang et al. call it intractable), and, with the posterior differentiated as in their code, it is
  exactly the pixel-mean entropy again; tests/test_segmentation.py checks both against an enumeration
  of every label map of a small image.
- `reduce_outputs` (the uncertainty baselines, BALD) is the mean over pixels as well.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxal import losses
from jaxal.detection import decode as detection_decode
from jaxal.detection import losses as detection_losses
from jaxal.models.fcos import FCOS_ISAL, FCOSConfig, flatten_levels


@dataclasses.dataclass(frozen=True)
class Classification:
    """One label per example; logits of shape (C,)."""

    num_classes: int
    ignore_label: Optional[int] = None  # classification labels are never ignored

    name: ClassVar[str] = "classification"
    metric: ClassVar[str] = "accuracy"  # the learning curve's metric: records hold test_<metric>

    # ---- losses of one example ----
    def supervised_loss(self, logits, label):
        return losses.cross_entropy(logits, label)

    def entropy(self, logits):
        return losses.entropy_loss(logits)

    def expected_loss(self, logits):
        return losses.expected_loss(logits)

    def pseudo_label_loss(self, logits):
        return losses.pseudo_label_cross_entropy(logits)

    def reduce_outputs(self, values):
        return values

    # ---- evaluation ----
    def confusion(self, logits, labels, weights):
        """(C, C) weighted counts of (true, predicted) pairs over a batch; weights 0 drop padding."""
        return weighted_confusion(labels, jnp.argmax(logits, -1), weights, self.num_classes)

    def metrics(self, confusion) -> dict:
        confusion = np.asarray(confusion, np.float64)
        return {"accuracy": float(np.trace(confusion) / max(confusion.sum(), 1.0))}

    def correct_fraction(self, logits, labels):
        """(n,) fraction of an example's outputs predicted right (the training step's running accuracy)."""
        return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)

    # ---- augmentation ----
    def augment(self, rng, images, labels, mode: str, padding: int, window: Optional[int] = None):
        if window is not None:
            raise ValueError("training windows (crop_size) are for segmentation")
        return augment_images(rng, images, mode, padding), labels


def weighted_confusion(labels, predictions, weights, num_classes: int, ignore_label: Optional[int] = None):
    """(C, C) int32 counts of (true, predicted) pairs over every output of a batch: `sum_i w_i [label =
    a][prediction = b]` with integer weights (1 real, 0 padding), outputs with `ignore_label` left out.
    One scatter-add (`bincount`): memory of the outputs, and exact integer sums."""
    weights = jnp.broadcast_to(weights.reshape(weights.shape + (1,) * (labels.ndim - 1)), labels.shape)
    labels = labels.astype(jnp.int32)
    weights = jnp.where(valid_labels(labels, num_classes, ignore_label), weights.astype(jnp.int32), 0)
    # Labels outside [0, C) (the ignore label) carry weight 0; clip them so the index stays in range.
    index = jnp.clip(labels, 0, num_classes - 1) * num_classes + predictions
    counts = jnp.bincount(index.reshape(-1), weights.reshape(-1), length=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


# ---- augmentation of images (shared by the tasks) ---------------------------------------------------

AUGMENTATIONS = ("none", "crop", "crop_flip", "flip")


def crop_offsets(rng, padding: int):
    return jax.random.randint(rng, (2,), 0, 2 * padding + 1)


def random_crop(image, offsets, padding: int, fill=0):
    """The image padded by `padding` pixels of `fill` on each side, then cropped back to its size at
    `offsets` (torchvision's RandomCrop(size, padding)); on raw pixels, fill 0 is black."""
    height, width = image.shape[:2]
    pad = ((padding, padding), (padding, padding)) + ((0, 0),) * (image.ndim - 2)
    padded = jnp.pad(image, pad, constant_values=jnp.asarray(fill, image.dtype))
    return jax.lax.dynamic_slice(padded, (offsets[0], offsets[1]) + (0,) * (image.ndim - 2), image.shape)


def augment_images(rng, images, mode: str, padding: int):
    """On-device augmentation, independent per example: "none", "crop", "crop_flip" or "flip"."""
    return augment_pairs(rng, images, None, mode, padding)[0]


def window_offsets(rng, image_shape, window: int):
    """A uniformly random top-left corner of a window x window part of an image of `image_shape`."""
    return jax.random.randint(rng, (2,), 0, jnp.array(image_shape[:2]) - window + 1)


def take_window(image, offsets, window: int):
    return jax.lax.dynamic_slice(image, (offsets[0], offsets[1]) + (0,) * (image.ndim - 2),
                                 (window, window) + image.shape[2:])


def augment_pairs(rng, images, labels, mode: str, padding: int, label_fill=0, window: Optional[int] = None):
    """The same random crop and flip for every image and its dense label (None: images only); the
    label's padding is `label_fill` (the ignore label, so padded pixels are never trained on). With a
    `window` (training on crops, as DRN and Wang et al. on Cityscapes): a random window x window part
    of each image and label, whatever the mode, in place of the padded crop; "crop_flip" then flips."""
    if mode not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {mode!r}; choose one of: {', '.join(AUGMENTATIONS)}")
    if mode == "none" and window is None:
        return images, labels
    if mode == "flip" and window is None:
        return axis_flips(rng, images, labels)
    crop_rngs, flip_rngs = jnp.split(jax.random.split(rng, 2 * images.shape[0]), 2)
    if window is not None:
        if window > min(images.shape[1:3]):
            raise ValueError(f"a training window of {window} pixels does not fit in {images.shape[1]}x"
                             f"{images.shape[2]} images")
        offsets = jax.vmap(lambda key: window_offsets(key, images.shape[1:3], window))(crop_rngs)
        crop = jax.vmap(functools.partial(take_window, window=window))
        images, labels = crop(images, offsets), None if labels is None else crop(labels, offsets)
    else:
        offsets = jax.vmap(functools.partial(crop_offsets, padding=padding))(crop_rngs)
        images = jax.vmap(functools.partial(random_crop, padding=padding))(images, offsets)
        if labels is not None:
            labels = jax.vmap(functools.partial(random_crop, padding=padding, fill=label_fill))(labels, offsets)
    if mode == "crop_flip":
        flips = jax.vmap(jax.random.bernoulli)(flip_rngs)
        flip = lambda x: jnp.where(flips.reshape((-1,) + (1,) * (x.ndim - 1)), x[:, :, ::-1], x)  # noqa: E731
        images = flip(images)
        labels = None if labels is None else flip(labels)
    return images, labels


def axis_flips(rng, images, labels=None):
    """"flip": each example (and its dense label) reversed along each of its spatial axes with probability
    1/2, independently -- for volumes, the flips that keep a single-axis tilt's missing wedge in place."""
    spatial = images.ndim - 2
    flips = jax.random.bernoulli(rng, 0.5, (images.shape[0], spatial))
    for axis in range(spatial):
        def flip(x, axis=axis):
            return jnp.where(flips[:, axis].reshape((-1,) + (1,) * (x.ndim - 1)), jnp.flip(x, axis + 1), x)
        images = flip(images)
        labels = None if labels is None else flip(labels)
    return images, labels


def valid_labels(labels, num_classes: int, ignore_label: Optional[int] = None):
    """True where a label is a class: in [0, C) and not the ignore label."""
    valid = (labels >= 0) & (labels < num_classes)
    return valid if ignore_label is None else valid & (labels != ignore_label)


def _per_pixel(loss_of_logits):
    """A loss of one logit vector (C,) -> the mean of it over the pixels of one image's logits (H, W, C)."""
    def mean_over_pixels(logits):
        return jnp.mean(jax.vmap(loss_of_logits)(logits.reshape(-1, logits.shape[-1])))

    return mean_over_pixels


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """One label per pixel: logits of shape (H, W, C), labels (H, W) (uint8 or int32 masks). Pixels labelled
    `ignore_label` (void), or with any value outside [0, C), count in no loss and no metric. The reductions
    over pixels and the references' choices are in the module docstring."""

    num_classes: int
    ignore_label: Optional[int] = None

    name: ClassVar[str] = "segmentation"
    metric: ClassVar[str] = "miou"

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"segmentation needs at least 2 classes, got {self.num_classes}")

    @property
    def fill_label(self) -> int:
        """The label of pixels that augmentation pads in: the ignore label, else the first non-class value."""
        return self.ignore_label if self.ignore_label is not None else self.num_classes

    def valid(self, labels):
        return valid_labels(labels, self.num_classes, self.ignore_label)

    # ---- losses of one image ----
    def supervised_loss(self, logits, label):
        """Cross-entropy averaged over the labelled pixels (0 for an image without any)."""
        label = label.astype(jnp.int32)
        valid = self.valid(label)
        safe = jnp.where(valid, label, 0)
        per_pixel = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, safe[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(valid, per_pixel, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

    def entropy(self, logits):
        return _per_pixel(losses.entropy_loss)(logits)

    def expected_loss(self, logits):
        return _per_pixel(losses.expected_loss)(logits)

    def pseudo_label_loss(self, logits):
        return _per_pixel(losses.pseudo_label_cross_entropy)(logits)

    def reduce_outputs(self, values):
        """(n, H, W) per-pixel scores -> (n,) their mean over each image's pixels."""
        return jnp.mean(values, axis=tuple(range(1, values.ndim)))

    # ---- evaluation ----
    def confusion(self, logits, labels, weights):
        return weighted_confusion(labels, jnp.argmax(logits, -1), weights, self.num_classes, self.ignore_label)

    def metrics(self, confusion) -> dict:
        return segmentation_metrics(confusion)

    def correct_fraction(self, logits, labels):
        """(n,) fraction of each image's labelled pixels predicted right."""
        valid = self.valid(labels.astype(jnp.int32))
        right = valid & (jnp.argmax(logits, -1) == labels)
        axes = tuple(range(1, labels.ndim))
        return jnp.sum(right, axes) / jnp.maximum(jnp.sum(valid, axes), 1)

    # ---- augmentation ----
    def augment(self, rng, images, labels, mode: str, padding: int, window: Optional[int] = None):
        """The same crop and flip for each image and its mask; padded pixels get `fill_label` (ignored).
        With a `window`, a random window x window part of each image and its mask instead of the padded
        crop (then the flip of "crop_flip")."""
        return augment_pairs(rng, images, labels, mode, padding, label_fill=self.fill_label, window=window)


def segmentation_metrics(confusion) -> dict:
    """mIoU, per-class IoU and pixel accuracy of a (C, C) confusion matrix (true x predicted, void pixels
    already left out). IoU_c = TP / (TP + FP + FN); the mean is over the classes with a non-zero union
    (present in the labels or the predictions), the usual convention (a class absent from both has no
    IoU: None in the per-class list)."""
    confusion = np.asarray(confusion, np.float64)
    true_positives = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - true_positives
    present = union > 0
    iou = np.where(present, true_positives / np.where(present, union, 1.0), np.nan)
    return {"miou": float(np.mean(iou[present])) if present.any() else 0.0,
            "pixel_accuracy": float(true_positives.sum() / max(confusion.sum(), 1.0)),
            "iou": [float(v) if p else None for v, p in zip(iou, present)]}


@dataclasses.dataclass(frozen=True)
class Detection:
    """Boxes: a detector's outputs are FCOS's per-level maps (a pytree, `jaxal.models.fcos`), a label is an
    image's padded box array {"boxes" (B, 4) canvas pixels, "classes" (B,) with -1 padding, "difficult"
    (B,)} (a batch stacks them). The per-example losses take ONE image's maps (every leaf without the
    batch axis), as the other tasks' take one example's logits, so `vmap`, the gradient engines and the
    strategies go through them unchanged.

    - `supervised_loss`: the FCOS loss of the config normalised by THAT image's positives (what ISAL's
      batch-1 code differentiates); `batch_loss`: the training loss, normalised by the batch's positives
      (train.py uses it where a task has one).
    - `entropy` / `expected_loss` (ent-gn / exp-gn): the binary entropy of the sigmoid class posteriors,
      summed over the classes and over the image's `top_k` highest-scoring locations (score = max class
      probability x centerness, the decoding's; the choice of locations is piecewise constant and carries
      no gradient); the expected BCE under the model's own Bernoulli posteriors, differentiated, is the
      same function (tested).
    - `pseudo_label_loss`: the image's loss at its own detections with score >= `pseudo_score` (ISAL).
    Evaluation is by AP (`jaxal.detection.evaluate`), not by a confusion matrix; augmentation (the
    horizontal flip, mirrored within each image's own width) is the loader's, so `augment` refuses crops.
    """

    num_classes: int
    ignore_label: Optional[int] = None
    config: FCOSConfig = FCOS_ISAL
    top_k: int = 100
    pseudo_score: float = 0.5
    max_boxes: int = 100

    name: ClassVar[str] = "detection"
    metric: ClassVar[str] = "ap"

    # ---- losses of one image ----
    def supervised_loss(self, outputs, label):
        return detection_losses.image_loss(outputs, label, self.config)

    def batch_loss(self, outputs, labels):
        return detection_losses.batch_loss(outputs, labels, self.config)

    def _top_logits(self, outputs):
        """(k, C) class logits at the image's top-k locations by max sigmoid(cls) x sigmoid(ctr)."""
        cls, _, ctr = flatten_levels(outputs)
        score = jax.lax.stop_gradient(jax.nn.sigmoid(cls).max(-1) * jax.nn.sigmoid(ctr))
        _, top = jax.lax.top_k(score, min(self.top_k, score.shape[0]))
        return cls[top]

    def entropy(self, outputs):
        z = self._top_logits(outputs)
        p = jax.nn.sigmoid(z)
        return -jnp.sum(p * jax.nn.log_sigmoid(z) + (1 - p) * jax.nn.log_sigmoid(-z))

    def expected_loss(self, outputs):
        """sum over locations and classes of E_{y ~ Bernoulli(p)} BCE(z, y) = p BCE(z, 1) + (1-p) BCE(z, 0)."""
        bce = detection_losses.binary_cross_entropy_with_logits
        z = self._top_logits(outputs)
        p = jax.nn.sigmoid(z)
        return jnp.sum(p * bce(z, jnp.ones_like(z)) + (1 - p) * bce(z, jnp.zeros_like(z)))

    def pseudo_labels(self, outputs):
        """One image's own detections with score >= pseudo_score, as a label (no gradient)."""
        detections = detection_decode.decode_image(jax.lax.stop_gradient(outputs), self.config)
        return detection_decode.pseudo_labels(detections, self.pseudo_score, self.max_boxes)

    def pseudo_label_loss(self, outputs):
        return self.supervised_loss(outputs, self.pseudo_labels(outputs))

    # ---- augmentation ----
    def augment(self, rng, images, labels, mode: str, padding: int, window: Optional[int] = None):
        if mode != "none" or window is not None:
            raise ValueError("detection's augmentation is the loader's horizontal flip (--boxes.flip); "
                             f"augmentation {mode!r} and training windows are for images without boxes")
        return images, labels


TASKS = {"classification": Classification, "segmentation": Segmentation, "detection": Detection}


def create_task(name: str, num_classes: int, ignore_label: Optional[int] = None):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(sorted(TASKS))}")
    return TASKS[name](num_classes, ignore_label) if ignore_label is not None else TASKS[name](num_classes)
