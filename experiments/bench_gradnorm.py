"""Benchmark of the per-example gradient-norm engine (`jaxal.gradnorm`).

For ResNet-18 on CIFAR-shaped inputs (32x32x3, 10 classes) and the digits CNN (8x8x1, 10 classes) it
times, on the same random inputs, the entropy-gradnorm score (ent-gn; AL-GradNorm's default scheme) of every
example, reduced as the reference code does (`norm="layer_sum"`: the sum over all parameter tensors of each
tensor's gradient norm), by
  - the engine, `method="vmap"` (`vmap(grad)` in one jitted function), `method="ghost"` (layer inputs x
    output gradients, each layer by the Gram matrices or its per-example gradient, whichever takes fewer
    multiply-adds) and `method="auto"` (the same, each layer by Bu et al.'s rule: Gram matrices where
    2 T^2 <= K F, i.e. where they hold less than the layer's per-example gradient); the choice of each
    layer under both rules is printed;
  - the reference method in JAX: a Python loop of a jitted gradient at batch size 1 (+ its norm), with JAX's
    asynchronous dispatch (the fastest form of that loop);
  - the reference code itself, in PyTorch, when torch is importable (`--torch-site`): AL-GradNorm's
    `get_uncertainty` (batch size 1, `model.eval()`, entropy of the posterior, `zero_grad`, backward, the sum
    of `p.grad.norm()` over the parameters) on the torch twin of the same model with jaxal's weights
    (`experiments/torch_reference.py`). Before timing, the torch and jaxal scores of a few samples are
    compared (float32 tolerance; TF32 on a GPU: `timing.check_rtol`), so the two time the same computation;
  - a batched backward pass of the mean loss over the same samples, in batches of the engine's chunk size
    (on CPU, XLA's convolutions slow down per sample in large batches): the floor that no per-example
    method beats by much.
Times are the best of `--repeats` runs after a first run (compiling, for JAX), the repeats of all methods
interleaved so that load from other processes hits them alike (CPU seconds of the process are reported
beside them); the two loops are timed on `--loop-n` samples and scaled to the pool. Memory: the
temporary buffers of each compiled JAX program (XLA's memory analysis, per method) and the process's
peak RSS at the end.
The last line printed is one JSON object of ratios (speedups > 1 are good; costs < 1 are good); the torch
keys are null when torch was skipped.

    python experiments/bench_gradnorm.py            # defaults: a few minutes on 2 CPU cores
    python experiments/bench_gradnorm.py --quick    # about a minute
    python experiments/bench_gradnorm.py --torch-site /path/to/venv/lib/python3.11/site-packages

torch is not a dependency of jaxal: install it into a separate virtualenv (e.g. `python -m venv /tmp/tv &&
/tmp/tv/bin/pip install torch`) and pass that venv's site-packages with `--torch-site`; it is appended to
`sys.path`. On a CUDA machine the torch loop runs on the GPU.
"""

from __future__ import annotations

import argparse
import json
import resource

import jax
import jax.numpy as jnp
import numpy as np

from jaxal import gradnorm
from jaxal.models import create_model, inference_apply, init_variables
from jaxal.pytree import tree_size
from timing import check_rtol, import_torch_reference, time_runs

BENCHES = {"digits_cnn": ("cnn", (8, 8, 1)), "resnet18": ("resnet18", (32, 32, 3))}
ENGINES = ("vmap", "ghost", "auto")
CHECK_SAMPLES = 8


def temp_mib(jitted, *args, **kwargs) -> float:
    analysis = jitted.lower(*args, **kwargs).compile().memory_analysis()
    return float("nan") if analysis is None else analysis.temp_size_in_bytes / 2**20


def layer_sum_norm(grads) -> jax.Array:
    return sum(jnp.linalg.norm(g) for g in jax.tree.leaves(grads))


def check_torch(reference, torch_model, engine_norms, xs) -> float:
    """Largest relative difference between the torch reference's scores and jaxal's (per engine) on the
    first samples of `xs`; raises when it exceeds `check_rtol()` (the timings would not compare the same
    work)."""
    torch_scores = reference.gradnorm_scores(torch_model, reference.images(xs)).numpy()
    worst = 0.0
    for method, norms in engine_norms.items():
        err = float(np.max(np.abs(torch_scores - np.asarray(norms)) / np.abs(np.asarray(norms))))
        if not err <= check_rtol():
            raise RuntimeError(f"torch and jaxal ({method}) scores differ by {err:.2e} (relative) on {len(xs)} "
                               f"samples: torch {torch_scores}, jaxal {np.asarray(norms)}")
        worst = max(worst, err)
    return worst


