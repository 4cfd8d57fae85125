"""Selection strategies on detection: each is a function of a `DetectionContext` (the cycle's trained
detector, the pool's candidates and the labelled set as indices into streamed box splits) returning the
same `Selection` (chosen, scores, info) as the classification strategies (`jaxal.strategies.base`).

Box datasets stream from disk (`jaxal.data.boxes`), so a detection context holds splits and indices, not
arrays; a strategy reads its images per batch (`stream`) and keeps per-image results only.

Strategies (options in `--boxal.*`, `jaxal.config.BoxStrategyOptions`):
- `random`;
- `isal`, `grad_sim` (`.influence`): ISAL's detection code, influence of the image's pseudo-boxes;
- `entropy`, `least_confidence`, `margin` (`.uncertainty`): ISAL's uncertainty miners on post-NMS scores;
- `ent_gn`, `exp_gn` (`.gradient`): the gradient norm of the top-k binary entropy;
- `coreset` (`.coreset`): greedy k-center on the towers' pooled features (ISAL's appendix D.2);
- `localization_stability` (`.stability`): Kao et al.'s stability of the boxes under image noise;
- `ll4al` (`.ll4al`): LL4AL's loss-prediction module on the FPN levels, trained with the detector
  (detached); the loop trains the module for the strategies registered with `trains_loss_prediction`.
An image a strategy cannot score (no pseudo-box, no detection) is ranked after every scored one, in
random order, as ISAL's miners fill in their unscored images (`rank`); the count is in `info`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import numpy as np

from jaxal.config import Config
from jaxal.data import boxes as boxes_lib
from jaxal.models import ModelOutput
from jaxal.strategies.base import Selection


@dataclasses.dataclass(frozen=True)
class DetectionContext:
    detector: Any  # jaxal.detection.training.Detector
    variables: dict  # the cycle's trained detector: {"params", "batch_stats"}
    pool: Any  # jaxal.data.boxes.BoxSplit: the pool (the train split)
    candidates: np.ndarray  # indices into `pool`: the unlabelled images scored this cycle
    labeled: np.ndarray  # indices into `pool`: the labelled set the detector was trained on
    task: Any  # jaxal.tasks.Detection
    config: Config
    rng: np.random.Generator
    # ISAL's reference set R: (split, indices), by default the whole validation split; None if absent
    reference: Optional[tuple[Any, np.ndarray]] = None
    # the run's device mesh: every strategy's per-image passes are split over its `data` axis
    # (`jaxal.parallel.map_chunks`), isal's s_test chains too; None: one device
    mesh: Optional[jax.sharding.Mesh] = None


# name -> select(ctx, k) -> Selection, `chosen` being positions in ctx.candidates, best first, and `scores`
# (where the strategy has them) one per candidate, in ctx.candidates' order
DETECTION_STRATEGIES: dict[str, Callable[[DetectionContext, int], Selection]] = {}
# the strategies whose detector trains LL4AL's loss-prediction module beside it (ctx.variables["lossnet"])
LOSS_PREDICTION: set[str] = set()


def register(name: str, *, trains_loss_prediction: bool = False):
    def decorate(select):
        DETECTION_STRATEGIES[name] = select
        if trains_loss_prediction:
            LOSS_PREDICTION.add(name)
        return select

    return decorate


def trains_loss_prediction(name: str) -> bool:
    return name in LOSS_PREDICTION


def check_names(names) -> None:
    unknown = [s for s in names if s not in DETECTION_STRATEGIES]
    if unknown:
        raise ValueError(f"--task detection runs the strategies {', '.join(sorted(DETECTION_STRATEGIES))}; "
                         f"not {', '.join(unknown)}")


REDUCTIONS = ("max", "mean", "sum")
GN_PARAMS = ("cls_branch", "all")


def check_options(config: Config) -> None:
    """Refuse `--boxal.*` values the strategies cannot run with, before the run."""
    o = config.boxal
    if not 0.0 <= o.pseudo_score <= 1.0:
        raise ValueError(f"--boxal.pseudo_score must be in [0, 1] (a detection score), got {o.pseudo_score}")
    if len(o.isal_scales) != 3 or not all(np.isfinite(s) and s > 0 for s in o.isal_scales):
        raise ValueError("--boxal.isal_scales must be 3 finite numbers > 0 (the classification, regression and "
                         f"centerness kernels' LiSSA scales), got {o.isal_scales}")
    if o.s_test_images < 1:
        raise ValueError(f"--boxal.s_test_images must be at least 1, got {o.s_test_images}")
    if o.s_test_max_labeled is not None and o.s_test_max_labeled < 1:
        raise ValueError(f"--boxal.s_test_max_labeled must be at least 1 (or none), got {o.s_test_max_labeled}")
    if o.reduction not in REDUCTIONS:
        raise ValueError(f"--boxal.reduction: choose one of {', '.join(REDUCTIONS)}, not {o.reduction!r}")
    if o.gn_params not in GN_PARAMS:
        raise ValueError(f"--boxal.gn_params: choose one of {', '.join(GN_PARAMS)}, not {o.gn_params!r}")
    if o.top_k < 1:
        raise ValueError(f"--boxal.top_k must be at least 1, got {o.top_k}")
    if not o.stability_noise or not all(np.isfinite(s) and s > 0 for s in o.stability_noise):
        raise ValueError(f"--boxal.stability_noise must be one or more finite numbers > 0, got {o.stability_noise}")
    if LOSS_PREDICTION & set(config.strategies):
        check_loss_prediction_options(config)
    if {"isal", "grad_sim"} & set(config.strategies):  # the solve's --influence.* settings (damping, repeats, ...)
        from jaxal import influence as influence_lib
        from jaxal.detection.strategies.influence import solver_options

        influence_lib.check_solver_options(solver_options(config), "--influence.")


def check_loss_prediction_options(config: Config) -> None:
    """ll4al's `--lossnet.*`: margin, weight and width apply; the classification-only ones are refused."""
    o, default = config.lossnet, type(config.lossnet)()
    if o.width < 1 or not (np.isfinite(o.margin) and o.margin >= 0) or not (np.isfinite(o.weight) and o.weight > 0):
        raise ValueError(f"--lossnet.width must be at least 1, --lossnet.margin finite and >= 0 and --lossnet.weight "
                         f"finite and > 0; got {o.width}, {o.margin} and {o.weight}")
    if o.detach_epoch != default.detach_epoch or o.lr_decay != default.lr_decay:
        raise ValueError("--lossnet.detach_epoch and --lossnet.lr_decay do not apply to --task detection: the "
                         "module's features are always detached (ISAL's appendix D.2) and it follows the "
                         "detector's schedule")


