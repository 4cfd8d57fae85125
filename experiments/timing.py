"""Timing shared by the benchmarks (run as `python experiments/bench_*.py`, so this imports as `timing`),
and the optional import of the PyTorch references (`torch_reference`), which torch-free runs never load."""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, NamedTuple


class Timing(NamedTuple):
    first: float  # seconds of the first run (for jitted code: compilation included)
    best: float  # best of the timed runs
    # Best CPU seconds of this process over the timed runs (all threads; on a CPU backend the work itself,
    # which load from other processes on a shared machine stretches less than the wall time).
    best_cpu: float = float("nan")


def time_runs(fns: dict[str, Callable], repeats: int) -> dict[str, Timing]:
    """First-run and best wall time (and process CPU time) of each `fn()` over `repeats` runs, waiting for
    the device (`jax.block_until_ready` on the result; a torch function synchronises before it returns).
    The repeats are interleaved, one round of every function at a time, so that load from other processes
    on a shared machine hits all of them alike. JAX is imported here, not at module level: bench_parallel
    sets its fake devices before JAX starts."""
    import jax

    def run(fn) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        return time.perf_counter() - start, time.process_time() - cpu

    first = {name: run(fn)[0] for name, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    best_cpu = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = run(fn)
            best[name], best_cpu[name] = min(best[name], wall), min(best_cpu[name], cpu)
    return {name: Timing(first[name], best[name], best_cpu[name]) for name in fns}


def best_time(fn: Callable, repeats: int) -> float:
    """Best wall time of `fn()` over `repeats` runs after a first, compiling run, waiting for the device."""
    return time_runs({"fn": fn}, repeats)["fn"].best


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def import_torch_reference(torch_site: str | None, skip: bool = False):
    """The `torch_reference` module (PyTorch twins of jaxal's models and the reference codes' scoring
    loops), or None when `skip` or when torch cannot be imported; says which. `torch_site`, a
    site-packages directory holding torch, is appended to `sys.path` (after the project's own packages,
    so torch's dependencies never shadow them)."""
    if skip:
        print("PyTorch: skipped (--no-torch)")
        return None
    if torch_site:
        sys.path.append(torch_site)
    try:
        import torch_reference
    except ImportError as error:
        print(f"PyTorch: not importable ({error}); the torch comparison is skipped "
              "(see --torch-site in the module docstring)")
        return None
    return torch_reference


def check_rtol() -> float:
    """Relative tolerance of the benchmarks' torch-vs-jaxal agreement checks, which run without TF32
    (`torch_reference.full_float32`): float32 sums in different orders, 1e-4 on a CPU; on a GPU 3e-3
    (cuDNN and XLA pick different convolution algorithms; with TF32 left on, an H100 measured 6e-4 to 1e-3
    on gradient norms and 6e-2 on a ResNet-18 HVP)."""
    import jax

    return 1e-4 if jax.default_backend() == "cpu" else 3e-3
