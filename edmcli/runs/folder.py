"""A training run folder: ``config.yaml`` (resolved), ``checkpoints/``, ``metrics.jsonl``, grids.

Rerunning the same command on an existing run resumes it; a command whose settings would change
the training result is refused (settings that only change the length or the logging may change).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from edmcli.errors import EchoSynthError

# Keys that may differ between the run's config and a resuming command.
RESUMABLE_CHANGES = frozenset(
    {"steps", "epochs", "kimg", "checkpoint_every", "log_every", "grid_every", "num_workers",
     "device", "keep_checkpoints", "eval_batches"}
)  # fmt: skip


def prepare_run_dir(run_dir: Path, config: dict[str, Any], is_main: bool = True) -> bool:
    """Create the run folder or check that ``config`` may resume it. Returns True on resume."""
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        try:
            saved = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise EchoSynthError(f"{config_path} is not valid YAML ({exc})") from None
        diffs = [
            key
            for key in sorted(set(saved) | set(config))
            if key not in RESUMABLE_CHANGES and saved.get(key) != config.get(key)
        ]
        if diffs:
            key = diffs[0]
            raise EchoSynthError(
                f"run {run_dir} was started with {key}={saved.get(key)!r} but this command asks "
                f"for {key}={config.get(key)!r}; resume with the same settings or use another --run"
            )
        if is_main:
            config_path.write_text(yaml.safe_dump(config, sort_keys=True))
        return True
    if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / "checkpoints").exists():
        raise EchoSynthError(f"{run_dir} exists and is not a training run; choose another --run")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(config, sort_keys=True))
    return False


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