def select(name: str, ctx: DetectionContext, k: int) -> Selection:
    """The k chosen candidates (positions in ctx.candidates, distinct, best first) of strategy `name`."""
    k = min(k, len(ctx.candidates))
    selection = DETECTION_STRATEGIES[name](ctx, k)
    chosen = np.asarray(selection.chosen).reshape(-1)
    if len(chosen) != k or len(np.unique(chosen)) != k or chosen.min(initial=0) < 0 \
            or chosen.max(initial=0) >= len(ctx.candidates):
        raise RuntimeError(f"strategy {name} returned an invalid selection of {len(chosen)} for k={k}")
    return selection._replace(chosen=chosen)


@register("random")
def random(ctx: DetectionContext, k: int) -> Selection:
    """Uniformly at random."""
    return Selection(ctx.rng.choice(len(ctx.candidates), k, replace=False))


# ----------------------------------------------------------------------------- shared by the strategies


def inference_apply(detector, batch_stats) -> Callable:
    """`apply(params, images) -> ModelOutput(logits=maps, features)`: the detector in inference mode (its
    input normalisation included), what the gradient engines differentiate with respect to `params`."""

    def apply(params, images):
        out = detector.apply({"params": params, "batch_stats": batch_stats}, images)
        return ModelOutput(out["logits"], out["features"])

    return apply


def one_image(tree):
    """A batch of one's outputs without the batch axis (the task's per-image losses take those)."""
    return jax.tree.map(lambda a: a[0], tree)


LABEL_KEYS = ("boxes", "classes", "difficult")


def stream(split, indices, batch_size: int, fn: Callable) -> Any:
    """`fn(batch)` over `indices` of `split` read in batches of `batch_size` ({"images" uint8, "boxes",
    "classes", "difficult", "indices", "sizes": each image's (h, w) on its canvas}; the last batch padded
    with empty images, index -1 and size 1, so one program serves every batch),
    each result a pytree of per-image arrays; returned in `indices` order as NumPy arrays. Memory: one batch
    of images and the per-image results."""
    indices = np.asarray(indices)
    position = {int(i): k for k, i in enumerate(indices)}
    out = None
    for batch in boxes_lib.batches(split, indices, batch_size):
        n = len(batch["indices"])
        arrays = {**{k: batch[k] for k in ("images", "indices") + LABEL_KEYS},
                  "sizes": split.resized_sizes[batch["indices"]].astype(np.float32)}
        if n < batch_size:
            fills = {"classes": -1, "indices": -1, "sizes": 1}
            arrays = {k: np.concatenate([a, np.full((batch_size - n,) + a.shape[1:], fills.get(k, 0), a.dtype)])
                      for k, a in arrays.items()}
        result = jax.device_get(fn(arrays))
        if out is None:
            out = jax.tree.map(lambda a: np.zeros((len(indices),) + a.shape[1:], a.dtype), result)
        rows = np.array([position[int(i)] for i in batch["indices"]])
        jax.tree.map(lambda o, r: o.__setitem__(rows, r[:n]), out, result)
    return out


def rank(values, scored, k: int, rng: np.random.Generator, *, descending: bool) -> np.ndarray:
    """The k best positions: the scored ones by value (a stable sort, as Python's `sorted` in ISAL's
    `mining/utils/utils.py:select`), then, if fewer than k are scored, unscored ones at random (ISAL's
    miners, e.g. `hitl_mining_algorithm.py:46-53`)."""
    values = np.asarray(values, np.float64)
    scored = np.asarray(scored, bool) & np.isfinite(values)
    positions = np.flatnonzero(scored)
    order = np.argsort(-values[positions] if descending else values[positions], kind="stable")
    chosen = positions[order][:k]
    if len(chosen) < k:
        chosen = np.concatenate([chosen, rng.permutation(np.flatnonzero(~scored))[:k - len(chosen)]])
    return chosen.astype(np.int64)


# register the strategies of the submodules (they import the helpers above)
from jaxal.detection.strategies import coreset, gradient, influence, ll4al, stability, uncertainty  # noqa: E402,F401
