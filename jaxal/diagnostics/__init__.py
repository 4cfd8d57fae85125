"""Bound-tightness diagnostics of the gradient-norm theory (Wang et al., AAAI 2022, Fig. 3 and Tables 1-3).

Command (a whole active-learning run, with the diagnostics computed after every cycle):

    python -m jaxal.diagnostics --dataset digits --strategy entropy,random --cycles 6

Every flag of `python -m jaxal.run` works (they configure the experiment; `--coordinator/--num_processes/
--process_id/--distributed` start several processes as there, and only process 0 writes and prints), plus
the `--diag.*` flags of `BoundOptions` (bad values exit with status 2 before any training). Library
use: `run_diagnostics(config, options, workdir=...)`, or `cycle_bounds(...)` for one pair of models.

The package: `bounds` (the mathematics of one pair of models, and the options), `observer` (the
observer over consecutive cycles and `run_diagnostics`), `report` (the files and tables) and `__main__`
(the command line). The solve of H^-1 is `jaxal.influence.inverse_hvp`, ISAL's: its options are the
fields of `jaxal.config.SolverOptions` under `--diag.` (`--diag.solver`, `--diag.damping`, `--diag.scale`,
`--diag.depth`, ...), in its one damping convention.

What is computed, for the models T^c and T^{c+1} of consecutive cycles c, c+1
------------------------------------------------------------------------------
Notation: `theta` the parameter subset `--diag.params` ("last_layer" by default), `g_m(x)` the gradient
with respect to theta of the loss L of one example under the model of cycle m, `x_j` the test samples,
`U` the unlabelled pool of cycle c (the candidates the strategy scored in cycle c, including the ones it
then selected).

- H: the Hessian, with respect to theta, of the TRAINING objective of model c+1: the mean true-label
  cross-entropy over the labelled set model c+1 was trained on, plus `mu * I` with mu = the config's
  weight decay wd (`--diag.hessian_weight_decay true`, the default: SGD with weight decay minimises
  CE + wd/2 ||theta||^2, whose Hessian is H_CE + wd I) plus `--diag.damping` x `--diag.scale` (0 by
  default; the damping is relative, as ISAL's). The shift also makes H invertible: the CE Hessian of a
  softmax head is singular along "add the same vector to every class", a direction every gradient is
  orthogonal to.
- v = sum_j g_{c+1}(x_j), a SUM over the test set (as in the paper; a mean would only rescale everything
  by 1/n_test). Which loss the test gradients use (`--diag.test_loss`):
    "theory" (default): the same L as the pool gradients (L_exp in the L_exp column, L_ent in the L_ent
    column): the theory's test loss, which needs no test labels;
    "true": the true-label cross-entropy of the test samples (test labels used for the measurement only);
    then v, s and ||s|| are the same for both columns.
- s = H^-1 v: ONE solve per cycle and loss, by `--diag.solver` ("exact": dense, the default on the last
  layer, refused before training above `--diag.exact_max_gib`; "cg"; "lissa", with `--diag.scale`,
  `--diag.depth`, `--diag.repeats`, `--diag.batch_size`), `jaxal.influence.inverse_hvp`. Every
  Hessian-vector product is a sum over chunks of `--diag.hvp_chunk_size` labelled examples, and the
  solve is compiled once per run (the labelled set padded to the run's largest, the weights traced).
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
  L_ent = -sum_i p_i log p_i (ent-gn). These are the SAME function (`sum_i p_i CE(x, i) = -sum_i p_i
  log p_i` term by term, and the gradients agree because the posterior is differentiated in both), so
  the two columns agree to rounding: the diagnostics show it rather than hide it.

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

from jaxal.diagnostics.bounds import (LOSSES, QUANTITIES, TEST_LOSSES, BoundOptions, Bounds, ModelLoss,
                                      check_options, cycle_bounds, selection_overlap, summarise, top_k_overlap,
                                      true_label_grad_norms)
from jaxal.diagnostics.observer import DiagnosticsObserver, default_workdir, run_diagnostics
from jaxal.diagnostics.report import csv_columns, format_tables, plot_fig3, read_rows, write_outputs



def __getattr__(name: str):
    if name == "DiagnosticsOptions":  # the earlier name: say what replaced it
        raise ImportError("jaxal.diagnostics.DiagnosticsOptions is now BoundOptions, whose solve options are "
                             "jaxal.config.SolverOptions' (ISAL's names): lissa_scale/lissa_depth/lissa_repeats/"
                             "lissa_batch_size are scale/depth/repeats/batch_size, damping is relative (the shift "
                             "is damping x scale) and the weight decay is hessian_weight_decay=True; "
                             "cycle_bounds takes that absolute term as l2=")
    raise AttributeError(f"module 'jaxal.diagnostics' has no attribute {name!r}")


__all__ = ["LOSSES", "QUANTITIES", "TEST_LOSSES", "BoundOptions", "Bounds", "DiagnosticsObserver", "ModelLoss",
           "check_options", "csv_columns", "cycle_bounds", "default_workdir", "format_tables", "plot_fig3",
           "read_rows", "run_diagnostics", "selection_overlap", "summarise", "top_k_overlap",
           "true_label_grad_norms", "write_outputs"]
