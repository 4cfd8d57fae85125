"""Bound-tightness diagnostics of the gradient-norm theory (Wang et al., AAAI 2022, Fig. 3 and Tables 1-3).

Command (a whole active-learning run, with the diagnostics computed after every cycle):

    python -m jaxal.diagnostics --dataset digits --strategy entropy,random --cycles 6

Every flag of `python -m jaxal.run` works (they configure the experiment; `--coordinator/--num_processes/
--process_id/--distributed` start several processes as there, and only process 0 writes and prints), plus
the `--diag.*` flags of `DiagnosticsOptions` (bad values exit with status 2 before any training). Library
use: `run_diagnostics(config, options, workdir=...)`, or `cycle_bounds(...)` for one pair of models.

What is computed, for the models T^c and T^{c+1} of consecutive cycles c, c+1 (DESIGN.md, point 6)
-------------------------------------------------------------------------------------------------
Notation: `theta` the parameter subset `--diag.params` ("last_layer" by default), `g_m(x)` the gradient
with respect to theta of the loss L of one example under the model of cycle m, `x_j` the test samples,
`U` the unlabelled pool of cycle c (the candidates the strategy scored in cycle c, including the ones it
then selected).

- H: the Hessian, with respect to theta, of the TRAINING objective of model c+1: the mean true-label
  cross-entropy over the labelled set model c+1 was trained on, plus `mu * I` with mu = `--diag.damping`
  (default: the config's weight decay, because SGD with weight decay wd minimises CE + wd/2 ||theta||^2,
  whose Hessian is H_CE + wd I). The shift also makes H invertible: the CE Hessian of a softmax head is
  singular along "add the same vector to every class", a direction every gradient is orthogonal to.
- v = sum_j g_{c+1}(x_j), a SUM over the test set (as in the paper; a mean would only rescale everything
  by 1/n_test). Which loss the test gradients use (`--diag.test_loss`):
    "theory" (default): the same L as the pool gradients (L_exp in the L_exp column, L_ent in the L_ent
    column): the theory's test loss, which needs no test labels;
    "true": the true-label cross-entropy of the test samples (test labels used for the measurement only);
    then v, s and ||s|| are the same for both columns.
- s = H^-1 v: ONE solve per cycle and loss, by `--diag.solver` ("exact": dense, the default on the last
  layer, refused before training above `--diag.exact_max_gib`; "cg"; "lissa", with `--diag.lissa_*`),
  see `jaxal.influence`. Every Hessian-vector product is a sum over chunks of `--diag.chunk_size`
  labelled examples, and the solve is compiled once per run (the labelled set padded to the run's
  largest, the weights traced).
- Target(x) = s . g_{c+1}(x) = sum_j g_{c+1}(x_j)^T H^-1 g_{c+1}(x), for the whole pool by the forward-mode
  product of `jaxal.influence.influence_scores` (one jvp per chunk, no per-example gradient).
- Approx-1(x) = |Target(x)|.
- Approx-2(x) = ||g_{c+1}(x)|| * ||s||  (>= Approx-1 by Cauchy-Schwarz, sample by sample).
- Approx-3(x) = ||g_c(x)||     * ||s||  (the gradient from the model of cycle c: what a strategy can
  compute when it selects; this is the paper's Eq. 5, ranking by the gradient norm).
  Norms are global L2 norms over theta from `jaxal.gradnorm.per_example_grad_norms(norm="global")`, by
  the ghost engine (`--diag.grad_method`), which on the last layer costs a forward pass.
- Precision: every product here runs at `--precision.solvers` ("highest", not TF32; `jaxal.precision`).
- L: L_exp = sum_i p_i CE(x, i) with the posterior differentiated (exp-gn as in the reference code) and
  L_ent = -sum_i p_i log p_i (ent-gn). These are the SAME function (DESIGN.md, point 2), so the two
  columns agree to rounding: the diagnostics show it rather than hide it.

Sign convention (Koh & Liang, as in `jaxal.influence`): `I(x, test) = -grad L(test)^T H^-1 g(x) =
-Target(x)`, and adding x to the n labelled samples changes the test loss by about `I/n = -Target(x)/n`.
So the MOST BENEFICIAL samples (largest decrease of the test loss) have the LARGEST Target; the top-K by
Eq. 3 are the K largest Target values.

Tables (K = `--diag.k`, default the budget):
- Table 1: for each strategy, how many of the K samples it selected in cycle c are among the K of largest
  TRUE-label gradient norm on the same pool under model c (labels revealed only for this measurement;
  norm `--diag.table1_norm`, "global" by default, over `--diag.table1_params`, "all" by default).
- Table 2: |top-K by Target (Eq. 3) intersect top-K by Approx-3 (Eq. 5)|, per loss. Also reported:
  the overlap of top-K |Target| (Approx-1) with top-K Approx-3.
- Table 3: train accuracy (on the labelled training set) minus test accuracy, per cycle and strategy.

Outputs, next to the experiment's own results in the run directory (`--workdir`, default
`runs/diagnostics-<dataset>-<strategies>`): `diagnostics.jsonl` and `diagnostics.csv` (one row per
strategy, trial and cycle, rewritten after every cycle; the last cycle has only the accuracy gap),
`diagnostics_fig3.png` (the paper's Fig. 3: the four averages over cycles, one panel per loss, a row per
strategy), `diagnostics_tables.txt` (the printed tables) and `diagnostics_samples/<strategy>_trial<t>_
cycle<c>.npz` (per sample: candidate indices, selected mask, true-label gradient norm, and per loss the
Target, Approx-1/2/3 arrays, both gradient norms and ||s||).

A resumed run keeps the rows already written; the pair that straddles the interruption cannot be
computed (the model of the earlier cycle is not in memory) and is reported as missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, NamedTuple, Optional, get_type_hints

import jax
import jax.numpy as jnp
import numpy as np

from jaxal import gradnorm, influence, parallel, results
from jaxal import precision as precision_lib
from jaxal.config import Config, max_labeled, parse_value
from jaxal.models import inference_apply
from jaxal.pytree import PARAM_SUBSETS, partition, restrict, subset_mask, tree_norm, tree_size
from jaxal.strategies.base import top_k

LOSSES: dict[str, Callable] = {"exp": gradnorm.expected_loss, "ent": gradnorm.entropy_loss}
LOSS_LABELS = {"exp": "L_exp (expected loss)", "ent": "L_ent (entropy)"}
TEST_LOSSES = ("theory", "true")
QUANTITIES = ("target", "approx1", "approx2", "approx3")
QUANTITY_LABELS = {"target": "Target", "approx1": "Approx-1", "approx2": "Approx-2", "approx3": "Approx-3"}


@dataclasses.dataclass(frozen=True)
class DiagnosticsOptions:
    """The `--diag.*` flags."""

    solver: str = "exact"  # H^-1: "exact" (dense: small subsets only, see exact_max_gib), "cg" or "lissa"
    params: str = "last_layer"  # parameter subset theta: "last_layer", "weights" or "all"
    test_loss: str = "theory"  # test gradients: "theory" (the column's L, no labels) or "true" (true-label CE)
    k: Optional[int] = None  # top-K of Tables 1-2; None: the budget
    damping: Optional[float] = None  # mu of (H + mu I); None: the config's weight decay
    cg_maxiter: int = 200
    cg_tol: float = 1e-6
    lissa_scale: float = 10.0  # must exceed the largest Hessian eigenvalue (LiSSA solves (H + mu I) too)
    lissa_depth: int = 1000
    lissa_repeats: int = 1
    lissa_batch_size: Optional[int] = None  # None: the whole labelled set per step (deterministic)
    table1_params: str = "all"  # parameter subset of Table 1's true-label gradient norm
    table1_norm: str = "global"  # "global" or "layer_sum"
    chunk_size: int = 256  # examples per compiled chunk and per Hessian-vector product (memory only)
    exact_block_size: int = 32  # exact: basis vectors per assembly pass of the dense Hessian
    exact_max_gib: float = 1.0  # exact: refused before training if the dense Hessian needs more
    grad_method: str = "ghost"  # per-example norms: "ghost" (no per-example gradient held) or "vmap"
    seed: int = 0  # LiSSA's minibatches
    save_samples: bool = True  # the per-sample .npz files


def check_options(options: DiagnosticsOptions) -> None:
    if options.solver not in influence.SOLVERS:
        raise ValueError(f"--diag.solver: unknown solver {options.solver!r}; choose one of: "
                         f"{', '.join(influence.SOLVERS)}")
    for name in ("params", "table1_params"):
        if getattr(options, name) not in PARAM_SUBSETS:
            raise ValueError(f"--diag.{name}: unknown parameter subset {getattr(options, name)!r}; choose one "
                             f"of: {', '.join(PARAM_SUBSETS)}")
    if options.test_loss not in TEST_LOSSES:
        raise ValueError(f"--diag.test_loss must be one of {', '.join(TEST_LOSSES)}, got {options.test_loss!r}")
    if options.table1_norm not in gradnorm.NORMS:
        raise ValueError(f"--diag.table1_norm must be one of {', '.join(gradnorm.NORMS)}, "
                         f"got {options.table1_norm!r}")
    for name in ("k", "lissa_batch_size"):  # None (the default) or a positive count
        if getattr(options, name) is not None and getattr(options, name) < 1:
            raise ValueError(f"--diag.{name} must be at least 1 (or none), got {getattr(options, name)}")
    if options.grad_method not in gradnorm.METHODS:
        raise ValueError(f"--diag.grad_method must be one of {', '.join(gradnorm.METHODS)}, "
                         f"got {options.grad_method!r}")
    for name in ("cg_maxiter", "lissa_depth", "lissa_repeats", "chunk_size", "exact_block_size"):
        if getattr(options, name) < 1:
            raise ValueError(f"--diag.{name} must be at least 1, got {getattr(options, name)}")
    if options.seed < 0:
        raise ValueError(f"--diag.seed must be >= 0, got {options.seed}")
    # `not x >= 0` also rejects NaN, which every ordered comparison lets through.
    if options.damping is not None and not (math.isfinite(options.damping) and options.damping >= 0):
        raise ValueError(f"--diag.damping must be a finite number >= 0, got {options.damping}")
    if not (math.isfinite(options.cg_tol) and options.cg_tol >= 0):
        raise ValueError(f"--diag.cg_tol must be a finite number >= 0, got {options.cg_tol}")
    if not (math.isfinite(options.exact_max_gib) and options.exact_max_gib > 0):
        raise ValueError(f"--diag.exact_max_gib must be a finite number > 0, got {options.exact_max_gib}")
    if not (math.isfinite(options.lissa_scale) and options.lissa_scale > 0):
        raise ValueError(f"--diag.lissa_scale must be a finite number > 0, got {options.lissa_scale}")
    if options.solver == "lissa" and not 0 <= (options.damping or 0.0) < options.lissa_scale:
        raise ValueError("--diag.damping must be below --diag.lissa_scale (LiSSA's relative damping "
                         "damping/scale must be < 1)")


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


class SolveSettings(NamedTuple):
    """The static settings of `_solve`: one compiled program per value and shapes, for a whole run."""

    model: object
    subset: str
    solver: str
    depth: int
    repeats: int
    batch_size: Optional[int]
    maxiter: int
    chunk_size: int
    block_size: int
    precision: str
    mesh: object


def _solve_body(static: SolveSettings, variables, train_data, num_train, v, rng, damping, scale, tol):
    """`(H + mu I)^-1 v`, H the Hessian of the mean true-label CE over the padded labelled set
    `train_data = ((x, y), weights)` (its first `num_train` rows are real), by the chosen solver in
    LiSSA's convention `mu = damping * scale`. The loss is built from the traced variables."""
    theta_loss, theta = restrict(_example_loss(static.model, variables, gradnorm.cross_entropy, True),
                                 variables["params"], static.subset)
    return influence.solve_traced(static.solver, influence.weighted_mean_loss(theta_loss), theta, train_data, v,
                                  rng=rng, damping=damping, scale=scale, depth=static.depth, repeats=static.repeats,
                                  batch_size=static.batch_size, maxiter=static.maxiter, tol=tol,
                                  chunk_size=static.chunk_size, block_size=static.block_size,
                                  num_examples=num_train, mesh=static.mesh, precision=static.precision)


