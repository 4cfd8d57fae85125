"""`--task detection`: pool-based active learning with an FCOS detector on a box dataset.

Per trial: a random initial labelled set of `initial_size` images from the pool (the train split); per
cycle a FRESH detector (ISAL retrains from scratch each step) trained for the schedule of the config
(`jaxal.detection.training`), evaluated on the test split by COCO AP (pycocotools) and VOC mAP@0.5;
then `budget` images selected. Records hold AP, AP50, AP75, mAP@0.5, per-class AP, and the labelled set
in images AND boxes (`num_boxes`: the annotation cost ISAL counts); learning curves against both.

The strategies are `jaxal.detection.strategies`' registry; each receives a `DetectionContext` (the
trained detector, the candidates and the labelled set as indices into the streamed pool). Records also hold
what each cycle selected (`selected`, `num_selected`, `boxes_selected`), `selection_seconds` and the
strategy's `strategy_info`. The pool leaves out the images without boxes, as ISAL's code does (mmdet's
`filter_empty_gt`). `--stop_at_metric` ends a trial at the first cycle whose test AP reaches it.

Resume: each cycle trains a fresh detector, so a finished cycle's state is the labelled set, the records
and the trial's numpy generator (which draws the initial set, each cycle's batches and flips, the scored
subset and the strategies' random choices). They are checkpointed after every cycle (`jaxal.checkpoint`,
no arrays); a rerun of the same command continues at the next cycle and writes the records an
uninterrupted run writes. A workdir holding another config is refused (`jaxal.loop.config_differences`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax
import numpy as np

from jaxal import checkpoint, loop, parallel, results
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
    groups = fcos.CONFIGS[config.detection.config].norm_groups
    if config.detection.channels < 1 or config.detection.channels % groups:
        raise ValueError(f"--detection.channels must be a positive multiple of the head's {groups} GroupNorm groups, "
                         f"got {config.detection.channels}")
    if config.warm_start:
        raise ValueError("--task detection retrains a fresh detector each cycle (ISAL); --warm_start is not offered")
    if config.initial_size < 1 or config.budget < 0 or config.cycles < 1:
        raise ValueError("--initial_size must be >= 1, --budget >= 0 and --cycles >= 1")
    if config.boxes.cache_bytes < 0:
        raise ValueError(f"--boxes.cache_bytes must be >= 0 (0: stream every image), got {config.boxes.cache_bytes}")
    loop.check_stop_at_metric(config)
    if config.val_size:
        raise ValueError("--val_size does not apply to --task detection: the reference set is the dataset's own "
                         "validation split")
    if config.subset_size is not None and config.subset_size < config.budget:
        raise ValueError(f"--subset_size ({config.subset_size}) must be at least --budget ({config.budget})")
    short = config.boxes.short_side
    if short is not None and not 1 <= short <= config.boxes.canvas:
        raise ValueError(f"--boxes.short_side must be in [1, --boxes.canvas={config.boxes.canvas}], got {short}")


def build_detector(config: Config, num_classes: int) -> training.Detector:
    depth = MODELS[config.model or "fcos_r18"]
    backbone = resnet.ResNetBackbone(depth=depth, frozen_stages=1, norm_eval=True)
    model = fcos.FCOS(backbone, num_classes, fcos.CONFIGS[config.detection.config],
                      channels=config.detection.channels, stacked_convs=config.detection.stacked_convs)
    return training.Detector(model, fcos.CONFIGS[config.detection.config])


def schedule(config: Config, num_images: int, mesh=None) -> training.Schedule:
    """The config's schedule; on a mesh of D devices the batch is rounded up to a multiple of D (as the
    classification loop does, `jaxal.train.epoch_batches`)."""
    d = config.detection
    kwargs = dict(batch_size=parallel.round_up(config.batch_size, parallel.mesh_size(mesh)), base_lr=config.lr,
                  momentum=config.momentum, weight_decay=config.weight_decay, warmup_iters=d.warmup_iters,
                  warmup_ratio=d.warmup_ratio, gamma=config.lr_gamma, grad_clip=d.grad_clip)
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


def canvas_of(config: Config):
    """The canvas `load_boxes` takes: the longer side, or (short, long) as mmdetection's img_scale."""
    b = config.boxes
    return b.canvas if b.short_side is None else (b.short_side, b.canvas)


def simulated_pool(pool) -> np.ndarray:
    """Indices of the pool's images with at least one box: ISAL's code drops the images without ground-truth
    boxes from a simulated pool (mmdet's `filter_empty_gt`), so they are never selected or counted."""
    return np.flatnonzero(pool.num_boxes() > 0)


