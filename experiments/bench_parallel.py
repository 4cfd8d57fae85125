"""Benchmark of the scale-out path (`jaxal.parallel`): scoring and training throughput on 1, 2, 4 and
8 devices.

On a CPU-only machine the devices are fake (`JAX_NUM_CPU_DEVICES`, set before JAX starts, so every
count runs in its own subprocess) and share the same cores: the numbers measure the OVERHEAD of the
sharded programs (partitioning, collectives, per-device dispatch), not a speed-up. On a machine with
accelerators pass `--counts` up to the number of devices to see the speed-up.

Per device count, after a compiling run, the best of `--repeats`:
  - scoring: ent-gn per-example gradient norms (`parallel.map_chunks`, as exp_gn/ent_gn score the pool)
    and inference for entropy/margin (`train.predict`), in examples/s;
  - training: `train.train_step`, data parallel (batch split over `data`, replicated parameters), in
    examples/s.
One device runs without a mesh, as the loop does. The last line printed is one JSON object.

    python experiments/bench_parallel.py                  # digits CNN, under a minute on 2 CPU cores
    python experiments/bench_parallel.py --model resnet18 --pool 512 --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from timing import best_time

SHAPES = {"cnn": (8, 8, 1), "resnet18": (32, 32, 3)}


def worker(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxal import parallel
    from jaxal.config import build_config
    from jaxal.models import create_model
    from jaxal.strategies import StrategyContext
    from jaxal.strategies.gradient import ent_gn_scores
    from jaxal.train import TrainOptions, create_train_state, model_variables, predict, train_step

    count = jax.device_count()
    mesh = parallel.make_mesh(count) if count > 1 else None
    shape = SHAPES[args.model]
    model, options = create_model(args.model, 10), TrainOptions()
    state = create_train_state(model, None, jax.random.key(0), shape, options)
    variables = model_variables(state)
    pool = jax.random.normal(jax.random.key(1), (args.pool, *shape))
    config = build_config(gradnorm=dict(chunk_size=args.chunk))
    ctx = StrategyContext(model=model, variables=variables, pool_x=pool, labeled_x=pool[:0],
                          labeled_y=jnp.zeros(0, jnp.int32), num_classes=10, config=config, rng=jax.random.key(0),
                          mesh=mesh)
    t_gradnorm = best_time(lambda: ent_gn_scores(ctx), args.repeats)
    t_predict = best_time(lambda: predict(model, variables, pool, args.chunk, mesh=mesh), args.repeats)

    images, labels = pool, jnp.arange(args.pool) % 10
    batch = np.arange(args.batch, dtype=np.int32) % args.pool
    state, images, labels, batch = parallel.replicate((state, images, labels, batch), mesh)
    lr, detach = parallel.replicate((jnp.float32(0.01), jnp.asarray(False)), mesh)
    holder = {"state": state}

    def steps():
        for i in range(args.steps):
            key = parallel.replicate(jax.random.key(i), mesh)
            holder["state"], _ = train_step(holder["state"], images, labels, batch, key, lr, detach,
                                            model=model, lossnet=None, options=options, mesh=mesh)
        return holder["state"]

    t_train = best_time(steps, args.repeats)
    return {"devices": count, "gradnorm_per_s": args.pool / t_gradnorm, "predict_per_s": args.pool / t_predict,
            "train_examples_per_s": args.steps * args.batch / t_train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=sorted(SHAPES))
    parser.add_argument("--counts", default="1,2,4,8", help="device counts, comma-separated")
    parser.add_argument("--pool", type=int, default=2048, help="candidates scored")
    parser.add_argument("--chunk", type=int, default=256, help="scoring chunk size")
    parser.add_argument("--batch", type=int, default=128, help="training batch (divides every count)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    rows = []
    for count in [int(c) for c in args.counts.split(",")]:
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(count)}
        command = [sys.executable, __file__, "--worker"] + [f"--{k}={v}" for k, v in vars(args).items()
                                                           if k not in ("worker", "counts")]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['devices']} device(s): gradnorm scoring {r['gradnorm_per_s']:9.1f}/s   predict "
              f"{r['predict_per_s']:9.1f}/s   training {r['train_examples_per_s']:9.1f} examples/s", flush=True)
    base = rows[0]
    summary = {"model": args.model, "pool": args.pool, "batch": args.batch, "rows": rows,
               "relative_to_first": {str(r["devices"]): {k: round(r[k] / base[k], 3) for k in r if k != "devices"}
                                     for r in rows}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
