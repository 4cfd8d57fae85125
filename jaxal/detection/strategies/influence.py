"""ISAL on detection as its released code computes it (`dragonlzm/ISAL`, `detection/`), and `grad_sim`.

- Parameters: the kernels of the head's three LAST convolutions, classification, regression and
  centerness, no biases (`src/test_calc_s_test.py:108-117`: `requires_grad` on `conv_centerness`,
  `conv_cls`, `conv_reg`, then `len(p.size()) != 1` drops the biases). jaxal's head applies them once per
  FPN level with shared weights, as mmdet's: their gradient is the sum over the levels.
- The loss of an image: the FCOS loss of the image ALONE, normalised by its own positives (batch 1;
  `Detection.supervised_loss`), the sum of its parts (`src/utils.py:43-44`).
- v = grad L(R): the reference set's per-image gradients SUMMED (`test_calc_val_gradient.py:134-138`),
  R = the validation split (`data.val_influ`), at its ground truth.
- s_test: LiSSA (`src/utils.py:90-169`, `multi_gpu_s_test`): damping 0.01, a scale per tensor [100, 8000,
  5000] (cls, reg, centerness), batch 1, one chain per GPU (4) over its shard of the labelled set in loader
  order (`shuffle=False`), at most `--img-num` = S_TEST_IMG_NUM = 1000 images each, a tensor whose
  Hessian-vector product holds a NaN restarting from v (`:149-151`); the chains' h_T averaged
  (`test_calc_s_test.py:135-141`) WITHOUT dividing by the scales: `jaxal.influence.inverse_hvp` with
  `order="loader"`, `nan_reset` and the scales, times the scales. (The code's loop `if i > img_num:
  break` after the update makes 1002 updates; here at most `s_test_images`.)
- An unlabelled image's loss is at its pseudo-boxes, its own detections with score >= the threshold
  (`mining_algorithm.py:19-65`, `--noised-score-thresh`, default 0.5); an image without one is not in the
  pseudo-labelled set, gets no influence, and is filled in at random (`gt_mining_algorithm.py:26-54`).
- Influence `-g_z . s_test` (`src/utils.py:256-260`, there also divided by the pool's size, which orders
  nothing), selected in ascending order, most negative first (`select`, no `--sorted-reverse`).
Here the pool's scores are ONE forward-mode product per batch (`jaxal.influence.jvp_scores`), never a
backward per image, and the pseudo-boxes come from the same forward pass (its aux output).

Deviations: the code skips a tensor's term in the dot product where g_z or s_test holds a NaN; here an
image whose score is not finite is unscored (filled at random, counted). Pseudo-boxes are decoded on the
canvas (the code decodes in the original image and maps back: the same boxes up to the resize).
Images of different canvases (portrait and landscape buckets) enter the s_test solve padded to the
largest one. The labelled images the solve reads (at most `repeats x s_test_images`, the first ones in
loader order) are read from disk block by block (`jaxal.influence.LoaderRows`, `labelled_rows`): the
device holds one block of `repeats x DEFAULT_LOADER_BLOCK_STEPS` images and the chains, whatever the
labelled set's size, and the pool is read per batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxal import influence as influence_lib
from jaxal import parallel
from jaxal import precision as precision_lib
from jaxal.config import Config, SolverOptions
from jaxal.data import boxes as boxes_lib
from jaxal.detection import decode
from jaxal.detection.strategies import LABEL_KEYS, DetectionContext, one_image, rank, register, stream
from jaxal.pytree import restrict, tree_dot, tree_norm, tree_size
from jaxal.strategies.base import Selection

LAST_CONVS = ("fcos_cls", "fcos_reg", "fcos_centerness")


def last_convs(params):
    """Mask of the head's last classification, regression and centerness kernels (ISAL's parameters)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: len(k) == 3 and k[0] == "head" and k[1] in LAST_CONVS and k[2] == "kernel" for k in flat})


