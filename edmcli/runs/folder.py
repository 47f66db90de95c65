"""A training run folder: ``config.yaml`` (resolved), ``checkpoints/``, ``metrics.jsonl``, grids.

Rerunning the same command on an existing run resumes it; once the run has a checkpoint, a
command whose settings would change the training result is refused (settings that only change
the length or the logging may change). A run with no checkpoint yet has nothing to resume: a
command with other settings (the corrected one after a bad setting) starts it afresh.

A run built on a checkpoint of another run (a latent model on its Γ-VAE) keeps a frozen copy of
it (:func:`freeze_dependency`, in ``RUN/NAME/``), so the other run may be lengthened (pruning
its old checkpoints), moved or deleted without breaking this one. Writers hold the run's lock
(:func:`edmcli.runs.lock.run_lock`, the file ``RUN/.lock``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edmcli.errors import EchoSynthError
from edmcli.runs.checkpoint import file_sha256, link_or_copy, list_checkpoints
from edmcli.runs.lock import RUN_LOCK_NAME

# Keys that may differ between the run's config and a resuming command.
RESUMABLE_CHANGES = frozenset(
    {"steps", "epochs", "kimg", "checkpoint_every", "log_every", "grid_every", "num_workers",
     "device", "keep_checkpoints", "eval_batches"}
)  # fmt: skip
CONFIG_FILE = "config.yaml"
# The record of a NaN/Inf stop (:func:`record_nan_stop`): while it exists, a rerun may change
# the settings that cure a diverging run (:data:`NAN_CORRECTIONS`) and resumes from the last
# good checkpoint with them.
NAN_STOP_FILE = "nan_stop.json"
NAN_CORRECTIONS = frozenset({"lr", "precision", "grad_clip", "warmup_steps", "weight_decay"})
# What a first attempt that failed before its first checkpoint leaves and a fresh start removes
# (so nothing of it mixes into the new run's records).
ATTEMPT_RECORDS = ("metrics.jsonl", "summary.json", "checkpoints/best.pt", "grids", NAN_STOP_FILE)
# Files that do not make a folder "something else than a training run".
_HOUSEKEEPING = {RUN_LOCK_NAME, f".{CONFIG_FILE}.tmp"}


def prepare_run_dir(run_dir: Path, config: dict[str, Any], is_main: bool = True) -> bool:
    """Create the run folder, or check that ``config`` may continue it. Returns True when the
    run resumes from a checkpoint.

    - No ``config.yaml``: a new run; the folder must be missing, empty or a run's leftovers.
    - A checkpoint in ``checkpoints/``: every setting must equal the recorded one except
      :data:`RESUMABLE_CHANGES` (whose new values are recorded); a differing one is refused.
      Paths that name the same file are the same setting.
    - ``config.yaml`` but no checkpoint yet (a command that failed before its first checkpoint,
      e.g. on a bad setting or a missing weights file): a differing (or unreadable) config is
      *replaced*, not refused, and the failed attempt's records (:data:`ATTEMPT_RECORDS`) are
      removed: the corrected command trains this run from step 0.

    Only the main rank writes; the others check the same way."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    has_checkpoint = bool(list_checkpoints(run_dir / "checkpoints"))
    if config_path.is_file():
        try:
            saved = yaml.safe_load(config_path.read_text()) or {}
            problem = None
        except yaml.YAMLError as exc:
            saved, problem = {}, f"{config_path} is not valid YAML ({exc})"
        diffs = [
            key
            for key in sorted(set(saved) | set(config))
            if key not in RESUMABLE_CHANGES and not _same_setting(saved.get(key), config.get(key))
        ]
        if has_checkpoint and problem:
            raise EchoSynthError(f"{problem}; the run has checkpoints, so it cannot be resumed")
        _check_same_kind(run_dir, saved, config)
        nan_stop = _read_nan_stop(run_dir) if has_checkpoint and diffs else None
        if nan_stop is not None and set(diffs) <= NAN_CORRECTIONS:
            diffs = []  # a corrected rerun of a run stopped on NaN: resume with the cure
            if is_main:
                (run_dir / NAN_STOP_FILE).unlink(missing_ok=True)
        if has_checkpoint and diffs:
            key = diffs[0]
            if nan_stop is not None:
                raise EchoSynthError(
                    f"run {run_dir} stopped on a NaN loss at step {nan_stop.get('step')}; its "
                    f"rerun may change only {', '.join(sorted(NAN_CORRECTIONS))} (resuming from "
                    f"its last good checkpoint), not {key}; for other settings use another --run"
                )
            raise EchoSynthError(
                f"run {run_dir} was started with {key}={saved.get(key)!r} but this command asks "
                f"for {key}={config.get(key)!r}; resume with the same settings or use another --run"
            )
        if is_main:
            if not has_checkpoint and (diffs or problem):
                _remove_attempt_records(run_dir)
            _write_config(config_path, config)
        return has_checkpoint
    if has_checkpoint:
        raise EchoSynthError(
            f"{run_dir} has checkpoints but no {CONFIG_FILE}, so its settings are unknown; "
            "choose another --run"
        )
    if run_dir.exists() and not (run_dir / "checkpoints").exists():
        if any(p.name not in _HOUSEKEEPING for p in run_dir.iterdir()):
            raise EchoSynthError(
                f"{run_dir} exists and is not a training run; choose another --run"
            )
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_config(config_path, config)
    return False