_solve = jax.jit(_solve_body, static_argnums=0)


def inverse_hvp(model, variables: dict, options: DiagnosticsOptions, train_data, v, *, damping: float, rng,
                capacity: Optional[int] = None, precision: str = precision_lib.SOLVERS_DEFAULT, mesh=None):
    """`(H + damping*I)^-1 v` (damping is the ABSOLUTE shift for every solver), H the Hessian of the mean
    true-label CE of `model` with `variables` over `train_data = (x, y)` w.r.t. the subset
    `options.params`. The labelled set is padded to `jaxal.parallel.bucket(n, capacity)` rows (weights 0,
    the solvers stop at the real rows), so a growing set and new weights compile nothing new. Host
    checks: LiSSA's divergence, CG's curvature and tolerance."""
    train_x, train_y = train_data
    n = int(np.shape(train_y)[0])
    data = _pad_rows((np.asarray(train_x), np.asarray(train_y)), parallel.bucket(n, capacity))
    if options.solver == "lissa":
        scale = options.lissa_scale
        relative, batch_size = damping / scale, options.lissa_batch_size
    else:
        scale, relative, batch_size = 1.0, damping, 1
    static = SolveSettings(model, options.params, options.solver, options.lissa_depth, options.lissa_repeats,
                           batch_size, options.cg_maxiter, options.chunk_size, options.exact_block_size, precision,
                           mesh)
    placed = parallel.replicate((variables, data, n, v, rng), mesh)
    result = _solve(static, *placed, relative, scale, options.cg_tol)
    result = result if mesh is None else parallel.local(result)
    if options.solver == "lissa":
        theta_loss, theta = restrict(_example_loss(model, variables, gradnorm.cross_entropy, True),
                                     variables["params"], options.params)  # for the error message only
        influence.check_lissa(result, influence.weighted_mean_loss(theta_loss), theta, data, rng=rng,
                              damping=relative, scale=scale, batch_size=batch_size, num_examples=n,
                              chunk_size=options.chunk_size)
        return result.inverse_hvp
    if options.solver == "cg":
        influence.check_cg(result, damping, stacklevel=3, shift_remedy="raise --diag.damping",
                           convergence_remedy=influence.cg_flags_remedy("--diag.", options.cg_maxiter, options.cg_tol))
        return result.solution
    return result