def layer_scale(scales):
    """`(path, tensor) -> scale` for `inverse_hvp`: the scale of the last conv the tensor belongs to."""
    by_layer = dict(zip(LAST_CONVS, scales))

    def scale(path, _):
        names = [getattr(p, "key", None) for p in path]
        return float(next(by_layer[n] for n in names if n in by_layer))

    return scale


def times_scales(tree, scale_fn):
    """Each tensor times its own LiSSA scale: ISAL scores with h_T itself, `inverse_hvp` returns D^-1 h_T."""
    return jax.tree_util.tree_map_with_path(lambda path, x: x * scale_fn(path, x), tree)


class BoxLoss(NamedTuple):
    """`example_loss(variables, (image, label))` of `jaxal.influence`: one image's FCOS loss at its boxes,
    normalised by its own positives, the detector in inference mode. Hashable: compiled once per setting."""

    detector: object
    task: object

    def __call__(self, variables, example):
        image, label = example
        out = self.detector.apply(variables, image[None])["logits"]
        return self.task.supervised_loss(one_image(out), label)


def _labels(batch):
    return {k: jnp.asarray(batch[k]) for k in LABEL_KEYS}


def reference_gradient(ctx: DetectionContext, loss: BoxLoss, variables, batch_size: int, precision: str):
    """v = the SUM over the reference set of each image's gradient, read per batch (each split over the mesh)."""
    split, indices = ctx.reference
    total = None
    for batch in boxes_lib.batches(split, indices, batch_size):
        part = influence_lib.reference_gradient(loss, variables, (batch["images"], _labels(batch)), subset=last_convs,
                                                chunk_size=batch_size, reduce="sum", mesh=ctx.mesh,
                                                precision=precision)
        total = part if total is None else jax.tree.map(jnp.add, total, part)
    return total


def solve_images(ctx: DetectionContext, repeats: int, depth: int) -> np.ndarray:
    """The labelled images the solve reads, in loader order: the labelled set (or a random sample of
    `s_test_max_labeled`, the paper's), cut to the first repeats x depth (the rest is never read)."""
    labeled = np.asarray(ctx.labeled)
    cap = ctx.config.boxal.s_test_max_labeled
    if cap is not None and len(labeled) > cap:
        labeled = labeled[np.sort(ctx.rng.choice(len(labeled), cap, replace=False))]
    return labeled[:repeats * depth]


def largest_canvas(split, indices) -> tuple[int, int]:
    """(H, W) that holds the canvas of every image of `indices` (portrait and landscape buckets)."""
    buckets = np.unique(split.buckets[np.asarray(indices)])
    return max(split.canvases[b][0] for b in buckets), max(split.canvases[b][1] for b in buckets)


def read_padded(split, indices, canvas=None) -> dict:
    """Images (uint8, padded to `canvas`, by default the largest canvas among them) and labels of
    `indices`, in order."""
    indices = np.asarray(indices)
    height, width = largest_canvas(split, indices) if canvas is None else canvas
    images = np.zeros((len(indices), height, width, 3), np.uint8)
    for bucket in np.unique(split.buckets[indices]):
        rows = np.flatnonzero(split.buckets[indices] == bucket)
        part = split.read_images(indices[rows])
        images[rows, :part.shape[1], :part.shape[2]] = part
    labels = {"boxes": split.boxes[indices], "classes": split.classes[indices], "difficult": split.difficult[indices]}
    return {"images": images, **labels}


def labelled_rows(split, indices) -> influence_lib.LoaderRows:
    """The solve's labelled images as `jaxal.influence.LoaderRows`: read from disk block by block, each
    padded to the largest canvas among all of them (one shape, one compiled block program)."""
    indices = np.asarray(indices)
    canvas = largest_canvas(split, indices)

    def read(rows):
        batch = read_padded(split, indices[rows], canvas)
        return batch["images"], {k: batch[k] for k in LABEL_KEYS}

    return influence_lib.LoaderRows(len(indices), read)


