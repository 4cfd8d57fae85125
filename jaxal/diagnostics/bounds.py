"""The bound mathematics: Target and Approx-1/2/3 of one pair of models, the overlaps and the per-cycle
row (definitions: the package docstring), and the diagnostics' options."""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import jax
import numpy as np

from jaxal import gradnorm, influence, parallel
from jaxal import precision as precision_lib
from jaxal.config import SolverOptions
from jaxal.models import inference_apply
from jaxal.pytree import PARAM_SUBSETS, restrict, tree_norm
from jaxal.strategies.base import top_k

LOSSES: dict[str, Callable] = {"exp": gradnorm.expected_loss, "ent": gradnorm.entropy_loss}
LOSS_LABELS = {"exp": "L_exp (expected loss)", "ent": "L_ent (entropy)"}
TEST_LOSSES = ("theory", "true")
QUANTITIES = ("target", "approx1", "approx2", "approx3")
QUANTITY_LABELS = {"target": "Target", "approx1": "Approx-1", "approx2": "Approx-2", "approx3": "Approx-3"}


FLAGS = "--diag."


@dataclasses.dataclass(frozen=True)
class BoundOptions(SolverOptions):
    """The `--diag.*` flags: the solve of H^-1 (the fields of `jaxal.config.SolverOptions`, the one options
    type of `jaxal.influence.inverse_hvp`, with the diagnostics' defaults) and what is measured."""

    solver: str = "exact"  # dense on the last layer; "cg" or "lissa" for larger subsets
    params: str = "last_layer"  # parameter subset theta: "last_layer", "weights" or "all"
    # H of the training objective, CE + weight_decay/2 ||theta||^2: H_CE + weight_decay * I, which also
    # makes H invertible (a softmax head's CE Hessian is singular along "the same vector added to every
    # class", a direction every gradient is orthogonal to). damping * scale adds to that shift.
    hessian_weight_decay: bool = True
    damping: float = 0.0
    scale: float = 10.0  # LiSSA: must exceed the largest Hessian eigenvalue
    depth: int = 1000
    repeats: int = 1
    batch_size: Optional[int] = None  # LiSSA: None, the whole labelled set per step (deterministic)
    cg_maxiter: int = 200
    test_loss: str = "theory"  # test gradients: "theory" (the column's L, no labels) or "true" (true-label CE)
    k: Optional[int] = None  # top-K of Tables 1-2; None: the budget
    table1_params: str = "all"  # parameter subset of Table 1's true-label gradient norm
    table1_norm: str = "global"  # "global" or "layer_sum"
    grad_method: str = "ghost"  # per-example norms: "ghost" (no per-example gradient held) or "vmap"
    seed: int = 0  # LiSSA's minibatches
    save_samples: bool = True  # the per-sample .npz files


def check_options(options: BoundOptions) -> None:
    influence.check_solver_options(options, FLAGS)
    if options.table1_params not in PARAM_SUBSETS:
        raise ValueError(f"--diag.table1_params: unknown parameter subset {options.table1_params!r}; choose one "
                         f"of: {', '.join(PARAM_SUBSETS)}")
    if options.test_loss not in TEST_LOSSES:
        raise ValueError(f"--diag.test_loss must be one of {', '.join(TEST_LOSSES)}, got {options.test_loss!r}")
    if options.table1_norm not in gradnorm.NORMS:
        raise ValueError(f"--diag.table1_norm must be one of {', '.join(gradnorm.NORMS)}, "
                         f"got {options.table1_norm!r}")
    if options.k is not None and options.k < 1:
        raise ValueError(f"--diag.k must be at least 1 (or none), got {options.k}")
    if options.grad_method not in gradnorm.METHODS:
        raise ValueError(f"--diag.grad_method must be one of {', '.join(gradnorm.METHODS)}, "
                         f"got {options.grad_method!r}")
    if options.seed < 0:
        raise ValueError(f"--diag.seed must be >= 0, got {options.seed}")


