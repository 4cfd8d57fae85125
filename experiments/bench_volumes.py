"""Per-example gradient norms of 3-D CNNs (ent_gn on subtomograms): vmap, ghost and mixed engines, memory and time.

The ghost engine forms each Conv3D layer's input patches (27 x the layer's input) and, where cheaper, Gram
matrices over its output positions; vmap materialises a chunk of per-example gradients (chunk x |theta|,
16-18M parameters for dsrf3d/hal3d at 40^3, most of them in the first dense layer); the mixed engine
scores each layer by whichever of the two XLA finds smaller for that layer (`gradnorm.layer_costs`). This
prints the per-layer choice (XLA's bytes per volume with each layer by each engine) and what the
choice cost (programs compiled, seconds), the engine a run with `--gradnorm.memory_budget_mib` (`--budget_mib`)
would take; then, for each engine and two chunk sizes, XLA's analysis of the compiled chunk program
(temporary buffers; the pool is scored one chunk at a time by `jaxal.parallel.map_chunks`, so the memory is
that of a chunk whatever the pool), the bytes per volume of a chunk (the difference of the two sizes), and
the wall and CPU time per volume of scoring a pool with the program `query_gradient_norms` runs for ent_gn,
side by side in one run on the same weights (the model's initial ones: scores not those of a trained
model, same cost), with the ratios to vmap and the engines' agreement. The presets' engine and chunk size
come from these numbers (README, "Volumes").

    python experiments/bench_volumes.py                                  # dsrf3d_half at 24^3 (CPU)
    python experiments/bench_volumes.py --model dsrf3d --size 40 --pool 0 --chunks 2,4  # full size, memory only
    python experiments/bench_volumes.py --model dsrf3d --size 40 --pool 64  # full size with timing (a GPU)
    python experiments/bench_volumes.py --flat 16,64     # peak RSS of ent_gn's scoring at two pool sizes

`--flat A,B` scores pools of A and B volumes with ent_gn as the preset runs it (vmap, chunks of 16), each
in a child process of its own, and prints each child's peak resident memory (on a CPU backend the device
memory is the process's): the pool is scored one compiled chunk at a time, so the peak should not grow
with the pool beyond the pool's own volumes and its scores (what the child reports as `pool_mib`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import jax
import numpy as np

from jaxal import gradnorm, tasks
from jaxal.config import GradNormOptions, build_config
from jaxal.data import load_dataset
from jaxal.models import adapt, create_model, init_variables
from jaxal.parallel import map_chunks
from jaxal.strategies import StrategyContext, get_strategy
from jaxal.strategies.gradient import _query_norms, budget_engine
from bench_segmentation import chunk_temp_mib
from timing import num_cores, time_runs


ENGINES = ("vmap", "ghost", "mixed")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dsrf3d_half")
    parser.add_argument("--size", type=int, default=24)
    parser.add_argument("--pool", type=int, default=32, help="volumes scored in the timing")
    parser.add_argument("--chunks", default="4,8", help="two chunk sizes for the memory analysis")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--budget_mib", type=float, default=256.0,
                        help="the --gradnorm.memory_budget_mib whose choice (engine, chunk up to the larger of "
                             "--chunks) is reported with its cost")
    parser.add_argument("--flat", default=None, help="A,B: peak RSS of scoring pools of A and B volumes")
    parser.add_argument("--measure", type=int, default=None, help=argparse.SUPPRESS)  # a --flat child
    args = parser.parse_args(argv)
    if args.measure is not None:
        return measure_scoring(args.model, args.size, args.measure)
    if args.flat:
        return flat_in_pool(args, [int(n) for n in args.flat.split(",")])
    small, large = (int(c) for c in args.chunks.split(","))
    data = load_dataset(f"subtomograms_simulated:size={args.size},train={max(args.pool, large)},test=1")
    pool = data.x_train[:max(args.pool, 1)]
    task = tasks.create_task("classification", data.num_classes)
    model = adapt(create_model(args.model, data.num_classes), data.normalization)
    variables = init_variables(model, jax.random.key(0), data.image_shape)
    size = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    print(f"{args.model} on {args.size}^3 volumes ({size / 1e6:.2f}M parameters); {num_cores()} CPU core(s) "
          f"({jax.devices()[0].platform})", flush=True)

    # The per-layer choice and the engine under the budget, as a run with --gradnorm.memory_budget_mib makes them
    options = GradNormOptions(chunk_size=large, memory_budget_mib=args.budget_mib)
    programs, start, cpu = gradnorm._temp_bytes.cache_info().misses, time.perf_counter(), time.process_time()
    choice = budget_engine(model, task, "ent_gn", options, variables, data.x_train[:1])
    choice_cost = {"programs": gradnorm._temp_bytes.cache_info().misses - programs,
                   "wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(time.process_time() - cpu, 1)}
    print("  per layer, XLA temp MiB per volume of the program with that layer by vmap / by ghost "
          "(the others by vmap):", flush=True)
    for layer, cost in choice.layers.items():
        ghost = "-" if cost.ghost is None else f"{cost.ghost / 2**20:8.2f}"
        print(f"    {layer:<8} {cost.vmap / 2**20:8.2f} / {ghost}  -> {cost.engine}", flush=True)
    print(f"  budget {args.budget_mib:g} MiB: {choice.describe()}", flush=True)
    print(f"  the choice compiled {choice_cost['programs']} programs in {choice_cost['wall_s']} s "
          f"({choice_cost['cpu_s']} s CPU)", flush=True)
    ghost_layers = {"vmap": None, "ghost": None, "mixed": choice.ghost_layers}

    memory = {}
    for method in ENGINES:
        for chunk in (small, large):
            memory[f"{method}_chunk{chunk}"] = chunk_temp_mib(model, task, variables, data.x_train[:chunk], method,
                                                              ghost_layers[method])
            print(f"  XLA temp memory, {method:5}, chunk {chunk:>3}: {memory[f'{method}_chunk{chunk}']:9.1f} MiB",
                  flush=True)
    per_volume = {m: (memory[f"{m}_chunk{large}"] - memory[f"{m}_chunk{small}"]) / (large - small) for m in ENGINES}
    print("  per volume of a chunk: " + ", ".join(f"{m} {per_volume[m]:.1f} MiB" for m in ENGINES)
          + f" (ghost / vmap {per_volume['ghost'] / per_volume['vmap']:.2f}, mixed / vmap "
          f"{per_volume['mixed'] / per_volume['vmap']:.2f})", flush=True)

    summary = {"model": args.model, "size": args.size, "chunks": [small, large],
               "chunk_temp_mib": {k: round(v, 1) for k, v in memory.items()},
               "mib_per_volume": {k: round(v, 2) for k, v in per_volume.items()},
               "ghost_over_vmap_memory": round(memory[f"ghost_chunk{large}"] / memory[f"vmap_chunk{large}"], 3),
               "mixed_over_vmap_memory": round(memory[f"mixed_chunk{large}"] / memory[f"vmap_chunk{large}"], 3),
               "mixed_ghost_layers": sorted(choice.ghost_layers), "budget_mib": args.budget_mib,
               "budget_choice": [choice.method, choice.chunk_size], "choice_cost": choice_cost}
    if not args.pool:  # memory only (compiling, not running: what a CPU can do at the full size)
        print(json.dumps(summary))
        return 0

    def ent_gn(method: str):
        # what `query_gradient_norms` runs for ent_gn with this engine (the preset's norm and subset)
        static = (model, task, "ent_gn", "layer_sum", "all", method, ghost_layers[method])
        return lambda: map_chunks(_query_norms, static, variables, pool, chunk_size=small)

    # entropy scores in chunks of eval_batch_size, padded: the same chunk as ent_gn, not the preset's 100, or a
    # small pool would be timed as 100 volumes
    config = build_config("wang2022_cryoet_simulated", eval_batch_size=small)
    context = StrategyContext(model=model, variables=variables, pool_x=pool, labeled_x=data.x_train[:2],
                              labeled_y=data.y_train[:2], num_classes=data.num_classes, config=config,
                              rng=jax.random.key(1), task=task)
    runs = {f"ent_gn_{m}": ent_gn(m) for m in ENGINES}
    runs["entropy"] = lambda: get_strategy("entropy").score(context)
    times = time_runs(runs, args.repeats)
    for name, timing in times.items():
        print(f"  {name:<14} first {timing.first:7.2f} s   best {timing.best:7.2f} s, {timing.best_cpu:7.2f} s CPU "
              f"({timing.best / len(pool) * 1e3:.1f} ms per volume)", flush=True)
    scores = {m: np.asarray(runs[f"ent_gn_{m}"]()) for m in ENGINES}
    agreement = {f"{m}_vs_vmap": float(np.max(np.abs(scores[m] - scores["vmap"]) / np.abs(scores["vmap"])))
                 for m in ("ghost", "mixed")}
    ratios = {f"{m}_over_vmap_time": round(times[f"ent_gn_{m}"].best / times["ent_gn_vmap"].best, 3)
              for m in ("ghost", "mixed")}
    print(f"  time / vmap's: ghost {ratios['ghost_over_vmap_time']}, mixed {ratios['mixed_over_vmap_time']}; norms' "
          f"largest relative difference from vmap's: ghost {agreement['ghost_vs_vmap']:.1e}, mixed "
          f"{agreement['mixed_vs_vmap']:.1e}", flush=True)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    summary.update({
        "pool": len(pool), "ms_per_volume": {k: round(t.best / len(pool) * 1e3, 2) for k, t in times.items()},
        "cpu_s": {k: round(t.best_cpu, 2) for k, t in times.items()}, **ratios,
        "engines_max_relative_difference": agreement, "peak_rss_mib": round(peak_rss)})
    print(json.dumps(summary))
    return 0


def measure_scoring(model_name: str, size: int, pool_size: int) -> int:
    """(child of --flat) Score `pool_size` volumes with ent_gn as the preset does; print peak RSS as JSON."""
    data = load_dataset(f"subtomograms_simulated:size={size},train={pool_size},test=1")
    task = tasks.create_task("classification", data.num_classes)
    model = adapt(create_model(model_name, data.num_classes), data.normalization)
    variables = init_variables(model, jax.random.key(0), data.image_shape)
    config = build_config("wang2022_cryoet_simulated")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    context = StrategyContext(model=model, variables=variables, pool_x=data.x_train, labeled_x=data.x_train[:2],
                              labeled_y=data.y_train[:2], num_classes=data.num_classes, config=config,
                              rng=jax.random.key(1), task=task)
    start, cpu = time.perf_counter(), time.process_time()
    scores = np.asarray(get_strategy("ent_gn").score(context)[0])
    print(json.dumps({"pool": pool_size, "method": config.gradnorm.method, "chunk": config.gradnorm.chunk_size,
                      "pool_mib": round(data.x_train.nbytes / 2**20, 1), "rss_before_scoring_mib": round(before),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10),
                      "wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(time.process_time() - cpu, 1),
                      "finite": bool(np.isfinite(scores).all())}))
    return 0


def flat_in_pool(args, pools: list[int]) -> int:
    rows = []
    for pool_size in pools:
        child = subprocess.run([sys.executable, __file__, "--model", args.model, "--size", str(args.size),
                                "--measure", str(pool_size)], capture_output=True, text=True)
        if child.returncode:
            print(child.stderr[-2000:], file=sys.stderr)
            return child.returncode
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"  pool {pool_size:>5}: peak RSS {rows[-1]['peak_rss_mib']} MiB (pool {rows[-1]['pool_mib']} MiB, "
              f"{rows[-1]['wall_s']} s wall, {rows[-1]['cpu_s']} s CPU)", flush=True)
    print(json.dumps({"model": args.model, "size": args.size, "runs": rows,
                      "peak_growth_mib": rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
