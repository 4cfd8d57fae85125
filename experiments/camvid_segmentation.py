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
from pathlib import Path


from jaxal import loop, results
from jaxal.config import build_config

HERE = Path(__file__).resolve().parent
STRATEGIES = "ent_gn,entropy,random,coreset"


def table(records: list[dict]) -> str:
    return results.curve_table(records, "miou", tuple(STRATEGIES.split(",")))


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