_KIND_NAMES = {"vae": "Γ-VAE"}


def _check_same_kind(run_dir: Path, saved: dict[str, Any], config: dict[str, Any]) -> None:
    """A run folder of one command never continues as another's (``train-diffusion --run`` on
    a Γ-VAE run was reported as a ``base_channels`` mismatch)."""
    was, asked = saved.get("kind"), config.get("kind")
    if was is not None and asked is not None and was != asked:
        raise EchoSynthError(
            f"{run_dir} is a {_KIND_NAMES.get(was, was)} run, not a "
            f"{_KIND_NAMES.get(asked, asked)} run; choose another --run"
        )


def record_nan_stop(run_dir: Path, step: int, checkpoint: Path | None) -> None:
    """Record that training stopped on a NaN/Inf at ``step`` (:data:`NAN_STOP_FILE`): the
    rerun with a cure (:data:`NAN_CORRECTIONS`) is then accepted on this run."""
    record = {"step": int(step), "last_good_checkpoint": checkpoint.name if checkpoint else None}
    path = Path(run_dir) / NAN_STOP_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


def _read_nan_stop(run_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((Path(run_dir) / NAN_STOP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _same_setting(saved: Any, asked: Any) -> bool:
    """Equal, or two spellings of one existing file (a relative path recorded by older runs
    and the absolute one recorded now)."""
    if saved == asked:
        return True
    if isinstance(saved, str) and isinstance(asked, str) and os.sep in saved + asked:
        try:
            return os.path.samefile(saved, asked)
        except (OSError, ValueError):
            return False
    return False


def _write_config(path: Path, config: dict[str, Any]) -> None:
    """Write ``config.yaml`` atomically (other ranks may be reading it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=True))
    os.replace(tmp, path)


def _remove_attempt_records(run_dir: Path) -> None:
    for name in ATTEMPT_RECORDS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def load_run_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise EchoSynthError(f"{run_dir} is not a training run (no config.yaml)")
    return yaml.safe_load(path.read_text()) or {}


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step. On resume, lines past the resumed
    step are dropped so the log reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        if enabled and path.is_file():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
            path.write_text("".join(f"{line}\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


PATIENTS_FILE = "training_patients.json"


def record_training_patients(run_dir: Path, store: str | Path, splits=("train", "val")) -> None:
    """Write the patients whose images the run learns from (or monitors) to
    ``training_patients.json``, so evaluation can refuse test sets that overlap them."""
    from edmcli.data.store import DatasetStore

    reader = DatasetStore(store)
    record = {
        "store": str(Path(store).resolve()),
        "source": reader.info.get("provenance", {}),
        "splits": list(splits),
        "patients": reader.patients(list(splits)),
    }
    (Path(run_dir) / PATIENTS_FILE).write_text(json.dumps(record, indent=2))


def load_training_patients(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / PATIENTS_FILE
    if not path.is_file():
        raise EchoSynthError(f"{run_dir} does not record its training patients ({PATIENTS_FILE})")
    return json.loads(path.read_text())


SOURCE_FILE = "source.json"


@dataclass(frozen=True)
class Dependency:
    """A checkpoint of another run that a run is built on (a latent model's Γ-VAE)."""

    name: str  # the frozen copy's folder inside the dependant run, e.g. "vae"
    run: Path  # the source run
    checkpoint: Path  # the source run's checkpoint in use
    sha256: str  # its hash, as the dependant recorded it


@dataclass(frozen=True)
class FrozenDependency:
    """The frozen copy of a :class:`Dependency`: ``folder`` is a run folder of its own (the
    source's ``config.yaml`` and JSON records, ``checkpoints/`` with the one checkpoint)."""

    folder: Path
    checkpoint: Path
    source_run: Path
    source_checkpoint: Path
    sha256: str
    how: str  # "link" or "copy"


def freeze_dependency(run_dir: Path, dependency: Dependency) -> FrozenDependency:
    """Give ``run_dir`` its own frozen copy of ``dependency`` in ``RUN/NAME/``: the source run's
    ``config.yaml`` and top-level JSON records (``training_patients.json``,
    ``latent_stats.json``, ...) copied, its checkpoint hard-linked (same filesystem: no space,
    no time) or else copied, checked against the recorded hash, and ``source.json`` naming the
    source. Nothing done when the copy already holds that checkpoint (a resume); a copy of
    another checkpoint is replaced. Call it on the main rank while holding the run's lock."""
    run_dir = Path(run_dir)
    frozen = frozen_dependency(run_dir, dependency.name)
    if frozen is not None and frozen.sha256 == dependency.sha256 and frozen.checkpoint.is_file():
        return frozen
    source_run, source = Path(dependency.run), Path(dependency.checkpoint)
    tmp = run_dir / f".{dependency.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "checkpoints").mkdir(parents=True)
        for item in sorted(source_run.iterdir()):
            if item.is_file() and (item.name == CONFIG_FILE or item.suffix == ".json"):
                shutil.copy2(item, tmp / item.name)
        copy = tmp / "checkpoints" / source.name
        try:
            how = link_or_copy(source, copy)
        except FileNotFoundError:
            raise EchoSynthError(
                f"the checkpoint {source} of {source_run} no longer exists (pruned or deleted "
                "since it was chosen); rerun the command"
            ) from None
        if file_sha256(copy) != dependency.sha256:
            raise EchoSynthError(
                f"the checkpoint {source} of {source_run} changed since it was chosen (its hash "
                "differs); rerun the command"
            )
        record = {"run": str(source_run.resolve()), "checkpoint": str(source.resolve()),
                  "sha256": dependency.sha256, "how": how}  # fmt: skip
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2))
        dest = run_dir / dependency.name
        if dest.exists():
            old = run_dir / f".{dependency.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = frozen_dependency(run_dir, dependency.name)
    assert result is not None
    return result


def frozen_dependency(run_dir: Path, name: str) -> FrozenDependency | None:
    """The frozen copy ``RUN/NAME/`` written by :func:`freeze_dependency`, or None (a run that
    predates them, or one without that dependency)."""
    folder = Path(run_dir) / name
    try:
        record = json.loads((folder / SOURCE_FILE).read_text())
        source_checkpoint = Path(record["checkpoint"])
        return FrozenDependency(
            folder=folder.resolve(),
            checkpoint=folder.resolve() / "checkpoints" / source_checkpoint.name,
            source_run=Path(record["run"]),
            source_checkpoint=source_checkpoint,
            sha256=str(record["sha256"]),
            how=str(record.get("how", "copy")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