def _pool_scores(static, consts, images):
    """`s . g_z` of each image of a batch (one jvp) and its number of pseudo-boxes (same forward pass)."""
    detector, task, precision = static
    variables, s = consts

    def loss(params, image):
        maps = one_image(detector.apply({**variables, "params": params}, image[None])["logits"])
        label = task.pseudo_labels(maps)
        return task.supervised_loss(maps, label), decode.num_pseudo_boxes(label)

    with precision_lib.scope(precision):
        restricted, selected = restrict(loss, variables["params"], last_convs)
        return influence_lib.jvp_scores(restricted, selected, s, images, has_aux=True)


def solver_options(config: Config) -> SolverOptions:
    """--influence.*'s solve with ISAL detection's LiSSA: batch 1 in loader order, NaN reset, its depth."""
    base = {f.name: getattr(config.influence, f.name) for f in dataclasses.fields(SolverOptions)}
    return SolverOptions(**{**base, "solver": "lissa", "batch_size": 1, "order": "loader",
                                          "nan_reset": True, "depth": config.boxal.s_test_images,
                                          "params": last_convs})


def _finite(x):
    x = float(x)
    return x if math.isfinite(x) else None


def influence_selection(ctx: DetectionContext, k: int, *, hessian: bool) -> Selection:
    if ctx.reference is None or len(ctx.reference[1]) == 0:
        raise ValueError("isal and grad_sim on detection need a reference set: the dataset's validation split")
    config = ctx.config
    precision = config.precision.solvers
    batch_size = config.eval_batch_size
    task = dataclasses.replace(ctx.task, pseudo_score=config.boxal.pseudo_score)
    variables = {"params": ctx.variables["params"], "batch_stats": ctx.variables.get("batch_stats", {})}
    loss = BoxLoss(ctx.detector, task)
    v = reference_gradient(ctx, loss, variables, batch_size, precision)
    info = {"reference_size": int(len(ctx.reference[1])), "num_params": int(tree_size(v)),
            "pseudo_score": float(config.boxal.pseudo_score), "v_norm": _finite(tree_norm(v)),
            "solver": "lissa" if hessian else "identity"}
    s = v
    if hessian:
        options = solver_options(config)
        rows = solve_images(ctx, options.repeats, options.depth)
        scale_fn = layer_scale(config.boxal.isal_scales)
        key = jax.random.PRNGKey(int(ctx.rng.integers(2**31)))
        solution, solver_info = influence_lib.inverse_hvp(
            loss, variables, labelled_rows(ctx.pool, rows), v, options=options, rng=key, scale=scale_fn,
            precision=precision, flags="--influence.", mesh=ctx.mesh)
        s = times_scales(solution, scale_fn)
        info.update(solver_info, s_test_images=int(len(rows)), s_test_norm=_finite(tree_norm(s)),
                    cosine_s_test_v=_finite(tree_dot(s, v) / (tree_norm(s) * tree_norm(v))))
    static = (ctx.detector, task, precision)
    consts = parallel.replicate((variables, s), ctx.mesh)
    result = stream(ctx.pool, ctx.candidates, batch_size,
                    lambda batch: parallel.map_chunks(_pool_scores, static, consts, batch["images"],
                                                      chunk_size=batch_size, mesh=ctx.mesh))
    dots, boxes = result
    influence = -dots.astype(np.float64)
    scored = (boxes > 0) & np.isfinite(influence)
    chosen = rank(influence, scored, k, ctx.rng, descending=False)
    info.update(num_scored=int(scored.sum()), num_unscored=int((~scored).sum()),
                num_no_pseudo_box=int((boxes == 0).sum()),
                filled_at_random=int(max(0, k - int(scored.sum()))))
    return Selection(chosen, np.where(scored, influence, np.nan), info)


@register("isal")
def isal(ctx: DetectionContext, k: int) -> Selection:
    """ISAL (its detection code): the most negative influence -g_z . s_test of the image's pseudo-boxes on
    the reference set's loss, w.r.t. the head's last three kernels."""
    return influence_selection(ctx, k, hessian=True)


@register("grad_sim")
def grad_sim(ctx: DetectionContext, k: int) -> Selection:
    """ISAL with H = I: the most negative -g_z . v."""
    return influence_selection(ctx, k, hessian=False)
