"""Cost of one selection for EVERY registered strategy: seconds and peak memory, on the same pool and the
same trained model.

    python experiments/bench_strategies.py                        # digits CNN, pool 1000, labelled 200
    python experiments/bench_strategies.py --strategies vaal,qbc --pool 2000
    python experiments/bench_strategies.py --vae_width 128 --vae_iterations 0   # VAAL/SRAAL's own sizes

Method. The parent process trains one model (the digits CNN with dropout 0.25 and an LL4AL loss module,
`--epochs` epochs on the labelled set) and saves its weights, the pool and the labelled set. Then every
strategy runs in a FRESH process (`--worker`), so that one strategy's compilation caches and freed
buffers never count against another's: the worker builds the strategy context, reads its resident
memory, resets the kernel's peak-RSS counter (writing 5 to /proc/self/clear_refs, Linux >= 4.0), selects
`--budget` samples twice, and reads the peak again (VmHWM in /proc/self/status). Reported per strategy:
  - first_seconds: the first selection (compilation included), second_seconds: the second (compiled);
  - peak_rss_mb: the process's peak resident memory during the two selections; extra_mb: that peak minus
    the resident memory just before them (what the selection itself needed: its device buffers and
    compilation; on a CPU, XLA's buffers are host memory, so RSS sees them). Where clear_refs cannot be
    written, the peak is the process's lifetime peak and `peak_since_start` says so.
On a GPU, device memory is not RSS: there, read XLA's memory statistics instead (not done here).

Settings: every strategy at the config's defaults (the reference codes') except the sizes below, which a
2-core CPU needs: VAAL/SRAAL's VAE at `--vae_width` channels (reference 128) for `--vae_iterations`
iterations of `--vae_batch` images (0: the reference's own count; at width 16 and batch 64 one iteration
takes seconds on a shared 2-core CPU, most of it in the decoder's transposed convolutions), and the chunk
sizes (`--chunk`). QBC trains its `--qbc_members` members for `--epochs` epochs. One JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def config_for(args):
    from jaxal.config import build_config

    vae = dict(width=args.vae_width, batch_size=args.vae_batch,
               **({"iterations": args.vae_iterations} if args.vae_iterations else {}))
    return build_config(epochs=args.epochs, batch_size=32, eval_batch_size=args.chunk, val_size=10,
                        gradnorm=dict(chunk_size=args.chunk), influence=dict(chunk_size=args.chunk),
                        vaal=vae, sraal=vae, qbc=dict(members=args.qbc_members))


def prepare(args, path: Path) -> None:
    """Train the shared model once and save everything a worker needs."""
    import jax
    import numpy as np

    from jaxal.data import load_dataset
    from jaxal.loop import train_options
    from jaxal.models import LossNet, adapt, create_model
    from jaxal.train import create_train_state, train_model

    data = load_dataset(args.dataset)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data.x_train))
    labeled, pool = order[:args.labeled], order[args.labeled:args.labeled + args.pool]
    model = adapt(create_model("cnn", data.num_classes, 0.25), data.normalization)
    options = train_options(config_for(args), data)
    state = create_train_state(model, LossNet(), jax.random.key(0), data.image_shape, options)
    state, _ = train_model(state, data.x_train, data.y_train, labeled, model=model, lossnet=LossNet(), options=options,
                           epochs=args.epochs, batch_size=32, lr=0.05, lr_milestones=(), lr_gamma=0.1,
                           detach_epoch=args.epochs, seed=0)
    saved = {"state": jax.tree.map(np.asarray, state), "labeled": labeled, "pool": pool}
    path.write_bytes(pickle.dumps(saved))


def worker(args, name: str, path: Path) -> dict:
    import jax
    import numpy as np

    from jaxal.data import load_dataset
    from jaxal.loop import train_options
    from jaxal.models import LossNet, adapt, create_model
    from jaxal.strategies import StrategyContext, get_strategy
    from jaxal.train import model_variables

    saved = pickle.loads(path.read_bytes())
    data = load_dataset(args.dataset)
    config = config_for(args)
    labeled, pool = saved["labeled"], saved["pool"]
    val, train = labeled[:10], labeled[10:]
    state = saved["state"]
    ctx = StrategyContext(model=adapt(create_model("cnn", data.num_classes, 0.25), data.normalization),
                          variables=model_variables(state), pool_x=data.x_train[pool],
                          labeled_x=data.x_train[train], labeled_y=data.y_train[train], num_classes=data.num_classes,
                          config=config, rng=jax.random.key(1), lossnet=LossNet(),
                          lossnet_params=state.params["lossnet"], train_options=train_options(config, data),
                          reference_sets={"val": (data.x_train[val], data.y_train[val]),
                                          "labeled": (data.x_train[train], data.y_train[train]),
                                          "initial": (data.x_train[train], data.y_train[train])})
    strategy = get_strategy(name)
    if strategy.requires.check is not None:
        strategy.requires.check(config)
    before = status_kb("VmRSS")
    exact_peak = reset_peak()
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        np.asarray(strategy.select(ctx, args.budget).chosen)
        seconds.append(time.perf_counter() - start)
    peak = status_kb("VmHWM")
    return {"first_seconds": seconds[0], "second_seconds": seconds[1], "peak_rss_mb": peak / 1024,
            "extra_mb": (peak - before) / 1024, "peak_since_start": not exact_peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="all")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--pool", type=int, default=1000)
    parser.add_argument("--labeled", type=int, default=200)
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--vae_width", type=int, default=8)
    parser.add_argument("--vae_iterations", type=int, default=20)
    parser.add_argument("--vae_batch", type=int, default=32)
    parser.add_argument("--qbc_members", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args, args.worker, Path(args.state))))
        return 0

    from jaxal.strategies import STRATEGIES

    names = sorted(STRATEGIES) if args.strategies == "all" else args.strategies.split(",")
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.pkl"
        prepare(args, path)
        for name in names:
            run = subprocess.run([sys.executable, __file__, *forwarded, "--worker", name, "--state", str(path)],
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                     [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])})
            if run.returncode != 0:
                results[name] = {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "failed"}
            else:
                results[name] = json.loads(run.stdout.strip().splitlines()[-1])
            row = results[name]
            print(f"{name:<18}" + (f" first {row['first_seconds']:7.2f} s  second {row['second_seconds']:7.2f} s  "
                                   f"peak {row['peak_rss_mb']:7.0f} MB  extra {row['extra_mb']:6.0f} MB"
                                   if "error" not in row else f" error: {row['error']}"), flush=True)
    print(json.dumps({"benchmark": "bench_strategies", "dataset": args.dataset, "pool": args.pool,
                      "labeled": args.labeled, "budget": args.budget, "model": "cnn", "strategies": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
