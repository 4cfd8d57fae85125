"""The GPU measurements of jaxal's speed work, prepared as one script for a session that has a GPU.

On the GPU machine, from the repository root, with CIFAR-10's archive carried along (see below):

    python3 experiments/gpu_speed.py --out "$OUT" --state .gpu_state --dataset .gpu_data/cifar10-jpeg.tar.gz

and, if it stops at its time budget with stages left, the same command again (finished stages are skipped).
On any machine, at toy sizes (the check that the script runs; random CIFAR-shaped images for cycle0):

    python experiments/gpu_speed.py --quick --out /tmp/gpu_speed_quick --state /tmp/gpu_speed_quick_state

Stages, in this order (the most wanted first), each in a child process whose output goes to the log:
  train      `bench_train.py`: the ResNet-18 train step (batch 128, crop+flip) at `--precision.training`
             highest (float32), default (TF32) and bfloat16, against PyTorch's step in float32, TF32 and AMP
             (bf16 autocast); the input pipelines (host / prefetch / resident) over whole epochs, digits CNN
             and ResNet-18.
  gradnorm   `bench_gradnorm.py --resnet-n 2048 --loop-n 256`: ent-gn scores by the vmap, ghost and auto
             engines against the jitted batch-size-1 loop and AL-GradNorm's PyTorch loop; each layer's choice.
  cycle0     `bench_scale.py`: cycle 0 of `wang2022_cifar10_code` (ent_gn, 5000 labelled, 200 epochs, 25000
             candidates scored) with `--precision.training bfloat16`, and the time per trial it implies.
  influence  `bench_influence.py`: pool scores and LiSSA steps, the digits models and ResNet-18.
Each finished stage's JSON (the last line its benchmark prints) is written to `--state`, which a later run
reads; `--out` gets each stage's JSON, `summary.json` (every stage so far, the device, the per-trial
estimate) and `gpu_speed.log` (every child's output) -- at most 6 files, what a device call brings back.

Time: `--budget-s` (default 540, inside a 10-minute command) is shared by the stages; a stage starts only
when its estimate (`ESTIMATES`, seconds on an H100, compilation included) fits in what is left, and a
child still running when the budget ends is stopped (the stage is not marked done, so the next run
retries it). The estimates are guesses from the earlier H100 runs (compilation of ResNet-18 programs, 30-45
s each, dominates), not measurements; they add up to about 14 minutes, so plan on two commands and expect
the last stage (influence) to be the one left over when the device time runs out.

The per-trial estimate (cycle0): the protocol trains 7 cycles on 5000, 7500, ..., 20000 labelled images,
so the training of a trial is the steady epoch time at 5000 x 200 epochs x (5000 + 7500 + ... + 20000) /
5000 = 17.5 x cycle 0's, plus its compilation once; evaluation (the test set and the labelled set) scales
with the images evaluated; 6 of the 7 cycles score 25000 candidates (as cycle 0 does; compilation once).

CIFAR-10 on the GPU machine: it reaches no network, so carry the shared archive in an ignored folder of
the repository (19 MB): `mkdir -p .gpu_data && cp ../shared/data/cifar10-jpeg.tar.gz .gpu_data/` with
`/.gpu_data/` and `/.gpu_state/` in `.git/info/exclude`, and name `.gpu_data` (and `.gpu_state` on a rerun
from another machine) in the call's `carry`. Without the archive the cycle0 stage is skipped, saying so.
The GPU machine's `python3` holds PyTorch, JAX and Flax; the children run with the same interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
STAGES = ("train", "gradnorm", "cycle0", "influence")
ESTIMATES = {"train": 240, "gradnorm": 200, "cycle0": 180, "influence": 240}  # seconds on an H100
QUICK_ESTIMATES = {"train": 120, "gradnorm": 60, "cycle0": 150, "influence": 60}  # 2 shared CPU cores
PRESET = "wang2022_cifar10_code"


def stage_command(stage: str, quick: bool, dataset: str | None) -> list[str] | None:
    """The child's command line (None: the stage cannot run here)."""
    py = sys.executable
    if stage == "train":
        return [py, str(EXPERIMENTS / "bench_train.py")] + (["--quick", "--pipeline-labeled", "256"] if quick else [])
    if stage == "gradnorm":
        return [py, str(EXPERIMENTS / "bench_gradnorm.py")] + (
            ["--quick"] if quick else ["--resnet-n", "2048", "--loop-n", "256"])
    if stage == "influence":
        return [py, str(EXPERIMENTS / "bench_influence.py")] + (["--quick", "--models", "mlp,cnn"] if quick else [])
    if dataset is None:
        return None
    sizes = ["--epochs", "1", "--size-factor", "0.01"] if quick else []  # the preset's 200 epochs otherwise
    return [py, str(EXPERIMENTS / "bench_scale.py"), "--dataset", dataset, "--presets", PRESET,
            "--strategies", "ent_gn", "--precision-training", "bfloat16", *sizes]