def _pad_rows(data, size: int):
    """`(data, weights)` with `data`'s rows padded to `size` on the host (repeating the last row, weight 0)."""
    n = parallel.num_examples(data)
    idx = np.minimum(np.arange(size), n - 1)
    return jax.tree.map(lambda a: a[idx], data), (np.arange(size) < n).astype(np.float32)


# The pool-wide passes go through `jaxal.parallel.map_chunks`/`sum_chunks` as the strategies' scorers do
# (`jaxal.strategies.gradient`): module-level functions of `(static, consts, chunk)`, `static` a hashable
# tuple of settings (the Flax model hashes by value; the losses are module-level functions) and the
# trained variables and `s` the traced `consts`. The per-example losses are built INSIDE the trace, so a
# new cycle's weights compile nothing and are never baked into a program as constants: one program per
# (loss, chunk shape) for the whole run.


def _example_loss(model, variables: dict, loss_of_logits: Callable, labelled: bool = False):
    return gradnorm.example_loss(inference_apply(model, variables["batch_stats"]), loss_of_logits,
                                 labelled=labelled)


def _gradient_sum(static, variables, chunk):
    """sum_i w_i grad_theta L(z_i) over a chunk (w = 0 for sum_chunks' padding): the test gradient v."""
    model, loss_of_logits, subset, labelled, precision = static
    examples, weights = chunk
    with precision_lib.scope(precision):
        losses_of, theta = restrict(_example_loss(model, variables, loss_of_logits, labelled).batch_losses,
                                    variables["params"], subset)

        def total(p):
            losses = losses_of(p, examples)
            return jnp.sum(weights.astype(losses.dtype) * losses)

        return jax.grad(total)(theta)


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
        loss = _example_loss(model, variables, gradnorm.cross_entropy, labelled=True)
        return gradnorm.per_example_grad_norms(loss, variables["params"], chunk, norm=norm, params_filter=subset,
                                               method=grad_method)