def print_layer_engines(loss_fn, params, xs) -> None:
    """Each Dense/Conv layer's shapes and how "ghost" and "auto" form its per-example kernel norm."""
    rules = {m: gradnorm.layer_engines(loss_fn, params, xs, m) for m in gradnorm.LAYERWISE_METHODS}
    print(f"  {'layer':<34}{'T':>6}{'K':>6}{'F':>6}{'2T^2':>9}{'K*F':>9}{'ghost':>8}{'auto':>8}")
    word = {True: "gram", False: "grad"}
    for key, e in rules["auto"].items():
        print(f"  {key:<34}{e.positions:>6}{e.inputs:>6}{e.outputs:>6}{2 * e.positions ** 2:>9}"
              f"{e.inputs * e.outputs:>9}{word[rules['ghost'][key].gram]:>8}{word[e.gram]:>8}")
    differ = [k for k in rules["auto"] if rules["auto"][k].gram != rules["ghost"][k].gram]
    print(f"  (gram: ghost norm from the (T, T) Gram matrices; grad: the (K, F) per-example gradient; the rules "
          f"differ on {len(differ)} of {len(rules['auto'])} layers)")


def bench(name: str, n: int, repeats: int, chunk_size: int | None, loop_n: int, reference) -> dict:
    arch, shape = BENCHES[name]
    model = create_model(arch, 10)
    variables = init_variables(model, jax.random.key(0), shape)
    params = variables["params"]
    loss_fn = gradnorm.example_loss(inference_apply(model, variables["batch_stats"]), gradnorm.entropy_loss)
    xs = jax.random.normal(jax.random.key(1), (n, *shape))

    grad_norm_1 = jax.jit(lambda p, x: layer_sum_norm(jax.grad(loss_fn)(p, x)))  # the reference, one example
    batched = jax.jit(jax.grad(lambda p, x: jnp.mean(loss_fn.batch_losses(p, x))))
    loop_xs = xs[:loop_n]

    def engine(method, pool=xs):
        return lambda: gradnorm.per_example_grad_norms(loss_fn, params, pool, norm="layer_sum", method=method,
                                                       chunk_size=chunk_size)

    size = min(chunk_size or n, n)  # a pool smaller than one chunk is one chunk
    chunks = [xs[i:i + size] for i in range(0, n - size + 1, size)]  # whole chunks; the engine pads the last
    fns = {
        "batched_backward": lambda: [batched(params, c) for c in chunks],
        "vmap": engine("vmap"),
        "ghost": engine("ghost"),
        "auto": engine("auto"),
        "loop_bs1": lambda: [grad_norm_1(params, x) for x in loop_xs],
    }
    check_err = None
    if reference is not None:
        torch_model = reference.twin(arch, variables, shape)
        check_xs = xs[:min(CHECK_SAMPLES, n)]
        with reference.full_float32():  # the check without TF32; the timings below keep the defaults
            check_err = check_torch(reference, torch_model, {m: engine(m, check_xs)() for m in ENGINES},
                                    check_xs)
        torch_xs = reference.images(loop_xs)
        fns["torch_bs1"] = lambda: reference.gradnorm_scores(torch_model, torch_xs)
    timings = time_runs(fns, repeats)
    best = {k: t.best for k, t in timings.items()}
    # Scaled to n samples: the batched backward runs over whole chunks, the loops over loop_n samples.
    scale = {"batched_backward": n / (len(chunks) * size), "loop_bs1": n / len(loop_xs), "torch_bs1": n / len(loop_xs)}
    seconds = {k: v * scale.get(k, 1.0) for k, v in best.items()}
    cpu_seconds = {k: t.best_cpu * scale.get(k, 1.0) for k, t in timings.items()}
    chunk = chunks[0]
    mib = {
        "batched_backward": temp_mib(batched, params, chunk),
        "vmap": temp_mib(gradnorm._vmap_squares, loss_fn, params, chunk, params_filter="all"),
        "ghost": temp_mib(gradnorm._ghost_squares_jit, loss_fn, params, chunk),
        "auto": temp_mib(gradnorm._ghost_squares_jit, loss_fn, params, chunk, None, "auto"),
        "loop_bs1": temp_mib(grad_norm_1, params, xs[0]),
    }
    print(f"\n{name}: N={n}, {tree_size(params)} parameters, chunk_size={chunk_size}, "
          f"loops timed on {len(loop_xs)} samples")
    print_layer_engines(loss_fn, params, chunk)
    if check_err is not None:
        print(f"  checked: torch reference and jaxal ({', '.join(ENGINES)}) scores of {len(check_xs)} samples agree to "
              f"{check_err:.1e} relative (tolerance {check_rtol():g})")
    torch_col = "torch_bs1" in seconds
    print(f"  {'method':<18}{'samples/s':>12}{'x loop':>10}" + (f"{'x torch':>10}" if torch_col else "")
          + f"{'x batched bwd time':>20}{'temp MiB':>12}{'CPU s':>9}")
    for method, sec in seconds.items():
        vs_torch = f"{seconds['torch_bs1'] / sec:>10.2f}" if torch_col else ""
        temp = f"{mib[method]:>12.1f}" if method in mib else f"{'-':>12}"
        print(f"  {method:<18}{n / sec:>12.1f}{seconds['loop_bs1'] / sec:>10.2f}{vs_torch}"
              f"{sec / seconds['batched_backward']:>20.2f}{temp}{cpu_seconds[method]:>9.2f}")
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "temp_mib": mib, "check_err": check_err}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resnet-n", type=int, default=64, help="examples scored with ResNet-18")
    parser.add_argument("--cnn-n", type=int, default=1797, help="examples scored with the digits CNN")
    parser.add_argument("--loop-n", type=int, default=256, help="at most this many examples in the bs-1 loops")
    parser.add_argument("--chunk-size", type=int, default=64,
                        help="engine and batched-backward chunk size (0: all examples at once)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--torch-site", default=None,
                        help="a site-packages directory holding torch, appended to sys.path (see the docstring)")
    args = parser.parse_args(argv)
    if args.quick:
        args.resnet_n, args.cnn_n, args.loop_n, args.repeats = 32, 512, 64, 1
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    reference = import_torch_reference(args.torch_site, args.no_torch)
    if reference is not None:
        print(f"PyTorch reference: {reference.describe()}")

    ratios = {}
    for name, n in (("digits_cnn", args.cnn_n), ("resnet18", args.resnet_n)):
        result = bench(name, n, args.repeats, args.chunk_size or None, min(args.loop_n, n), reference)
        sec = result["seconds"]
        best = min(ENGINES, key=sec.get)
        for method in ENGINES:
            ratios[f"{name}_{method}_speedup_vs_loop"] = round(sec["loop_bs1"] / sec[method], 3)
            ratios[f"{name}_{method}_cost_vs_batched_backward"] = round(sec[method] / sec["batched_backward"], 3)
        cpu = result["cpu_seconds"]
        ratios[f"{name}_auto_time_vs_ghost"] = round(sec["auto"] / sec["ghost"], 3)
        ratios[f"{name}_auto_cpu_time_vs_ghost"] = round(cpu["auto"] / cpu["ghost"], 3)
        ratios[f"{name}_auto_temp_mib_vs_ghost"] = round(result["temp_mib"]["auto"] / result["temp_mib"]["ghost"], 3)
        ratios[f"{name}_best_method"] = best
        ratios[f"{name}_speedup_vs_loop"] = ratios[f"{name}_{best}_speedup_vs_loop"]
        ratios[f"{name}_cost_vs_batched_backward"] = ratios[f"{name}_{best}_cost_vs_batched_backward"]
        torch_sec = sec.get("torch_bs1")
        for method in (*ENGINES, "loop_bs1"):
            key = "jax_loop" if method == "loop_bs1" else method
            ratios[f"{name}_{key}_speedup_vs_torch"] = None if torch_sec is None else round(torch_sec / sec[method], 3)
        ratios[f"{name}_speedup_vs_torch"] = ratios[f"{name}_{best}_speedup_vs_torch"]
        ratios[f"{name}_torch_samples_per_s"] = None if torch_sec is None else round(n / torch_sec, 1)
        ratios[f"{name}_torch_check_max_rel_err"] = (None if result["check_err"] is None
                                                     else float(f"{result['check_err']:.2e}"))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    print(f"\npeak RSS of this process: {rss:.0f} MiB")
    ratios["peak_rss_mib"] = round(rss)
    ratios["torch"] = None if reference is None else reference.describe()
    print(json.dumps(ratios))
    return ratios


if __name__ == "__main__":
    main()
