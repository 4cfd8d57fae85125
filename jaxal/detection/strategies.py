"""Selection strategies on detection: each is a function of a `DetectionContext` (the cycle's trained
detector, the pool's candidates and the labelled set as indices into streamed box splits) returning the
same `Selection` (chosen, scores, info) as the classification strategies (`jaxal.strategies.base`).

Box datasets stream from disk (`jaxal.data.boxes`), so a detection context holds splits and indices, not
arrays; a strategy reads its images per batch and keeps per-image results only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

from jaxal.config import Config
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


# name -> select(ctx, k) -> Selection, `chosen` being positions in ctx.candidates, best first
DETECTION_STRATEGIES: dict[str, Callable[[DetectionContext, int], Selection]] = {}


def register(name: str):
    def decorate(select):
        DETECTION_STRATEGIES[name] = select
        return select

    return decorate


def check_names(names) -> None:
    unknown = [s for s in names if s not in DETECTION_STRATEGIES]
    if unknown:
        raise ValueError(f"--task detection runs the strategies {', '.join(sorted(DETECTION_STRATEGIES))}; "
                         f"not {', '.join(unknown)}")


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
