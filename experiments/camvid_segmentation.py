"""CamVid learning curves (mIoU vs labelled images) of ent_gn, entropy, random and coreset: the
`camvid_segnet` preset (DRN-D-22 at a quarter width on CamVid resized to 120x120, 20 -> 80 labelled images,
3 trials).

Runs (or resumes) the experiment in `--workdir`, then writes the table (mean +- std of the test mIoU over
the trials, per strategy and labelled-set size; mean selection seconds per cycle) to
`experiments/camvid_segmentation.md`, the learning curve to `experiments/camvid_segmentation.png` and the
per-cycle records to `experiments/camvid_segmentation.csv`.

    JAXAL_SHARED_DATA=/path/to/shared/data python experiments/camvid_segmentation.py   # about an hour on 2 busy cores
    python experiments/camvid_segmentation.py --summary-only --workdir runs/camvid_segnet
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from jaxal import loop, results
from jaxal.config import build_config

HERE = Path(__file__).resolve().parent
STRATEGIES = "ent_gn,entropy,random,coreset"


def table(records: list[dict]) -> str:
    by = defaultdict(lambda: defaultdict(list))
    seconds = defaultdict(list)
    for r in records:
        by[r["strategy"]][r["num_labeled"]].append(r["test_miou"])
        if r["num_scored"]:
            seconds[r["strategy"]].append(r["selection_seconds"])
    sizes = sorted({n for per_size in by.values() for n in per_size})
    strategies = [s for s in STRATEGIES.split(",") if s in by] + sorted(set(by) - set(STRATEGIES.split(",")))
    lines = ["| strategy | " + " | ".join(f"{n} labelled" for n in sizes) + " | selection s/cycle |",
             "|---" * (len(sizes) + 2) + "|"]
    for s in strategies:
        cells = []
        for n in sizes:
            values = np.array(by[s].get(n, []))
            cells.append(f"{100 * values.mean():.1f} +- {100 * values.std():.1f}" if len(values) else "")
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {np.mean(seconds[s]):.1f} |")
    trials = max(len(v) for per_size in by.values() for v in per_size.values())
    return "\n".join(lines) + f"\n\nTest mIoU (%) over {trials} trial(s): mean +- standard deviation.\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/camvid_segnet")
    parser.add_argument("--strategy", default=STRATEGIES)
    parser.add_argument("--summary-only", action="store_true", help="summarise an existing run; train nothing")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    if args.summary_only:
        records = results.read_jsonl(workdir / "results.jsonl")
    else:
        try:
            records = loop.run_experiment(build_config("camvid_segnet", strategy=args.strategy), workdir=workdir)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    text = table(records)
    print(text)
    (HERE / "camvid_segmentation.md").write_text(
        "# CamVid: mIoU vs labelled images\n\n"
        f"`python experiments/camvid_segmentation.py` (preset camvid_segnet, strategies {args.strategy}).\n\n"
        + text + "\n![learning curve](camvid_segmentation.png)\n")
    shutil.copyfile(workdir / "learning_curve.png", HERE / "camvid_segmentation.png")
    shutil.copyfile(workdir / "results.csv", HERE / "camvid_segmentation.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
