"""Exclusive advisory locks for the writers of a store or a run folder.

One writer at a time: :func:`exclusive` takes a ``flock`` on a lock file that belongs to the
target and writes the holder (pid, host, start time, command) into it; a second writer is
refused at once with one sentence naming the holder. The kernel drops a ``flock`` when its
process dies, so the file that a SIGKILLed writer leaves behind blocks nobody: the next writer
simply takes it over. A lock released normally deletes its file.

Where the lock file lives:

- a run folder (``inside=True``, :func:`run_lock`): ``RUN/.lock``, a run is never replaced whole;
- a store (``inside=False``, :func:`store_lock`): ``.NAME.lock`` next to it, so replacing or
  deleting the store (``--overwrite``) never deletes the lock its writer holds.

Under ``torchrun`` only rank 0 takes the lock (``enabled=env.is_main``); ``agree`` (e.g.
``lambda refused: broadcast_flag(refused, env)``) lets every rank learn that rank 0 was refused
and fail the same way instead of waiting for it in a collective.

``flock`` works between processes of one machine and, on Linux, on NFS (it becomes a POSIX
lock there); a filesystem without locks gets one clear error.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edmcli.errors import EchoSynthError

RUN_LOCK_NAME = ".lock"


class LockedError(EchoSynthError):
    """Another process writes the store or run: one sentence naming it (``holder``)."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


def lock_path(target: str | Path, inside: bool = False) -> Path:
    """The lock file of ``target``: ``TARGET/.lock`` (inside) or ``.NAME.lock`` next to it. The
    target is resolved, so every spelling of one path (relative, absolute, a symlink) shares
    one lock."""
    target = Path(target).resolve()
    return target / RUN_LOCK_NAME if inside else target.with_name(f".{target.name}.lock")


def read_holder(path: str | Path) -> dict[str, Any] | None:
    """What the lock file ``path`` says about its (last) holder, or None when it has none."""
    try:
        data = json.loads(Path(path).read_text() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def exclusive(
    path: str | Path,
    what: str = "store",
    *,
    inside: bool = False,
    enabled: bool = True,
    agree: Callable[[bool], bool] | None = None,
) -> Iterator[Path | None]:
    """Hold the exclusive lock of ``path`` (a store, or with ``inside`` a run folder, created
    if missing) for the ``with`` block; yields the lock file (None when not ``enabled``).

    Never waits: a lock held by a live process raises :class:`LockedError` naming its pid and
    host. ``what`` names the target in that sentence ("store", "run folder"). With ``agree``,
    every process calls ``agree(refused_here)`` once and all of them raise when it is true."""
    target = Path(path)
    lock = lock_path(target, inside)
    fd: int | None = None
    refused: EchoSynthError | None = None
    if enabled:
        try:
            fd = _acquire(lock, target, what)
        except EchoSynthError as exc:
            refused = exc
    if agree is not None and agree(refused is not None) and refused is None:
        if fd is not None:
            _release(fd, lock)
        refused = LockedError(
            f"{what} {target} is in use: another process of this job was refused its lock"
        )
    if refused is not None:
        raise refused
    try:
        yield lock if fd is not None else None
    finally:
        if fd is not None:
            _release(fd, lock)


def run_lock(
    run_dir: str | Path, *, enabled: bool = True, agree: Callable[[bool], bool] | None = None
):
    """:func:`exclusive` for a training run folder (``RUN/.lock``)."""
    return exclusive(run_dir, "run folder", inside=True, enabled=enabled, agree=agree)


def store_lock(
    store: str | Path, *, enabled: bool = True, agree: Callable[[bool], bool] | None = None
):
    """:func:`exclusive` for a dataset store (``.NAME.lock`` next to it; a name too long to
    leave room for it is refused first)."""
    from edmcli.data.store_replace import check_name_length

    check_name_length(store)
    return exclusive(store, "store", inside=False, enabled=enabled, agree=agree)


def _acquire(lock: Path, target: Path, what: str) -> int:
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(20):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refusal(lock, target, what) from None
        except OSError as exc:
            os.close(fd)
            reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
            raise EchoSynthError(
                f"cannot lock {what} {target}: the filesystem refuses a lock on {lock} ({reason})"
            ) from None
        # The previous holder deletes the file while it still holds it: a file locked after
        # that is no longer the one at the path, so open the path again.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            _write_holder(fd, what, target)
            return fd
        os.close(fd)
    raise EchoSynthError(f"cannot lock {what} {target}: {lock} keeps being replaced")


def _write_holder(fd: int, what: str, target: Path) -> None:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": started,
        "what": what,
        "target": str(target.resolve()),
        "command": " ".join(sys.argv)[:500],
    }
    data = (json.dumps(holder, indent=1) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _refusal(lock: Path, target: Path, what: str) -> LockedError:
    holder = None
    for _ in range(25):  # the holder writes its name right after it took the lock
        holder = read_holder(lock)
        if holder and "pid" in holder and _may_be_alive(holder):
            break
        time.sleep(0.01)
    if holder and "pid" in holder:
        who = f"process {holder['pid']} on {holder.get('host', '?')}"
        if holder.get("started"):
            who += f" (since {holder['started']})"
    else:
        who = f"another process (see {lock})"
    return LockedError(
        f"{what} {target} is in use by {who}; wait for it to finish or stop it, then rerun",
        holder,
    )


def _may_be_alive(holder: dict[str, Any]) -> bool:
    """False only for a holder of this host whose process is gone (a stale name that the new
    holder has not overwritten yet)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, TypeError):
        return True
    return True


def _release(fd: int, lock: Path) -> None:
    try:
        if os.path.samestat(os.fstat(fd), os.stat(lock)):
            os.unlink(lock)  # still holding it: a waiting opener re-checks the path
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
