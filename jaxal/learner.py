"""Annotation rounds: active learning on your own images, with a person as the oracle (ask/tell).

    learner = jaxal.ActiveLearner(model="resnet18", strategy="ent_gn", num_classes=10, workdir="al/")
    learner.tell(ids, labels)                          # what has been labelled so far
    batch = learner.ask(pool_ids, pool_images, k=100)  # the ids to label next, with scores and ranks
    # ... a person labels batch.ids ...
    learner.tell(batch.ids[:80], their_labels)         # all of them, some, or other images too
    batch = learner.ask(pool_ids, pool_images, k=100)  # the next round

The pool is every image you have, labelled or not, as ids (any str, int or tuple of them: file paths,
database keys) with their pixels (N, H, W, C) or (N, H, W): uint8 pixels stay uint8 (normalised on the
device by the model), float arrays are taken as they are. Each `ask` that finds new labels runs one
round of the same cycle the simulation runs (`jaxal.loop.run_round`: train on the labelled images,
score the others with the strategy, select k); the simulation is the case where the oracle is a
dataset's labels, here the oracle is whoever calls `tell`.

State (in `workdir`): `learner.json` (the settings: config, classes, image shape, normalisation), one
orbax checkpoint per finished round (`checkpoints/rounds`: the model, and beside it each round's new
labels, the proposal, the pool's fingerprint and the record), the trained model of a round in progress
(`checkpoints/trained`), and `round_NNN/round.json` for people to read. So:
  - `ask` without new labels re-proposes the last round's batch, without training (deterministic);
  - a round killed after training resumes at scoring; killed earlier, it trains again, drawing the same
    random numbers (every one comes from (seed, round)): the result equals an uninterrupted round;
  - a learner opened on an existing workdir continues its rounds (labels told after the last round live
    in memory until the next `ask` uses them: tell them again after a restart, as `jaxal.query` does by
    reading its CSV files every time); `forget(ids)` withdraws labels told since the last round.
Bad input raises `AnnotationError` (a ValueError) before anything is written: a label for an id that is
not in the pool, a class outside the known set, a second label for an id that differs from the first,
a pool that changed under a round (ids added or removed, or pixels changed, when no new label came in
to start a new round; or labelled images removed), settings that differ from the workdir's.

Classes: `num_classes=C` (labels are 0 .. C-1), `classes=[...]` (labels are those values, e.g. names),
or neither: the distinct labels told before the first round, fixed from then on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from jaxal import checkpoint, parallel, results, tasks, workdir as workdir_lock
from jaxal.config import Config, build_config, with_overrides
from jaxal.data import Normalization, images_dataset, with_options
from jaxal.loop import (RESUME_FREE_FIELDS, Experiment, RunError, candidate_pool, check_model_fits,
                        check_model_outputs, config_differences, model_description, reference_sets, run_round,
                        state_template, validate_settings)
from jaxal.models import MODELS, LossNet, adapt, create_model
from jaxal.strategies import get_strategy
from jaxal.train import model_variables, predict as predict_logits

FORMAT_VERSION = 1
# Config fields an annotation round does not read (the pool and k come from `ask`): they may differ
# between the runs of one workdir.
FREE_FIELDS = RESUME_FREE_FIELDS + ("budget", "dataset", "data_dir", "initial_size", "cycles", "trials")


class AnnotationError(RunError):
    """Bad input to an annotation round (labels, pool or settings): the message says what and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Proposal:
    """The batch a round proposes for labelling, best first."""

    round: int
    ids: tuple  # the ids to label next
    scores: tuple  # the strategy's score of each (higher = chosen first); None for set-valued strategies
    ranks: tuple[int, ...]  # 1 .. k
    retrained: bool  # False: re-proposed from a finished round (no new labels), nothing was trained

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self) -> list[tuple[Any, Optional[float], int]]:
        return list(zip(self.ids, self.scores, self.ranks))


# ---- ids and labels ------------------------------------------------------------------------------