def cycle_bounds(model, prev_variables: dict, next_variables: dict, pool_x, train_data, test_data, *,
                 options: DiagnosticsOptions = DiagnosticsOptions(), damping: float = 0.0,
                 rng: Optional[jax.Array] = None, losses: Optional[dict[str, Callable]] = None,
                 mesh: Optional[jax.sharding.Mesh] = None, capacity: Optional[int] = None,
                 precision: str = precision_lib.SOLVERS_DEFAULT) -> dict[str, Bounds]:
    """{loss name: Bounds} for the models of cycles c (`prev_variables`) and c+1 (`next_variables`), the
    pool `pool_x`, the labelled training set `train_data = (x, y)` model c+1 was trained on, and the test
    set `test_data = (x, y)` (its labels are used only with `options.test_loss == "true"`).
    See the module docstring for the definitions; `damping` is the absolute shift mu of H + mu I.
    `losses` maps a name to a module-level function of one example's logits (it is part of the static
    settings of the compiled passes); with a `mesh`, the pool and test passes and the solve are split over
    its devices. `capacity`: the largest labelled set of the run (the solver's padded size, so it compiles
    once per run). `precision`: of every product here (`jaxal.precision`; "highest" by default).

    Cost per loss: one solve (every Hessian-vector product summed over chunks of `options.chunk_size`
    labelled examples), one pass over the pool (Target by a jvp, and the per-example gradient norms under
    models c and c+1), and one gradient of the test loss (skipped for the second loss with true labels).
    """
    losses = LOSSES if losses is None else losses
    rng = jax.random.key(options.seed) if rng is None else rng
    chunk, subset = options.chunk_size, options.params
    test_x, test_y = test_data

    def solve_for(loss_of_logits, data, labelled: bool):
        v = parallel.sum_chunks(_gradient_sum, (model, loss_of_logits, subset, labelled, precision), next_variables,
                                data, chunk_size=chunk, mesh=mesh)  # sum_j g_{c+1}(x_j): a SUM over the test set
        return inverse_hvp(model, next_variables, options, train_data, v, damping=damping, rng=rng, capacity=capacity,
                           precision=precision, mesh=mesh)

    s_true = solve_for(gradnorm.cross_entropy, (test_x, test_y), True) if options.test_loss == "true" else None
    out = {}
    for name, loss_of_logits in losses.items():
        s = s_true if s_true is not None else solve_for(loss_of_logits, test_x, False)
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


