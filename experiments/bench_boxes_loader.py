"""Benchmark of the detection loader (`jaxal.data.boxes.batches`): host memory and images/s as the
dataset grows. Synthetic VOC folders of N random 640x480 JPEGs (a few boxes each) are written to a
temporary folder; for each N a fresh Python process loads the dataset with the cache off (images
streamed from disk) and reads one shuffled, flipped epoch at the canvas, reporting its peak RSS (the
process's high-water mark, so one process per N) and the loader's images/s. Peak RSS should not grow
with N: only the boxes (N x max_boxes x 4 floats) and a few prefetched batches are held. Then, when the
shared BCCD archive is present, two epochs of its train split at canvas 320 with the image cache on: the
first decodes, the second reads the cached canvas images. The last line printed is one JSON object.

    python experiments/bench_boxes_loader.py                       # N = 200 and 800, canvas 512
    python experiments/bench_boxes_loader.py --sizes 200 2000 --canvas 800 --batch 8 --workers 2
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

import numpy as np


def write_voc(root: Path, n: int, seed: int = 0, held_out: int = 2) -> None:
    """N images in train; val and test are the first `held_out` of them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    ids = []
    for i in range(n):
        image_id = f"{i:06d}"
        ids.append(image_id)
        pixels = np.roll(base, i * 7, axis=1)  # distinct files, realistic JPEG size, cheap to make
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        objects = []
        for _ in range(int(rng.integers(1, 6))):
            x, y = rng.integers(1, 500), rng.integers(1, 350)
            objects.append(f"<object><name>c{int(rng.integers(3))}</name><difficult>0</difficult><bndbox>"
                           f"<xmin>{x}</xmin><ymin>{y}</ymin><xmax>{x + 100}</xmax><ymax>{y + 100}</ymax>"
                           "</bndbox></object>")
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>640</width><height>480</height></size>{''.join(objects)}</annotation>")
    for split in ("train", "val", "test"):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids if split == "train" else ids[:held_out]))


def measure(root: str, canvas: int, batch: int, workers: int | None) -> dict:
    """One epoch of batches in this process; its peak RSS."""
    from jaxal.data import boxes

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    ds = boxes.load_boxes(root, canvas=canvas, cache_bytes=0)
    train = ds.train
    start = time.perf_counter()
    count = 0
    for b in boxes.batches(train, np.arange(len(train)), batch, rng=np.random.default_rng(0), flip=True,
                           workers=workers):
        count += len(b["indices"])
    seconds = time.perf_counter() - start
    return {"images": count, "canvas": list(ds.canvases[0]), "seconds": round(seconds, 2),
            "images_per_s": round(count / seconds, 1), "rss_before_load_mib": round(before, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1)}


def bccd_epochs(path: Path, batch: int, workers: int | None) -> dict:
    """images/s of a decoding epoch and of a cached one, side by side, in this process."""
    from jaxal.data import boxes

    with tempfile.TemporaryDirectory() as cache:
        ds = boxes.load_boxes(path, canvas=320, cache_dir=cache)
        rates = []
        for epoch in range(2):
            start = time.perf_counter()
            for _ in boxes.batches(ds.train, np.arange(len(ds.train)), batch, rng=np.random.default_rng(epoch),
                                   flip=True, workers=workers):
                pass
            rates.append(len(ds.train) / (time.perf_counter() - start))
    return {"decoding_images_per_s": round(rates[0], 1), "cached_images_per_s": round(rates[1], 1),
            "ratio": round(rates[1] / rates[0], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 800])
    parser.add_argument("--canvas", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="loader threads (default: cores, at most 8)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the folder one child process reads
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.canvas, args.batch, args.workers)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            root = Path(tmp) / f"voc{n}"
            write_voc(root, n)
            command = [sys.executable, __file__, "--measure", str(root), "--canvas", str(args.canvas),
                       "--batch", str(args.batch)] + (["--workers", str(args.workers)] if args.workers else [])
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[n] = json.loads(out)
            r = results[n]
            print(f"N={n:>6}: {r['images_per_s']:7.1f} images/s at canvas {r['canvas']}, peak RSS "
                  f"{r['peak_rss_mib']:.0f} MiB (after imports {r['rss_before_load_mib']:.0f} MiB)", flush=True)
    sizes = sorted(results)
    ratio = results[sizes[-1]]["peak_rss_mib"] / results[sizes[0]]["peak_rss_mib"]
    print(f"peak RSS ratio N={sizes[-1]} / N={sizes[0]}: {ratio:.3f} (images x{sizes[-1] / sizes[0]:.0f})")
    bccd = Path(os.environ.get("JAXAL_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    bccd = bccd / "bccd-voc.tar.gz"
    if bccd.exists():
        results["bccd_train_320"] = bccd_epochs(bccd, args.batch, args.workers)
        r = results["bccd_train_320"]
        print(f"BCCD train at 320: {r['decoding_images_per_s']} images/s decoding, {r['cached_images_per_s']} "
              f"cached ({r['ratio']}x)")
    print(json.dumps({"cores": os.cpu_count(), "load_average": os.getloadavg()[0], "batch": args.batch,
                      "rss_ratio": round(ratio, 3), **{str(k): v for k, v in results.items()}}))


if __name__ == "__main__":
    main()
