"""The strategy contract and registry.

A strategy is a pure function of a `StrategyContext` (the trained model, the candidate pool, the
labelled data, the config and an RNG) and the budget k; it returns k distinct indices into
`ctx.pool_x`, or `(indices, info)` where `info` is a dict of JSON-able diagnostics that the loop
stores in the cycle's record under "strategy_info" (a scorer may likewise return `(scores, info)`). Most strategies are scores with "take the k largest": register those with
`register_scorer`, which wraps them with `top_k`. Set-valued strategies (coreset, BADGE) register
the selection itself with `register_selector`. The loop owns every piece of state; strategies never
mutate anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import numpy as np

from jaxal.config import Config
from jaxal.models import LossNet
from jaxal.tasks import Classification


@dataclasses.dataclass(frozen=True)
class StrategyContext:
    model: nn.Module
    variables: dict  # {"params", "batch_stats"} of the trained classifier
    pool_x: Any  # (n_pool, H, W, C): the candidates scored this cycle
    labeled_x: Any  # the training labelled set
    labeled_y: Any
    num_classes: int
    config: Config
    rng: jax.Array
    lossnet: Optional[LossNet] = None
    lossnet_params: Any = None
    # Reference sets for influence-based strategies (ISAL): name -> (x, y). "val", "initial",
    # "labeled", "test"; a missing one is absent from the mapping.
    reference_sets: dict = dataclasses.field(default_factory=dict)
    mesh: Any = None  # a jax.sharding.Mesh when scoring is spread over devices, else None
    task: Any = None  # a `jaxal.tasks` task; None: classification with `num_classes` classes

    def __post_init__(self):
        if self.task is None:
            object.__setattr__(self, "task", Classification(self.num_classes))


Selector = Callable[[StrategyContext, int], np.ndarray]


class Strategy(NamedTuple):
    name: str
    select: Selector
    needs_lossnet: bool  # the loop trains the LL4AL loss-prediction module jointly
    needs_dropout: bool  # the model must have a non-zero dropout rate (MC dropout)
    description: str
    check: Optional[Callable[[Config], None]] = None  # raises ValueError for settings it cannot run with
    tasks: tuple[str, ...] = ("classification",)  # the `jaxal.tasks` it can run on (checked before a run)
    task_note: str = ""  # why it cannot run on the other tasks (the refusal's message says it)


STRATEGIES: dict[str, Strategy] = {}


def top_k(scores, k: int) -> np.ndarray:
    """Indices of the k largest scores, ties broken by the lower index; never a non-finite score."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(scores)):
        bad = int(np.sum(~np.isfinite(scores)))
        raise FloatingPointError(f"{bad} of {scores.size} scores are not finite (NaN or inf); "
                                 "the model or the strategy's settings are numerically broken")
    if k > scores.size:
        raise ValueError(f"cannot select {k} samples from a pool of {scores.size}")
    return np.argsort(-scores, kind="stable")[:k]


# The tasks of strategies that run on dense outputs too.
ALL_TASKS = ("classification", "segmentation")


def register_selector(name: str, *, needs_lossnet: bool = False, needs_dropout: bool = False,
                      check: Optional[Callable[[Config], None]] = None,
                      tasks: tuple[str, ...] = ("classification",), task_note: str = ""):
    def decorate(select: Selector) -> Selector:
        description = (select.__doc__ or "").strip().splitlines()[0] if select.__doc__ else ""
        STRATEGIES[name] = Strategy(name, select, needs_lossnet, needs_dropout, description, check, tasks,
                                    task_note)
        return select

    return decorate


def register_scorer(name: str, *, needs_lossnet: bool = False, needs_dropout: bool = False,
                    check: Optional[Callable[[Config], None]] = None, tasks: tuple[str, ...] = ("classification",),
                    task_note: str = ""):
    """Register `score(ctx) -> (n_pool,) scores`; the k highest are selected."""

    def decorate(score: Callable[[StrategyContext], Any]):
        def select(ctx: StrategyContext, k: int):
            scores, info = split_info(score(ctx))
            chosen = top_k(scores, k)
            return chosen if info is None else (chosen, info)

        select.__doc__ = score.__doc__
        register_selector(name, needs_lossnet=needs_lossnet, needs_dropout=needs_dropout, check=check,
                          tasks=tasks, task_note=task_note)(select)
        return score

    return decorate


def split_info(result) -> tuple[Any, Optional[dict]]:
    """(value, info) from a strategy's `value` or `(value, info)` result."""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
        return result
    return result, None


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]
