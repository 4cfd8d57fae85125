"""One active-learning cycle of every published preset on real CIFAR-10: seconds per phase and peak memory.

Run from the repository root (the shared archive, or any folder/.tar(.gz) of train/<class>/ test/<class>/
images, via --dataset; without it the benchmark says so and stops):

    python experiments/bench_scale.py --epochs 1 --size-factor 0.05   # a CPU run (see the README's numbers)
    python experiments/bench_scale.py                                  # the presets as published (a GPU)
    python experiments/bench_scale.py --presets lplgrad_cifar10 --strategies ent_gn,random --epochs 2

For each preset (wang2022_cifar10_code, wang2022_cifar10_paper, lplgrad_cifar10, isal2021_cifar10,
isal2021_cifar10_code, yoo2019_ll4al_cifar10) and each strategy (the preset's own, or --strategies), the
cycle the loop runs first: train on the initial labelled set, evaluate, score the candidates and select a
batch. It runs through `jaxal.loop.run_prepared` exactly as `python -m jaxal.run --preset P` does (two
cycles configured so that cycle 0 selects; the run stops when cycle 0's record arrives), so the phase times
are the loop's own record fields: `train_seconds`, `evaluate_seconds` (test set and labelled set) and
`selection_seconds`, split into scoring and the top-k selection by timing `strategies.base.top_k` (once the
scores are computed; a set-selection strategy such as coreset or random has no separate top-k).

Compilation: the seconds JAX spends tracing, lowering and compiling (its own monitoring events; top-level
traces only, so nothing is counted twice) are attributed to the phase running at the time and reported
apart, so that `train_epoch_steady_s = (train - its compilation) / epochs` is the cost of one more epoch.

Sizes: `--size-factor F` multiplies the initial set, the validation split, the budget and the scored
subset; a preset that scores the whole pool scores a random F x (unlabelled pool) instead. The test set
(10000 images) is evaluated whole at every factor, as the protocols do. `--epochs` replaces the preset's
200 epochs. A cycle of the published sizes and epochs is an estimate from these numbers (the README).

Memory: each (preset, strategy) runs in a fresh Python process, so its peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss` read in that process at the end) is its own, the dataset
(uint8, about 180 MB for CIFAR-10) included; `rss_after_load_mb` is the resident size once the data is
loaded. On a GPU, `device_peak_bytes` is the device's `peak_bytes_in_use` (`memory_stats()` of the first
local device; null on CPU, where the host RSS holds everything).

The last line printed is one JSON object with every number. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

PRESETS = ("wang2022_cifar10_code", "wang2022_cifar10_paper", "lplgrad_cifar10", "isal2021_cifar10",
           "isal2021_cifar10_code", "yoo2019_ll4al_cifar10")
ARCHIVE = "cifar10-jpeg.tar.gz"
REPO = Path(__file__).resolve().parents[1]
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def default_dataset() -> Path:
    shared = os.environ.get("JAXAL_SHARED_DATA") or REPO.parent / "shared" / "data"
    return Path(shared) / ARCHIVE


def scaled_sizes(config, factor: float, pool_size: int) -> dict:
    """The preset's initial/val/budget/subset sizes times `factor` (a whole-pool preset: factor x the
    unlabelled pool, as a random subset)."""
    if factor == 1.0:
        return {}
    initial = max(2, round(config.initial_size * factor))
    val = min(initial - 1, max(1, round(config.val_size * factor))) if config.val_size else 0
    budget = max(1, round(config.budget * factor))
    subset = config.subset_size if config.subset_size is not None else pool_size - config.initial_size
    return dict(initial_size=initial, val_size=val, budget=budget, subset_size=max(budget, round(subset * factor)))


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---- one (preset, strategy): runs in its own process -------------------------------------------------------


class _CycleDone(Exception):
    """Raised by the observer once cycle 0's record exists: the run stops there."""


class PhaseClock:
    """Which phase of the cycle runs (switched by thin wrappers around the loop's own calls), and per
    phase: the compile seconds that JAX's monitoring events report, the process's CPU seconds (all
    threads; on a shared machine a steadier measure of the work than wall time) and the peak RSS
    reached by the end of the phase (so the phase whose peak grows is the one that allocated)."""

    def __init__(self):
        self.phase = "setup"
        self.compile_seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self.top_k_seconds = 0.0
        self._cpu = time.process_time()

    def on_event(self, event: str, duration: float, **_) -> None:
        if event in COMPILE_EVENTS:
            self.compile_seconds[self.phase] = self.compile_seconds.get(self.phase, 0.0) + duration

    def switch(self, phase: str) -> None:
        now = time.process_time()
        self.cpu_seconds[self.phase] = self.cpu_seconds.get(self.phase, 0.0) + now - self._cpu
        self.peak_rss_mb[self.phase] = max_rss_mb()
        self.phase, self._cpu = phase, now

    def wrap(self, fn, phase: str, after: str):
        def wrapped(*args, **kwargs):
            self.switch(phase)
            try:
                return jax_ready(fn(*args, **kwargs))
            finally:
                self.switch(after)

        return wrapped


