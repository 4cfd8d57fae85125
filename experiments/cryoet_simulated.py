"""Simulated cryo-ET subtomograms: test accuracy vs labelled volumes of ent_gn, entropy, coreset, BALD and
random, on a CPU: the `wang2022_cryoet_simulated` preset (24^3 volumes, SNR 0.1, DSRF3D-v2 at half width,
AITom's training) or `--preset cryoet_simulated_cpu` (its CPU variant: the model and training that leave
chance in a CPU's steps), with --override for the sizes the machine affords.

Runs (or resumes) `jaxal.loop` in each --workdir (one per process: strategies can be split over processes
and their records merged here), then writes the table (mean +- std of the test accuracy over the trials,
per strategy and labelled-set size; mean selection seconds per cycle; wall time) to
`experiments/cryoet_simulated.md`, the curve to `experiments/cryoet_simulated.png` and the records to
`experiments/cryoet_simulated.csv` (`--output NAME`: experiments/NAME.md, .png, .csv).

    python experiments/cryoet_simulated.py                       # the preset as it is: 3 trials, 100 -> 500
    python experiments/cryoet_simulated.py --preset cryoet_simulated_cpu --strategy bald --workdir runs/cpu_d
        # the CPU variant, one process per strategy side by side (the README's table)
    python experiments/cryoet_simulated.py --summary-only --workdir runs/cpu_a,runs/cpu_b
The full size (40^3, dsrf3d, SNR 0.1 and 0.5) is experiments/cryoet_gpu.sh.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from jaxal import loop, results
from jaxal.config import build_config, flat_fields, parse_value

HERE = Path(__file__).resolve().parent
STRATEGIES = "ent_gn,entropy,coreset,bald,random"


def table(records: list[dict]) -> str:
    return results.curve_table(records, "accuracy", tuple(STRATEGIES.split(",")))


def plot(path: Path, records: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = defaultdict(lambda: defaultdict(list))
    for r in records:
        by[r["strategy"]][r["num_labeled"]].append(r["test_accuracy"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for s, per_size in sorted(by.items()):
        sizes = sorted(per_size)
        mean = np.array([np.mean(per_size[n]) for n in sizes])
        std = np.array([np.std(per_size[n]) for n in sizes])
        ax.plot(sizes, 100 * mean, marker="o", label=s)
        ax.fill_between(sizes, 100 * (mean - std), 100 * (mean + std), alpha=0.15)
    ax.set_xlabel("labelled volumes")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_overrides(items: list[str]) -> dict:
    """key=value pairs (dotted sections allowed) typed as the config's fields."""
    kinds = {name: kind for name, kind, _, _ in flat_fields()}
    out = {}
    for item in items:
        key, _, text = item.partition("=")
        if key not in kinds:
            raise ValueError(f"unknown config field {key!r}")
        section, _, field = key.rpartition(".")
        value = parse_value(text, kinds[key])
        if section:
            out.setdefault(section, {})[field] = value
        else:
            out[key] = value
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/cryoet_simulated", help="run folder(s), comma-separated")
    parser.add_argument("--preset", default="wang2022_cryoet_simulated",
                        help="wang2022_cryoet_simulated (AITom's model and training) or cryoet_simulated_cpu")
    parser.add_argument("--strategy", default=STRATEGIES)
    parser.add_argument("--override", nargs="*", default=[], help="config fields as key=value")
    parser.add_argument("--summary-only", action="store_true", help="summarise existing runs; train nothing")
    parser.add_argument("--output", default="cryoet_simulated",
                        help="name of the table, figure and records written into experiments/ (.md, .png, .csv)")
    args = parser.parse_args(argv)
    workdirs = [Path(w) for w in args.workdir.split(",")]
    if not args.summary_only:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            config = build_config(args.preset, strategy=args.strategy,
                                  **parse_overrides(args.override))
            loop.run_experiment(config, workdir=workdirs[0])
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        (workdirs[0] / "seconds.txt").write_text(f"{time.perf_counter() - start:.0f} {time.process_time() - cpu:.0f}\n")
    records = [r for w in workdirs for r in results.read_jsonl(w / "results.jsonl")]
    seconds = [(w.name, *(w / "seconds.txt").read_text().split()) for w in workdirs if (w / "seconds.txt").exists()]
    first = json.loads((workdirs[0] / "config.json").read_text())
    title = f"{first['dataset']}, {first['model']}"

    text = table(records)
    print(text)
    plot(HERE / f"{args.output}.png", records, title)
    fields = ["strategy", "trial", "cycle", "num_labeled", "test_accuracy", "selection_seconds", "train_seconds"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    (HERE / f"{args.output}.csv").write_text(buffer.getvalue())
    command = " ".join(["python experiments/cryoet_simulated.py", *(sys.argv[1:] if argv is None else argv)])
    (HERE / f"{args.output}.md").write_text(
        f"# Simulated subtomograms: accuracy vs labelled volumes, CPU size ({title})\n\n"
        f"`{command}`\n\n" + text
        + (f"\nWall / CPU seconds per run folder (one process each, side by side on a shared 2-core machine): "
           f"{', '.join(f'{name} {wall} / {cpu}' for name, wall, cpu in seconds)}.\n" if seconds else "")
        + f"\n![learning curve]({args.output}.png)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