# ----------------------------------------------------------------------------- the observer


@dataclasses.dataclass
class _Previous:
    cycle: int
    variables: dict
    candidates: np.ndarray
    selected: np.ndarray


class DiagnosticsObserver:
    """`observer(exp, cycle, state, trained_on, record, candidates)` for `jaxal.loop.run_experiment`:
    keeps the previous cycle's model per (strategy, trial) and, when cycle c+1 arrives, computes the row of
    cycle c. `rows[(strategy, trial, cycle)]` holds every row; `on_update(rows)` runs after every cycle."""

    def __init__(self, options: DiagnosticsOptions, *, rows: Optional[dict] = None,
                 on_update: Optional[Callable[[dict], None]] = None, log: Callable[[str], None] = print):
        check_options(options)
        self.options = options
        self.rows: dict[tuple, dict] = dict(rows or {})
        self.on_update = on_update
        self.log = log
        self.samples: dict[tuple, dict] = {}  # (strategy, trial, cycle) -> per-sample arrays (last ones only)
        self._previous: dict[tuple, _Previous] = {}

    def __call__(self, exp, cycle: int, state, trained_on, record: dict, candidates) -> None:
        from jaxal.train import model_variables

        key = (record["strategy"], record["trial"])
        # Process-local (the state may be a global array over several processes, as the loop's strategies
        # get them), then copies: a warm-started next cycle may donate the state's buffers to its training.
        variables = jax.tree.map(jnp.copy, parallel.local(model_variables(state)))
        row = dict(self.rows.get((*key, cycle), {}))
        row.update(strategy=key[0], trial=key[1], cycle=cycle, num_labeled=record["num_labeled"],
                   train_accuracy=record["train_accuracy"], test_accuracy=record["test_accuracy"],
                   gap=record["train_accuracy"] - record["test_accuracy"])
        self.rows[(*key, cycle)] = row
        previous = self._previous.pop(key, None)
        if previous is not None and previous.cycle == cycle - 1:
            self.rows[(*key, cycle - 1)].update(self._pair(exp, key, previous, variables, trained_on))
        elif cycle > 0 and "table2_k" not in self.rows.get((*key, cycle - 1), {}) and parallel.is_primary():
            self.log(f"diagnostics: {key[0]} trial {key[1]}: the model of cycle {cycle - 1} ran in an earlier "
                     f"process (resumed run); the pair ({cycle - 1}, {cycle}) is missing")
        if len(candidates):
            self._previous[key] = _Previous(cycle, variables, np.asarray(candidates),
                                            np.asarray(record["selected"], np.int64))
        if self.on_update is not None:
            self.on_update(self.rows)

    def _pair(self, exp, key, previous: _Previous, variables: dict, trained_on) -> dict:
        options, config, data = self.options, exp.config, exp.dataset
        start = time.perf_counter()
        strategy, trial = key
        candidates = previous.candidates
        pool_x = data.x_train[candidates]  # host arrays: the chunked passes move them a chunk at a time
        trained_on = np.asarray(trained_on)
        train_data = (data.x_train[trained_on], data.y_train[trained_on])  # padded on the host by the solve
        test_data = (data.x_test, data.y_test)
        damping = config.weight_decay if options.damping is None else options.damping
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(options.seed), trial), previous.cycle)
        precision = config.precision.solvers
        bounds = cycle_bounds(exp.model, previous.variables, variables, pool_x, train_data, test_data,
                              options=options, damping=damping, rng=rng, mesh=exp.mesh,
                              capacity=max_labeled(config), precision=precision)
        k = options.k or config.budget
        k = min(k, len(candidates))
        row = summarise(bounds, k)
        # Table 1: the strategy's K selected samples vs the K of largest true-label gradient norm, model c.
        true_norms = true_label_grad_norms(exp.model, previous.variables, pool_x, data.y_train[candidates],
                                           norm=options.table1_norm, params_filter=options.table1_params,
                                           chunk_size=options.chunk_size, mesh=exp.mesh,
                                           grad_method=options.grad_method, precision=precision)
        selected_positions = np.searchsorted(candidates, previous.selected)
        if not np.array_equal(candidates[np.minimum(selected_positions, len(candidates) - 1)], previous.selected):
            raise RuntimeError("the selected samples are not among the candidates of their cycle")
        row.update(table1_overlap=selection_overlap(selected_positions, true_norms),
                   table1_k=int(selected_positions.size), table2_k=k, num_pool=int(len(candidates)),
                   num_test=int(data.x_test.shape[0]), num_train=int(len(trained_on)), solver=options.solver,
                   params=options.params, num_params=_subset_size(variables["params"], options.params),
                   test_loss=options.test_loss, damping=float(damping), diagnostics_seconds=0.0)
        row["diagnostics_seconds"] = time.perf_counter() - start
        selected_mask = np.zeros(len(candidates), bool)
        selected_mask[selected_positions] = True
        arrays = {"candidates": candidates, "selected": selected_mask, "true_label_grad_norm": true_norms}
        for name, b in bounds.items():
            for field in ("target", "approx1", "approx2", "approx3", "grad_norm_next", "grad_norm_prev"):
                arrays[f"{name}_{field}"] = getattr(b, field)
            arrays[f"{name}_s_norm"] = np.asarray(b.s_norm)
        self.samples = {(strategy, trial, previous.cycle): arrays}
        return row