def toy_cifar(path: Path, train: int = 7600, test: int = 100) -> Path:
    """A CIFAR-shaped `.npz` of random uint8 images, for --quick: as many training images as the preset's
    own sizes need to pass validation (5000 initial + 2500), which bench_scale then scales down."""
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (train, 32, 32, 3), dtype=np.uint8),
             y_train=rng.integers(0, 10, train).astype(np.int32),
             x_test=rng.integers(0, 256, (test, 32, 32, 3), dtype=np.uint8), y_test=rng.integers(0, 10, test).astype(np.int32))
    return path


def trial_estimate(cycle0: dict) -> dict | None:
    """Seconds one trial of the preset would take, from cycle 0's phase times (see the module docstring)."""
    from jaxal.config import build_config

    if "error" in cycle0 or not cycle0.get("results") or "error" in cycle0["results"][0]:
        return None
    r = cycle0["results"][0]
    config = build_config(PRESET)
    labeled = [config.initial_size - config.val_size + c * config.budget for c in range(config.cycles)]
    s, compile_s = r["seconds"], r["seconds"]["compile"]
    n0, test = r["sizes"]["train_labeled"], r["sizes"]["test"]
    epochs = config.epochs
    train = (s["train_epoch_steady"] * epochs * sum(labeled) / n0 + compile_s.get("train", 0.0))
    evaluate = s["evaluate"] * sum(test + n for n in labeled) / (test + n0)
    score_steady = (s["score"] or 0.0) - compile_s.get("score", 0.0)
    score = (config.cycles - 1) * (score_steady + s["select"]) + compile_s.get("score", 0.0)
    return {"train_s": round(train, 1), "evaluate_s": round(evaluate, 1), "score_s": round(score, 1),
            "trial_s": round(train + evaluate + score, 1), "trial_minutes": round((train + evaluate + score) / 60, 1),
            "cycle0_epochs": r["epochs"], "labelled_per_cycle": labeled,
            "note": "from cycle 0 at the preset's epochs" if r["epochs"] == epochs else
                    f"from cycle 0 at {r['epochs']} epoch(s), its steady epoch time scaled to {epochs}"}


