"""Checkpoints: written atomically (temporary file, fsync, rename), validated on resume.

A checkpoint file is never changed in place (a new one is a new file renamed over the name), so
a hard link to it (:func:`link_or_copy`) is a frozen copy that costs no space: pruning or
replacing the original only removes a name.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from edmcli.errors import EchoSynthError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d{8})\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"checkpoint-{step:08d}.pt"


def save_checkpoint(state: dict[str, Any], path: Path, keep: int | None = 2) -> None:
    """Write ``state`` to ``path`` atomically, then keep only the newest ``keep`` numbered
    checkpoints of its folder (None: prune nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        disk_full = _disk_full(exc, path.parent)
        tmp.unlink(missing_ok=True)  # a partial file would keep the disk full
        if disk_full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise
    if keep is not None:
        for old in list_checkpoints(path.parent)[:-keep]:
            old.unlink(missing_ok=True)


DISK_FULL_BYTES = 1 << 20  # a failed write with less free space than this: the disk was full


def _disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed checkpoint write failed for want of space: an ENOSPC/EDQUOT, or torch's
    writer error (``RuntimeError: [enforce fail at inline_container.cc] ...``, which names no
    cause) on a disk left with (almost) no free space."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(exc, RuntimeError):
        return False
    try:
        return shutil.disk_usage(folder).free < DISK_FULL_BYTES
    except OSError:
        return False


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir / "checkpoints")
    return found[-1] if found else None


RESUME_ADVICE = "delete it to resume from the one before"


def _short_reason(exc: Exception, limit: int = 120) -> str:
    """The first line of an exception's message, cut at a word boundary (never mid-word)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " …"


def load_checkpoint(
    path: Path, map_location: str | torch.device = "cpu", advice: str = RESUME_ADVICE
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, or raise one clear error (ending
    with ``advice``: what the caller's user can do)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, ...
        raise EchoSynthError(
            f"checkpoint {path} is corrupt ({_short_reason(exc)}); {advice}"
        ) from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise EchoSynthError(f"checkpoint {path} is not an echo-synth training checkpoint")
    return state


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_checkpoint(recorded: str | Path, run_dir: Path) -> Path:
    """The file that a recorded checkpoint path of the run ``run_dir`` names: the path itself
    (absolute, or relative to the working directory as older runs recorded it) when it exists,
    else the checkpoint of that name in ``run_dir/checkpoints`` (a run read from another folder
    than the one it was recorded in). Returns the recorded path when neither exists."""
    recorded = Path(recorded)
    if recorded.is_file():
        return recorded
    candidate = Path(run_dir) / "checkpoints" / recorded.name
    return candidate if candidate.is_file() else recorded


_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}


def link_or_copy(source: Path, dest: Path) -> str:
    """Make ``dest`` a frozen copy of the checkpoint ``source``: a hard link where the filesystem
    allows one ("link": no space, no time), else an atomic copy ("copy": another filesystem, or
    one without hard links). A missing ``source`` raises FileNotFoundError."""
    source, dest = Path(source), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    try:
        os.link(source, dest)
        return "link"
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
    tmp = dest.with_name(f".{dest.name}.tmp")
    with open(source, "rb") as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, dest)
    return "copy"
