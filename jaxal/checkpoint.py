"""Per-cycle checkpoints with orbax-checkpoint: everything a run needs to continue where it stopped.

`save_state`/`restore_state` store a train state with a JSON dict beside it; the simulation's cycles
(`save`/`restore_latest`) and the annotation rounds of `jaxal.learner` are both kept that way.
One `CheckpointManager` per (strategy, trial), one step per finished cycle, holding the train state
(model, BatchNorm and optimizer state), the labelled and validation indices, the trial's RNG key,
the cycle number and the records so far. The records travel with the state, so what a resumed run
reports can never disagree with the state it resumed from.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NamedTuple, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or one that does not belong to this run."""


class CycleCheckpoint(NamedTuple):
    cycle: int  # the last finished cycle
    state: Any  # TrainState after that cycle's training
    labeled: np.ndarray  # training labelled indices for the next cycle
    val: np.ndarray  # validation indices (held out of the initial set)
    rng_key_data: np.ndarray  # jax.random.key_data of the trial key
    records: list  # the trial's records, cycles 0..cycle


def manager(directory: Path, max_to_keep: int = 1) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def save_state(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """One step: the arrays of `state` (orbax's array format) and `meta`, a JSON-able dict (index sets,
    keys and records are small, and may be empty, which orbax's array handler refuses). `state` None:
    `meta` alone (a detection cycle, whose next cycle trains a fresh detector; read it with `read_meta`)."""
    items = {"meta": ocp.args.JsonSave(meta)}
    if state is not None:
        items["arrays"] = ocp.args.StandardSave({"state": state})
    mngr.save(step, args=ocp.args.Composite(**items))
    mngr.wait_until_finished()


def restore_state(mngr: ocp.CheckpointManager, template_state: Any) -> Optional[tuple[int, Any, dict]]:
    """(step, state, meta) of the latest step, or None if there is none. Array shapes and structure come
    from the checkpoint's own metadata, then are checked against `template_state` (this run's state as
    `jax.eval_shape` gives it): a checkpoint of another model fails here with a clear message."""
    step = mngr.latest_step()
    if step is None:
        return None
    _silence_abandoned_reads()
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(),
                                                              meta=ocp.args.JsonRestore()))
        arrays, meta = restored["arrays"], restored["meta"]
        state = _match_template(template_state, arrays["state"])
    except CheckpointError:
        raise
    except Exception as error:  # orbax raises many types for unreadable files
        raise _unreadable(mngr, step, error) from error
    return step, state, meta


def read_meta(mngr: ocp.CheckpointManager) -> Optional[tuple[int, dict]]:
    """(step, meta) of the latest step without reading its arrays, or None if there is none."""
    step = mngr.latest_step()
    if step is None:
        return None
    try:
        return step, mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as error:
        raise _unreadable(mngr, step, error) from error


def _unreadable(mngr, step: int, error: Exception) -> CheckpointError:
    # TensorStore appends its whole spec (~60 lines of JSON) to the reason: the first sentence is the news.
    reason = str(error).split(" [tensorstore_spec=")[0].strip().splitlines()
    reason = reason[0] if reason else ""
    reason = reason if len(reason) <= 300 else reason[:300] + " ..."
    return CheckpointError(f"checkpoint {mngr.directory}/{step} cannot be read ({type(error).__name__}: "
                           f"{reason}); delete it or choose another --workdir")


def _silence_abandoned_reads() -> None:
    """When one read of a restore fails, orbax gives up and closes its event loop while TensorStore's
    other reads are still under way; each of those then reports `RuntimeError: Event loop is closed`
    through `sys.unraisablehook` (a traceback apiece, after the error has been reported). Drop those,
    and only those."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_reads", False):
        return

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook


def save(mngr: ocp.CheckpointManager, ckpt: CycleCheckpoint) -> None:
    meta = {"cycle": ckpt.cycle, "records": ckpt.records, "labeled": np.asarray(ckpt.labeled).tolist(),
            "val": np.asarray(ckpt.val).tolist(), "rng": np.asarray(ckpt.rng_key_data).tolist()}
    save_state(mngr, ckpt.cycle, ckpt.state, meta)


def restore_latest(mngr: ocp.CheckpointManager, template_state: Any) -> Optional[CycleCheckpoint]:
    """The latest cycle's checkpoint, or None if there is none (see `restore_state`)."""
    restored = restore_state(mngr, template_state)
    if restored is None:
        return None
    step, state, meta = restored
    if meta.get("cycle") != step:
        raise CheckpointError(f"checkpoint {mngr.directory}/{step} is inconsistent: it says cycle {meta.get('cycle')}")
    return CycleCheckpoint(step, state, np.asarray(meta["labeled"], np.int64), np.asarray(meta["val"], np.int64),
                           np.asarray(meta["rng"], np.uint32), list(meta["records"]))


def _match_template(template: Any, restored: Any) -> Any:
    """`restored` (nested dicts from orbax) rebuilt into the structure of `template`, shapes checked."""
    leaves_t, treedef = jax.tree.flatten(template)
    try:
        leaves_r = treedef.flatten_up_to(_as_structure(template, restored))
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"checkpoint does not match this run's model/optimizer structure: {error}") from error
    for t, r in zip(leaves_t, leaves_r):
        if tuple(t.shape) != tuple(np.shape(r)) or np.dtype(t.dtype) != np.asarray(r).dtype:
            raise CheckpointError(f"checkpoint does not match this run's model: array of shape {np.shape(r)} "
                                  f"{np.asarray(r).dtype} where {tuple(t.shape)} {t.dtype} is expected")
    return jax.tree.unflatten(treedef, [jax.numpy.asarray(r) for r in leaves_r])


def _as_structure(template: Any, restored: Any) -> Any:
    """Orbax restores custom nodes (dataclasses, NamedTuples) as dicts or lists; map them back by
    walking the template's own key paths."""
    paths, _ = jax.tree_util.tree_flatten_with_path(template)
    values = []
    for path, _ in paths:
        node = restored
        for key in path:
            name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
            if isinstance(node, dict):
                node = node[name] if name in node else node[str(name)]
            else:
                node = node[name]
        values.append(node)
    return jax.tree.unflatten(jax.tree.structure(template), values)
