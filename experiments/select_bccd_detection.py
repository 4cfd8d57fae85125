"""Every detection strategy once on BCCD at its real size: the `bccd_fcos` detector (FCOS-R18, 64
channels, canvas 320) trained from scratch for `--iterations` on 20 random train images, then each strategy
selects `--budget` of the other 185 (the reference set: val's 87), printing its picks, its info (isal: the
LiSSA norms, NaN resets, cosine between s_test and v, images without a pseudo-box) and its wall and CPU
seconds (compilation included: one selection, as a cycle of the loop makes).

    JAXAL_SHARED_DATA=/work/shared/data python experiments/select_bccd_detection.py
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from jaxal import config as config_lib
from jaxal.data import boxes as boxes_lib
from jaxal.detection import active, strategies, training
from jaxal.models import fcos
from jaxal.tasks import Detection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=120)
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--pseudo_score", type=float, default=0.1)  # ISAL's README command
    parser.add_argument("--strategies", default="isal,grad_sim,entropy,ent_gn,coreset,localization_stability")
    args = parser.parse_args()
    config = config_lib.build_config("bccd_fcos", detection=dict(iterations=args.iterations, warmup_iters=20),
                                     boxal=dict(pseudo_score=args.pseudo_score))
    data = boxes_lib.load_boxes(active.resolve_source("bccd"), canvas=config.boxes.canvas)
    detector = active.build_detector(config, data.num_classes)
    rng = np.random.default_rng(0)
    labeled = rng.choice(len(data.train), config.initial_size, replace=False)
    variables = active.fresh_variables(detector, config, jax.random.PRNGKey(0), data.canvases[0], None)
    variables, history = training.train(detector, variables, data.train, labeled,
                                        active.schedule(config, len(labeled)), rng,
                                        trainable=active.trainable_mask(variables["params"]))
    print(f"trained {args.iterations} iterations on {len(labeled)} images: final loss {float(history[-1]['loss']):.3f}")
    task = Detection(data.num_classes, config=fcos.CONFIGS[config.detection.config])
    candidates = np.setdiff1d(np.arange(len(data.train)), labeled)
    out = {"cores": os.cpu_count(), "load_average": os.getloadavg()[0]}
    for name in args.strategies.split(","):
        ctx = strategies.DetectionContext(detector, variables, data.train, candidates, labeled, task, config,
                                          np.random.default_rng(1), reference=(data.val, np.arange(len(data.val))))
        start, cpu = time.perf_counter(), time.process_time()
        selection = strategies.select(name, ctx, args.budget)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        out[name] = {"chosen": candidates[selection.chosen].tolist(), "info": selection.info,
                     "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1)}
        print(f"{name}: {seconds:.0f} s wall, {cpu:.0f} CPU s; info {json.dumps(selection.info, default=str)}",
              flush=True)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
