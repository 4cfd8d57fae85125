"""Host memory of a whole `--task detection` run as the dataset grows. For each N a synthetic VOC folder
of N random 640x480 JPEGs (train = test = the N images; `bench_boxes_loader.write_voc`) is written to a
temporary folder, and a fresh Python process runs `jaxal.run` on it: FCOS-R18 from scratch, the image
cache off (`--boxes.cache_bytes 0`: every image streamed from disk), ONE epoch over all N images as the
labelled set, then detection and COCO/VOC evaluation of all N test images. Each child prints its own
peak RSS (the process's high-water mark, hence one process per N), printed side by side with the ratio.
What may grow with N: the boxes (N x max_boxes x 5 numbers) and the detections (max_per_img x N); the
images may not. The last line printed is one JSON object.

    python experiments/bench_detection_memory.py                 # N = 64 and 256, canvas 128
    python experiments/bench_detection_memory.py --sizes 100 1000 --canvas 320
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_boxes_loader import write_voc  # noqa: E402


def run_flags(root: str, workdir: str, n: int, canvas: int, batch: int) -> list[str]:
    return ["--task", "detection", "--strategy", "random", "--dataset", root, "--workdir", workdir,
            "--model", "fcos_r18", "--boxes.canvas", str(canvas), "--boxes.cache_bytes", "0",
            "--initial_size", str(n), "--budget", "0", "--cycles", "1", "--batch_size", str(batch),
            "--eval_batch_size", str(batch), "--detection.iterations", str(math.ceil(n / batch)),
            "--detection.warmup_iters", "1", "--detection.channels", "32", "--detection.stacked_convs", "1"]


def measure(flags: list[str]) -> dict:
    """The run in this process; its peak RSS and CPU seconds."""
    from jaxal import run

    start, cpu = time.perf_counter(), time.process_time()
    code = run.main(flags)
    if code:
        raise SystemExit(f"jaxal.run exited {code}")
    return {"seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(time.process_time() - cpu, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--canvas", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--measure", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # internal: a child's run
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            root = Path(tmp) / f"voc{n}"
            write_voc(root, n, held_out=n)
            flags = run_flags(str(root), str(Path(tmp) / f"run{n}"), n, args.canvas, args.batch)
            child = subprocess.run([sys.executable, __file__, "--measure", *flags], capture_output=True, text=True)
            if child.returncode:
                raise SystemExit(f"the run at N={n} failed:\n{child.stderr[-3000:]}")
            results[n] = json.loads(child.stdout.strip().splitlines()[-1])
            r = results[n]
            print(f"N={n:>6}: peak RSS {r['peak_rss_mib']:.0f} MiB ({n} images trained one epoch and evaluated; "
                  f"{r['seconds']:.0f} s, {r['cpu_seconds']:.0f} CPU s)", flush=True)
    sizes = sorted(results)
    ratio = results[sizes[-1]]["peak_rss_mib"] / results[sizes[0]]["peak_rss_mib"]
    print(f"peak RSS ratio N={sizes[-1]} / N={sizes[0]}: {ratio:.3f} (images x{sizes[-1] / sizes[0]:.0f})")
    print(json.dumps({"cores": os.cpu_count(), "load_average": os.getloadavg()[0], "canvas": args.canvas,
                      "batch": args.batch, "rss_ratio": round(ratio, 3), **{str(k): v for k, v in results.items()}}))


if __name__ == "__main__":
    main()