def check_sizes(config: Config, usable: int) -> None:
    needed = config.initial_size + config.budget * (config.cycles - 1)
    if needed > usable:
        raise ValueError(f"the budget is larger than the pool: initial_size + budget * (cycles - 1) = "
                         f"{config.initial_size} + {config.budget} * {config.cycles - 1} = {needed} images, but the "
                         f"pool has {usable} with boxes; lower --initial_size, --budget or --cycles")


class DetectionRun(NamedTuple):
    """What every cycle of a run shares: the data, the detector and where results go."""

    config: Config
    data: boxes_lib.BoxDataset
    usable: np.ndarray  # pool indices that may be labelled (images with boxes)
    detector: training.Detector
    backbone_variables: Optional[dict]
    task: Detection
    workdir: Path
    log: Callable[[str], None]
    mesh: Optional[jax.sharding.Mesh] = None  # data parallel training and detection; None: one device


def load_run(config: Config, workdir: Path, log) -> DetectionRun:
    """Everything a run needs, checked before the workdir is touched."""
    check(config)
    b = config.boxes
    try:
        data = boxes_lib.load_boxes(resolve_source(config.dataset), canvas=canvas_of(config), max_boxes=b.max_boxes,
                                    on_invalid=b.on_invalid, cache_bytes=b.cache_bytes, data_dir=config.data_dir)
    except (FileNotFoundError, RuntimeError) as error:  # RuntimeError: a tfds dataset not prepared here
        raise loop.RunError(str(error)) from None
    usable = simulated_pool(data.train)
    check_sizes(config, len(usable))
    config, mesh = device_mesh(config)
    return DetectionRun(config, data, usable, build_detector(config, data.num_classes), backbone_weights(config),
                        detection_task(config, data.num_classes), workdir, log, mesh)


def device_mesh(config: Config):
    """(config with the resolved --num_devices, mesh or None for one device), as `jaxal.loop.prepare`: the
    count goes into config.json, so a resume on the same machine compares equal."""
    try:
        mesh = parallel.make_mesh(config.num_devices)
    except ValueError as error:
        raise loop.RunError(f"--num_devices: {error}") from None
    config = dataclasses.replace(config, num_devices=mesh.devices.size)
    return config, (mesh if mesh.devices.size > 1 else None)


def backbone_weights(config: Config) -> Optional[dict]:
    """The backbone's variables from --detection.backbone_weights, or None (trained from scratch)."""
    file = config.detection.backbone_weights
    return None if file is None else resnet.load_torchvision_weights(file, MODELS[config.model or "fcos_r18"])


def detection_task(config: Config, num_classes: int) -> Detection:
    return Detection(num_classes, config=fcos.CONFIGS[config.detection.config])


def describe(run: DetectionRun) -> str:
    config, data, d = run.config, run.data, run.config.detection
    pool = data.train
    return (f"detection: {data.name}, {len(pool)} pool / {0 if data.val is None else len(data.val)} val / "
            f"{len(data.test)} test images ({len(pool) - len(run.usable)} pool images without boxes dropped, as "
            f"ISAL's code), {data.num_classes} classes {data.class_names}, canvases {data.canvases}, {data.dropped} "
            f"invalid boxes dropped; {config.model or 'fcos_r18'} ({d.config}), backbone "
            + (f"from {d.backbone_weights}" if d.backbone_weights
               else "trained FROM SCRATCH (no --detection.backbone_weights)")
            + f"; {parallel.describe_mesh(run.mesh)}")


def loss_prediction_for(config: Config, strategy: str) -> Optional[training.LossPrediction]:
    """LL4AL's module (`--lossnet.*`) if `strategy` needs it trained with the detector (ll4al), else None."""
    return strategies.ll4al.loss_prediction(config) if strategies.trains_loss_prediction(strategy) else None


def train_fresh(detector: training.Detector, config: Config, split, labeled: np.ndarray, key, rng: np.random.Generator,
                backbone_variables: Optional[dict], mesh=None,
                loss_prediction: Optional[training.LossPrediction] = None) -> tuple[dict, list, training.Schedule]:
    """A FRESH detector (ISAL retrains from scratch each step) trained on `labeled` (indices into `split`) for
    the config's schedule, data parallel on `mesh`: (variables, per-iteration losses, schedule). With
    `loss_prediction`, a fresh LL4AL module trains beside it (`variables["lossnet"]`); the detector's own
    weights are drawn from `key` as without it."""
    plan = schedule(config, len(labeled), mesh)
    variables = fresh_variables(detector, config, key, split.canvases[0], backbone_variables)
    if loss_prediction is not None:
        variables["lossnet"] = training.init_loss_prediction(detector, loss_prediction, variables,
                                                             jax.random.fold_in(key, 1), split.canvases[0])
    variables, history = training.train(detector, variables, split, labeled, plan, rng, flip=config.boxes.flip,
                                        trainable=trainable_mask(variables["params"]), mesh=mesh,
                                        loss_prediction=loss_prediction)
    return variables, history, plan


