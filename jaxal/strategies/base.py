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
    # The loop's `jaxal.train.TrainOptions` (the dataset's augmentation included), for strategies that
    # train task models of their own (QBC's committee); None: the config's, without augmentation.
    train_options: Any = None

    def __post_init__(self):
        if self.task is None:
            object.__setattr__(self, "task", Classification(self.num_classes))


Selector = Callable[[StrategyContext, int], np.ndarray]


# What a strategy may need from the model beyond its logits (`Strategy.needs`), and how to say so.
MODEL_NEEDS = {
    "features": "the penultimate features (ModelOutput.features, or 'features' in a returned dict)",
    "blocks": "intermediate block outputs for the loss-prediction module (ModelOutput.blocks, or 'blocks' "
              "in a returned dict)",
    "mc_dropout": "an `mc_dropout` keyword argument of its __call__ that turns dropout on at inference",
}


class Strategy(NamedTuple):
    name: str
    select: Selector
    needs_lossnet: bool  # the loop trains the LL4AL loss-prediction module jointly
    needs_dropout: bool  # the model must have a non-zero dropout rate (MC dropout)
    description: str
    check: Optional[Callable[[Config], None]] = None  # raises ValueError for settings it cannot run with
    tasks: tuple[str, ...] = ("classification",)  # the `jaxal.tasks` it can run on (checked before a run)
    # Raises ValueError for settings that cannot run on this model: `check_model(config, variables)` with
    # the model's variables as shapes (`jax.eval_shape`), before the run starts (e.g. a dense Hessian
    # too large to allocate); the message names the option to use instead.
    check_model: Optional[Callable[[Config, Any], None]] = None
    # What it needs from the model besides logits: keys of MODEL_NEEDS (checked before a run).
    needs: tuple[str, ...] = ()
    # `score(ctx) -> scores` for strategies that take the k largest scores (`register_scorer`), else None.
    score: Optional[Callable[[StrategyContext], Any]] = None
    # `initial_set(experiment, trial_key, labeled, val) -> labeled`: a strategy's own initial training set
    # (same size, outside `val`) in place of the trial's random one; None keeps the random one.
    initial_set: Optional[Callable] = None
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
                      tasks: tuple[str, ...] = ("classification",), needs: tuple[str, ...] = (),
                      score: Optional[Callable[[StrategyContext], Any]] = None,
                      check_model: Optional[Callable[[Config, Any], None]] = None,
                      initial_set: Optional[Callable] = None, task_note: str = ""):
    """Register `select(ctx, k) -> k indices` (or `(indices, info)`). `needs`: what it reads from the
    model besides logits (MODEL_NEEDS); a loss module implies "blocks", MC dropout "mc_dropout"."""
    unknown = set(needs) - set(MODEL_NEEDS)
    if unknown:
        raise ValueError(f"unknown model needs {sorted(unknown)}; choose from: {', '.join(MODEL_NEEDS)}")
    needs = tuple(dict.fromkeys((*needs, *(("blocks",) if needs_lossnet else ()),
                                 *(("mc_dropout",) if needs_dropout else ()))))

    def decorate(select: Selector) -> Selector:
        description = (select.__doc__ or "").strip().splitlines()[0] if select.__doc__ else ""
        STRATEGIES[name] = Strategy(name, select, needs_lossnet, needs_dropout, description, check, tasks,
                                    check_model, needs, score, initial_set, task_note)
        return select

    return decorate


def register_scorer(name: str, *, needs_lossnet: bool = False, needs_dropout: bool = False,
                    check: Optional[Callable[[Config], None]] = None, tasks: tuple[str, ...] = ("classification",),
                    check_model: Optional[Callable[[Config, Any], None]] = None, needs: tuple[str, ...] = (),
                    initial_set: Optional[Callable] = None, task_note: str = ""):
    """Register `score(ctx) -> (n_pool,) scores`; the k highest are selected."""

    def decorate(score: Callable[[StrategyContext], Any]):
        def select(ctx: StrategyContext, k: int):
            chosen, _, info = propose(STRATEGIES[name], ctx, k)
            return chosen if info is None else (chosen, info)

        select.__doc__ = score.__doc__
        register_selector(name, needs_lossnet=needs_lossnet, needs_dropout=needs_dropout, check=check,
                          tasks=tasks, needs=needs, score=score, check_model=check_model,
                          initial_set=initial_set, task_note=task_note)(select)
        return score

    return decorate


def propose(strategy: Strategy, ctx: StrategyContext, k: int) -> tuple[np.ndarray, Optional[np.ndarray], Optional[dict]]:
    """(k chosen indices into ctx.pool_x, best first; their scores, or None for a set-valued strategy
    such as coreset or BADGE, whose picks have no score; the strategy's info dict or None)."""
    if strategy.score is None:
        chosen, info = split_info(strategy.select(ctx, k))
        return np.asarray(chosen).reshape(-1), None, info
    scores, info = split_info(strategy.score(ctx))
    chosen = top_k(scores, k)
    return chosen, np.asarray(scores, np.float64)[chosen], info


def split_info(result) -> tuple[Any, Optional[dict]]:
    """(value, info) from a strategy's `value` or `(value, info)` result."""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
        return result
    return result, None


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]
