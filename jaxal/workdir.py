"""One process at a time in a workdir: a lock that `jaxal.run` and `jaxal.query` take before they write.

Two processes writing the same run directory mix their rounds (one's checkpoint, the other's
`round.json`) or break each other's orbax writes. `hold(workdir)` takes an exclusive `fcntl.flock` on
`<workdir>/.jaxal.lock` (the file holds the holder's pid, for the message), or refuses at once naming
that pid. The kernel releases the lock when its holder exits, however it exits (kill -9 included), so
there is never a stale lock to guess about; the file itself stays (unlinking it would let a third
process lock a new file while a second still holds the old one). Where several processes run one job
(`--num_processes`), only process 0 takes it: the others are its partners, not rivals.

It also turns the workdir's filesystem errors (a path under a file, a file in its place, a parent
that cannot be written, /proc/...) into a `RunError` naming the path.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".jaxal.lock"


def contents(workdir: Path) -> list[Path]:
    """What the workdir holds, other than the lock file: what decides whether it is empty."""
    return [p for p in workdir.iterdir() if p.name != LOCK_NAME]


def filesystem_error(path: Path, error: OSError, doing: str) -> Exception:
    from jaxal.loop import RunError

    reason = error.strerror or str(error)
    if isinstance(error, (NotADirectoryError, FileExistsError)):
        reason += " (a file is in the way)"
    return RunError(f"cannot {doing} {path}: {reason}; choose another --workdir")


def create(workdir: Path) -> list[Path]:
    """Make `workdir` and its missing parents; returns the folders made (innermost first)."""
    made = []
    for folder in [workdir, *workdir.parents]:
        if folder.is_dir():
            break
        made.append(folder)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise filesystem_error(workdir, error, "create the workdir") from None
    return made


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, primary: bool = True) -> Iterator[None]:
    """Hold the workdir's lock for the block (creating the workdir if needed). `primary`: False in the
    processes other than 0 of a multi-process run, which take no lock. A workdir this call created and
    that holds nothing but the lock when the block ends (its job refused its input) is removed again."""
    if not primary:
        yield
        return
    workdir = Path(workdir)
    made = create(workdir)
    path = workdir / LOCK_NAME
    try:
        handle = open(path, "a+")
    except OSError as error:
        _remove_empty(made)
        raise filesystem_error(workdir, error, "write in the workdir") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            from jaxal.loop import RunError

            raise RunError(f"{workdir} is in use by another jaxal process ({_holder(path)}); wait for it to finish, "
                           "or choose another --workdir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
        handle.flush()
        try:
            yield
        finally:
            if made and not contents(workdir):
                _remove_empty(made)
    finally:
        handle.close()  # releases the flock


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):  # written as it is being read: the lock is what counts
        return "pid unknown"


def _remove_empty(made: list[Path]) -> None:
    """Remove the folders `create` made, innermost first, as far as they are empty but for the lock."""
    for folder in made:
        try:
            (folder / LOCK_NAME).unlink(missing_ok=True)
            folder.rmdir()
        except OSError:
            return


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in `path`; RunError naming the file if it is unreadable, damaged or not an object."""
    from jaxal.loop import RunError

    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise RunError(f"cannot read {path} ({error}); {what}") from None
    except ValueError as error:
        raise RunError(f"{path} is damaged (not JSON: {error}); {what}") from None
    if not isinstance(value, dict):
        raise RunError(f"{path} is damaged (a JSON {type(value).__name__}, not an object); {what}")
    return value
