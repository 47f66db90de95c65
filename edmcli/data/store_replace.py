"""Putting a store in place: the temporary path a writer fills and renames over its target,
and what ``--overwrite`` may delete (only an echo-synth store or an empty folder,
:func:`check_replaceable`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from edmcli.data.store_format import (
    ATTRS_KEY,
    CARD_FILE,
    CHUNK_FOLDER,
    FORMAT_NAME,
    VERDICTS_FILE,
)
from edmcli.errors import DataError


@contextlib.contextmanager
def atomic_store_path(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``out``; on success it replaces ``out`` by a rename.

    On any error the temporary store is deleted, so a crash never leaves a store at ``out`` that
    looks complete. An existing ``out`` is refused unless ``overwrite``, and even then unless it
    is an echo-synth store or an empty folder (:func:`check_replaceable`).
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise DataError(f"{out} already exists; pass --overwrite to replace it")
        check_replaceable(out)
    if not out.parent.exists():
        out.parent.mkdir(parents=True)
    tmp, old = out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.old")
    _remove_leftover(tmp)
    _remove_leftover(old)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


# The longest name echo-synth derives from a store's: ``STEM-summary.json`` beside a sampled
# store (13 more than its stem), ``.NAME.partial`` and ``.NAME.lock``.
DERIVED_NAME_EXTRA = 13


def check_name_length(out: str | Path, option: str = "--out") -> None:
    """Refuse an output name that the file system takes but that leaves no room for the files
    echo-synth keeps beside it (a legal 255-character name failed on ``.NAME.lock``)."""
    out = Path(out)
    anchor = next((p for p in (out.parent, *out.parent.parents) if p.exists()), Path("."))
    try:
        limit = os.pathconf(anchor, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = limit - DERIVED_NAME_EXTRA
    if len(os.fsencode(out.name)) > longest:
        raise DataError(
            f"{option} name {out.name[:40]}… is {len(os.fsencode(out.name))} bytes long; "
            f"echo-synth keeps files named after it beside it (.NAME.lock, NAME-summary.json), "
            f"so it may be at most {longest} bytes on this file system"
        )


def check_not_an_input(out: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """Raise one DataError when the output ``out`` is one of the command's inputs (``inputs``:
    what each is → its path; None skipped), lies inside one, or holds one: writing or
    ``--overwrite`` there would destroy what the command reads. Paths are compared resolved,
    through symbolic links, whatever the flags."""
    target = Path(out).resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if target == source or source in target.parents or target in source.parents:
            relation = (
                "is" if target == source else "lies inside" if source in target.parents else "holds"
            )
            raise DataError(
                f"--out {out} {relation} the {what} this command reads ({path}); write the "
                "output elsewhere"
            )


def check_replaceable(path: str | Path) -> None:
    """Raise one DataError unless ``--overwrite`` may delete ``path``: only an echo-synth store
    (a Zarr v3 group whose attrs hold the echo-synth marker and nothing but its arrays) or an
    empty folder; never a file, a link, another folder, the current directory or one above it,
    the home directory or one above it. A path that does not exist is fine (nothing to delete)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    refuse = f"--overwrite refuses to delete {path}:"
    if path.is_symlink():
        raise DataError(f"{refuse} it is a symbolic link, not a dataset store")
    target = path.resolve()
    for place, what in ((Path.cwd(), "the current directory"), (_home(), "your home directory")):
        if place is not None and (target == place.resolve() or target in place.resolve().parents):
            raise DataError(f"{refuse} it is {what} or a folder above it")
    if not path.is_dir():
        raise DataError(f"{refuse} it is a file, not a dataset store")
    entries = sorted(path.iterdir())
    if not entries:
        return
    if not is_echo_synth_store(path):
        raise DataError(
            f"{refuse} it is not an echo-synth dataset store; move or delete it yourself, "
            "or choose another --out"
        )
    for entry in entries:
        inside = sorted(p.name for p in entry.iterdir()) if entry.is_dir() else []
        ours = entry.name in ("zarr.json", CARD_FILE, VERDICTS_FILE) or (
            entry.is_dir() and "zarr.json" in inside and set(inside) <= {"zarr.json", CHUNK_FOLDER}
        )
        if not ours:
            raise DataError(
                f"{refuse} it holds {entry.name}, which is not part of the store; move that "
                "out first"
            )


def replace_store(path: str | Path) -> None:
    """Delete ``path`` for ``--overwrite`` after :func:`check_replaceable` allowed it."""
    path = Path(path)
    check_replaceable(path)
    if path.is_dir():
        shutil.rmtree(path)


def is_echo_synth_store(path: str | Path) -> bool:
    """Whether ``path`` holds a Zarr v3 group whose attrs carry the echo-synth marker (complete
    or not); reads only its ``zarr.json``."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_bytes())
        info = meta.get("attributes", {}).get(ATTRS_KEY)
    except (OSError, ValueError, AttributeError):
        return False
    return (
        meta.get("zarr_format") == 3
        and meta.get("node_type") == "group"
        and isinstance(info, dict)
        and info.get("format") == FORMAT_NAME
    )


def _home() -> Path | None:
    try:
        return Path.home()
    except (KeyError, RuntimeError):  # no home directory known
        return None


def _remove_leftover(path: Path) -> None:
    """Delete a ``.NAME.partial``/``.NAME.old`` folder a crashed writer left, if it is ours."""
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink():
        if not any(path.iterdir()) or (path / "zarr.json").is_file():
            shutil.rmtree(path)
            return
    raise DataError(f"{path} is in the way and is not a store that echo-synth left; move it away")
