"""BCCD detection: test AP against boxes (and images) of detection strategies, the `bccd_fcos` preset with the
sizes given on the command line where the shared CPU cannot afford the preset's.

Runs (or resumes) `jaxal.detection.active.run_detection` in --workdir -- the records, results.csv and the
learning curves `jaxal.run` writes -- with two additions that change none of the numbers it records:
- cycle 0 of a trial is trained once and reused by every strategy: its initial set, detector key and the
  trial's generator are the same for every strategy, so the detector is too; the generator is set to the
  state that training left, so each strategy then draws what a run of it alone would draw (every
  strategy's cycle-0 record holds that one training's seconds);
- each selection's CPU seconds (process time, all threads) beside its wall seconds, in `strategy_info`.
Then writes experiments/<name>.md (the table: per strategy and cycle images, boxes, AP, AP50, selection
CPU/wall s; the wall time and load), <name>.csv and the two curves <name>_boxes.png, <name>_images.png.

    python experiments/compare_bccd_detection.py --strategy isal,ent_gn,entropy,random \\
        --override boxes.canvas=256 detection.iterations=none epochs=30 detection.warmup_iters=30 \\
        cycles=3 boxal.pseudo_score=0.1      # what ran (README, "BCCD: AP against boxes")
The full comparison (+ coreset, localization stability; 3 trials; the R50 config) is
experiments/bccd_detection_gpu.sh.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cryoet_simulated import parse_overrides  # noqa: E402  (one parser of key=value config overrides)
from jaxal import loop, results  # noqa: E402
from jaxal.config import build_config  # noqa: E402
from jaxal.detection import active, strategies  # noqa: E402

STRATEGIES = "isal,ent_gn,entropy,random"


def share_cycle_zero():
    """Make active.train_and_evaluate train cycle 0 of each (trial, labelled set, generator state) once: a
    second call with the same inputs returns the first's fields and leaves the generator where training left
    it. Later cycles are trained as usual (their labelled sets differ between strategies)."""
    train_and_evaluate, cache = active.train_and_evaluate, {}

    def cached(run, trial, cycle, labeled, rng, loss_prediction=None):
        if cycle != 0:
            return train_and_evaluate(run, trial, cycle, labeled, rng, loss_prediction)
        # ll4al's cycle 0 trains the loss-prediction module too: its own entry
        key = (trial, labeled.tobytes(), repr(rng.bit_generator.state), loss_prediction)
        if key not in cache:
            fields = train_and_evaluate(run, trial, cycle, labeled, rng, loss_prediction)
            cache[key] = fields, rng.bit_generator.state
        fields, state = cache[key]
        rng.bit_generator.state = state
        return dict(fields)

    active.train_and_evaluate = cached


def time_selections():
    """Add each selection's CPU seconds (this process's, all threads) to its info."""
    select = strategies.select

    def timed(name, ctx, k):
        cpu = time.process_time()
        selection = select(name, ctx, k)
        return selection._replace(info={**selection.info, "selection_cpu_seconds": time.process_time() - cpu})

    strategies.select = timed


def table(records: list[dict]) -> str:
    lines = ["| strategy | trial | cycle | images | boxes | AP | AP50 | train CPU s | selection CPU s | "
             "selection wall s |", "|---" * 10 + "|"]
    order = {s: i for i, s in enumerate(STRATEGIES.split(","))}
    for r in sorted(records, key=lambda r: (order.get(r["strategy"], 99), r["strategy"], r["trial"], r["cycle"])):
        selected = r.get("num_selected", 0) > 0
        cpu = r.get("strategy_info", {}).get("selection_cpu_seconds")
        lines.append(f"| {r['strategy']} | {r['trial']} | {r['cycle']} | {r['num_labeled']} | {r['num_boxes']} | "
                     f"{r['test_ap']:.4f} | {r['test_ap50']:.4f} | {r['train_cpu_seconds']:.0f} | "
                     + (f"{cpu:.0f} | {r['selection_seconds']:.0f} |" if selected and cpu is not None else "- | - |"))
    return "\n".join(lines) + "\n"


def mean_table(records: list[dict]) -> str:
    """Mean +- std of test AP over trials per strategy and cycle (with boxes, mean over trials)."""
    by = defaultdict(lambda: defaultdict(list))
    for r in records:
        by[r["strategy"]][r["cycle"]].append(r)
    cycles = sorted({c for per in by.values() for c in per})
    lines = ["| strategy | " + " | ".join(f"cycle {c}: AP (boxes)" for c in cycles) + " |", "|---" * (len(cycles) + 1)
             + "|"]
    for s in sorted(by):
        cells = []
        for c in cycles:
            rs = by[s].get(c, [])
            if not rs:
                cells.append("")
                continue
            aps = [r["test_ap"] for r in rs]
            mean = sum(aps) / len(aps)
            std = (sum((a - mean) ** 2 for a in aps) / len(aps)) ** 0.5
            boxes = sum(r["num_boxes"] for r in rs) / len(rs)
            cells.append(f"{mean:.4f} +- {std:.4f} ({boxes:.0f})")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_runs(workdirs: list[Path]) -> list[dict]:
    """The records of every run folder; with several folders each (folder, trial) gets a trial number of its own."""
    if len(workdirs) == 1:
        return results.read_jsonl(workdirs[0] / "results.jsonl")
    records, numbers = [], {}
    for w in workdirs:
        for r in results.read_jsonl(w / "results.jsonl"):
            records.append({**r, "trial": numbers.setdefault((w, r["trial"]), len(numbers))})
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/compare_bccd_detection",
                        help="run folder; with --summary-only several, comma-separated (each a trial of its own)")
    parser.add_argument("--strategy", default=STRATEGIES)
    parser.add_argument("--override", nargs="*", default=[], help="config fields as key=value")
    parser.add_argument("--name", default="compare_bccd_detection", help="name of the files written")
    parser.add_argument("--out", default=str(HERE), help="folder of the .md, .csv and .png")
    parser.add_argument("--summary-only", action="store_true", help="summarise an existing run; train nothing")
    args = parser.parse_args(argv)
    workdirs, out = [Path(w) for w in args.workdir.split(",")], Path(args.out)
    workdir = workdirs[0]
    if not args.summary_only:
        start, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
        try:
            config = build_config("bccd_fcos", strategy=args.strategy, **parse_overrides(args.override))
            share_cycle_zero()
            time_selections()
            active.run_detection(config, workdir)
        except (ValueError, loop.RunError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        (workdir / "wall_seconds.txt").write_text(
            f"{time.perf_counter() - start:.0f} wall s, {time.process_time() - cpu:.0f} CPU s, "
            f"load average {load:.1f} at the start and {os.getloadavg()[0]:.1f} at the end\n")
    records = read_runs([w for w in workdirs if (w / "results.jsonl").exists()])
    trials = len({r["trial"] for r in records})
    text = table(records) + ("\nTest AP over the trials: mean +- std (boxes in the labelled set):\n\n"
                             + mean_table(records) if trials > 1 else "")
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    title = f"BCCD, test AP ({args.name})"
    results.plot_learning_curve(out / f"{args.name}_boxes.png", records, title, "ap", "num_boxes",
                                "boxes in the labelled set")
    results.plot_learning_curve(out / f"{args.name}_images.png", records, title, "ap")
    fields = ["strategy", "trial", "cycle", "num_labeled", "num_boxes", "boxes_selected", "test_ap", "test_ap50",
              "test_ap75", "test_map50", "train_cpu_seconds", "train_seconds", "selection_seconds",
              "selection_cpu_seconds"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({**r, **r.get("strategy_info", {})} for r in records)
    (out / f"{args.name}.csv").write_text(buffer.getvalue())
    walls = [(w / "wall_seconds.txt").read_text().strip() for w in workdirs if (w / "wall_seconds.txt").exists()]
    command = " ".join(["python experiments/compare_bccd_detection.py", *(sys.argv[1:] if argv is None else argv)])
    (out / f"{args.name}.md").write_text(
        "# BCCD detection: test AP against boxes, `bccd_fcos` at the sizes below\n\n"
        f"`{command}`\n\n" + text
        + (f"\nWhole run: {'; '.join(walls)} (cycle 0 trained once per trial, shared by the strategies).\n"
           if walls else "")
        + f"\n![AP against boxes]({args.name}_boxes.png) ![AP against images]({args.name}_images.png)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