def jax_ready(value):
    import jax

    return jax.block_until_ready(value)


def run_one(preset: str, strategy: str, dataset: str, epochs: int | None, factor: float, seed: int,
            influence_scale: float | None = None, training_precision: str | None = None) -> dict:
    import jax

    from jaxal import loop
    from jaxal.config import build_config
    from jaxal.strategies import base

    clock = PhaseClock()
    jax.monitoring.register_event_duration_secs_listener(clock.on_event)
    overrides = dict(dataset=dataset, strategy=strategy, trials=1, cycles=2, seed=seed, progress=False)
    if epochs is not None:
        overrides["epochs"] = epochs
    if influence_scale is not None:
        overrides["influence"] = {"scale": influence_scale}
    if training_precision is not None:
        overrides["precision"] = {"training": training_precision}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        exp = loop.prepare(build_config(preset, **overrides), Path(workdir) / "run")
        config = dataclasses.replace(exp.config, **scaled_sizes(exp.config, factor, exp.dataset.x_train.shape[0]))
        loop.validate(config, exp.dataset, exp.task)
        exp = dataclasses.replace(exp, config=config)
        load_seconds = time.perf_counter() - start
        rss_after_load = current_rss_mb()

        real_top_k = base.top_k

        def timed_top_k(scores, k):
            jax.block_until_ready(scores)  # the scores' computation belongs to scoring
            clock.switch("select")
            begin = time.perf_counter()
            try:
                return real_top_k(scores, k)
            finally:
                clock.top_k_seconds += time.perf_counter() - begin

        base.top_k = timed_top_k
        loop.train_model = clock.wrap(loop.train_model, "train", after="evaluate")
        loop.evaluate = clock.wrap(loop.evaluate, "evaluate", after="score")
        records = []

        def observer(exp_, cycle, state, labeled, record, candidates):
            clock.switch("done")
            records.append(record)
            raise _CycleDone

        try:
            loop.run_prepared(exp, log=lambda *_: None, observer=observer)
        except _CycleDone:
            pass
    (record,) = records
    compile_s = {phase: round(s, 3) for phase, s in clock.compile_seconds.items()}
    has_top_k = clock.top_k_seconds > 0
    score_s = record["selection_seconds"] - clock.top_k_seconds if has_top_k else None
    select_s = clock.top_k_seconds if has_top_k else record["selection_seconds"]
    train_labeled = config.initial_size - config.val_size
    steady_epoch = (record["train_seconds"] - clock.compile_seconds.get("train", 0.0)) / config.epochs
    stats = jax.local_devices()[0].memory_stats() or {}
    return {
        "preset": preset, "strategy": strategy, "epochs": config.epochs,
        "training_precision": config.precision.training,
        "sizes": {"train_labeled": train_labeled, "val": config.val_size, "budget": config.budget,
                  "scored": record["num_scored"], "test": int(exp.dataset.x_test.shape[0])},
        "seconds": {"load": round(load_seconds, 2), "train": round(record["train_seconds"], 2),
                    "train_epoch_steady": round(steady_epoch, 3), "evaluate": round(record["evaluate_seconds"], 2),
                    "score": None if score_s is None else round(score_s, 2), "select": round(select_s, 3),
                    "compile": compile_s, "cpu": {phase: round(s, 2) for phase, s in clock.cpu_seconds.items()}},
        "per_sample_ms": {"train_epoch": round(1e3 * steady_epoch / train_labeled, 3),
                          "score": None if score_s is None or not record["num_scored"]
                          else round(1e3 * (score_s - clock.compile_seconds.get("score", 0.0)) / record["num_scored"], 3)},
        "peak_rss_mb": round(max_rss_mb(), 1), "rss_after_load_mb": round(rss_after_load, 1),
        "peak_rss_mb_by_phase_end": {phase: round(mb, 1) for phase, mb in clock.peak_rss_mb.items()},
        "device_peak_bytes": stats.get("peak_bytes_in_use"), "test_accuracy": record["test_accuracy"],
        "device": str(jax.devices()[0].device_kind), "num_devices": config.num_devices,
    }