def encode_id(item) -> Any:
    """An id as JSON stores it: str, int, or a list of those (a tuple id)."""
    if isinstance(item, str):
        return item
    if isinstance(item, (int, np.integer)) and not isinstance(item, (bool, np.bool_)):
        return int(item)
    if isinstance(item, tuple):
        return [encode_id(part) for part in item]
    raise AnnotationError(f"ids must be str, int or tuples of them (they are stored as JSON); got {item!r} "
                          f"of type {type(item).__name__}")


def decode_id(value) -> Any:
    return tuple(decode_id(v) for v in value) if isinstance(value, list) else value


def id_key(encoded) -> str:
    """A total order and identity over ids of any allowed type: their JSON text."""
    return json.dumps(encoded, separators=(",", ":"), ensure_ascii=False)


def normalize_label(label) -> Any:
    if isinstance(label, str):
        return label
    if isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
        return int(label)
    raise AnnotationError(f"labels must be class indices (int) or class names (str); got {label!r} of type "
                          f"{type(label).__name__}")


def infer_classes(labels) -> tuple:
    """The sorted distinct labels: numbers in numeric order (also when written as text, "10" after "9")."""
    values = set(labels)
    if all(isinstance(v, int) for v in values):
        return tuple(sorted(values))
    if all(isinstance(v, str) for v in values):
        digits = all(v.isdigit() for v in values)
        if digits:
            check_number_spellings(values)
        return tuple(sorted(values, key=(lambda v: (int(v), v)) if digits else None))
    raise AnnotationError("labels mix class indices (int) and class names (str); use one kind")


def check_number_spellings(labels) -> None:
    """Refuse two spellings of one number ("08" and "8"): taken as names they would be two classes."""
    by_value: dict[int, set] = {}
    for label in labels:
        if isinstance(label, str) and label.isdigit():
            by_value.setdefault(int(label), set()).add(label)
    spelt_twice = [sorted(spellings) for spellings in by_value.values() if len(spellings) > 1]
    if spelt_twice:
        raise AnnotationError(f"the labels {' and '.join(map(repr, spelt_twice[0]))} are one number written two ways, "
                              "which would make them two classes; write each class one way")


def _shorten(values: Sequence, limit: int = 5) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def _show_keys(keys: Sequence[str], limit: int = 5) -> str:
    return _shorten([decode_id(json.loads(k)) for k in keys], limit)


# ---- the pool ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Pool:
    """The images of one `ask`, in a canonical order (by id), so the order they were given in changes nothing."""

    ids: list  # decoded ids, canonical order
    keys: list  # their `id_key`s
    index: dict  # key -> row
    images: np.ndarray  # (N, H, W, C) uint8 or float32, rows in the order of `keys`
    fingerprint: str  # of the ids and the pixels


