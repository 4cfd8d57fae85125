"""ISAL's detection scoring: jaxal's batched forward-mode product against ISAL's own method, side by side,
and XLA's memory count of the s_test solve and of the pool scoring.

Speed. The pool's influence `-g_z . s_test` of N BCCD train images (canvas 320, the `bccd_fcos` preset's
detector: FCOS-R18, 64 channels, 2 convs per tower; random weights: the shapes, hence the work, do not
depend on them), g_z the gradient of the image's loss at its pseudo-boxes w.r.t. the head's three last
kernels:
- jaxal: `jaxal.detection.strategies.influence` -- per batch of `--batch` images, ONE jvp (the pseudo-boxes
  from the same forward pass);
- ISAL's method (`detection/src/utils.py:multi_gpu_cal_influence`): per image, a batch-1 backward of its
  loss for the three kernels' gradient, then the dot product with s_test (each program jitted; a Python
  loop over the images as the code's loop over its loader).
Both read the same cached images; the printed ratio is ISAL's method's seconds over jaxal's (best of
`--repeats`, compilation excluded, process CPU seconds beside), and both scores are checked to agree.

Memory. `memory_analysis()` of the compiled s_test solve (`jaxal.influence.inverse_hvp`'s block program,
ISAL's settings: 4 loader-order chains of 1000 steps, per-tensor scales, NaN reset; the labelled images
read from disk one block at a time, beside the previous whole-set program: see
`bench_isal_solve_memory.py`) at two labelled-set sizes, and of the pool-scoring program at two pool
sizes. The pool is a host loop over batches of one compiled program, so its count is the same program's.

    JAXAL_SHARED_DATA=/work/shared/data python experiments/bench_isal_detection.py
    python experiments/bench_isal_detection.py --images 64 --batch 8 --labeled 16 128
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxal import config as config_lib
from jaxal import parallel
from jaxal import influence as influence_lib
from jaxal.data import boxes as boxes_lib
from jaxal.detection import active, training
from jaxal.detection.strategies import influence as isal
from jaxal.detection.strategies import one_image, stream
from jaxal.pytree import restrict, tree_dot
from jaxal.tasks import Detection


def setup(canvas: int):
    config = config_lib.build_config("bccd_fcos", boxes=dict(canvas=canvas))
    data = boxes_lib.load_boxes(active.resolve_source("bccd"), canvas=canvas)
    detector = active.build_detector(config, data.num_classes)
    variables = training.init_detector(detector, jax.random.PRNGKey(0), data.canvases[0])
    task = Detection(data.num_classes, config=detector.config, pseudo_score=config.boxal.pseudo_score)
    return config, data, detector, variables, task


def isal_method(detector, task, variables, s, images):
    """ISAL's: per image, the batch-1 gradient of its pseudo-box loss w.r.t. the three kernels, dot s."""

    def loss(params, image):
        maps = one_image(detector.apply({**variables, "params": params}, image[None])["logits"])
        return task.pseudo_label_loss(maps)

    restricted, selected = restrict(loss, variables["params"], isal.last_convs)
    return -tree_dot(jax.grad(restricted)(selected, images[0]), s)


def speed(config, data, detector, variables, task, n: int, batch: int, repeats: int) -> dict:
    indices = np.arange(min(n, len(data.train)))
    s = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape),
                     influence_lib.select(variables["params"], isal.last_convs))
    static = (detector, task, config.precision.solvers)

    def jaxal_scores():
        dots, _ = stream(data.train, indices, batch,
                         lambda b: parallel.map_chunks(isal._pool_scores, static, (variables, s), b["images"],
                                                       chunk_size=batch))
        return -dots

    one = jax.jit(isal_method, static_argnums=(0, 1))

    def isal_scores():
        return np.array([float(one(detector, task, variables, s, jnp.asarray(b["images"])))
                         for b in boxes_lib.batches(data.train, indices, 1)])

    times = {}
    results = {}
    for name, fn in (("jaxal", jaxal_scores), ("isal", isal_scores)):
        start = time.perf_counter()
        results[name] = fn()  # compiles
        times[name] = {"first_seconds": time.perf_counter() - start, "seconds": float("inf"), "cpu": float("inf")}
    for _ in range(repeats):  # interleaved, so that load from other processes hits both alike
        for name, fn in (("jaxal", jaxal_scores), ("isal", isal_scores)):
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name]["seconds"] = min(times[name]["seconds"], time.perf_counter() - start)
            times[name]["cpu"] = min(times[name]["cpu"], time.process_time() - cpu)
    difference = float(np.max(np.abs(results["jaxal"] - results["isal"])) / np.max(np.abs(results["isal"])))
    return {"images": int(len(indices)), "batch": batch, "jaxal": times["jaxal"], "isal_method": times["isal"],
            "ratio": times["isal"]["seconds"] / times["jaxal"]["seconds"],
            "cpu_ratio": times["isal"]["cpu"] / times["jaxal"]["cpu"], "max_relative_difference": difference}


