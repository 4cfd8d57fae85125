"""Timing shared by the benchmarks (run as `python experiments/bench_*.py`, so this imports as `timing`)."""

import time


def best_time(fn, repeats: int) -> float:
    """Best wall time of `fn()` over `repeats` runs after a first, compiling run, waiting for the device.
    JAX is imported here, not at module level: bench_parallel sets its fake devices before JAX starts."""
    import jax

    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)