def _subset_size(params, subset: str) -> int:
    """Number of parameters in `subset` (works on shapes from `jax.eval_shape` too)."""
    return int(tree_size(partition(params, subset_mask(params, subset))[0]))


# ----------------------------------------------------------------------------- outputs

CSV_FIRST = ("strategy", "trial", "cycle", "num_labeled", "train_accuracy", "test_accuracy", "gap",
             "table1_overlap", "table1_k", "table2_k")


def csv_columns(rows: list[dict]) -> list[str]:
    seen = list(CSV_FIRST)
    for row in rows:
        seen += [c for c in row if c not in seen]
    return seen


def write_outputs(workdir: Path, rows: dict, samples: Optional[dict] = None, title: str = "") -> None:
    """diagnostics.jsonl/.csv, the figure, the tables and the new per-sample file (all rewritten whole)."""
    import csv
    import io

    ordered = [rows[key] for key in sorted(rows)]
    results.write_jsonl(workdir / "diagnostics.jsonl", ordered)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(ordered), restval="")
    writer.writeheader()
    writer.writerows(ordered)
    results.write_atomic(workdir / "diagnostics.csv", buffer.getvalue())
    for (strategy, trial, cycle), arrays in (samples or {}).items():
        folder = workdir / "diagnostics_samples"
        folder.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        results.write_atomic(folder / f"{strategy}_trial{trial}_cycle{cycle}.npz", buffer.getvalue())
    if any("table2_k" in r for r in ordered):
        plot_fig3(workdir / "diagnostics_fig3.png", ordered, title)
    results.write_atomic(workdir / "diagnostics_tables.txt", format_tables(ordered) + "\n")


def _mean_by_cycle(rows: list[dict], strategy: str, field: str) -> dict[int, float]:
    """cycle -> mean over trials of `field` (rows lacking it are skipped)."""
    values = defaultdict(list)
    for r in rows:
        if r["strategy"] == strategy and r.get(field) is not None:
            values[r["cycle"]].append(r[field])
    return {c: float(np.mean(v)) for c, v in sorted(values.items())}


def _strategies(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["strategy"] for r in rows))


def _table(title: str, header: list[str], body: list[list[str]], note: str = "") -> str:
    widths = [max(len(str(line[i])) for line in [header] + body) for i in range(len(header))]
    fmt = lambda line: "  ".join(str(v).rjust(w) if i else str(v).ljust(w)  # noqa: E731
                                 for i, (v, w) in enumerate(zip(line, widths)))
    lines = [title, fmt(header), "-" * (sum(widths) + 2 * (len(widths) - 1))] + [fmt(line) for line in body]
    return "\n".join(lines + ([note] if note else []))


def _count(value: Optional[float], k: Optional[float]) -> str:
    if value is None:
        return "-"
    text = f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    return f"{text}/{k:.0f} ({100 * value / k:.0f}%)" if k else text


