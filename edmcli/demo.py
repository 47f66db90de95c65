"""``echo-synth demo``: the main path on built-in phantom data with tiny settings.

It grows with the tool: today it prepares a phantom dataset store and summarises it.
"""

from __future__ import annotations

from pathlib import Path

from edmcli.console import console, progress
from edmcli.data.prepare import prepare_phantom
from edmcli.data.store import DatasetStore


def run_demo(out: Path, n_patients: int, size: int, seed: int, overwrite: bool) -> dict:
    """Run every stage that exists on phantom data under ``out``; return a summary dict."""
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / "phantom.zarr"
    if store_path.exists() and not overwrite:
        console.print(f"using existing {store_path} (pass --overwrite to rebuild it)")
    else:
        with progress(4 * n_patients, "prepare phantom") as advance:
            prepare_phantom(store_path, n_patients, size, seed, (0.8, 0.1, 0.1), overwrite, advance)
    summary = DatasetStore(store_path).summary()
    console.print(
        f"phantom store {store_path}: {summary['samples']} images, "
        f"{summary['image_size'][0]}×{summary['image_size'][1]}, "
        + ", ".join(f"{k} {v['samples']}" for k, v in summary["splits"].items()),
        highlight=False,
    )
    return {"store": summary}