def make_pool(pool_ids, pool_images) -> Pool:
    images = np.asarray(pool_images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim not in (4, 5) or 0 in images.shape or (images.ndim == 5 and images.dtype.kind != "f"):
        raise AnnotationError(f"pool images must be an array (N, H, W, C) or (N, H, W), or real-valued volumes "
                              f"(N, D, H, W, C); got shape {images.shape} {images.dtype}")
    if images.dtype != np.uint8:
        if images.dtype.kind != "f":
            raise AnnotationError(f"pool images must be uint8 pixels or floats; got {images.dtype}")
        images = images if images.dtype == np.float16 else images.astype(np.float32, copy=False)
        if not np.all(np.isfinite(images)):
            raise AnnotationError("pool images contain non-finite values")
    pool_ids = list(pool_ids)
    if len(pool_ids) != images.shape[0]:
        raise AnnotationError(f"{len(pool_ids)} pool ids for {images.shape[0]} images")
    keys = [id_key(encode_id(i)) for i in pool_ids]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    keys = [keys[i] for i in order]
    duplicates = sorted({a for a, b in zip(keys, keys[1:]) if a == b})
    if duplicates:
        raise AnnotationError(f"the pool lists ids more than once: {_show_keys(duplicates)}")
    if order != list(range(len(order))):
        images = images[np.asarray(order)]
    digest = hashlib.sha256(json.dumps([images.shape, images.dtype.str, keys]).encode())
    for start in range(0, images.shape[0], 4096):
        digest.update(np.ascontiguousarray(images[start:start + 4096]).tobytes())
    return Pool([pool_ids[i] for i in order], keys, {k: row for row, k in enumerate(keys)}, images, digest.hexdigest())


def pool_changes(before_keys: Sequence[str], pool: Pool) -> str:
    """'N added (a, b, ...), M removed (...)' or 'the same ids, other pixels'."""
    before = set(before_keys)
    added = sorted(set(pool.keys) - before)
    removed = sorted(before - set(pool.keys))
    parts = [f"{len(added)} added ({_show_keys(added)})"] if added else []
    parts += [f"{len(removed)} removed ({_show_keys(removed)})"] if removed else []
    return ", ".join(parts) or "the same ids with other pixels"


# ---- the learner ---------------------------------------------------------------------------------


class ActiveLearner:
    """Ask/tell active learning over rounds checkpointed in `workdir` (see the module docstring).

    model: a name of `jaxal.models.MODELS` ("cnn", "resnet18", ...), a Flax module of your own (see
      `jaxal.models` for the contract), or None: the model a folder of these images gets in `jaxal.run`
      (`jaxal.data.image_defaults`: "resnet18" for RGB images of 32 pixels or more, else "cnn"), and
      with it that default augmentation (config.augmentation: "crop_flip" for RGB, "none" for grey).
    strategy: one strategy name (`jaxal.strategies.STRATEGIES`).
    num_classes / classes: the label set (see the module docstring).
    normalization: None (config.normalization: "dataset" = the channel statistics of the first round's
      pool, labelled and unlabelled images together; "pytorch_cifar", "pycls_cifar"), or a
      `jaxal.data.Normalization`.
    config: a whole `Config` (e.g. from the command line); `overrides`: config fields (epochs=10,
      gradnorm=dict(norm="global"), ...) on top of it, or of the "annotation" preset.
    """

    def __init__(self, model=None, strategy: Optional[str] = None, num_classes: Optional[int] = None, *,
                 classes: Optional[Sequence] = None, workdir: str | Path = "al", normalization=None,
                 config: Optional[Config] = None, log: Callable[[str], None] = print, **overrides):
        base = config if config is not None else build_config("annotation")
        if strategy is not None:
            overrides["strategy"] = strategy
        try:
            config = with_overrides(base, overrides)
        except (TypeError, ValueError) as error:
            raise RunError(f"bad config override: {error}") from None
        if len(config.strategies) != 1:
            raise RunError(f"a learner runs one strategy; got {config.strategy!r}")
        self.module = None if model is None or isinstance(model, str) else model
        if isinstance(model, str):
            config = dataclasses.replace(config, model=model)
        elif self.module is not None:
            config = dataclasses.replace(config, model=model_description(self.module))
        if self.module is None and config.model is not None and config.model not in MODELS:
            raise RunError(f"unknown model {config.model!r}; choose one of: {', '.join(sorted(MODELS))} "
                           "or pass a Flax module")
        validate_settings(config)
        self.strategy = get_strategy(config.strategy)
        self.workdir = Path(workdir)
        self.log = log
        self._given_classes = _given_classes(num_classes, classes)
        self._normalization = normalization
        if normalization is not None and not isinstance(normalization, Normalization):
            raise RunError("normalization must be None or a jaxal.data.Normalization; name a kind with "
                           "the config field normalization ('dataset', 'pytorch_cifar', 'pycls_cifar')")
        try:
            self.mesh = parallel.make_mesh(config.num_devices)
        except ValueError as error:
            raise RunError(f"--num_devices: {error}") from None
        config = dataclasses.replace(config, num_devices=self.mesh.devices.size, workdir=str(self.workdir))
        self.mesh = self.mesh if self.mesh.devices.size > 1 else None
        self.config = config
        self._labels: dict[str, tuple[Any, Any]] = {}  # key -> (id, label)
        self._rounds: list[dict] = []
        self._pool_keys: list[str] = []
        self._settings = self._read_settings()
        self._load_rounds()

    # ---- public -----------------------------------------------------------------------------------

    @property
    def classes(self) -> Optional[tuple]:
        if self._settings is not None:
            return tuple(self._settings["classes"])
        return self._given_classes

    @property
    def labels(self) -> dict:
        """{id: label} of every label told (and of every finished round)."""
        return {i: label for i, label in self._labels.values()}

    @property
    def rounds(self) -> list[dict]:
        """Each finished round: round, new_labels, proposal (ids, scores, ranks), record, ..."""
        return [dict(r) for r in self._rounds]

    def tell(self, ids, labels) -> None:
        """Record labels (any ids of the pool, proposed or not). All or nothing: a class outside the
        known set or a label that differs from the one an id already has raises AnnotationError and
        changes nothing."""
        ids, labels = list(ids), list(np.asarray(labels).tolist() if isinstance(labels, np.ndarray) else labels)
        if len(ids) != len(labels):
            raise AnnotationError(f"{len(ids)} ids but {len(labels)} labels")
        classes = self.classes
        known = set(classes) if classes is not None else None
        updated = dict(self._labels)
        conflicts, outside = [], []
        for item, label in zip(ids, labels):
            key, label = id_key(encode_id(item)), normalize_label(label)
            if known is not None and label not in known:
                outside.append(label)
            elif key in updated and updated[key][1] != label:
                conflicts.append(f"{item!r}: {updated[key][1]!r} then {label!r}")
            else:
                updated[key] = (decode_id(encode_id(item)), label)
        if outside:
            raise AnnotationError(f"label {outside[0]!r} is not one of the known classes ({_shorten(classes, 12)})"
                                  + (f"; {len(outside) - 1} other labels neither" if len(outside) > 1 else "")
                                  + ": the classes are fixed from the first round on; start a new workdir to "
                                  "add one")
        if conflicts:
            raise AnnotationError(f"conflicting labels for the same id: {'; '.join(conflicts[:5])}"
                                  + (f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
                                  + ". A label once given stays; to correct one, start a new workdir")
        self._labels = updated

    def forget(self, ids) -> None:
        """Withdraw labels told since the last round (e.g. for ids that are not in the pool). Labels a
        finished round trained on stay: AnnotationError, and nothing is withdrawn."""
        keys = [id_key(encode_id(item)) for item in ids]
        used = self._used_keys()
        in_rounds = [key for key in keys if key in used]
        if in_rounds:
            raise AnnotationError(f"{len(in_rounds)} of these ids were labelled in finished rounds and stay labelled "
                                  f"({_show_keys(in_rounds)}); only labels told since the last round can be withdrawn")
        unknown = [key for key in keys if key not in self._labels]
        if unknown:
            raise AnnotationError(f"no label was told for {_show_keys(unknown)}; nothing withdrawn")
        self._labels = {key: value for key, value in self._labels.items() if key not in set(keys)}

    def ask(self, pool_ids, pool_images, k: int = 100) -> Proposal:
        """The k ids of the pool to label next. Runs a round if labels came in since the last one (or
        there is none yet), else re-proposes the last round's batch."""
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
            raise AnnotationError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        pool = make_pool(pool_ids, pool_images)
        if not self._labels:
            raise AnnotationError("no labels yet: tell some labels (a few per class) before the first ask")
        classes = self._classes_for_round()
        self._check_labels_in(pool)
        self._check_images(pool)
        self._write_round_files()  # a run killed between a round's checkpoint and its files
        used = self._used_keys()
        if self._rounds and set(self._labels) == used:
            return self._repropose(pool, k)
        try:
            return self._new_round(pool, k, classes)
        except KeyboardInterrupt as interrupt:  # Ctrl-C: `jaxal.cli` tells where a rerun resumes
            interrupt.resume_from = f"round {len(self._rounds)}"
            raise

    def predict(self, pool_ids, pool_images) -> np.ndarray:
        """Class probabilities (N, C), in the order of `pool_ids`, of the model the last finished round
        trained (over `classes`), for any images of the round's shape, labelled or not."""
        if not self._rounds:
            raise AnnotationError("no finished round yet: ask for a batch first")
        pool = make_pool(pool_ids, pool_images)
        self._check_images(pool)
        exp = self._experiment(pool, np.full((len(pool.keys),), -1, np.int32), self.classes)
        lossnet = LossNet(self.config.lossnet.width) if self.strategy.requires.lossnet else None
        variables = parallel.local(model_variables(self._restore_round_state(exp, lossnet)))
        logits, _ = predict_logits(exp.model, variables, pool.images, self.config.eval_batch_size, mesh=exp.mesh)
        probabilities = np.asarray(jax.nn.softmax(np.asarray(logits, np.float32), axis=-1))
        return probabilities[[pool.index[id_key(encode_id(i))] for i in pool_ids]]

    # ---- checks -----------------------------------------------------------------------------------

    def _classes_for_round(self) -> tuple:
        classes = self.classes
        if classes is None:
            classes = infer_classes(label for _, label in self._labels.values())
        if len(classes) < 2:
            raise AnnotationError(f"classification needs at least 2 classes; the labels so far have "
                                  f"{len(classes)} ({_shorten(classes)}); label images of another class, or pass "
                                  "num_classes / classes")
        return classes

    def _check_labels_in(self, pool: Pool) -> None:
        unknown = sorted(k for k in self._labels if k not in pool.index)
        if unknown:
            used = self._used_keys()
            earlier = [k for k in unknown if k in used]
            if earlier:
                raise AnnotationError(f"{len(earlier)} labelled images of earlier rounds are no longer in the pool "
                                      f"({_show_keys(earlier)}): the pool changed under the rounds; restore them or "
                                      "start a new workdir")
            raise AnnotationError(f"labels for ids that are not in the pool: {_show_keys(unknown)}; add the images to "
                                  "the pool, or withdraw the labels with forget(ids)")

    def _check_images(self, pool: Pool) -> None:
        if self._settings is None:
            return
        shape, dtype = tuple(self._settings["image_shape"]), self._settings["dtype"]
        if pool.images.shape[1:] != shape or pool.images.dtype.str != dtype:
            raise AnnotationError(f"the pool's images are {pool.images.shape[1:]} {pool.images.dtype}, but the rounds "
                                  f"in {self.workdir} were on {shape} {np.dtype(dtype)} images; use the same size "
                                  "(--image_size) or another workdir")

    def _used_keys(self) -> set:
        keys = set()
        for info in self._rounds:
            keys.update(id_key(i) for i, _ in info["new_labels"])
            keys.update(id_key(i) for i in info.get("val", []))
        return keys

    # ---- rounds -----------------------------------------------------------------------------------

    def _repropose(self, pool: Pool, k: int) -> Proposal:
        last = self._rounds[-1]
        if pool.fingerprint != last["pool_fingerprint"]:
            raise AnnotationError(f"the pool changed under round {last['round']} ({pool_changes(self._pool_keys, pool)}) "
                                  "and no new label came in: label its batch (or other images) to start the next "
                                  "round, or restore the pool")
        if k != last["k"]:
            raise AnnotationError(f"round {last['round']} proposed {last['k']} images and no new label came in since; "
                                  f"ask for k={last['k']} to see them again, or label some to start a new round")
        self.log(f"round {last['round']}: no new labels since it proposed its batch; proposing it again")
        return _proposal(last, retrained=False)

    def _new_round(self, pool: Pool, k: int, classes: tuple) -> Proposal:
        config, number = self.config, len(self._rounds)
        class_index = {c: i for i, c in enumerate(classes)}
        labels = np.full((len(pool.keys),), -1, np.int32)
        for key, (_, label) in self._labels.items():
            labels[pool.index[key]] = class_index[label]
        labeled = sorted(self._labels)
        val_keys = self._validation_keys(labeled)
        train_rows = np.asarray(sorted(pool.index[key] for key in labeled if key not in set(val_keys)), np.int64)
        val_rows = np.asarray(sorted(pool.index[key] for key in val_keys), np.int64)
        unlabeled = len(pool.keys) - len(labeled)
        if unlabeled < k:
            raise AnnotationError(f"only {unlabeled} unlabelled images are left in the pool; ask for at most that many")
        if config.subset_size is not None and config.subset_size < k:
            raise AnnotationError(f"--subset_size ({config.subset_size}) must be at least k ({k})")
        if len(train_rows) == 0:
            raise AnnotationError(f"all {len(labeled)} labels are held out for validation (--val_size); label more")
        exp = self._experiment(pool, labels, classes)
        lossnet = LossNet(config.lossnet.width) if self.strategy.requires.lossnet else None
        initial_keys = [id_key(i) for i, _ in self._rounds[0]["new_labels"]] if self._rounds else labeled
        initial_rows = np.asarray(sorted(pool.index[key] for key in initial_keys if key not in set(val_keys)), np.int64)
        digest = _labels_digest(labeled, labels[[pool.index[key] for key in labeled]], val_keys, pool.fingerprint)

        # Everything is checked: from here on the workdir is written.
        self._write_settings(pool, classes, exp)
        trained = self._resumable_trained(number, digest, exp, lossnet)
        state = self._restore_round_state(exp, lossnet) if config.warm_start and number > 0 and trained is None else None
        trained_mngr = checkpoint.manager(self.workdir / "checkpoints" / "trained")

        def on_trained(trained_state, fields):
            checkpoint.save_state(trained_mngr, number, trained_state, {"round": number, "digest": digest,
                                                                        "fields": fields})

        previous = self._rounds[-1] if self._rounds else None
        proposed = {id_key(encode_id(i)) for i in previous["proposal"]["ids"]} if previous else set()
        new_keys = [key for key in labeled if key not in self._used_keys()]
        self.log(f"round {number}: {len(labeled)} labelled images"
                 + (f" ({len(new_keys)} new: {len(proposed & set(new_keys))} of round {number - 1}'s {len(proposed)} "
                    f"proposed, {len(set(new_keys) - proposed)} others)" if previous else "")
                 + (", training" if trained is None else ", trained before it was interrupted")
                 + f"; then choosing {k} of {unlabeled} with {self.strategy.name}")
        trial_key = jax.random.fold_in(jax.random.key(config.seed), 0)
        images = pool.images
        result = run_round(
            exp, self.strategy, trial_key, number, state, images, labels, train_rows, lossnet=lossnet, budget=k,
            num_labeled=len(labeled),
            candidates=lambda rng: candidate_pool(len(pool.keys), train_rows, val_rows, config.subset_size, rng),
            evaluation=lambda: {"train": (images[train_rows], labels[train_rows]),
                                **({"val": (images[val_rows], labels[val_rows])} if len(val_rows) else {})},
            reference_sets=lambda: reference_sets(config, exp.dataset, train_rows, val_rows, initial_rows),
            trained=trained, on_trained=on_trained)
        rows = result.candidates[result.chosen]
        scores = [None] * k if result.scores is None else [float(s) for s in result.scores]
        info = {"round": number, "k": k, "pool_fingerprint": pool.fingerprint, "pool_size": len(pool.keys),
                "new_labels": [[json.loads(key), class_index[self._labels[key][1]]] for key in new_keys],
                "val": [json.loads(key) for key in val_keys] if number == 0 else [],
                "proposed_labeled": len(proposed & set(new_keys)), "others_labeled": len(set(new_keys) - proposed),
                "proposal": {"ids": [encode_id(pool.ids[r]) for r in rows], "scores": scores,
                             "ranks": list(range(1, k + 1))},
                "record": {**result.record, "selected": [encode_id(pool.ids[r]) for r in rows]}}
        rounds = self._rounds + [info]
        meta = {"version": FORMAT_VERSION, "rounds": rounds, "pool_ids": [json.loads(key) for key in pool.keys],
                "rng": np.asarray(jax.random.key_data(trial_key)).tolist()}
        rounds_mngr = checkpoint.manager(self.workdir / "checkpoints" / "rounds")
        checkpoint.save_state(rounds_mngr, number, result.state, meta)
        rounds_mngr.close()
        if trained_mngr.latest_step() is not None:  # the round is finished: its training checkpoint is spent
            trained_mngr.delete(trained_mngr.latest_step())
        trained_mngr.close()
        self._rounds, self._pool_keys = rounds, list(pool.keys)
        self._write_round_files()
        record = result.record
        self.log(f"round {number}: trained on {len(train_rows)} in {record['train_seconds']:.1f} s (train accuracy "
                 f"{record.get('train_accuracy', float('nan')):.3f}); chose {k} of {record['num_scored']} scored in "
                 f"{record['selection_seconds']:.1f} s")
        return _proposal(info, retrained=True)

    def _write_round_files(self) -> None:
        """`round_NNN/round.json` of each finished round that lacks it (the checkpoint is the truth; a run
        killed just after writing it left the file unwritten)."""
        if not parallel.is_primary():
            return
        for info in self._rounds:
            folder = self.workdir / round_folder(info["round"])
            if not (folder / "round.json").exists():
                folder.mkdir(parents=True, exist_ok=True)
                results.write_atomic(folder / "round.json", json.dumps(info, indent=1, sort_keys=True))

    def _validation_keys(self, labeled: list) -> list:
        """Round 0 holds `val_size` of its labels out of training (the reference set R of ISAL's "val");
        later rounds keep the same ones."""
        if self._rounds:
            return [id_key(i) for i in self._rounds[0].get("val", [])]
        size = self.config.val_size
        if size == 0:
            return []
        if size >= len(labeled):
            raise AnnotationError(f"--val_size ({size}) must be smaller than the {len(labeled)} labels of the first "
                                  "round")
        rng = np.random.default_rng([self.config.seed, 0])
        return sorted(labeled[i] for i in rng.choice(len(labeled), size, replace=False))

    def _experiment(self, pool: Pool, labels: np.ndarray, classes: tuple) -> Experiment:
        """The pool as the train split of a `Dataset` with the defaults of a folder run
        (`jaxal.data.images_dataset`, `with_options`): the same images get the same model, augmentation
        and normalisation here as in `jaxal.run`."""
        config = self.config
        scale = 1 / 255 if pool.images.dtype == np.uint8 else 1.0
        try:
            data = with_options(images_dataset("pool", pool.images, labels, pool.images[:0], labels[:0], len(classes),
                                               scale, class_names=tuple(str(c) for c in classes)),
                                config.normalization, config.augmentation)
        except ValueError as error:
            raise RunError(str(error)) from None
        normalization = self._given_normalization()
        if normalization is not None:
            data = dataclasses.replace(data, normalization=normalization)
        model_name = config.model or data.default_model
        config = dataclasses.replace(config, model=model_name)
        module = self.module if self.module is not None else create_model(model_name, len(classes), config.dropout)
        model = adapt(module, data.normalization)
        check_model_fits(model, model_name, data)
        check_model_outputs(model, model_name, config, data.image_shape, pool.images.dtype, len(classes))
        task = tasks.create_task("classification", len(classes))
        self.config = config
        return Experiment(config, data, model, self.workdir, self.mesh, task)

    def _given_normalization(self) -> Optional[Normalization]:
        """The workdir's saved normalisation (later rounds keep the first round's), or the one passed in."""
        if self._settings is not None:
            saved = self._settings["normalization"]
            return Normalization(saved["scale"], tuple(saved["mean"]), tuple(saved["std"]))
        return self._normalization

    # ---- the workdir ------------------------------------------------------------------------------

    def _read_settings(self) -> Optional[dict]:
        path = self.workdir / "learner.json"
        if not path.exists():
            if self.workdir.is_dir() and workdir_lock.contents(self.workdir):
                raise RunError(f"{self.workdir} exists and holds no annotation rounds (no learner.json); choose "
                               "another workdir")
            return None
        settings = workdir_lock.read_json_object(path, "choose another workdir")
        saved_config = settings.get("config")
        if not isinstance(saved_config, dict) or not isinstance(settings.get("classes"), list):
            raise RunError(f"{path} is damaged (no config or classes); choose another workdir")
        config = self.config
        if config.model is None and self.module is None:
            config = dataclasses.replace(config, model=saved_config.get("model"))
        details = config_differences(saved_config, config, FREE_FIELDS)
        if details:
            raise RunError(f"{self.workdir} holds annotation rounds with other settings ({details}); use the same "
                           "settings to continue them, or another workdir")
        if self._given_classes is not None and tuple(self._given_classes) != tuple(settings["classes"]):
            raise RunError(f"{self.workdir} holds rounds over the classes {_shorten(settings['classes'], 12)}, not "
                           f"{_shorten(self._given_classes, 12)}; use another workdir")
        self.config = config
        return settings

    def _write_settings(self, pool: Pool, classes: tuple, exp: Experiment) -> None:
        if self._settings is not None:
            return
        norm = exp.dataset.normalization
        settings = {"version": FORMAT_VERSION, "config": json.loads(self.config.to_json()), "classes": list(classes),
                    "image_shape": list(pool.images.shape[1:]), "dtype": pool.images.dtype.str,
                    "normalization": {"scale": norm.scale, "mean": list(norm.mean), "std": list(norm.std)}}
        parallel.sync("jaxal-learner-checked")
        if parallel.is_primary():
            self.workdir.mkdir(parents=True, exist_ok=True)
            results.write_atomic(self.workdir / "learner.json", json.dumps(settings, indent=1))
        parallel.sync("jaxal-learner-open")
        self._settings = settings

    def _load_rounds(self) -> None:
        directory = self.workdir / "checkpoints" / "rounds"
        if self._settings is None or not directory.exists():
            return
        found = checkpoint.read_meta(checkpoint.manager(directory))
        if found is None:
            return
        step, meta = found
        rounds = meta["rounds"]
        expected_rng = np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(self.config.seed), 0)))
        if step != len(rounds) - 1 or not np.array_equal(np.asarray(meta["rng"]), expected_rng):
            raise checkpoint.CheckpointError(f"checkpoint in {directory} is inconsistent or belongs to another seed")
        classes = self._settings["classes"]
        self._rounds = rounds
        self._pool_keys = [id_key(i) for i in meta["pool_ids"]]
        for info in rounds:
            for item, index in info["new_labels"]:
                self._labels[id_key(item)] = (decode_id(item), classes[index])

    def _resumable_trained(self, number: int, digest: str, exp: Experiment, lossnet) -> Optional[tuple]:
        """(state, fields) of this round's training, if a run of it with the same labels and pool was
        interrupted after training; else None."""
        directory = self.workdir / "checkpoints" / "trained"
        if not directory.exists():
            return None
        mngr = checkpoint.manager(directory)
        found = checkpoint.read_meta(mngr)
        if found is None or found[0] != number or found[1].get("digest") != digest:
            return None
        _, state, meta = checkpoint.restore_state(mngr, state_template(exp, lossnet))
        return state, meta["fields"]

    def _restore_round_state(self, exp: Experiment, lossnet):
        """The train state of the last finished round (a warm start continues from it)."""
        mngr = checkpoint.manager(self.workdir / "checkpoints" / "rounds")
        return checkpoint.restore_state(mngr, state_template(exp, lossnet))[1]


def round_folder(number: int) -> str:
    return f"round_{number:03d}"


def _proposal(info: dict, retrained: bool) -> Proposal:
    proposal = info["proposal"]
    return Proposal(info["round"], tuple(decode_id(i) for i in proposal["ids"]), tuple(proposal["scores"]),
                    tuple(proposal["ranks"]), retrained)


def _given_classes(num_classes, classes) -> Optional[tuple]:
    if num_classes is not None and classes is not None:
        raise RunError("pass num_classes or classes, not both")
    if num_classes is not None:
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
            raise RunError(f"num_classes must be an integer of at least 2, got {num_classes!r}")
        return tuple(range(int(num_classes)))
    if classes is not None:
        classes = tuple(normalize_label(c) for c in classes)
        if len(set(classes)) != len(classes) or len(classes) < 2:
            raise RunError(f"classes must be at least 2 distinct labels, got {classes!r}")
        check_number_spellings(classes)
        return classes
    return None


def _labels_digest(keys: list, indices: np.ndarray, val_keys: list, fingerprint: str) -> str:
    return hashlib.sha256(json.dumps([keys, indices.tolist(), val_keys, fingerprint]).encode()).hexdigest()
