"""The active-learning cycle: train -> score -> select -> label, checkpointed once per cycle.

`run_experiment(config)` is the library entry point (the CLI and the notebooks call it). The loop
owns all state (labelled indices, RNG, cycle); strategies are pure functions of a context.

One cycle, train -> score -> select, is `run_round`; a simulated cycle (`run_cycle`) is a round whose
oracle is the dataset's labels, and the annotation rounds of `jaxal.learner` are rounds whose oracle is
a person. Both share its random numbers (`cycle_keys`), its strategy call (`Strategy.select`)
and its checks (`validate_settings`, `check_model_outputs`).

Everything is validated before the run directory is touched, so bad input leaves nothing behind.
Running the same config again in the same directory resumes at the first unfinished cycle, and a
resumed run ends with the same results as an uninterrupted one: every random choice of cycle c is
derived from (seed, trial, cycle), never from how many cycles this process has run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxal import checkpoint, parallel, precision, results, tasks, workdir as workdir_lock
from jaxal.config import Config
from jaxal.data import Dataset, load_dataset
from jaxal.models import LossNet, accepted_modes, adapt, base_model, create_model, init_variables
from jaxal.strategies import StrategyContext, get_strategy
from jaxal.strategies.base import MODEL_NEEDS
from jaxal.train import (OPTIMIZERS, TrainOptions, create_train_state, evaluate, fresh_optimizer, model_variables,
                         train_model)

# Fields that may differ between a run and its resumption: they change no result.
# Keys of config.json a resumed run need not match: output settings, and the dataset's class names
# (recorded beside the config for people and tools to read; the dataset itself is compared by name).
RESUME_FREE_FIELDS = ("progress", "workdir", "class_names")


class RunError(ValueError):
    """Bad input to a run: the message says what is wrong and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    config: Config
    dataset: Dataset
    model: object  # the model as the loop runs it: `jaxal.models.adapt`ed to the dataset's stored pixels
    workdir: Path
    mesh: Optional[jax.sharding.Mesh] = None  # None: one device
    task: object = None  # a `jaxal.tasks` task


def default_workdir(config: Config) -> Path:
    dataset = Path(config.dataset).stem if config.dataset.endswith(".npz") else config.dataset
    return Path("runs") / f"{dataset}-{config.strategy.replace(',', '+')}"


