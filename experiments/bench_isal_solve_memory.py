"""Memory of ISAL's s_test solve on detection as the labelled set grows, at the `isal2021_voc` canvas
(images resized into 1333x800, `--boxes.canvas 1333 --boxes.short_side 800`).

The solve is LiSSA in loader order (ISAL's detection code: 4 chains, batch 1, at most 1000 steps each, a
scale per kernel, the NaN reset; `jaxal.detection.strategies.influence.solver_options`). It reads the
labelled images from disk one block of `DEFAULT_LOADER_BLOCK_STEPS` steps at a time
(`jaxal.influence.LoaderRows`); before, the whole labelled set the solve reads (up to 4 x 1000 images,
12.8 GB of uint8 at 1333x800) was one argument of one program. Both are measured side by side:

- XLA's `memory_analysis()` of the compiled programs at each labelled-set size N: the block program
  (`jaxal.influence._loader_block`, the labelled-set size a traced number) and the whole-set program
  (`jaxal.influence._solve` with the N images as its argument);
- peak host RSS of a fresh Python process per (N, path) that runs the solve on N images of a synthetic VOC
  folder of random 640x480 JPEGs, read from disk with the image cache off (`cache_bytes=0`): "streamed"
  is what `isal` runs, "whole" reads the N images into one array first and solves on it (the previous
  implementation, here padded to exactly N rows where `isal` padded to its capacity of 4000). Both print the solution's norm: they must agree.
The detector is a toy FCOS (a two-convolution backbone, strides 8 and 16, 3 FPN levels, 16 channels), so
that the solve runs on a CPU at this canvas; the images' size, not the detector, is what is measured.
The last line printed is one JSON object.

    python experiments/bench_isal_solve_memory.py                      # N = 64 and 256
    python experiments/bench_isal_solve_memory.py --sizes 64 512 --paths streamed
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_boxes_loader import write_voc  # noqa: E402

CANVAS = (800, 1333)  # isal2021_voc: --boxes.canvas 1333 --boxes.short_side 800


def setup(root: str):
    import dataclasses

    import flax.linen as nn
    import jax

    from jaxal import config as config_lib
    from jaxal.data import boxes as boxes_lib
    from jaxal.detection import training
    from jaxal.models import fcos
    from jaxal.tasks import Detection

    class ToyBackbone(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            c3 = nn.relu(nn.Conv(8, (3, 3), (8, 8), padding=((1, 1), (1, 1)))(x))
            return c3, nn.relu(nn.Conv(8, (3, 3), (2, 2), padding=((1, 1), (1, 1)))(c3))

    config = config_lib.build_config("isal2021_voc", strategy="isal")
    data = boxes_lib.load_boxes(root, canvas=CANVAS, cache_bytes=0)
    head = dataclasses.replace(fcos.FCOS_ISAL, strides=(8, 16, 32), norm_groups=4)
    detector = training.Detector(fcos.FCOS(ToyBackbone(), data.num_classes, head, channels=16, stacked_convs=2), head)
    variables = training.init_detector(detector, jax.random.PRNGKey(0), data.canvases[0])
    task = Detection(data.num_classes, config=detector.config)
    return config, data, detector, variables, task


def solve(root: str, n: int, path: str) -> dict:
    """The solve on the first n train images in this process; its peak RSS, seconds and the result's norm."""
    import jax
    import numpy as np

    from jaxal import influence as influence_lib
    from jaxal.detection.strategies import LABEL_KEYS
    from jaxal.detection.strategies import influence as isal
    from jaxal.pytree import tree_norm

    config, data, detector, variables, task = setup(root)
    options = isal.solver_options(config)
    v = jax.tree.map(lambda x: np.cos(np.arange(x.size)).reshape(x.shape).astype(x.dtype) * 1e-3,
                     influence_lib.select(variables["params"], isal.last_convs))
    indices = np.arange(n)
    start, cpu = time.perf_counter(), time.process_time()
    if path == "streamed":
        rows = isal.labelled_rows(data.train, indices)
    else:
        batch = isal.read_padded(data.train, indices)
        rows = (batch["images"], {k: batch[k] for k in LABEL_KEYS})
    # the whole set padded to exactly N rows, the least the previous implementation held (`isal` padded it to
    # min(the run's largest labelled set, 4 x 1000): 4000 images, 12.8 GB at this canvas, for isal2021_voc)
    result = influence_lib.inverse_hvp(isal.BoxLoss(detector, task), variables, rows, v, options=options,
                                       rng=jax.random.PRNGKey(0), scale=isal.layer_scale(config.boxal.isal_scales),
                                       capacity=n)
    norm = float(tree_norm(result.solution))
    return {"seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(time.process_time() - cpu, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1),
            "solution_norm": norm, "steps_per_chain": min(options.depth, -(-n // options.repeats))}


def _mib(analysis) -> dict:
    return {"temp_mib": round(analysis.temp_size_in_bytes / 2**20, 1),
            "argument_mib": round(analysis.argument_size_in_bytes / 2**20, 1)}


def program_memory(config, data, detector, variables, task, n: int) -> dict:
    """XLA's memory analysis (compiled, not run) of the solve's programs for a labelled set of n images of the
    split's first canvas: the block program `isal` runs (n a traced number) and the previous whole-set one."""
    import jax
    import jax.numpy as jnp

    from jaxal import influence as influence_lib
    from jaxal.detection.strategies import LABEL_KEYS
    from jaxal.detection.strategies import influence as isal

    options = isal.solver_options(config)
    loss = isal.BoxLoss(detector, task)
    v = influence_lib.select(variables["params"], isal.last_convs)
    scale = jax.tree_util.tree_map_with_path(isal.layer_scale(config.boxal.isal_scales), v)
    precision = config.precision.solvers

    def examples(*rows):
        images = jax.ShapeDtypeStruct((*rows, *data.canvases[0], 3), jnp.uint8)
        labels = {k: jax.ShapeDtypeStruct((*rows, *getattr(data.train, k).shape[1:]), getattr(data.train, k).dtype)
                  for k in LABEL_KEYS}
        return (images, labels), jax.ShapeDtypeStruct(rows, jnp.float32)

    block_static = influence_lib._BlockSettings(loss, isal.last_convs, options.depth, options.repeats,
                                                options.hvp_chunk_size, precision, None, True)
    carry = jax.tree.map(lambda x: jnp.zeros((options.repeats, *x.shape), x.dtype), (v, jnp.zeros((), jnp.int32)))
    blocks = examples(options.repeats, influence_lib.DEFAULT_LOADER_BLOCK_STEPS)
    block = influence_lib._loader_block.lower(block_static, variables, blocks, n, v, carry, 0, options.damping, scale,
                                              0.0).compile().memory_analysis()
    whole_static = influence_lib._Settings(loss, isal.last_convs, "lissa", options.depth, options.repeats, 1,
                                           options.cg_maxiter, options.hvp_chunk_size, options.exact_block_size,
                                           precision, None, True, "loader")
    whole = influence_lib._solve.lower(whole_static, variables, examples(n), n, v, jax.random.PRNGKey(0),
                                       options.damping, scale, options.cg_tol, 0.0).compile().memory_analysis()
    return {"block_program": _mib(block), "whole_set_program": _mib(whole)}


def compiled_memory(root: str, sizes) -> dict:
    world = setup(root)
    return {n: program_memory(*world, n) for n in sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[64, 256])
    parser.add_argument("--paths", nargs="+", default=["streamed", "whole"], choices=["streamed", "whole"])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # internal: root, n, path
    args = parser.parse_args()
    if args.child:
        root, n, path = args.child
        print(json.dumps(solve(root, int(n), path) if path != "compiled" else
                         compiled_memory(root, [int(s) for s in n.split(",")])))
        return
    result = {"cores": os.cpu_count(), "load_average_start": os.getloadavg()[0], "canvas": CANVAS,
              "block_steps": None, "runs": {}}

    def child(root, n, path):
        out = subprocess.run([sys.executable, __file__, "--child", str(root), str(n), path], capture_output=True,
                             text=True)
        if out.returncode:
            raise SystemExit(f"the {path} run at N={n} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "voc"
        write_voc(root, max(args.sizes), held_out=2)
        from jaxal import influence as influence_lib

        result["block_steps"] = influence_lib.DEFAULT_LOADER_BLOCK_STEPS
        memory = child(root, ",".join(str(n) for n in args.sizes), "compiled")
        result["compiled"] = memory
        for n in args.sizes:
            m = memory[str(n)]
            print(f"N={n:>5}: block program temporaries {m['block_program']['temp_mib']} MiB, arguments "
                  f"{m['block_program']['argument_mib']} MiB | whole-set program temporaries "
                  f"{m['whole_set_program']['temp_mib']} MiB, arguments {m['whole_set_program']['argument_mib']} MiB",
                  flush=True)
        for path in args.paths:
            for n in args.sizes:
                r = result["runs"][f"{path}_{n}"] = child(root, n, path)
                print(f"N={n:>5} {path:>8}: peak RSS {r['peak_rss_mib']:.0f} MiB, {r['steps_per_chain']} steps per "
                      f"chain, {r['seconds']:.0f} s ({r['cpu_seconds']:.0f} CPU s), |s_test| {r['solution_norm']:.6g}",
                      flush=True)
    for path in args.paths:
        small, large = (result["runs"][f"{path}_{n}"]["peak_rss_mib"] for n in args.sizes)
        result[f"{path}_rss_ratio"] = round(large / small, 3)
        print(f"{path}: peak RSS ratio N={args.sizes[1]} / N={args.sizes[0]}: {large / small:.3f}")
    result["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
