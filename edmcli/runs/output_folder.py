"""The one rule for the report folders that ``evaluate``, ``bench``, ``study`` and ``demo`` write
into (``--out``): a folder is written only when it is new, empty, or marked as this kind of
echo-synth output.

:func:`check_output_folder` refuses, before anything is computed, a path that is a file, the
filesystem root, the home directory, a folder above it or above the current one, and an existing
non-empty folder that holds no :data:`MARKER` of the same kind: the command would otherwise replace
a user's own ``report.md`` or ``bench.json``. :func:`mark_output_folder` creates the folder and its
marker when the command starts writing, so a rerun resumes into it. A folder written by a version
before the marker is recognised by the record only echo-synth writes there (:data:`RECORDS`: its
``report.json``, ``bench.json``, ``study.json``, or the demo's evaluation report or phantom store)
and is marked on its next use.

Dataset stores and run folders have rules of their own (:mod:`edmcli.data.store_replace`,
:func:`edmcli.runs.folder.prepare_run_dir`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edmcli.data.store_replace import is_echo_synth_store
from edmcli.errors import DataError

MARKER = ".echo-synth-output.json"


def _record_with(name: str, *keys: str) -> Callable[[Path], bool]:
    """A test for a folder holding the JSON record ``name`` with every one of ``keys``."""

    def test(folder: Path) -> bool:
        try:
            record = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(record, dict) and all(key in record for key in keys)

    return test


def _demo(folder: Path) -> bool:
    evaluated = _record_with("evaluation/report.json", "settings", "runs", "test")(folder)
    return evaluated or any(is_echo_synth_store(p) for p in folder.glob("phantom*.zarr"))


# kind → how to recognise its folder written before the marker existed: the record only
# echo-synth writes there (the demo's: its evaluation report, or its phantom store)
RECORDS: dict[str, Callable[[Path], bool]] = {
    "evaluation": _record_with("report.json", "settings", "runs", "test"),
    "bench": _record_with("bench.json", "environment", "settings", "scales"),
    "study": _record_with("study.json", "format", "stages"),
    "demo": _demo,
}


def _marker_kind(folder: Path) -> str | None:
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record.get("kind") if isinstance(record, dict) else None


def check_output_folder(out: str | Path, kind: str, option: str = "--out") -> None:
    """Raise one DataError unless ``kind``'s command may write into ``out`` (module docstring).
    Writes nothing."""
    if kind not in RECORDS:
        raise ValueError(f"unknown output kind {kind!r}; known: {', '.join(RECORDS)}")
    path = Path(out)
    target = path.resolve()
    refuse = f"{option} {out}"
    if target == Path(target.anchor):
        raise DataError(f"{refuse} is the filesystem root; name a folder for the {kind} output")
    home = Path(os.path.expanduser("~")).resolve()
    if target == home or target in home.parents or target in Path.cwd().resolve().parents:
        raise DataError(
            f"{refuse} is your home directory or a folder above it or above the current one; "
            f"name a new folder for the {kind} output"
        )
    if path.exists() and not path.is_dir():
        raise DataError(f"{refuse} is a file, not a folder")
    if not path.exists() or not any(path.iterdir()):
        return
    mine = _marker_kind(path)
    if mine == kind or (mine is None and RECORDS[kind](path)):
        return
    what = f"echo-synth {mine} output" if mine else "files echo-synth did not write"
    raise DataError(
        f"{refuse} already holds {what}; the {kind} output would replace them, so name a new or "
        "empty folder"
    )


def mark_output_folder(out: str | Path, kind: str, settings: dict[str, Any] | None = None) -> None:
    """Create ``out`` (and parents) and its marker of ``kind`` unless it has one: from now on the
    folder is ``kind``'s output, which reruns write into."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    if _marker_kind(path) == kind:
        return
    tmp = path / f"{MARKER}.tmp"
    record = {"tool": "echo-synth", "kind": kind, "settings": settings or {}}
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path / MARKER)