def validate_settings(config: Config, task=None) -> None:
    """Raise RunError for strategies, options and training settings that cannot run, whatever the data:
    what a simulation (`validate`) and annotation rounds (`jaxal.learner`) both check."""
    task_name = getattr(task, "name", "classification")
    if not config.strategies:
        raise RunError("no strategy given")
    repeated = sorted({name for name in config.strategies if config.strategies.count(name) > 1})
    if repeated:  # a second run of one strategy would resume the first's checkpoints: it would not run twice
        raise RunError(f"--strategy names {', '.join(repeated)} more than once; name each strategy once "
                       "(--trials repeats a strategy)")
    for name in config.strategies:
        try:
            strategy = get_strategy(name)
        except ValueError as error:
            raise RunError(str(error)) from None
        if task_name not in strategy.requires.tasks:
            raise RunError(f"strategy {name} does not support the {task_name} task "
                           f"(it supports: {', '.join(strategy.requires.tasks)})"
                           + (f": {strategy.requires.task_note}" if strategy.requires.task_note else ""))
        if strategy.requires.check is not None:
            try:  # the check sees the task the run resolved (config.task may be None)
                strategy.requires.check(dataclasses.replace(config, task=task_name))
            except ValueError as error:
                raise RunError(f"{name}: {error}") from None
    if config.seed < 0:
        raise RunError(f"--seed must be a non-negative integer, got {config.seed}")
    for field, allowed in (("solvers", precision.PRECISIONS), ("training", precision.TRAINING_PRECISIONS)):
        try:
            precision.check(getattr(config.precision, field), f"--precision.{field}", allowed)
        except ValueError as error:
            raise RunError(str(error)) from None
    if config.optimizer not in OPTIMIZERS:
        raise RunError(f"unknown --optimizer {config.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if config.dropout is not None and not 0.0 <= config.dropout < 1.0:
        raise RunError(f"--dropout must be in [0, 1), got {config.dropout}")
    if config.lossnet.width < 1 or config.lossnet.margin < 0:
        raise RunError(f"--lossnet.width must be at least 1 and --lossnet.margin non-negative, got "
                       f"{config.lossnet.width} and {config.lossnet.margin}")
    for field in ("budget", "epochs", "batch_size", "eval_batch_size", "num_devices"):
        if getattr(config, field) is not None and getattr(config, field) < 1:
            raise RunError(f"--{field} must be at least 1, got {getattr(config, field)}")
    if config.val_size < 0:
        raise RunError(f"--val_size must be non-negative, got {config.val_size}")
    if config.subset_size is not None and config.subset_size < config.budget:
        raise RunError(f"--subset_size ({config.subset_size}) must be at least --budget ({config.budget})")
    check_stop_at_metric(config)


def check_stop_at_metric(config: Config) -> None:
    if config.stop_at_metric is not None and not 0.0 < config.stop_at_metric <= 1.0:
        raise RunError(f"--stop_at_metric is a fraction in (0, 1] (AP 22 is 0.22), got {config.stop_at_metric}")


def validate(config: Config, dataset: Dataset, task=None) -> None:
    """Raise RunError for any config that cannot run to the end on `dataset` (with `task`, default
    classification)."""
    validate_settings(config, task)
    for field in ("initial_size", "cycles", "trials"):
        if getattr(config, field) < 1:
            raise RunError(f"--{field} must be at least 1, got {getattr(config, field)}")
    pool = dataset.x_train.shape[0]
    if not 0 <= config.val_size < config.initial_size:
        raise RunError(f"--val_size ({config.val_size}) must be in [0, initial_size={config.initial_size})")
    if config.initial_size > pool:
        raise RunError(f"--initial_size {config.initial_size} is larger than the {pool} training samples "
                       f"of {dataset.name}")
    needed = config.initial_size + config.budget * (config.cycles - 1)
    if needed > pool:
        raise RunError(f"the budget is larger than the pool: initial_size + budget * (cycles - 1) = "
                       f"{config.initial_size} + {config.budget} * {config.cycles - 1} = {needed} samples, "
                       f"but {dataset.name} has {pool}; lower --budget or --cycles")
    if dataset.x_train.ndim == 5:  # volumes
        from jaxal.strategies.vaal import IMAGE_ONLY, VOLUME_REFUSAL

        refused = [name for name in config.strategies if name in IMAGE_ONLY]
        if refused:
            raise RunError(f"{', '.join(refused)} cannot run on the volumes of {dataset.name}: {VOLUME_REFUSAL}")
    task_name = getattr(task, "name", "classification")
    if config.crop_size is not None and (task_name != "segmentation" or not
                                         1 <= config.crop_size <= min(dataset.image_shape[:2])):
        raise RunError(f"--crop_size (training windows) is for segmentation, at least 1 and at most the images' "
                       f"{'x'.join(map(str, dataset.image_shape[:2]))}; got {config.crop_size} for {task_name}")
    if dataset.x_train.dtype.kind == "f" and not (all_finite(dataset.x_train) and all_finite(dataset.x_test)):
        raise RunError(f"dataset {dataset.name} contains non-finite values")


def all_finite(x: np.ndarray, rows: int = 1024) -> bool:
    """np.isfinite(x).all(), a block of rows at a time: a memory-mapped pool is never read whole."""
    return all(np.isfinite(x[start:start + rows]).all() for start in range(0, len(x), rows))


def check_model_fits(model, model_name: str, dataset: Dataset) -> None:
    """Refuse a model whose pooling stages shrink this dataset's images to nothing (e.g. VGG-16 on
    8x8 digits): its features would be the mean of an empty array, NaN."""
    def forward(key):
        return model.init_with_output(key, jnp.zeros((1, *dataset.image_shape), dataset.x_train.dtype), train=False)[0]

    minimum = getattr(base_model(model), "min_image_size", 1)
    if min(dataset.image_shape[:2]) < minimum:
        raise RunError(f"model {model_name} needs images of at least {minimum}x{minimum} pixels, and "
                       f"{dataset.name}'s are {'x'.join(map(str, dataset.image_shape[:2]))}: its stages would run on "
                       "1-pixel maps; choose a smaller model (--model cnn or mlp) or larger images (--image_size)")
    output = jax.eval_shape(forward, jax.random.key(0))
    if any(0 in leaf.shape for leaf in jax.tree.leaves(output)):
        raise RunError(f"model {model_name} needs larger images than {dataset.name}'s "
                       f"{'x'.join(map(str, dataset.image_shape[:-1]))}: its pooling stages reduce them to nothing; "
                       "choose a smaller model (--model cnn or mlp) or a dataset with larger images")


def check_strategies_fit(config: Config, model, dataset: Dataset) -> None:
    """Each strategy's model-aware check (`Requirements.check_model`) on the model's variable shapes, so
    that what cannot fit (a dense Hessian of ResNet-18) is refused before anything runs."""
    checks = [(name, get_strategy(name).requires.check_model) for name in config.strategies]
    checks = [(name, check) for name, check in checks if check is not None]
    if not checks:
        return
    variables = jax.eval_shape(lambda key: init_variables(model, key, dataset.image_shape), jax.random.key(0))
    for name, check in checks:
        try:
            check(config, variables)
        except ValueError as error:
            raise RunError(f"{name}: {error}") from None


def check_model_outputs(model, model_name: str, config: Config, input_shape, dtype, num_classes: int) -> None:
    """Refuse a model that does not follow the contract of `jaxal.models` (logits with `num_classes` on
    the last axis), and each strategy of `config` that needs from the model what it does not give
    (`Requirements.needs`: features, block outputs, an `mc_dropout` keyword), saying what and why. From the
    output shapes alone (`jax.eval_shape`), before anything is trained."""
    def forward(key):
        return model.init_with_output(key, jnp.zeros((2, *input_shape), dtype), train=False)[0]

    try:
        output = jax.eval_shape(forward, jax.random.key(0))
    except Exception as error:  # a user's module can fail in any way; say which model and inputs
        raise RunError(f"model {model_name} fails on a batch of images of shape {tuple(input_shape)} {np.dtype(dtype)} "
                       f"({type(error).__name__}: {error})") from error
    logits = output.logits
    if logits.ndim < 2 or logits.shape[0] != 2 or logits.shape[-1] != num_classes:
        raise RunError(f"model {model_name} returns logits of shape {logits.shape} for 2 images; expected "
                       f"(2, ..., {num_classes}): one score per class on the last axis")
    module = base_model(model)
    has = {"features": output.features is not None, "blocks": len(output.blocks) > 0,
           "mc_dropout": "mc_dropout" in accepted_modes(type(module))}
    for name in config.strategies:
        strategy = get_strategy(name)
        missing = [need for need in strategy.requires.needs if not has[need]]
        if missing:
            raise RunError(f"strategy {name} cannot run on model {model_name}: it needs "
                           f"{' and '.join(MODEL_NEEDS[m] for m in missing)}, which the model does not give")
        if strategy.requires.dropout and getattr(module, "dropout_rate", None) is not None and module.dropout_rate <= 0.0:
            raise RunError(f"strategy {name} needs MC dropout but model {model_name} has dropout rate 0; "
                           "pass --dropout 0.25 (or another positive rate)")


def model_description(model) -> str:
    """How the config names a model given as a module (not one of `jaxal.models.MODELS`)."""
    return f"module:{type(model).__module__}.{type(model).__qualname__}"


def prepare(config: Config, workdir: Optional[str | Path] = None, *, model=None) -> Experiment:
    """Load and validate everything a run needs, touching nothing on disk. `model`: a Flax module of
    your own (see `jaxal.models`) instead of the one `config.model` names."""
    try:
        dataset = load_dataset(config.dataset, data_dir=config.data_dir, image_size=config.image_size,
                               normalization=config.normalization, augmentation=config.augmentation,
                               task=config.task, ignore_label=config.ignore_label)
        task = tasks.create_task(dataset.task, dataset.num_classes, dataset.ignore_label)
        if model is None:
            model_name = config.model or dataset.default_model
            model = create_model(model_name, dataset.num_classes, config.dropout)
        else:
            model_name = model_description(model)
        model = adapt(model, dataset.normalization)
    except (ValueError, FileNotFoundError, RuntimeError) as error:  # RuntimeError: tfds data not prepared
        raise RunError(str(error)) from None
    config = dataclasses.replace(config, model=model_name)
    validate(config, dataset, task)
    check_model_fits(model, model_name, dataset)
    check_strategies_fit(config, model, dataset)
    check_model_outputs(model, model_name, config, dataset.image_shape, dataset.x_train.dtype, dataset.num_classes)
    try:
        mesh = parallel.make_mesh(config.num_devices)
    except ValueError as error:
        raise RunError(f"--num_devices: {error}") from None
    # The resolved count goes into config.json: a resume on the same machine compares equal.
    config = dataclasses.replace(config, num_devices=mesh.devices.size)
    mesh = mesh if mesh.devices.size > 1 else None
    workdir = Path(workdir or config.workdir or default_workdir(config))
    return Experiment(dataclasses.replace(config, workdir=str(workdir)), dataset, model, workdir, mesh, task)


def open_workdir(exp: Experiment, overwrite: bool) -> None:
    """Create the run directory, or check that the one there belongs to this config (resume).
    Several processes: all check (read only) before process 0 writes, so all fail or none does."""
    if not overwrite:
        check_workdir(exp)
    else:
        check_overwritable(exp.workdir)
    parallel.sync("jaxal-workdir-checked")
    if parallel.is_primary():
        if overwrite:
            clear_workdir(exp.workdir)
        workdir_lock.create(exp.workdir)
        if not (exp.workdir / "config.json").exists():
            results.write_atomic(exp.workdir / "config.json", config_json(exp))
    parallel.sync("jaxal-workdir-open")


def config_json(exp: Experiment) -> str:
    """config.json: the resolved config, and the dataset's class names where it names them (folders,
    tensorflow-datasets; the labels are indices into them)."""
    names = {"class_names": list(exp.dataset.class_names)} if exp.dataset.class_names else {}
    return json.dumps({**exp.config.to_dict(), **names}, indent=2, sort_keys=True)


def config_differences(saved: dict, config: Config, free_fields=RESUME_FREE_FIELDS) -> str:
    """'field: saved there vs current now, ...' for the fields (up to 5) that differ, other than
    `free_fields`; empty if none does."""
    current = json.loads(config.to_json())  # tuples become lists, as in the saved file
    # A field added since the run was saved (absent there) holds its default in that run.
    defaults = json.loads(Config().to_json())
    saved = {**defaults, **{k: {**defaults[k], **v} if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
                            for k, v in saved.items()}}
    differing = sorted(k for k in set(saved) | set(current) if k not in free_fields and saved.get(k) != current.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} there vs {current.get(k)!r} now" for k in differing[:5])


def check_workdir(exp: Experiment) -> None:
    check_run_directory(exp.workdir, exp.config)


def check_run_directory(workdir: Path, config: Config) -> None:
    """Raise RunError unless the run directory is absent, empty, or holds a run of this config."""
    config_path = workdir / "config.json"
    if config_path.exists():
        saved = workdir_lock.read_json_object(config_path, "delete it (or pass --overwrite) to start the run "
                                                           "again, or choose another --workdir")
        details = config_differences(saved, config)
        if details:
            raise RunError(f"{workdir} holds a run with another config ({details}); resume it with the "
                           "same flags, pass --overwrite to start again, or choose another --workdir")
        return
    if workdir.exists() and workdir_lock.contents(workdir):
        raise RunError(f"{workdir} exists and is not a jaxal run directory; choose another --workdir")


def check_overwritable(workdir: Path) -> None:
    if workdir.exists() and workdir_lock.contents(workdir) and not (workdir / "config.json").exists():
        raise RunError(f"--overwrite deletes only jaxal run directories, and {workdir} is not one "
                       "(it has no config.json); choose another --workdir")


def clear_workdir(workdir: Path) -> None:
    """Delete what a run directory holds (--overwrite); the lock stays: this process holds it."""
    if workdir.exists():
        for path in workdir_lock.contents(workdir):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def stop_reached(config: Config, record: dict, metric: str) -> bool:
    """Whether a cycle's record reached --stop_at_metric (its test_<metric>): the trial ends there, with no
    selection after it (ISAL's COCO protocol runs until AP 22)."""
    value = record.get(f"test_{metric}")
    return config.stop_at_metric is not None and value is not None and value >= config.stop_at_metric


def initial_split(config: Config, trial: int, pool_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(training labelled indices, validation indices): the same for every strategy of a trial."""
    rng = np.random.default_rng([config.seed, trial])
    initial = rng.choice(pool_size, config.initial_size, replace=False)
    return np.sort(initial[config.val_size:]), np.sort(initial[: config.val_size])


def reference_sets(config: Config, data: Dataset, labeled, val, initial) -> dict:
    """The labelled sets an influence strategy may use as its reference set R."""
    sets = {"labeled": (data.x_train[labeled], data.y_train[labeled]),
            "initial": (data.x_train[initial], data.y_train[initial])}
    if len(data.x_test):  # an annotation pool (`jaxal.ActiveLearner`) has no test split
        sets["test"] = (data.x_test, data.y_test)
    if len(val):
        sets["val"] = (data.x_train[val], data.y_train[val])
    return sets


def candidate_pool(pool_size: int, labeled: np.ndarray, val: np.ndarray, subset_size: Optional[int],
                   rng: np.random.Generator) -> np.ndarray:
    """Sorted unlabelled indices to score this cycle: all of them, or a random `subset_size` of them
    (the reference codes score a random 10000 or 25000 of the pool, not the whole pool)."""
    unlabeled = np.setdiff1d(np.arange(pool_size), np.concatenate([labeled, val]))
    if subset_size is not None and subset_size < len(unlabeled):
        unlabeled = np.sort(rng.choice(unlabeled, subset_size, replace=False))
    return unlabeled


def check_selection(chosen: np.ndarray, num_candidates: int, budget: int, strategy: str) -> np.ndarray:
    """`chosen` as a flat index array, or RuntimeError unless it holds `budget` distinct positions in
    [0, num_candidates): a strategy's contract, checked in every mode."""
    chosen = np.asarray(chosen).reshape(-1)
    if (len(chosen) != budget or len(np.unique(chosen)) != budget or chosen.min() < 0
            or chosen.max() >= num_candidates):
        raise RuntimeError(f"strategy {strategy} must return {budget} distinct positions in [0, {num_candidates}), "
                           f"got {len(chosen)} ({len(np.unique(chosen))} distinct)")
    return chosen


def add_selection(labeled: np.ndarray, candidates: np.ndarray, chosen: np.ndarray, budget: int,
                  strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """(new labelled set, newly labelled indices) after `chosen` (positions in `candidates`)."""
    selected = candidates[check_selection(chosen, len(candidates), budget, strategy)]
    return np.sort(np.concatenate([labeled, selected])), selected


def train_options(config: Config, data: Dataset, task=None) -> TrainOptions:
    return TrainOptions(config.momentum, config.weight_decay, data.augmentation, data.crop_padding,
                        config.lossnet.margin, config.lossnet.weight, task, config.crop_size,
                        precision.compute_dtype(config.precision.training), config.optimizer)


def metric_fields(prefix: str, metrics: dict) -> dict:
    """A task's metrics as record fields: {"accuracy": a} -> {"test_accuracy": a}."""
    return {f"{prefix}_{name}": value for name, value in metrics.items()}


def cycle_keys(seed: int, trial_key: jax.Array, cycle: int) -> tuple[jax.Array, jax.Array, list[int]]:
    """(model init key, strategy key, host seed) of a cycle: derived from (seed, trial, cycle) alone, so a
    resumed cycle draws what an uninterrupted one draws."""
    init_key, strategy_key, host_key = jax.random.split(jax.random.fold_in(trial_key, cycle), 3)
    return init_key, strategy_key, [seed, int(jax.random.randint(host_key, (), 0, 2**31 - 1))]


def state_template(exp: Experiment, lossnet) -> object:
    """The train state's shapes and structure (no arrays), to restore a checkpoint against."""
    options = train_options(exp.config, exp.dataset, exp.task)
    return jax.eval_shape(lambda key: create_train_state(exp.model, lossnet, key, exp.dataset.image_shape, options),
                          jax.random.key(0))


class Round(NamedTuple):
    state: object  # the train state after this round's training
    record: dict  # cycle, num_labeled, <prefix>_<metric> per evaluation set, train_loss, seconds, num_scored, ...
    candidates: np.ndarray  # the indices scored; empty without a selection
    chosen: np.ndarray  # the batch: positions in `candidates`, best first; empty without a selection
    scores: Optional[np.ndarray]  # the strategy's scores of `chosen`; None for a set-valued strategy or none


def run_round(exp: Experiment, strategy, trial_key, cycle: int, state, images, labels, labeled: np.ndarray, *,
              lossnet, budget: Optional[int], candidates: Callable[[np.random.Generator], np.ndarray],
              evaluation: Callable[[], dict], reference_sets: Callable[[], dict], num_labeled: int,
              trained: Optional[tuple] = None, on_trained: Optional[Callable] = None) -> Round:
    """One turn of the cycle train -> score -> select, the same for a simulation (`run_cycle`, whose oracle
    is the dataset's labels) and for annotation rounds (`jaxal.learner`, whose oracle is a person).

    Trains on `labeled` (indices into the host arrays `images`/`labels`; the labels of other indices are
    never read), from `state` with a fresh optimizer when warm-starting, else from a new model; evaluates
    on the sets `evaluation()` returns ({prefix: (xs, ys)}); then, if `budget`, scores the indices
    `candidates(rng)` and selects `budget` of them. Every random choice comes from (seed, trial_key, cycle)
    (`cycle_keys`). `on_trained(state, fields)` is called once training and evaluation are done; passing
    those back as `trained=(state, fields)` (a round interrupted after them) skips both."""
    config, data = exp.config, exp.dataset
    init_key, strategy_key, host_seed = cycle_keys(config.seed, trial_key, cycle)
    options = train_options(config, data, exp.task)
    if trained is None:
        if state is None or not config.warm_start:
            state = create_train_state(exp.model, lossnet, init_key, data.image_shape, options)
        else:
            state = fresh_optimizer(state, options)
        start = time.perf_counter()
        state, train_metrics = train_model(state, images, labels, labeled, model=exp.model, lossnet=lossnet,
                                           options=options, epochs=config.epochs, batch_size=config.batch_size,
                                           lr=config.lr, lr_milestones=config.lr_milestones, lr_gamma=config.lr_gamma,
                                           detach_epoch=config.lossnet.detach_epoch, seed=host_seed[1], mesh=exp.mesh,
                                           lossnet_lr_decay=config.lossnet.lr_decay)
        jax.block_until_ready(state)
        train_seconds = time.perf_counter() - start
        variables = parallel.local(model_variables(state))
        fields = {}
        start = time.perf_counter()
        for prefix, (xs, ys) in evaluation().items():
            fields.update(metric_fields(prefix, evaluate(exp.model, variables, xs, ys, exp.task,
                                                         config.eval_batch_size, mesh=exp.mesh)))
        evaluate_seconds = time.perf_counter() - start  # the metrics are host floats: evaluation has finished
        fields.update(train_loss=train_metrics.get("loss"), train_seconds=train_seconds,
                      evaluate_seconds=evaluate_seconds)
        if on_trained is not None:
            on_trained(state, fields)
    else:
        state, fields = trained
    record = {"cycle": cycle, "num_labeled": int(num_labeled), **fields, "selection_seconds": 0.0,
              "num_scored": 0, "selected": []}
    if not budget or stop_reached(config, record, exp.task.metric):
        return Round(state, record, np.zeros((0,), np.int64), np.zeros((0,), np.int64), None)
    scored = candidates(np.random.default_rng(host_seed))
    # Strategies get process-local copies of the (replicated) trained weights: single-device code
    # works unchanged on them, and the parallel helpers replicate them again where they shard work.
    variables, lossnet_params = parallel.local((model_variables(state), state.params["lossnet"]))
    # Host arrays, like the variables are process-local: the strategies place them on the mesh themselves.
    ctx = StrategyContext(model=exp.model, variables=variables, pool_x=images[scored], labeled_x=images[labeled],
                          labeled_y=labels[labeled], num_classes=data.num_classes, task=exp.task, config=config,
                          rng=strategy_key, lossnet=lossnet, lossnet_params=lossnet_params,
                          reference_sets=reference_sets(), mesh=exp.mesh,
                          train_options=options)
    start = time.perf_counter()
    chosen, scores, info = strategy.select(ctx, budget)
    record["selection_seconds"] = time.perf_counter() - start
    if info:
        record["strategy_info"] = info
    record["num_scored"] = int(len(scored))
    return Round(state, record, scored, check_selection(chosen, len(scored), budget, strategy.name), scores)


def run_cycle(exp: Experiment, strategy, trial_key, cycle: int, state, labeled: np.ndarray, val: np.ndarray,
              initial: np.ndarray, images, labels, lossnet) -> tuple[object, np.ndarray, dict, np.ndarray]:
    """A simulated cycle: `run_round` on the dataset, then (except in the last cycle) the oracle labels
    the batch (the dataset's labels, known all along). Returns (state, next labelled set, record, the
    candidates scored: empty in the last cycle)."""
    config, data = exp.config, exp.dataset
    last = cycle == config.cycles - 1
    result = run_round(
        exp, strategy, trial_key, cycle, state, images, labels, labeled, lossnet=lossnet,
        budget=None if last else config.budget, num_labeled=len(labeled) + len(val),
        candidates=lambda rng: candidate_pool(data.x_train.shape[0], labeled, val, config.subset_size, rng),
        evaluation=lambda: {"test": (data.x_test, data.y_test), "train": (images[labeled], labels[labeled])},
        reference_sets=lambda: reference_sets(config, data, labeled, val, initial))
    record = {"strategy": strategy.name, "trial": None, **result.record}
    if data.class_names:  # what the label indices of the results (e.g. a segmentation's test_iou) mean
        record["class_names"] = list(data.class_names)
    if not last and not stop_reached(config, record, exp.task.metric):
        labeled, selected = add_selection(labeled, result.candidates, result.chosen, config.budget, strategy.name)
        record["selected"] = [int(i) for i in selected]
    return result.state, labeled, record, result.candidates


def run_trial(exp: Experiment, strategy_name: str, trial: int, images, labels,
              on_cycle: Callable[[list], None], observer: Optional[Callable] = None) -> list[dict]:
    """Run (or resume) one trial of one strategy. `observer(exp, cycle, state, labeled, record,
    candidates)` is called after every cycle run by this process, with the trained state, the
    labelled set it was trained on and the candidate indices it scored (the diagnostics use it to
    compare the models of consecutive cycles)."""
    config, data = exp.config, exp.dataset
    strategy = get_strategy(strategy_name)
    lossnet = LossNet(config.lossnet.width) if strategy.requires.lossnet else None
    trial_key = jax.random.fold_in(jax.random.key(config.seed), trial)
    labeled, val = initial_split(config, trial, data.x_train.shape[0])
    if strategy.initial_set is not None:  # the strategy's own initial set (SRAAL's k-center option)
        labeled = np.sort(np.asarray(strategy.initial_set(config, data.x_train, exp.model, exp.mesh, trial_key,
                                                           labeled, val)))
    initial = labeled.copy()
    mngr = checkpoint.manager(exp.workdir / "checkpoints" / strategy_name / f"trial_{trial}")
    resumed = checkpoint.restore_latest(mngr, state_template(exp, lossnet))
    state, records, first_cycle = None, [], 0
    if resumed is not None:
        if not np.array_equal(resumed.val, val) or not np.array_equal(resumed.rng_key_data,
                                                                       jax.random.key_data(trial_key)):
            raise checkpoint.CheckpointError(f"checkpoint in {mngr.directory} belongs to another seed or split")
        state, labeled, records, first_cycle = resumed.state, resumed.labeled, resumed.records, resumed.cycle + 1
        on_cycle(records)
    for cycle in range(first_cycle, config.cycles):
        if records and stop_reached(config, records[-1], exp.task.metric):
            break
        try:
            trained_on = labeled
            state, labeled, record, candidates = run_cycle(exp, strategy, trial_key, cycle, state, labeled, val,
                                                           initial, images, labels, lossnet)
            record["trial"] = trial
            if observer is not None:
                observer(exp, cycle, state, trained_on, record, candidates)
            records = records + [record]
            checkpoint.save(mngr, checkpoint.CycleCheckpoint(cycle, state, labeled, val,
                                                             np.asarray(jax.random.key_data(trial_key)), records))
        except KeyboardInterrupt as interrupt:  # Ctrl-C: `jaxal.cli` tells where a rerun resumes
            resume = cycle + 1 if mngr.latest_step() == cycle else cycle  # interrupted after its checkpoint?
            interrupt.resume_from = (f"cycle {resume}" + (f" (strategy {strategy_name}, trial {trial})"
                                                           if len(config.strategies) > 1 or config.trials > 1 else ""))
            raise
        on_cycle(records)
    mngr.close()
    return records


def describe_void(data: Dataset) -> str:
    return "" if data.task == "classification" else f", {data.task}, void label {data.ignore_label}"


def describe(exp: Experiment) -> str:
    config, data = exp.config, exp.dataset
    batch = parallel.round_up(config.batch_size, parallel.mesh_size(exp.mesh))
    return (f"jaxal: {config.strategy} on {data.name} ({data.x_train.shape[0]} train / {data.x_test.shape[0]} test, "
            f"{data.num_classes} classes{describe_void(data)}), model {config.model}, "
            f"{config.cycles} cycles x {config.trials} trials, "
            f"{config.initial_size} initial + {config.budget} per cycle; {parallel.describe_mesh(exp.mesh)}, "
            f"batch {batch}{' (rounded up to the device count)' if batch != config.batch_size else ''}; "
            f"workdir {exp.workdir}")


def describe_budget_engine(exp: Experiment) -> str:
    """With --gradnorm.memory_budget_mib and a strategy that ranks by gradient norms: the engine and chunk size
    chosen from XLA's memory analysis, with every engine's numbers and the mixed engine's layers (what the
    cycles will use); else ""."""
    from jaxal.strategies.gradient import STRATEGY_QUERY_LOSS, budget_engine

    config = exp.config
    loss_name = next((STRATEGY_QUERY_LOSS[s] for s in config.strategies if s in STRATEGY_QUERY_LOSS), None)
    if config.gradnorm.memory_budget_mib <= 0 or loss_name is None:
        return ""
    variables = init_variables(exp.model, jax.random.key(0), exp.dataset.image_shape)
    choice = budget_engine(exp.model, exp.task, loss_name, config.gradnorm, variables, exp.dataset.x_train[:1])
    return f"{choice.describe()}, budget {config.gradnorm.memory_budget_mib:g} MiB"


def run_experiment(config: Config, *, workdir: Optional[str | Path] = None, overwrite: bool = False,
                   log: Callable[[str], None] = print, observer: Optional[Callable] = None,
                   model=None) -> list[dict]:
    """Run (or resume) every strategy and trial of `config`; returns all per-cycle records.
    `observer`, if given, is called after every cycle (see `run_trial`); `model`: a Flax module of your
    own instead of `config.model` (see `jaxal.models` for what it must return)."""
    if config.task == "detection":  # boxes stream from disk per batch: `jaxal.detection.active`
        from jaxal.detection import active

        return active.maybe_run(config, workdir, overwrite, log)
    return run_prepared(prepare(config, workdir, model=model), overwrite=overwrite, log=log, observer=observer)


def run_prepared(exp: Experiment, *, overwrite: bool = False, log: Callable[[str], None] = print,
                 observer: Optional[Callable] = None) -> list[dict]:
    """`run_experiment` for an experiment `prepare` already loaded and validated. Holds the workdir's lock
    (`jaxal.workdir`) throughout: a second process on the same workdir is refused."""
    with workdir_lock.hold(exp.workdir, parallel.is_primary()):
        return _run_holding_the_lock(exp, overwrite, log, observer)


def _run_holding_the_lock(exp: Experiment, overwrite: bool, log: Callable[[str], None],
                          observer: Optional[Callable]) -> list[dict]:
    config = exp.config
    open_workdir(exp, overwrite)
    if parallel.is_primary():
        log(describe(exp))
        engine = describe_budget_engine(exp)
        if engine:
            log(engine)
    # Host arrays in their stored dtype: training sends one batch at a time, scoring one chunk at a time.
    images, labels = exp.dataset.x_train, exp.dataset.y_train
    finished: dict[tuple, list] = {}
    title = f"{exp.dataset.name}, {config.model}"
    metric = exp.task.metric  # the learning curve's: test_accuracy, test_miou
    short = {"accuracy": "acc"}.get(metric, metric)  # its name on the progress bar
    progress = _progress_bar(config, exp)

    # Training and plain inference at --precision.training; the solvers set their own (jaxal.precision).
    with precision.scope(config.precision.training):
        for strategy_name in config.strategies:
            for trial in range(config.trials):
                def on_cycle(trial_records, key=(strategy_name, trial)):
                    done_before = len(finished.get(key, []))
                    finished[key] = trial_records
                    if parallel.is_primary():  # every process holds the same records
                        results.write_results(exp.workdir, [r for rs in finished.values() for r in rs], title,
                                              metric=metric)
                    if trial_records:
                        last = trial_records[-1]
                        progress.update(len(trial_records) - done_before)
                        progress.set_postfix(strategy=last["strategy"], trial=last["trial"], cycle=last["cycle"],
                                             labeled=last["num_labeled"],
                                             **{short: f"{last[f'test_{metric}']:.4f}"})

                run_trial(exp, strategy_name, trial, images, labels, on_cycle, observer)
    progress.close()
    records = [r for rs in finished.values() for r in rs]
    if parallel.is_primary():
        log(results.summary_table(records, metric))
        log(f"results: {exp.workdir / 'results.csv'}, {exp.workdir / 'learning_curve.png'}")
    return records


def _progress_bar(config: Config, exp: Experiment):
    from tqdm.auto import tqdm

    total = len(config.strategies) * config.trials * config.cycles
    return tqdm(total=total, desc="cycles", unit="cycle", disable=not (config.progress and parallel.is_primary()),
                dynamic_ncols=True)
