"""Benchmark of `jaxal.folders` on the shared real archives: the first load (one streaming pass over
the archive, every image decoded with Pillow, the cache written) against a load from the cache, side by
side for each archive present in ../shared/data (or $JAXAL_SHARED_DATA). A fresh temporary cache folder
per archive, so the first load really decodes. The last line printed is one JSON object.

    python experiments/bench_folders.py
    python experiments/bench_folders.py --workers 1  # decoding threads (default: the cores, at most 8)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from jaxal import folders

ARCHIVES = {
    "fashion-mnist-png.tar.gz": folders.load_classification,
    "cifar10-jpeg.tar.gz": folders.load_classification,
    "camvid-segnet-180x240.tar.gz": folders.load_segmentation,
}


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("JAXAL_SHARED_DATA")
                        or Path(__file__).resolve().parents[2] / "shared" / "data")  # fmt: skip
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    if args.workers:
        folders._WORKERS = args.workers
    results = {}
    for archive, load in ARCHIVES.items():
        path = Path(args.data) / archive
        if not path.exists():
            print(f"{archive}: absent from {args.data}, skipped")
            continue
        with tempfile.TemporaryDirectory() as cache:
            first = seconds(lambda: load(path, cache_dir=cache))
            cached = seconds(lambda: load(path, cache_dir=cache))
        results[archive] = {"first_s": round(first, 2), "cached_s": round(cached, 3), "ratio": first / cached}
        print(f"{archive}: first load {first:.1f} s, cached load {cached:.2f} s ({first / cached:.0f}x)")
    print(json.dumps({"workers": folders._WORKERS, "cores": os.cpu_count(), **results}))


if __name__ == "__main__":
    main()