# ----------------------------------------------------------------------------- the quantities


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Per-sample arrays over the pool, for one loss L (all float64 numpy arrays of shape (n_pool,))."""

    target: np.ndarray  # s . g_{c+1}(x)
    approx1: np.ndarray  # |target|
    approx2: np.ndarray  # ||g_{c+1}(x)|| ||s||
    approx3: np.ndarray  # ||g_c(x)|| ||s||
    grad_norm_next: np.ndarray  # ||g_{c+1}(x)||
    grad_norm_prev: np.ndarray  # ||g_c(x)||
    s_norm: float  # ||H^-1 sum_j g_{c+1}(x_j)||


# The pool-wide passes go through `jaxal.parallel.map_chunks` as the strategies' scorers do
# (`jaxal.strategies.gradient`): module-level functions of `(static, consts, chunk)`, `static` a hashable
# tuple of settings (the Flax model hashes by value; the losses are module-level functions) and the
# trained variables and `s` the traced `consts`. The per-example losses are built INSIDE the trace, so a
# new cycle's weights compile nothing and are never baked into a program as constants: one program per
# (loss, chunk shape) for the whole run.


def _example_loss(model, variables: dict, loss_of_logits: Callable, labeled: bool = False):
    return gradnorm.example_loss(inference_apply(model, variables["batch_stats"]), loss_of_logits,
                                 labeled=labeled)


class ModelLoss(NamedTuple):
    """`example_loss(variables, example)` of `jaxal.influence`: `loss_of_logits` of the model's logits in
    inference mode, for an example `(x, y)` (`labelled`) or `x`. Hashable: a static setting."""

    model: object
    loss_of_logits: Callable
    labeled: bool

    def __call__(self, variables, example):
        loss = _example_loss(self.model, variables, self.loss_of_logits, self.labeled)
        return loss(variables["params"], example)


def _pool_pass(static, consts, xs):
    """(Target, ||g_{c+1}||, ||g_c||) for a chunk of the pool, one loss, in one program. Target is the
    forward-mode product of `jaxal.influence.influence_scores` (one jvp of the batched losses in the
    direction s, no per-example gradient); the norms come from `gradnorm.per_example_grad_norms` (the
    ghost engine by default: no per-example gradient is held, and on the last layer no backward pass
    through the body)."""
    model, loss_of_logits, subset, grad_method, precision = static
    prev_variables, next_variables, s = consts
    with precision_lib.scope(precision):
        loss_next = _example_loss(model, next_variables, loss_of_logits)
        loss_prev = _example_loss(model, prev_variables, loss_of_logits)
        losses_of, theta = restrict(loss_next.batch_losses, next_variables["params"], subset)
        target = jax.jvp(lambda p: losses_of(p, xs), (theta,), (s,))[1]
        norm_next = gradnorm.per_example_grad_norms(loss_next, next_variables["params"], xs, norm="global",
                                                    params_filter=subset, method=grad_method)
        norm_prev = gradnorm.per_example_grad_norms(loss_prev, prev_variables["params"], xs, norm="global",
                                                    params_filter=subset, method=grad_method)
        return target, norm_next, norm_prev


def _true_label_norms(static, variables, chunk):
    model, norm, subset, grad_method, precision = static
    with precision_lib.scope(precision):
        loss = _example_loss(model, variables, gradnorm.cross_entropy, labeled=True)
        return gradnorm.per_example_grad_norms(loss, variables["params"], chunk, norm=norm, params_filter=subset,
                                               method=grad_method)


def cycle_bounds(model, prev_variables: dict, next_variables: dict, pool_x, train_data, test_data, *,
                 options: BoundOptions = BoundOptions(), l2: float = 0.0,
                 rng: Optional[jax.Array] = None, losses: Optional[dict[str, Callable]] = None,
                 mesh: Optional[jax.sharding.Mesh] = None, capacity: Optional[int] = None,
                 precision: str = precision_lib.SOLVERS_DEFAULT) -> dict[str, Bounds]:
    """{loss name: Bounds} for the models of cycles c (`prev_variables`) and c+1 (`next_variables`), the
    pool `pool_x`, the labelled training set `train_data = (x, y)` model c+1 was trained on, and the test
    set `test_data = (x, y)` (its labels are used only with `options.test_loss == "true"`).
    See the package docstring for the definitions. H is shifted by `l2 + options.damping * options.scale`
    (`l2`: the training objective's weight decay, which `run_diagnostics` passes with
    `hessian_weight_decay`). `losses` maps a name to a module-level function of one example's logits (it
    is part of the static settings of the compiled passes); with a `mesh`, the pool and test passes and
    the solve are split over its devices. `capacity`: the largest labelled set of the run (the solver's
    padded size, so it compiles once per run). `precision`: of every product here (`jaxal.precision`;
    "highest" by default).

    Cost per loss: one solve (`jaxal.influence.inverse_hvp`, every Hessian-vector product summed over
    chunks of `options.hvp_chunk_size` labelled examples), one pass over the pool (Target by a jvp, and
    the per-example gradient norms under models c and c+1), and one gradient of the test loss (skipped
    for the second loss with true labels).
    """
    losses = LOSSES if losses is None else losses
    rng = jax.random.key(options.seed) if rng is None else rng
    chunk, subset = options.chunk_size, options.params
    test_x, test_y = test_data
    train_loss = ModelLoss(model, gradnorm.cross_entropy, True)

    def solve_for(loss_of_logits, data, labeled: bool):
        # v = sum_j g_{c+1}(x_j): a SUM over the test set.
        v = influence.reference_gradient(ModelLoss(model, loss_of_logits, labeled), next_variables, data,
                                         subset=subset, chunk_size=chunk, reduce="sum", mesh=mesh,
                                         precision=precision)
        return influence.inverse_hvp(train_loss, next_variables, train_data, v, options=options, rng=rng, l2=l2,
                                     capacity=capacity, mesh=mesh, precision=precision, flags=FLAGS).solution

    s_true = solve_for(gradnorm.cross_entropy, (test_x, test_y), True) if options.test_loss == "true" else None
    out = {}
    for name, loss_of_logits in losses.items():
        s = s_true if s_true is not None else solve_for(loss_of_logits, test_x, False)
        with precision_lib.scope(precision):  # a host-side product, outside the jitted passes
            s_norm = float(tree_norm(s))
        passes = parallel.map_chunks(_pool_pass, (model, loss_of_logits, subset, options.grad_method, precision),
                                     (prev_variables, next_variables, s), pool_x, chunk_size=chunk, mesh=mesh)
        target, norm_next, norm_prev = (np.asarray(a, np.float64) for a in passes)
        out[name] = Bounds(target, np.abs(target), norm_next * s_norm, norm_prev * s_norm, norm_next, norm_prev,
                           s_norm)
    return out


def true_label_grad_norms(model, variables: dict, pool_x, pool_y, *, norm: str = "global",
                          params_filter: str = "all", chunk_size: Optional[int] = None,
                          mesh: Optional[jax.sharding.Mesh] = None, grad_method: str = "ghost",
                          precision: str = precision_lib.SOLVERS_DEFAULT) -> np.ndarray:
    """(n_pool,) norms of the true-label CE gradient under `variables` (Table 1's reference ranking)."""
    return np.asarray(parallel.map_chunks(_true_label_norms, (model, norm, params_filter, grad_method, precision),
                                          variables, (pool_x, pool_y), chunk_size=chunk_size, mesh=mesh), np.float64)


def top_k_overlap(scores_a, scores_b, k: int) -> int:
    """|top-k of a intersect top-k of b| (positions into the same pool). `top_k` is the strategies' own
    (`jaxal.strategies.base`): ties go to the lower position as when they select, and a non-finite
    Target or norm raises FloatingPointError rather than being ranked."""
    return int(np.intersect1d(top_k(scores_a, k), top_k(scores_b, k)).size)


def selection_overlap(selected_positions, scores, k: Optional[int] = None) -> int:
    """How many of the selected positions are among the k (default: as many as selected) largest scores."""
    selected_positions = np.asarray(selected_positions).reshape(-1)
    k = selected_positions.size if k is None else k
    return int(np.intersect1d(selected_positions, top_k(scores, k)).size)


def summarise(bounds: dict[str, Bounds], k: int) -> dict:
    """The per-cycle row: averages over the pool, ratios, Table 2 overlaps, and Cauchy-Schwarz checks."""
    row = {}
    for name, b in bounds.items():
        means = {q: float(np.mean(getattr(b, q))) for q in QUANTITIES}
        row.update({f"{name}_{q}_mean": means[q] for q in QUANTITIES})
        row[f"{name}_s_norm"] = b.s_norm
        row[f"{name}_grad_norm_next_mean"] = float(np.mean(b.grad_norm_next))
        row[f"{name}_grad_norm_prev_mean"] = float(np.mean(b.grad_norm_prev))
        row[f"{name}_ratio_approx3_target"] = _ratio(means["approx3"], means["target"])
        row[f"{name}_ratio_approx3_approx1"] = _ratio(means["approx3"], means["approx1"])
        row[f"{name}_ratio_approx2_approx1"] = _ratio(means["approx2"], means["approx1"])
        row[f"{name}_target_negative_fraction"] = float(np.mean(b.target < 0))
        row[f"{name}_overlap_target_approx3"] = top_k_overlap(b.target, b.approx3, k)
        row[f"{name}_overlap_abs_target_approx3"] = top_k_overlap(b.approx1, b.approx3, k)
        # Cauchy-Schwarz, sample by sample, with a relative rounding allowance.
        row[f"{name}_cauchy_schwarz_violations"] = int(np.sum(b.approx2 < b.approx1 * (1 - 1e-4) - 1e-12))
    return row


def _ratio(a: float, b: float) -> Optional[float]:
    return float(a / b) if b != 0 else None