def solve_memory(config, data, detector, variables, task, labeled_sizes) -> dict:
    """Compiled memory of the s_test solve's block program (and of the previous whole-set program) at each
    labelled-set size (`bench_isal_solve_memory.program_memory`)."""
    from bench_isal_solve_memory import program_memory

    return {n: program_memory(config, data, detector, variables, task, n) for n in labeled_sizes}


def pool_memory(config, data, detector, variables, task, batch: int, pool_sizes) -> dict:
    """Compiled memory of the pool-scoring program, and how many times it runs for each pool size."""
    s = influence_lib.select(variables["params"], isal.last_convs)
    static = (detector, task, config.precision.solvers)
    images = jnp.zeros((batch, *data.canvases[0], 3), jnp.uint8)
    analysis = parallel._compiled(isal._pool_scores).lower(static, (variables, s), images).compile().memory_analysis()
    return {n: {"program_temp_mib": analysis.temp_size_in_bytes / 2**20,
                "program_argument_mib": analysis.argument_size_in_bytes / 2**20,
                "batches": -(-n // batch)} for n in pool_sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--canvas", type=int, default=320)
    parser.add_argument("--images", type=int, default=32, help="pool images scored by both methods")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--labeled", type=int, nargs=2, default=[20, 80])
    parser.add_argument("--pool", type=int, nargs=2, default=[205, 118000])
    parser.add_argument("--skip_memory", action="store_true")
    args = parser.parse_args()
    world = setup(args.canvas)
    result = {"cores": os.cpu_count(), "load_average": os.getloadavg()[0], "canvas": args.canvas,
              "device": jax.devices()[0].platform}
    result["speed"] = r = speed(*world, args.images, args.batch, args.repeats)
    print(f"{r['images']} images, canvas {args.canvas}: jaxal (one jvp per batch of {args.batch}) "
          f"{r['jaxal']['seconds']:.2f} s ({r['jaxal']['cpu']:.2f} CPU s), ISAL's method (a batch-1 backward "
          f"per image) {r['isal_method']['seconds']:.2f} s ({r['isal_method']['cpu']:.2f} CPU s): ratio "
          f"{r['ratio']:.2f} (CPU {r['cpu_ratio']:.2f}); scores agree to {r['max_relative_difference']:.1e}",
          flush=True)
    if not args.skip_memory:
        result["solve_memory"] = solve_memory(*world, args.labeled)
        for n, m in result["solve_memory"].items():
            print(f"s_test solve, labelled set {n}: block program temporaries {m['block_program']['temp_mib']:.1f} "
                  f"MiB, arguments {m['block_program']['argument_mib']:.1f} MiB (the whole-set program: "
                  f"{m['whole_set_program']['temp_mib']:.1f} and {m['whole_set_program']['argument_mib']:.1f} MiB)",
                  flush=True)
        result["pool_memory"] = pool_memory(*world, args.batch, args.pool)
        for n, m in result["pool_memory"].items():
            print(f"pool scoring, pool {n}: {m['batches']} runs of one program with temporaries "
                  f"{m['program_temp_mib']:.1f} MiB, arguments {m['program_argument_mib']:.1f} MiB", flush=True)
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
