"""Learning curves of every registered strategy on the shared Fashion-MNIST images: CPU, a small CNN,
several trials; a figure (mean and +-1 std band per strategy) and a table with the area under the curve.

    python experiments/compare_strategies.py --dataset /work/shared/data/fashion-mnist-png.tar.gz
    python experiments/compare_strategies.py --quick          # a few minutes: every strategy, tiny sizes

Everything goes through `jaxal.loop` (one run directory, resumable: run the same command again after an
interruption and it continues). The sizes are chosen for a 2-core CPU and are the defaults below:

  - images resized to 14x14 (`--image_size`), the digits CNN (`cnn`: two 3x3 convolutions of 32 and 64
    channels, a max-pool, 128 hidden units, dropout 0.25); SGD lr 0.05, momentum 0.9, batch 32,
    `--epochs` per cycle, retrained from scratch every cycle;
  - a fixed random `--pool_size` of the 60000 training images as the pool and `--test_size` of the
    10000 test images as the test set (the same for every strategy and trial), a validation split of
    10 held out of the initial set for every strategy (ISAL's reference set), `--subset_size` random
    candidates scored per cycle;
  - the strategies' own networks at CPU size: VAAL/SRAAL `--vae_width` channels (reference 128) and
    `--vae_iterations` iterations of `--vae_batch` images per cycle (reference: 100 epochs of the pool in
    batches of 128 / 20000 iterations of 250), QBC `--qbc_members` members; the GCN, BALD, LiSSA (depth
    250 x 4) and the rest at their reference settings. (A VAE iteration at width 16 and batch 64 costs
    about 10 GFLOP, most of it in the decoder's transposed convolutions at full resolution.)

Area under the curve: the trapezoid rule over the labelled counts, divided by their range, i.e. the mean
test accuracy over the budget; per trial, then mean and standard deviation over trials. Outputs:
`<out>.png` (figure), `<out>.md` (the table and the command), and a last line with one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

DEFAULT_DATASET = os.path.join(os.environ.get("JAXAL_SHARED_DATA", "/work/shared/data"), "fashion-mnist-png.tar.gz")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=DEFAULT_DATASET)
    parser.add_argument("--strategies", default="all", help="comma-separated, or 'all' registered strategies")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=6)
    parser.add_argument("--initial_size", type=int, default=60)
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--image_size", type=int, default=14)
    parser.add_argument("--pool_size", type=int, default=6000)
    parser.add_argument("--test_size", type=int, default=2000)
    parser.add_argument("--subset_size", type=int, default=1000)
    parser.add_argument("--vae_width", type=int, default=8)
    parser.add_argument("--vae_iterations", type=int, default=60)
    parser.add_argument("--vae_batch", type=int, default=32)
    parser.add_argument("--qbc_members", type=int, default=3)
    parser.add_argument("--workdir", default="runs/compare_fashion_mnist")
    parser.add_argument("--out", default="experiments/compare_fashion_mnist")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that everything runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.cycles, args.initial_size, args.budget, args.epochs = 1, 2, 30, 10, 1
        args.pool_size, args.test_size, args.subset_size, args.vae_iterations = 600, 200, 100, 2
        args.workdir, args.out = args.workdir + "_quick", args.out + "_quick"
    return args


def experiment_config(args, strategies: str):
    from jaxal.config import build_config

    vae = dict(width=args.vae_width, iterations=args.vae_iterations, batch_size=args.vae_batch)
    return build_config(dataset=args.dataset, strategy=strategies, model="cnn", image_size=args.image_size,
                        trials=args.trials, cycles=args.cycles, initial_size=args.initial_size, budget=args.budget,
                        subset_size=args.subset_size, val_size=10, epochs=args.epochs, batch_size=32, lr=0.05,
                        lr_milestones=(), eval_batch_size=500, progress=False, vaal=vae, sraal=vae,
                        qbc=dict(members=args.qbc_members))


def subsample(dataset, pool_size: int, test_size: int, seed: int = 0):
    """The same fixed random pool and test subset for every strategy and trial."""
    rng = np.random.default_rng(seed)
    train = np.sort(rng.choice(len(dataset.x_train), min(pool_size, len(dataset.x_train)), replace=False))
    test = np.sort(rng.choice(len(dataset.x_test), min(test_size, len(dataset.x_test)), replace=False))
    return dataclasses.replace(dataset, x_train=dataset.x_train[train], y_train=dataset.y_train[train],
                               x_test=dataset.x_test[test], y_test=dataset.y_test[test])


def area_under_curve(points) -> float:
    """Trapezoid area of [(num_labeled, accuracy)] divided by the labelled range: the mean accuracy."""
    xs, ys = (np.asarray(v, np.float64) for v in zip(*sorted(points)))
    return float(np.trapezoid(ys, xs) / (xs[-1] - xs[0])) if len(xs) > 1 else float(ys[0])


def summarise(records: list[dict]) -> dict:
    by = defaultdict(lambda: defaultdict(list))
    seconds = defaultdict(list)
    for r in records:
        by[r["strategy"]][r["trial"]].append((r["num_labeled"], r["test_accuracy"]))
        if r["num_scored"]:
            seconds[r["strategy"]].append(r["selection_seconds"])
    table = {}
    for strategy, trials in by.items():
        aucs = [area_under_curve(points) for points in trials.values()]
        finals = [max(points)[1] for points in trials.values()]
        table[strategy] = {"auc_mean": float(np.mean(aucs)), "auc_std": float(np.std(aucs)),
                           "final_mean": float(np.mean(finals)), "final_std": float(np.std(finals)),
                           "trials": len(aucs), "selection_seconds_mean": float(np.mean(seconds[strategy] or [0.0]))}
    return dict(sorted(table.items(), key=lambda item: -item[1]["auc_mean"]))


def plot(path: Path, records: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = defaultdict(lambda: defaultdict(list))
    for r in sorted(records, key=lambda r: r["cycle"]):
        by[r["strategy"]][r["trial"]].append((r["num_labeled"], r["test_accuracy"]))
    fig, ax = plt.subplots(figsize=(9, 6))
    colors = plt.cm.tab20.colors + plt.cm.tab20b.colors
    styles = ("-", "--", ":", "-.")
    for i, (strategy, trials) in enumerate(sorted(by.items())):
        length = min(len(p) for p in trials.values())
        xs = np.array([x for x, _ in next(iter(trials.values()))[:length]])
        acc = np.array([[y for _, y in p[:length]] for p in trials.values()])
        mean, std = acc.mean(0), acc.std(0)
        ax.plot(xs, mean, color=colors[i % len(colors)], ls=styles[i % len(styles)], lw=1.6, marker="o", ms=3,
                label=f"{strategy}")
        ax.fill_between(xs, mean - std, mean + std, color=colors[i % len(colors)], alpha=0.08)
    ax.set_xlabel("labelled samples")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_table(path: Path, table: dict, args, command: str, config, wall_seconds: float) -> None:
    lines = [f"# Active-learning strategies on Fashion-MNIST (CPU, small CNN, {args.trials} trials)", "",
             "Made by:", "", f"    {command}", "",
             f"Pool: {args.pool_size} training images (fixed random subset), {args.subset_size} random candidates "
             f"scored per cycle; test: {args.test_size} test images; images resized to {args.image_size}x"
             f"{args.image_size}; model `cnn`, {args.epochs} epochs per cycle from scratch; "
             f"{args.initial_size} initial (10 of them the validation split) + {args.budget} per cycle, "
             f"{args.cycles} cycles. VAE width {args.vae_width}, {args.vae_iterations} VAE iterations of "
             f"{args.vae_batch}, "
             f"QBC {args.qbc_members} members. Wall time {wall_seconds / 60:.0f} min on a shared 2-core CPU.", "",
             "AUC: area under the test-accuracy curve over the labelled counts divided by their range (the mean "
             "accuracy over the budget), per trial; mean +- std over trials. Final: accuracy at the last cycle. "
             "Selection: mean seconds per selection (compilation included in the first).", "",
             "| rank | strategy | AUC | final accuracy | selection s |", "|---:|---|---:|---:|---:|"]
    for rank, (strategy, row) in enumerate(table.items(), 1):
        lines.append(f"| {rank} | {strategy} | {row['auc_mean']:.4f} +- {row['auc_std']:.4f} | "
                     f"{row['final_mean']:.4f} +- {row['final_std']:.4f} | {row['selection_seconds_mean']:.1f} |")
    lines += ["", "Settings (jaxal config):", "", "```json", config.to_json(), "```", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxal import loop
    from jaxal.strategies import STRATEGIES

    names = sorted(STRATEGIES) if args.strategies == "all" else [s.strip() for s in args.strategies.split(",")]
    config = experiment_config(args, ",".join(names))
    exp = loop.prepare(config, args.workdir)
    exp = dataclasses.replace(exp, dataset=subsample(exp.dataset, args.pool_size, args.test_size))
    loop.validate(exp.config, exp.dataset, exp.task)  # the budget against the subsampled pool
    print(f"{len(names)} strategies: {', '.join(names)}", flush=True)
    start = time.perf_counter()
    records = loop.run_prepared(exp, log=lambda line: print(line, flush=True))
    wall = time.perf_counter() - start
    table = summarise(records)
    out = Path(args.out)
    title = (f"Fashion-MNIST {args.image_size}x{args.image_size}, cnn, {args.trials} trials "
             f"(mean +- std), pool {args.pool_size}")
    plot(out.with_suffix(".png"), records, title)
    command = "python experiments/compare_strategies.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_table(out.with_suffix(".md"), table, args, command.strip(), exp.config, wall)
    print(json.dumps({"benchmark": "compare_strategies", "wall_seconds": wall, "strategies": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
