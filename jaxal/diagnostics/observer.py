"""The observer over consecutive cycles (`DiagnosticsObserver`) and `run_diagnostics`, which runs an
experiment with it."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxal import influence, parallel
from jaxal import precision as precision_lib
from jaxal.config import Config, max_labeled
from jaxal.diagnostics.bounds import (BoundOptions, check_options, cycle_bounds, selection_overlap, summarise,
                                      true_label_grad_norms)
from jaxal.diagnostics.report import format_tables, read_rows, write_outputs
from jaxal.pytree import partition, subset_mask, tree_size

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

    def __init__(self, options: BoundOptions, *, rows: Optional[dict] = None,
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
        l2 = float(config.weight_decay) if options.hessian_weight_decay else 0.0
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(options.seed), trial), previous.cycle)
        precision = config.precision.solvers
        bounds = cycle_bounds(exp.model, previous.variables, variables, pool_x, train_data, test_data,
                              options=options, l2=l2, rng=rng, mesh=exp.mesh,
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
                   test_loss=options.test_loss, hessian_shift=l2 + options.damping * options.scale,
                   diagnostics_seconds=0.0)
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


# ----------------------------------------------------------------------------- entry points


def default_workdir(config: Config) -> Path:
    """`jaxal.loop.default_workdir` with the name prefixed by "diagnostics-": a diagnostics run never
    resumes, or overwrites, the plain run of the same config."""
    from jaxal import loop

    plain = loop.default_workdir(config)
    return plain.with_name(f"diagnostics-{plain.name}")


def run_diagnostics(config: Config, options: BoundOptions = BoundOptions(), *,
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


def _check_against(exp, options: BoundOptions) -> None:
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
        try:
            influence.check_exact_memory(influence.select(variables["params"], options.params),
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
