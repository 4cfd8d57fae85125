"""The strategy contract and registry.

A strategy is a pure function of a `StrategyContext` (the trained model, the candidate pool, the
labelled data, the task, the config and an RNG). Most strategies score every candidate and take the k
largest: they return `Scores(values, info)` and are registered with `register_scorer`. Set-valued
strategies (coreset, BADGE, CoreGCN) choose the set itself, `select_set(ctx, k) -> Selection`, and are
registered with `register_selector`. Either way `Strategy.select(ctx, k)` gives a `Selection` (chosen,
scores, info), where `info` holds JSON-able diagnostics that the loop stores in the cycle's record under
"strategy_info". What a strategy requires (a loss module, dropout, model outputs, tasks, checks of its
settings) is a separate `Requirements`, checked before a run. The loop owns every piece of state;
strategies never mutate anything.
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


class Scores(NamedTuple):
    """What a scorer returns: one score per candidate (the k largest are chosen) and its diagnostics."""

    values: Any  # (n_pool,)
    info: dict = {}  # JSON-able diagnostics the loop stores in the cycle's record ("strategy_info")


class Selection(NamedTuple):
    """What a strategy's selection is: k distinct indices into `ctx.pool_x`, best first, their scores (None
    for a set-valued strategy such as coreset or BADGE, whose picks have no score), and its diagnostics."""

    chosen: np.ndarray
    scores: Optional[np.ndarray] = None
    info: dict = {}


# What a strategy may need from the model beyond its logits (`Requirements.needs`), and how to say so.
MODEL_NEEDS = {
    "features": "the penultimate features (ModelOutput.features, or 'features' in a returned dict)",
    "blocks": "intermediate block outputs for the loss-prediction module (ModelOutput.blocks, or 'blocks' "
              "in a returned dict)",
    "mc_dropout": "an `mc_dropout` keyword argument of its __call__ that turns dropout on at inference",
}


@dataclasses.dataclass(frozen=True)
class Requirements:
    """What a strategy needs to run, checked before a run starts (`jaxal.loop`)."""

    lossnet: bool = False  # the loop trains the LL4AL loss-prediction module jointly
    dropout: bool = False  # the model must have a non-zero dropout rate (MC dropout)
    tasks: tuple[str, ...] = ("classification",)  # the `jaxal.tasks` it can run on
    task_note: str = ""  # why it cannot run on the other tasks (the refusal's message says it)
    needs: tuple[str, ...] = ()  # what it reads from the model besides logits: keys of MODEL_NEEDS
    check: Optional[Callable[[Config], None]] = None  # raises ValueError for settings it cannot run with
    # `check_model(config, variables)` with the model's variables as shapes (`jax.eval_shape`): raises
    # ValueError for settings that cannot run on this model (e.g. a dense Hessian too large to allocate),
    # naming the option to use instead.
    check_model: Optional[Callable[[Config, Any], None]] = None


# `initial_set(config, images, model, mesh, key, labeled, val) -> labeled`: a strategy's own initial
# training set (as many indices as `labeled`, outside `val`) in place of the trial's random one.
InitialSet = Callable[..., np.ndarray]


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A registered strategy: exactly one of `score(ctx) -> Scores` (take the k largest) and
    `select_set(ctx, k) -> Selection` (a set-valued selection), what it requires, and optionally its own
    initial set."""

    name: str
    description: str
    requires: Requirements
    score: Optional[Callable[[StrategyContext], Scores]] = None
    select_set: Optional[Callable[[StrategyContext, int], Selection]] = None
    initial_set: Optional[InitialSet] = None

    def select(self, ctx: StrategyContext, k: int) -> Selection:
        """The k chosen candidates, best first, with their scores and the strategy's diagnostics."""
        if self.score is None:
            selection = self.select_set(ctx, k)
            return selection._replace(chosen=np.asarray(selection.chosen).reshape(-1))
        scores, info = self.score(ctx)
        chosen = top_k(scores, k)
        return Selection(chosen, np.asarray(scores, np.float64)[chosen], info)


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


def _requirements(needs: tuple[str, ...], lossnet: bool, dropout: bool, **fields) -> Requirements:
    """`needs` checked and completed: a loss module implies "blocks", MC dropout "mc_dropout"."""
    unknown = set(needs) - set(MODEL_NEEDS)
    if unknown:
        raise ValueError(f"unknown model needs {sorted(unknown)}; choose from: {', '.join(MODEL_NEEDS)}")
    needs = tuple(dict.fromkeys((*needs, *(("blocks",) if lossnet else ()), *(("mc_dropout",) if dropout else ()))))
    return Requirements(lossnet=lossnet, dropout=dropout, needs=needs, **fields)


def _description(fn) -> str:
    return (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""


def register_selector(name: str, *, needs_lossnet: bool = False, needs_dropout: bool = False,
                      needs: tuple[str, ...] = (), initial_set: Optional[InitialSet] = None, **requirements):
    """Register a set-valued `select_set(ctx, k) -> Selection`. `needs`: what it reads from the model besides
    logits (MODEL_NEEDS); `requirements`: the other fields of `Requirements`."""

    def decorate(select_set):
        requires = _requirements(needs, needs_lossnet, needs_dropout, **requirements)
        STRATEGIES[name] = Strategy(name, _description(select_set), requires, select_set=select_set,
                                    initial_set=initial_set)
        return select_set

    return decorate


def register_scorer(name: str, *, needs_lossnet: bool = False, needs_dropout: bool = False,
                    needs: tuple[str, ...] = (), initial_set: Optional[InitialSet] = None, **requirements):
    """Register `score(ctx) -> Scores` with one score per candidate; the k highest are selected."""

    def decorate(score):
        requires = _requirements(needs, needs_lossnet, needs_dropout, **requirements)
        STRATEGIES[name] = Strategy(name, _description(score), requires, score=score, initial_set=initial_set)
        return score

    return decorate


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]