def train_and_evaluate(run: DetectionRun, trial: int, cycle: int, labeled: np.ndarray,
                       rng: np.random.Generator, loss_prediction: Optional[training.LossPrediction] = None) -> dict:
    """A fresh detector trained on `labeled` (ISAL retrains from scratch each step; with `loss_prediction`,
    LL4AL's module beside it), its test metrics; returns the record's fields and the trained variables
    under "variables"."""
    config, data = run.config, run.data
    start, cpu = time.perf_counter(), time.process_time()
    key = jax.random.PRNGKey(config.seed * 1000 + trial * 100 + cycle)
    variables, history, plan = train_fresh(run.detector, config, data.train, labeled, key, rng,
                                           run.backbone_variables, run.mesh, loss_prediction)
    train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    test_indices = np.arange(len(data.test))
    found = training.detect(run.detector, variables, data.test, test_indices, config.eval_batch_size, mesh=run.mesh)
    coco = evaluate.coco_metrics(data.test, test_indices, found, num_classes=data.num_classes)
    voc = evaluate.voc_map(data.test, test_indices, found, num_classes=data.num_classes)
    return {"num_labeled": int(len(labeled)), "num_boxes": int(data.train.num_boxes(labeled).sum()),
            "iterations": plan.iterations, "first_loss": float(history[0]["loss"]),
            "final_loss": float(history[-1]["loss"]),
            **({"final_ranking_loss": float(history[-1]["ranking_loss"])} if loss_prediction is not None else {}),
            **{f"test_{k}": float(coco[k]) for k in evaluate.COCO_KEYS},
            "test_map50": float(voc["map50"]),
            "test_per_class_ap": [None if np.isnan(v) else float(v) for v in coco["per_class_ap"]],
            "train_seconds": train_seconds, "train_cpu_seconds": train_cpu,
            "evaluate_seconds": time.perf_counter() - start, "variables": parallel.local(variables)}