def child_main(args) -> None:
    try:
        result = run_one(args.child, args.strategy, args.dataset, args.epochs, args.size_factor, args.seed,
                         args.influence_scale, args.precision_training)
    except Exception as error:  # reported to the parent, which goes on with the next preset
        result = {"preset": args.child, "strategy": args.strategy, "peak_rss_mb": round(max_rss_mb(), 1),
                  "error": f"{type(error).__name__}: {error}"[:2000], "traceback": traceback.format_exc()[-3000:]}
    print(json.dumps(result))


# ---- the parent: one process per (preset, strategy) --------------------------------------------------------


def run_child(args, preset: str, strategy: str) -> dict:
    command = [sys.executable, __file__, "--child", preset, "--strategy", strategy, "--dataset", args.dataset,
               "--size-factor", str(args.size_factor), "--seed", str(args.seed)]
    if args.epochs is not None:
        command += ["--epochs", str(args.epochs)]
    if args.influence_scale is not None:
        command += ["--influence-scale", str(args.influence_scale)]
    if args.precision_training is not None:
        command += ["--precision-training", args.precision_training]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    begin = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout or None)
    except subprocess.TimeoutExpired:
        return {"preset": preset, "strategy": strategy, "error": f"timed out after {args.timeout} s"}
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"preset": preset, "strategy": strategy,
                  "error": f"exit status {done.returncode} without a result (killed for memory?): "
                           f"{done.stderr.strip()[-1500:]}"}
    result["process_seconds"] = round(time.perf_counter() - begin, 1)
    return result


def describe(r: dict) -> str:
    if "error" in r:
        return f"{r['preset']} / {r['strategy']}: FAILED ({r['error'].splitlines()[0][:300]})"
    s, z = r["seconds"], r["sizes"]
    score = "-" if s["score"] is None else f"{s['score']:.1f}"
    return (f"{r['preset']} / {r['strategy']}: {z['train_labeled']} train, {z['scored']} scored, {r['epochs']} "
            f"epoch(s): train {s['train']:.1f} s ({s['train_epoch_steady']:.2f} s/epoch without compilation), "
            f"evaluate {s['evaluate']:.1f} s, score {score} s, select {s['select']:.2f} s; compile "
            f"{sum(s['compile'].values()):.0f} s; peak RSS {r['peak_rss_mb']:.0f} MB"
            + ("" if r["device_peak_bytes"] is None else f", device peak {r['device_peak_bytes'] / 2**30:.2f} GiB"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=str(default_dataset()),
                        help="CIFAR-10 as a folder or .tar(.gz) of train/<class>/ test/<class>/ images")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--strategies", default=None, help="comma-separated; default: each preset's own")
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's (200)")
    parser.add_argument("--size-factor", type=float, default=1.0)
    parser.add_argument("--influence-scale", type=float, default=None,
                        help="LiSSA's scale for the ISAL presets (default: the preset's, 1e4). A model trained for "
                             "a few epochs has Hessian eigenvalues far above it and LiSSA diverges (jaxal stops and "
                             "says which scale to use); LiSSA's cost does not depend on the scale")
    parser.add_argument("--precision-training", default=None,
                        help="--precision.training of the runs (default: the preset's, 'default'; 'bfloat16': "
                             "mixed-precision training)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=0, help="seconds per (preset, strategy); 0: none")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    if not Path(args.dataset).exists():
        print(f"bench_scale: {args.dataset} is absent; pass --dataset PATH (CIFAR-10 as train/<class>/ "
              f"test/<class>/ images) or set JAXAL_SHARED_DATA. Skipped.")
        print(json.dumps({"skipped": f"{args.dataset} absent"}))
        return
    if not 0 < args.size_factor <= 1:
        parser.error("--size-factor must be in (0, 1]")
    from jaxal.config import build_config

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}; choose among {', '.join(PRESETS)}")
    load_before = os.getloadavg()
    results = []
    for preset in presets:
        strategies = args.strategies.split(",") if args.strategies else build_config(preset).strategies
        for strategy in strategies:
            results.append(run_child(args, preset, strategy.strip()))
            print(describe(results[-1]), flush=True)
    print(json.dumps({"dataset": args.dataset, "epochs": args.epochs, "size_factor": args.size_factor,
                      "machine": platform.machine(), "cores": len(os.sched_getaffinity(0)),
                      "load_average_before_after": [round(load_before[0], 1), round(os.getloadavg()[0], 1)],
                      "results": results}))


if __name__ == "__main__":
    main()
