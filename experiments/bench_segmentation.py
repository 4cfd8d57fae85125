"""Benchmark of ent_gn on semantic segmentation: CamVid at 180x240 (11 classes + void), DRN-D-22.

What one AL cycle's selection costs, side by side in one run on the same pool and weights:
  - ent_gn (the per-image gradient norm of the pixel-averaged entropy, `norm="layer_sum"` as Wang et al.'s
    code) by the vmap engine and by the ghost engine, through the strategy the loop calls
    (`get_strategy("ent_gn").select`), on the preset's pool subset (`--pool`, camvid_segnet: 100 images)
    and on half of it (the time grows with the pool, the memory does not);
  - the entropy baseline (one forward pass per image) on the same pool: what a gradient norm costs over a
    plain uncertainty score.
Memory: XLA's analysis of the compiled chunk program (temporary buffers) of each engine at two chunk
sizes: the bytes per image of a chunk, and proof that memory is set by the chunk, never by the pool
(the pool is scored one chunk at a time by `jaxal.parallel.map_chunks`). The process's peak RSS at the
end. The weights are the model's initial ones with BatchNorm averages from a train-mode pass over the
pool, so the scores are not those of a trained model but cost the same.

The last line printed is one JSON object (times in seconds, memory in MiB, ratios).

    JAXAL_SHARED_DATA=/path/to/shared/data python experiments/bench_segmentation.py          # minutes
    python experiments/bench_segmentation.py --dataset camvid/ --model drn_d_22 --pool 20  # the full width
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

import jax
import numpy as np

from jaxal import tasks
from jaxal.config import build_config
from jaxal.data import load_dataset
from jaxal.models import adapt, create_model, init_variables
from jaxal.strategies import StrategyContext, get_strategy
from jaxal.strategies.gradient import _query_norms
from timing import num_cores, time_runs


def chunk_temp_mib(model, task, variables, xs, method: str, ghost_layers=None) -> float:
    static = (model, task, "ent_gn", "layer_sum", "all", method, ghost_layers)
    compiled = jax.jit(_query_norms, static_argnums=0).lower(static, variables, xs).compile()
    analysis = compiled.memory_analysis()
    return float("nan") if analysis is None else analysis.temp_size_in_bytes / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="camvid", help="'camvid' (in $JAXAL_SHARED_DATA) or a SegNet folder")
    parser.add_argument("--ignore_label", type=int, default=None)
    parser.add_argument("--model", default="drn_d_22_cpu")
    parser.add_argument("--pool", type=int, default=100, help="images scored per cycle (camvid_segnet: 100)")
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=8, help="images per compiled chunk (camvid_segnet: 8)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        data = load_dataset(args.dataset, task="segmentation", ignore_label=args.ignore_label)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    task = tasks.create_task("segmentation", data.num_classes, data.ignore_label)
    model = adapt(create_model(args.model, data.num_classes), data.normalization)
    variables = init_variables(model, jax.random.key(0), data.image_shape)
    pool = data.x_train[: args.pool]
    _, updated = model.apply(variables, pool[:16], train=True, mutable=["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": updated["batch_stats"]}
    size = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    print(f"{data.name}: pool {len(pool)} images of {data.image_shape}, {data.num_classes} classes; model "
          f"{args.model} ({size / 1e6:.2f}M parameters); chunk {args.chunk}; {num_cores()} CPU core(s) "
          f"({jax.devices()[0].platform})", flush=True)

    def context(method: str, n: int) -> StrategyContext:
        config = build_config("camvid_segnet", gradnorm=dict(method=method, chunk_size=args.chunk),
                              eval_batch_size=16)
        return StrategyContext(model=model, variables=variables, pool_x=pool[:n], labeled_x=data.x_train[-4:],
                               labeled_y=data.y_train[-4:], num_classes=data.num_classes, config=config,
                               rng=jax.random.key(1), task=task)

    half = len(pool) // 2
    runs = {f"ent_gn_{method}_{n}": (lambda m=method, k=n: get_strategy("ent_gn").select(context(m, k), args.budget))
            for method in ("vmap", "ghost") for n in (half, len(pool))}
    runs[f"entropy_{len(pool)}"] = lambda: get_strategy("entropy").select(context("vmap", len(pool)), args.budget)
    times = time_runs(runs, args.repeats)
    for name, timing in times.items():
        print(f"  {name:<22} first {timing.first:7.2f} s   best {timing.best:7.2f} s", flush=True)
    # The two engines compute the same norms (checked on one chunk; the tests check them against jax.grad).
    chunk = {m: np.asarray(_query_norms((model, task, "ent_gn", "layer_sum", "all", m, None), variables,
                                        pool[:args.chunk]))
             for m in ("vmap", "ghost")}
    agreement = float(np.max(np.abs(chunk["ghost"] - chunk["vmap"]) / np.abs(chunk["vmap"])))
    print(f"  largest relative difference of the two engines' norms on one chunk: {agreement:.1e}")

    memory = {}
    for method in ("vmap", "ghost"):
        for chunk in (args.chunk, 2 * args.chunk):
            memory[f"{method}_chunk{chunk}"] = chunk_temp_mib(model, task, variables, pool[:chunk], method)
            print(f"  XLA temp memory, {method}, chunk {chunk:>3}: {memory[f'{method}_chunk{chunk}']:8.1f} MiB",
                  flush=True)
    per_image = {m: (memory[f"{m}_chunk{2 * args.chunk}"] - memory[f"{m}_chunk{args.chunk}"]) / args.chunk
                 for m in ("vmap", "ghost")}
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"  per image of a chunk: vmap {per_image['vmap']:.1f} MiB, ghost {per_image['ghost']:.1f} MiB; "
          f"peak RSS {peak_rss:.0f} MiB")
    n = len(pool)
    summary = {
        "model": args.model, "pool": n, "chunk": args.chunk, "image_shape": list(data.image_shape),
        "selection_seconds": {name: round(t.best, 3) for name, t in times.items()},
        "ent_gn_vmap_seconds_per_image": round(times[f"ent_gn_vmap_{n}"].best / n, 4),
        "ghost_over_vmap_time": round(times[f"ent_gn_ghost_{n}"].best / times[f"ent_gn_vmap_{n}"].best, 3),
        "ent_gn_over_entropy_time": round(times[f"ent_gn_vmap_{n}"].best / times[f"entropy_{n}"].best, 3),
        "pool_doubling_time_ratio_vmap": round(times[f"ent_gn_vmap_{n}"].best / times[f"ent_gn_vmap_{half}"].best, 3),
        "chunk_temp_mib": {k: round(v, 1) for k, v in memory.items()},
        "mib_per_image": {k: round(v, 2) for k, v in per_image.items()},
        "ghost_over_vmap_memory": round(memory[f"ghost_chunk{args.chunk}"] / memory[f"vmap_chunk{args.chunk}"], 3),
        "peak_rss_mib": round(peak_rss), "engines_max_relative_difference": agreement,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