def run_cycle(run: DetectionRun, strategy: str, trial: int, cycle: int, labeled: np.ndarray,
              rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """Train, evaluate and (but in the last cycle, or once --stop_at_metric is reached) select. Returns the
    cycle's record and the next labelled set (pool indices, in the order they were labelled)."""
    config, pool = run.config, run.data.train
    fields = train_and_evaluate(run, trial, cycle, labeled, rng, loss_prediction_for(config, strategy))
    variables = fields.pop("variables")
    record = {"strategy": strategy, "trial": trial, "cycle": cycle, **fields, "selection_seconds": 0.0,
              "num_scored": 0, "num_selected": 0, "boxes_selected": 0, "selected": []}
    run.log(f"{strategy} trial {trial} cycle {cycle}: {record['num_labeled']} images, {record['num_boxes']} boxes, "
            f"AP {record['test_ap']:.4f}, AP50 {record['test_ap50']:.4f}, mAP@0.5 {record['test_map50']:.4f} "
            f"(train {record['train_seconds']:.0f} s, {record['train_cpu_seconds']:.0f} CPU s)")
    if cycle == config.cycles - 1 or loop.stop_reached(config, record, "ap"):
        return record, labeled
    positions = np.searchsorted(run.usable, labeled)  # candidate_pool works on positions in the usable pool
    candidates = run.usable[loop.candidate_pool(len(run.usable), positions, np.zeros(0, np.int64),
                                                config.subset_size, rng)]
    data = run.data
    ctx = strategies.DetectionContext(run.detector, variables, pool, candidates, labeled, run.task, config, rng,
                                      reference=None if data.val is None else (data.val, np.arange(len(data.val))),
                                      mesh=run.mesh)
    start = time.perf_counter()
    selection = strategies.select(strategy, ctx, config.budget)
    selected = candidates[loop.check_selection(selection.chosen, len(candidates), min(config.budget, len(candidates)),
                                               strategy)]
    record.update(selection_seconds=time.perf_counter() - start, num_scored=int(len(candidates)),
                  num_selected=int(len(selected)), boxes_selected=int(pool.num_boxes(selected).sum()),
                  selected=[int(i) for i in selected])
    if selection.info:
        record["strategy_info"] = selection.info
    return record, np.concatenate([labeled, selected])


def cycle_meta(cycle: int, records: list, labeled: np.ndarray, rng: np.random.Generator, seed: list) -> dict:
    """A finished cycle's checkpoint: the next cycle trains a FRESH detector, so the labelled set, the
    records and the trial's random generator are the whole state."""
    return {"cycle": cycle, "records": records, "labeled": np.asarray(labeled).tolist(),
            "rng": json.dumps(rng.bit_generator.state), "seed": seed}


def resume_trial(mngr, seed: list) -> Optional[tuple[int, list, np.ndarray, np.random.Generator]]:
    """(next cycle, records, labelled set, generator) of the last finished cycle, or None."""
    saved = checkpoint.read_meta(mngr)
    if saved is None:
        return None
    step, meta = saved
    if meta.get("cycle") != step or meta.get("seed") != seed:
        raise checkpoint.CheckpointError(f"checkpoint {mngr.directory}/{step} belongs to another seed or trial")
    rng = np.random.default_rng()
    rng.bit_generator.state = json.loads(meta["rng"])
    return step + 1, list(meta["records"]), np.asarray(meta["labeled"], np.int64), rng


def run_trial(run: DetectionRun, strategy: str, trial: int, on_cycle: Callable[[list], None]) -> list[dict]:
    """Run (or resume, at the cycle after the last checkpointed one) one trial of one strategy. A resumed trial
    draws what an uninterrupted one draws: its generator is restored with the labelled set."""
    config = run.config
    seed = [config.seed, trial]
    mngr = checkpoint.manager(run.workdir / "checkpoints" / strategy / f"trial_{trial}")
    resumed = resume_trial(mngr, seed)
    if resumed is None:
        rng = np.random.default_rng(seed)
        labeled, records, first_cycle = run.usable[rng.choice(len(run.usable), config.initial_size,
                                                               replace=False)], [], 0
    else:
        first_cycle, records, labeled, rng = resumed
        on_cycle(records)
    for cycle in range(first_cycle, config.cycles):
        if records and loop.stop_reached(config, records[-1], "ap"):
            break
        try:
            record, labeled = run_cycle(run, strategy, trial, cycle, labeled, rng)
            records = records + [record]
            checkpoint.save_state(mngr, cycle, None, cycle_meta(cycle, records, labeled, rng, seed))
        except KeyboardInterrupt as interrupt:  # Ctrl-C: `jaxal.cli` tells where a rerun resumes
            resume = cycle + 1 if mngr.latest_step() == cycle else cycle
            interrupt.resume_from = (f"cycle {resume}" + (f" (strategy {strategy}, trial {trial})"
                                                           if len(config.strategies) > 1 or config.trials > 1 else ""))
            raise
        on_cycle(records)
    mngr.close()
    return records


def run_detection(config: Config, workdir: Path, *, overwrite: bool = False,
                  log: Callable[[str], None] = print) -> list[dict]:
    """Run (or resume) every strategy and trial of a detection config in `workdir`; returns the records.
    Bad input is refused before the workdir is touched; a workdir holding a run of another config is
    refused (`jaxal.loop.config_differences`) unless `overwrite`."""
    from jaxal import workdir as workdir_lock

    run = load_run(config, workdir, log)
    with workdir_lock.hold(workdir):
        if overwrite:
            loop.check_overwritable(workdir)
            loop.clear_workdir(workdir)
        else:
            loop.check_run_directory(workdir, config)
        if not (workdir / "config.json").exists():
            results.write_atomic(workdir / "config.json", config.to_json())
        log(describe(run))
        finished: dict[tuple, list] = {}
        title = f"{run.data.name}, {config.model or 'fcos_r18'} ({config.detection.config})"
        for strategy in config.strategies:
            for trial in range(config.trials):
                def on_cycle(trial_records, key=(strategy, trial)):
                    finished[key] = trial_records
                    results.write_results(workdir, [r for rs in finished.values() for r in rs], title, metric="ap")

                run_trial(run, strategy, trial, on_cycle)
        records = [r for rs in finished.values() for r in rs]
        log(results.summary_table(records, "ap"))
        return records


def maybe_run(config: Config, workdir: Optional[str | Path], overwrite: bool, log) -> Optional[list[dict]]:
    """The loop's entry: runs a detection config, None for the other tasks."""
    if config.task != "detection":
        return None
    path = Path(workdir or config.workdir or f"runs/{Path(str(config.dataset)).name}-detection-{config.strategy}")
    return run_detection(config, path, overwrite=overwrite, log=log)