def format_tables(rows: list[dict]) -> str:
    """Fig. 3's averages and Tables 1-3 in the paper's layout (means over trials)."""
    if not rows:
        return "(no diagnostics yet)"
    strategies = _strategies(rows)
    cycles = sorted({r["cycle"] for r in rows})
    pair_cycles = sorted({r["cycle"] for r in rows if "table2_k" in r})
    losses = [name for name in LOSSES if any(f"{name}_target_mean" in r for r in rows)]
    parts = []
    for strategy in strategies:
        body = []
        for name in losses:
            for q in QUANTITIES:
                means = _mean_by_cycle(rows, strategy, f"{name}_{q}_mean")
                body.append([f"{name} {QUANTITY_LABELS[q]}"] + [f"{means[c]:.4g}" if c in means else "-"
                                                                 for c in pair_cycles])
            ratio = _mean_by_cycle(rows, strategy, f"{name}_ratio_approx3_target")
            body.append([f"{name} Approx-3/Target"] + [f"{ratio[c]:.3g}" if c in ratio else "-"
                                                       for c in pair_cycles])
        parts.append(_table(f"Fig. 3 ({strategy}): averages over the unlabelled pool of cycle c "
                            "(models of cycles c and c+1)", ["quantity"] + [f"c={c}" for c in pair_cycles], body))
    body = []
    for strategy in strategies:
        overlap, k = _mean_by_cycle(rows, strategy, "table1_overlap"), _mean_by_cycle(rows, strategy, "table1_k")
        body.append([strategy] + [_count(overlap.get(c), k.get(c)) for c in pair_cycles])
    parts.append(_table("Table 1: selected samples among the K of largest true-label gradient norm (model c)",
                        ["strategy"] + [f"c={c}" for c in pair_cycles], body))
    body = []
    for strategy in strategies:
        k = _mean_by_cycle(rows, strategy, "table2_k")
        for name in losses:
            for field, label in (("overlap_target_approx3", "Target"), ("overlap_abs_target_approx3", "|Target|")):
                overlap = _mean_by_cycle(rows, strategy, f"{name}_{field}")
                body.append([f"{strategy} {name} {label}"] + [_count(overlap.get(c), k.get(c)) for c in pair_cycles])
    parts.append(_table("Table 2: overlap of the top-K by Eq. 3 (largest Target = most beneficial; or largest "
                        "|Target|) and by Eq. 5 (Approx-3)", ["strategy, loss, Eq. 3 by"]
                        + [f"c={c}" for c in pair_cycles], body))
    body = []
    for strategy in strategies:
        gap = _mean_by_cycle(rows, strategy, "gap")
        body.append([strategy] + [f"{100 * gap[c]:.2f}" if c in gap else "-" for c in cycles])
    parts.append(_table("Table 3: train accuracy - test accuracy (percentage points)",
                        ["strategy"] + [f"c={c}" for c in cycles], body))
    return "\n\n".join(parts)