def device_name() -> str:
    """The GPU's name from nvidia-smi (the parent never starts JAX: it would take the GPU's memory)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        return done.stdout.strip() or "no GPU (nvidia-smi printed nothing)"
    except (OSError, subprocess.SubprocessError):
        return "no GPU (no nvidia-smi)"


def run_stage(command: list[str], timeout: float, log) -> tuple[dict | None, str]:
    """Run a child; (the JSON of its last line, or None, and why not)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(EXPERIMENTS), os.environ.get("PYTHONPATH")]))}
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as stopped:
        output = stopped.stdout or ""
        log.write(output if isinstance(output, str) else output.decode(errors="replace"))
        return None, f"stopped at the time budget ({timeout:.0f} s left for it)"
    log.write(done.stdout)
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]), ""
    except (IndexError, json.JSONDecodeError):
        return None, f"exit status {done.returncode}, no JSON on its last line"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the results that come back ($OUT)")
    parser.add_argument("--state", required=True, help="folder kept between runs: finished stages are skipped")
    parser.add_argument("--dataset", default=None,
                        help="CIFAR-10 archive or folder for cycle0 (default: .gpu_data/cifar10-jpeg.tar.gz, else "
                             "$JAXAL_SHARED_DATA or ../shared/data; --quick: a toy folder of random images)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"a subset of {', '.join(STAGES)}")
    parser.add_argument("--budget-s", type=float, default=540.0, help="seconds for all the stages of this run")
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks that the script runs, on a CPU too")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    stages = [s for s in args.stages.split(",") if s]
    if set(stages) - set(STAGES):
        parser.error(f"--stages must be among {', '.join(STAGES)}")
    out, state = Path(args.out), Path(args.state)
    out.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    estimates = QUICK_ESTIMATES if args.quick else ESTIMATES
    toy = None
    dataset = args.dataset
    if args.quick and dataset is None:
        toy = Path(tempfile.mkdtemp(prefix="gpu_speed_toy_cifar_"))
        dataset = str(toy_cifar(toy / "cifar10.npz"))
    if dataset is None:
        shared = os.environ.get("JAXAL_SHARED_DATA") or str(REPO.parent / "shared" / "data")
        candidates = [REPO / ".gpu_data" / "cifar10-jpeg.tar.gz", Path(shared) / "cifar10-jpeg.tar.gz"]
        dataset = next((str(c) for c in candidates if c.exists()), None)
    device = device_name()
    with open(out / "gpu_speed.log", "a") as log:
        log.write(f"\n==== gpu_speed {'--quick ' if args.quick else ''}on {device}; budget {args.budget_s:.0f} s\n")
        for stage in stages:
            done_file = state / f"{stage}.json"
            if done_file.exists():
                print(f"{stage}: done in an earlier run ({done_file})", flush=True)
                continue
            command = stage_command(stage, args.quick, dataset)
            if command is None:
                print(f"{stage}: skipped: no CIFAR-10 (pass --dataset; see the module docstring)", flush=True)
                continue
            left = args.budget_s - (time.perf_counter() - start)
            if left < estimates[stage]:
                print(f"{stage}: not started: {left:.0f} s left of the budget, it needs about {estimates[stage]} s; "
                      "run the same command again", flush=True)
                continue
            began = time.perf_counter()
            result, why = run_stage(command, left - 5, log)
            seconds = time.perf_counter() - began
            errors = [r["error"] for r in (result or {}).get("results", []) if "error" in r]  # bench_scale's runs
            if result is None or errors:
                print(f"{stage}: FAILED after {seconds:.0f} s: {why or errors[0][:300]} (see gpu_speed.log)", flush=True)
                continue
            result = {"stage_seconds": round(seconds, 1), "device": device, "quick": args.quick, "result": result}
            done_file.write_text(json.dumps(result, indent=1))
            print(f"{stage}: done in {seconds:.0f} s", flush=True)
    summary = {"device": device, "quick": args.quick}
    for stage in STAGES:
        done_file = state / f"{stage}.json"
        if done_file.exists():
            summary[stage] = json.loads(done_file.read_text())
            shutil.copy(done_file, out / f"{stage}.json")
    if "cycle0" in summary:
        summary["trial_estimate"] = trial_estimate(summary["cycle0"]["result"])
    summary["stages_left"] = [s for s in STAGES if s not in summary]
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if toy is not None:
        shutil.rmtree(toy, ignore_errors=True)
    print(json.dumps({"stages_done": [s for s in STAGES if s in summary], "stages_left": summary["stages_left"],
                      "trial_estimate": summary.get("trial_estimate"), "device": device}))
    return summary


if __name__ == "__main__":
    main()
