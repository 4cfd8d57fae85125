"""`--task detection`: pool-based active learning with an FCOS detector on a box dataset.

Per trial: a random initial labelled set of `initial_size` images from the pool (the train split); per
cycle a FRESH detector (ISAL retrains from scratch each step) trained for the schedule of the config
(`jaxal.detection.training`), evaluated on the test split by COCO AP (pycocotools) and VOC mAP@0.5;
then `budget` images selected. Records hold AP, AP50, AP75, mAP@0.5, per-class AP, and the labelled set
in images AND boxes (`num_boxes`: the annotation cost ISAL counts); learning curves against both.

The strategies are `jaxal.detection.strategies`' registry; each receives a `DetectionContext` (the
trained detector, the candidates and the labelled set as indices into the streamed pool).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np

from jaxal import results
from jaxal.config import Config
from jaxal.data import SHARED_DATA_ENV
from jaxal.data import boxes as boxes_lib
from jaxal.detection import evaluate, strategies, training
from jaxal.tasks import Detection
from jaxal.models import fcos, resnet

# Named box datasets: archives in $JAXAL_SHARED_DATA.
NAMED = {"bccd": "bccd-voc.tar.gz"}
# --model: (backbone depth, FCOS config default)
MODELS = {"fcos_isal_r50": 50, "fcos_r50": 50, "fcos_r34": 34, "fcos_r18": 18}


def resolve_source(name: str) -> str:
    """A path, a tfds name, or a named archive looked up in $JAXAL_SHARED_DATA (then ../shared/data)."""
    if name not in NAMED or Path(name).exists():
        return name
    folders = [os.environ.get(SHARED_DATA_ENV), str(Path(__file__).resolve().parents[2] / ".." / "shared" / "data")]
    for folder in folders:
        if folder and (Path(folder) / NAMED[name]).exists():
            return str(Path(folder) / NAMED[name])
    raise ValueError(f"dataset {name!r} is the archive {NAMED[name]} in ${SHARED_DATA_ENV}, which is not set or "
                     "does not hold it; set it, or pass --dataset PATH to a VOC folder or a COCO folder")


def check(config: Config) -> None:
    """Refuse what this task cannot run, before anything is loaded."""
    strategies.check_names(config.strategies)
    strategies.check_options(config)
    if (config.model or "fcos_r18") not in MODELS:
        raise ValueError(f"unknown detection model {config.model!r}; choose one of: {', '.join(MODELS)}")
    if config.detection.config not in fcos.CONFIGS:
        raise ValueError(f"unknown FCOS config {config.detection.config!r}; choose one of: {', '.join(fcos.CONFIGS)}")
    if config.warm_start:
        raise ValueError("--task detection retrains a fresh detector each cycle (ISAL); --warm_start is not offered")
    if config.initial_size < 1 or config.budget < 0 or config.cycles < 1:
        raise ValueError("--initial_size must be >= 1, --budget >= 0 and --cycles >= 1")
    if config.boxes.cache_bytes < 0:
        raise ValueError(f"--boxes.cache_bytes must be >= 0 (0: stream every image), got {config.boxes.cache_bytes}")


def build_detector(config: Config, num_classes: int) -> training.Detector:
    depth = MODELS[config.model or "fcos_r18"]
    backbone = resnet.ResNetBackbone(depth=depth, frozen_stages=1, norm_eval=True)
    model = fcos.FCOS(backbone, num_classes, fcos.CONFIGS[config.detection.config],
                      channels=config.detection.channels, stacked_convs=config.detection.stacked_convs)
    return training.Detector(model, fcos.CONFIGS[config.detection.config])


def schedule(config: Config, num_images: int) -> training.Schedule:
    d = config.detection
    kwargs = dict(batch_size=config.batch_size, base_lr=config.lr, momentum=config.momentum,
                  weight_decay=config.weight_decay, warmup_iters=d.warmup_iters, warmup_ratio=d.warmup_ratio,
                  gamma=config.lr_gamma, grad_clip=d.grad_clip)
    if d.iterations is not None:
        return training.Schedule(iterations=d.iterations, **kwargs)
    return training.Schedule.epochs(config.epochs, num_images, **kwargs)


def trainable_mask(params):
    """The frozen stage and the BatchNorm affines of the ResNet (mmdet frozen_stages=1, norm_eval, BN
    requires_grad=False) are outside the optimiser: no update, no weight decay; the rest trains."""
    mask = jax.tree.map(lambda _: True, params)
    return {**mask, "backbone": resnet.trainable_mask(params["backbone"], frozen_stages=1)}


def fresh_variables(detector, config: Config, rng, canvas, backbone_variables):
    variables = training.init_detector(detector, rng, canvas)
    if backbone_variables is not None:
        variables = {"params": {**variables["params"], "backbone": backbone_variables["params"]},
                     "batch_stats": {**variables["batch_stats"], "backbone": backbone_variables["batch_stats"]}}
    return variables


def run_detection(config: Config, workdir: Path, *, log: Callable[[str], None] = print) -> list[dict]:
    check(config)
    d = config.detection
    b = config.boxes
    data = boxes_lib.load_boxes(resolve_source(config.dataset), canvas=b.canvas, max_boxes=b.max_boxes,
                                on_invalid=b.on_invalid, cache_bytes=b.cache_bytes,
                                data_dir=config.data_dir)
    pool = data.train
    if config.initial_size > len(pool):
        raise ValueError(f"--initial_size {config.initial_size} exceeds the pool's {len(pool)} images")
    detector = build_detector(config, data.num_classes)
    depth = MODELS[config.model or "fcos_r18"]
    backbone_variables = None if d.backbone_weights is None else resnet.load_torchvision_weights(d.backbone_weights,
                                                                                                  depth)
    workdir.mkdir(parents=True, exist_ok=True)
    results.write_atomic(workdir / "config.json", config.to_json())
    log(f"detection: {data.name}, {len(pool)} pool / {0 if data.val is None else len(data.val)} val / "
        f"{len(data.test)} test images, {data.num_classes} classes {data.class_names}, canvases {data.canvases}, "
        f"{data.dropped} invalid boxes dropped; {config.model or 'fcos_r18'} ({d.config}), backbone "
        + (f"from {d.backbone_weights}" if d.backbone_weights
           else "trained FROM SCRATCH (no --detection.backbone_weights)"))
    task = Detection(data.num_classes, config=fcos.CONFIGS[d.config])
    test_indices = np.arange(len(data.test))
    records: list[dict] = []
    title = f"{data.name}, {config.model or 'fcos_r18'} ({d.config})"
    for strategy in config.strategies:
        for trial in range(config.trials):
            rng = np.random.default_rng([config.seed, trial])
            labeled = rng.choice(len(pool), config.initial_size, replace=False)
            for cycle in range(config.cycles):
                plan = schedule(config, len(labeled))
                start, cpu = time.perf_counter(), time.process_time()
                key = jax.random.PRNGKey(config.seed * 1000 + trial * 100 + cycle)
                variables = fresh_variables(detector, config, key, data.canvases[0], backbone_variables)
                variables, history = training.train(detector, variables, pool, labeled, plan, rng, flip=b.flip,
                                                    trainable=trainable_mask(variables["params"]))
                train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu
                start = time.perf_counter()
                found = training.detect(detector, variables, data.test, test_indices, config.eval_batch_size)
                coco = evaluate.coco_metrics(data.test, test_indices, found, num_classes=data.num_classes)
                voc = evaluate.voc_map(data.test, test_indices, found, num_classes=data.num_classes)
                record = {"strategy": strategy, "trial": trial, "cycle": cycle, "num_labeled": int(len(labeled)),
                          "num_boxes": int(pool.num_boxes(labeled).sum()), "iterations": plan.iterations,
                          "first_loss": float(history[0]["loss"]), "final_loss": float(history[-1]["loss"]),
                          **{f"test_{k}": float(coco[k]) for k in evaluate.COCO_KEYS},
                          "test_map50": float(voc["map50"]),
                          "test_per_class_ap": [None if np.isnan(v) else float(v) for v in coco["per_class_ap"]],
                          "train_seconds": train_seconds, "train_cpu_seconds": train_cpu,
                          "evaluate_seconds": time.perf_counter() - start}
                records.append(record)
                results.write_results(workdir, records, title, metric="ap")
                log(f"{strategy} trial {trial} cycle {cycle}: {record['num_labeled']} images, {record['num_boxes']} "
                    f"boxes, AP {record['test_ap']:.4f}, AP50 {record['test_ap50']:.4f}, mAP@0.5 "
                    f"{record['test_map50']:.4f} (train {train_seconds:.0f} s, {train_cpu:.0f} CPU s)")
                if cycle < config.cycles - 1:
                    unlabeled = np.setdiff1d(np.arange(len(pool)), labeled)
                    ctx = strategies.DetectionContext(
                        detector, variables, pool, unlabeled, labeled, task, config, rng,
                        reference=None if data.val is None else (data.val, np.arange(len(data.val))))
                    selection = strategies.select(strategy, ctx, config.budget)
                    labeled = np.concatenate([labeled, unlabeled[selection.chosen]])
    log(results.summary_table(records, "ap"))
    return records


def maybe_run(config: Config, workdir: Optional[str | Path], overwrite: bool, log) -> Optional[list[dict]]:
    """The loop's entry: runs a detection config, None for the other tasks."""
    if config.task != "detection":
        return None
    from jaxal import workdir as workdir_lock

    path = Path(workdir or config.workdir or f"runs/{Path(str(config.dataset)).name}-detection-{config.strategy}")
    with workdir_lock.hold(path):
        if workdir_lock.contents(path) and not overwrite:
            raise ValueError(f"{path} already holds a run; pass --overwrite or another --workdir (detection runs do "
                             "not resume yet)")
        return run_detection(config, path, log=log)