def plot_fig3(path: Path, rows: list[dict], title: str = "") -> None:
    """The paper's Fig. 3: the pool averages of Target and Approx-1/2/3 over cycles, one panel per loss,
    a row per strategy, log-scale y. A negative average Target is drawn at its absolute value with a
    hollow marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = [s for s in _strategies(rows) if any("table2_k" in r and r["strategy"] == s for r in rows)]
    losses = [name for name in LOSSES if any(f"{name}_target_mean" in r for r in rows)]
    fig, axes = plt.subplots(len(strategies), len(losses), figsize=(4.6 * len(losses), 3.1 * len(strategies)),
                             squeeze=False, sharex=True)
    styles = {"target": ("k", "o"), "approx1": ("tab:blue", "s"), "approx2": ("tab:orange", "^"),
              "approx3": ("tab:green", "D")}
    for i, strategy in enumerate(strategies):
        for j, name in enumerate(losses):
            ax = axes[i, j]
            for q in QUANTITIES:
                means = _mean_by_cycle(rows, strategy, f"{name}_{q}_mean")
                xs = np.array(list(means), float)
                ys = np.array(list(means.values()))
                color, marker = styles[q]
                ax.plot(xs, np.abs(ys), color=color, lw=1.3, label=QUANTITY_LABELS[q])
                for x, y in zip(xs, ys):
                    ax.plot([x], [abs(y)], marker=marker, color=color, ms=4,
                            markerfacecolor=color if y > 0 else "none")
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.grid(alpha=0.3, which="both")
            ax.set_title(f"{strategy}: {LOSS_LABELS[name]}", fontsize=9)
            if i == len(strategies) - 1:
                ax.set_xlabel("AL cycle c (models c, c+1)")
            if j == 0:
                ax.set_ylabel("mean over pool")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def read_rows(workdir: Path) -> dict:
    path = Path(workdir) / "diagnostics.jsonl"
    if not path.exists():
        return {}
    return {(r["strategy"], r["trial"], r["cycle"]): r for r in results.read_jsonl(path)}


# ----------------------------------------------------------------------------- entry points


def default_workdir(config: Config) -> Path:
    """`jaxal.loop.default_workdir` with the name prefixed by "diagnostics-": a diagnostics run never
    resumes, or overwrites, the plain run of the same config."""
    from jaxal import loop

    plain = loop.default_workdir(config)
    return plain.with_name(f"diagnostics-{plain.name}")


def run_diagnostics(config: Config, options: DiagnosticsOptions = DiagnosticsOptions(), *,
                    workdir: Optional[str | Path] = None, overwrite: bool = False,
                    log: Callable[[str], None] = print) -> list[dict]:
    """Run (or resume) the experiment of `config` with the diagnostics after every cycle; writes the
    outputs into the run directory and returns the rows (one per strategy, trial and cycle)."""
    from jaxal import loop

    check_options(options)
    workdir = Path(workdir or config.workdir or default_workdir(config))
    exp = loop.prepare(config, workdir)  # validates the experiment, touches nothing
    _check_against(exp, options)
    rows = {} if overwrite else read_rows(workdir)
    title = (f"{exp.dataset.name}, {exp.config.model}: solver {options.solver}, params {options.params}, "
             f"test loss {options.test_loss}")
    # Several processes: every one computes the same rows (the passes are collective over the mesh), and
    # only process 0 writes and logs, as the loop does with its own results.
    primary = parallel.is_primary()

    def on_update(current):
        if primary:
            write_outputs(workdir, current, observer.samples if options.save_samples else None, title)
        observer.samples = {}

    observer = DiagnosticsObserver(options, rows=rows, on_update=on_update, log=log)
    loop.run_prepared(exp, overwrite=overwrite, log=log, observer=observer)
    ordered = [observer.rows[key] for key in sorted(observer.rows)]
    if primary:
        write_outputs(workdir, observer.rows, None, title)
        log(format_tables(ordered))
        log(f"diagnostics: {workdir / 'diagnostics.csv'}, {workdir / 'diagnostics_fig3.png'}, "
            f"{workdir / 'diagnostics_tables.txt'}"
            + (f", {workdir / 'diagnostics_samples'}/" if options.save_samples else ""))
    return ordered


def _check_against(exp, options: DiagnosticsOptions) -> None:
    """Fail before training for settings that cannot run on this experiment."""
    from jaxal.models import init_variables

    config = exp.config
    if exp.task is not None and exp.task.name != "classification":
        raise ValueError(f"the bound diagnostics (Wang et al.'s Approx-1/2/3, Tables 1-3) use per-example "
                         f"class labels and accuracies: they are implemented for classification, not "
                         f"{exp.task.name}")
    variables = jax.eval_shape(lambda key: init_variables(exp.model, key, exp.dataset.image_shape),
                               jax.random.key(0))
    if options.solver == "exact":
        params = variables["params"]
        try:
            influence.check_exact_memory(partition(params, subset_mask(params, options.params))[0],
                                         max_bytes=int(options.exact_max_gib * 2**30),
                                         block_size=options.exact_block_size, flag="--diag.exact_max_gib")
        except ValueError as error:
            raise ValueError(f"--diag.solver exact with --diag.params {options.params} of {config.model}: {error}"
                             ) from None
    precision_lib.check(config.precision.solvers, "--precision.solvers")
    if config.cycles < 2:
        raise ValueError("the diagnostics compare the models of consecutive cycles: --cycles must be at least 2")
    k = options.k or config.budget
    if config.subset_size is not None and k > config.subset_size:
        raise ValueError(f"--diag.k ({k}) is larger than the scored pool (--subset_size {config.subset_size})")


def build_parser() -> argparse.ArgumentParser:
    from jaxal import cli, run

    parser = run.build_parser()
    parser.prog = "python -m jaxal.diagnostics"
    parser.description = ("Run an active-learning experiment and, after every cycle, the bound-tightness "
                          "diagnostics of Wang et al. (AAAI 2022): Fig. 3 (Target, Approx-1/2/3), Table 1 "
                          "(overlap with the true-label gradient norm), Table 2 (overlap of Eq. 3 and Eq. 5) "
                          "and Table 3 (train-test gap). Outputs go next to the run's results in --workdir "
                          "(default runs/diagnostics-<dataset>-<strategies>).")
    group = parser.add_argument_group("diagnostics")
    hints = get_type_hints(DiagnosticsOptions)
    for field in dataclasses.fields(DiagnosticsOptions):
        kind = hints[field.name]
        group.add_argument(f"--diag.{field.name}", dest=f"diag.{field.name}", default=argparse.SUPPRESS,
                           metavar=cli.metavar(kind),  # INT, INT|NONE, ... as the config's flags
                           help=f"default: {field.default!r}")
    return parser


def options_from_args(args: argparse.Namespace) -> DiagnosticsOptions:
    hints = get_type_hints(DiagnosticsOptions)
    values = {}
    for name, text in vars(args).items():
        if name.startswith("diag."):
            field = name[len("diag."):]
            try:
                values[field] = parse_value(text, hints[field])
            except ValueError as error:
                raise ValueError(f"--{name}: cannot read {text!r} ({error})") from None
    return DiagnosticsOptions(**values)


def main(argv=None) -> int:
    """`jaxal.run.main` with the diagnostics: the same distributed start-up, errors and exit codes."""
    from jaxal import cli

    args = build_parser().parse_args(argv)
    return cli.run_command(args, lambda config: run_diagnostics(config, options_from_args(args),
                                                                workdir=config.workdir, overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
