"""Benchmark of the per-example gradient-norm engine (`jaxal.gradnorm`).

For ResNet-18 on CIFAR-shaped inputs (32x32x3, 10 classes) and the digits CNN (8x8x1, 10 classes) it
times, on the same random inputs, the entropy-gradient norm (ent-gn) of every example by
  - the engine, `method="vmap"` (`vmap(grad)` in one jitted function) and `method="ghost"`
    (layer inputs x output gradients, no per-example gradient materialised);
  - the reference method: a Python loop of a jitted gradient at batch size 1 (+ its norm), with JAX's
    asynchronous dispatch (the fastest form of that loop);
  - a batched backward pass of the mean loss over the same samples, in batches of the engine's chunk size
    (on CPU, XLA's convolutions slow down per sample in large batches): the floor that no per-example
    method beats by much.
Times are the best of `--repeats` runs after a compiling run. Memory: the temporary buffers of each
compiled program (XLA's memory analysis, per method) and the process's peak RSS at the end.
The last line printed is one JSON object of ratios (speedups > 1 are good; costs < 1 are good).
(No PyTorch reference: torch is not a dependency, and the JAX bs-1 loop is the same method.)

    python experiments/bench_gradnorm.py            # defaults: a few minutes on 2 CPU cores
    python experiments/bench_gradnorm.py --quick    # about a minute
"""

from __future__ import annotations

import argparse
import json
import resource

import jax
import jax.numpy as jnp

from jaxal import gradnorm
from jaxal.models import create_model, inference_apply, init_variables
from jaxal.pytree import tree_norm, tree_size
from timing import best_time

BENCHES = {"digits_cnn": ("cnn", (8, 8, 1)), "resnet18": ("resnet18", (32, 32, 3))}


def temp_mib(jitted, *args, **kwargs) -> float:
    analysis = jitted.lower(*args, **kwargs).compile().memory_analysis()
    return float("nan") if analysis is None else analysis.temp_size_in_bytes / 2**20


def bench(name: str, n: int, repeats: int, chunk_size: int | None, loop_n: int) -> dict:
    arch, shape = BENCHES[name]
    model = create_model(arch, 10)
    variables = init_variables(model, jax.random.key(0), shape)
    params = variables["params"]
    loss_fn = gradnorm.example_loss(inference_apply(model, variables["batch_stats"]), gradnorm.entropy_loss)
    xs = jax.random.normal(jax.random.key(1), (n, *shape))

    grad_norm_1 = jax.jit(lambda p, x: tree_norm(jax.grad(loss_fn)(p, x)))  # the reference, one example
    batched = jax.jit(jax.grad(lambda p, x: jnp.mean(loss_fn.batch_losses(p, x))))
    loop_xs = xs[:loop_n]

    def engine(method):
        return lambda: gradnorm.per_example_grad_norms(loss_fn, params, xs, method=method, chunk_size=chunk_size)

    size = min(chunk_size or n, n)  # a pool smaller than one chunk is one chunk
    chunks = [xs[i:i + size] for i in range(0, n - size + 1, size)]  # whole chunks; the engine pads the last
    seconds = {
        # backward passes over the whole chunks at the engine's chunk size, scaled to n samples
        "batched_backward": best_time(lambda: [batched(params, c) for c in chunks], repeats)
        * n / (len(chunks) * size),
        "vmap": best_time(engine("vmap"), repeats),
        "ghost": best_time(engine("ghost"), repeats),
        # The loop is timed on up to loop_n examples and reported per sample.
        "loop_bs1": best_time(lambda: [grad_norm_1(params, x) for x in loop_xs], repeats) * n / len(loop_xs),
    }
    chunk = chunks[0]
    mib = {
        "batched_backward": temp_mib(batched, params, chunk),
        "vmap": temp_mib(gradnorm._vmap_squares, loss_fn, params, chunk, params_filter="all"),
        "ghost": temp_mib(gradnorm._ghost_squares_jit, loss_fn, params, chunk),
        "loop_bs1": temp_mib(grad_norm_1, params, xs[0]),
    }
    print(f"\n{name}: N={n}, {tree_size(params)} parameters, chunk_size={chunk_size}, "
          f"loop timed on {len(loop_xs)} samples")
    print(f"  {'method':<18}{'samples/s':>12}{'x loop':>10}{'x batched bwd time':>20}{'temp MiB':>12}")
    for method, sec in seconds.items():
        print(f"  {method:<18}{n / sec:>12.1f}{seconds['loop_bs1'] / sec:>10.2f}"
              f"{sec / seconds['batched_backward']:>20.2f}{mib[method]:>12.1f}")
    return seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resnet-n", type=int, default=64, help="examples scored with ResNet-18")
    parser.add_argument("--cnn-n", type=int, default=1797, help="examples scored with the digits CNN")
    parser.add_argument("--loop-n", type=int, default=256, help="at most this many examples in the bs-1 loop")
    parser.add_argument("--chunk-size", type=int, default=64,
                        help="engine and batched-backward chunk size (0: all examples at once)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.resnet_n, args.cnn_n, args.loop_n, args.repeats = 32, 512, 64, 1
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")

    ratios = {}
    for name, n in (("digits_cnn", args.cnn_n), ("resnet18", args.resnet_n)):
        sec = bench(name, n, args.repeats, args.chunk_size or None, min(args.loop_n, n))
        best = min(("vmap", "ghost"), key=sec.get)
        for method in ("vmap", "ghost"):
            ratios[f"{name}_{method}_speedup_vs_loop"] = round(sec["loop_bs1"] / sec[method], 3)
            ratios[f"{name}_{method}_cost_vs_batched_backward"] = round(sec[method] / sec["batched_backward"], 3)
        ratios[f"{name}_best_method"] = best
        ratios[f"{name}_speedup_vs_loop"] = ratios[f"{name}_{best}_speedup_vs_loop"]
        ratios[f"{name}_cost_vs_batched_backward"] = ratios[f"{name}_{best}_cost_vs_batched_backward"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    print(f"\npeak RSS of this process: {rss:.0f} MiB")
    ratios["peak_rss_mib"] = round(rss)
    print(json.dumps(ratios))
    return ratios


if __name__ == "__main__":
    main()
