"""The demo pipeline: the main path on built-in phantom data with tiny settings (CPU minutes).

prepare 64² phantom echoes → Γ-VAE L64 → EDM-L64 → a synthetic store → evaluation against the
real-trained segmenter and view classifier. Every step resumes, so rerunning continues.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edmcli.console import console
from edmcli.errors import EchoSynthError

DEMO_SIZE = 64
DEMO_MODEL = "edm-l64"
DEMO_NFE = 35  # Heun with 18 steps: the tiny model needs more than 5 steps (NFE 9)


def run_demo(
    out: Path = Path("demo"), n_patients: int = 24, seed: int = 0, device: str = "auto"
) -> dict[str, Any] | None:
    """Run the demo under ``out``; returns the evaluation report (None on non-main ranks)."""
    from edmcli.data.prepare import prepare
    from edmcli.evaluation.evaluate import evaluate
    from edmcli.sampling.preview import preview_samples
    from edmcli.sampling.sample import sample
    from edmcli.training.diffusion import train_diffusion
    from edmcli.training.vae import train_vae

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EchoSynthError(f"demo output {out} is a file; name a folder")
    if n_patients < 5:
        raise EchoSynthError(
            f"the demo needs at least 5 phantom patients (train, validation and test), got "
            f"{n_patients}"
        )
    store = out / "phantom64.zarr"
    if store.exists():  # a rerun continues; with other data it would silently mix two demos
        from edmcli.data.store import DatasetStore

        held = DatasetStore(store).column("patient")
        count = len(set(held.tolist()))
        if count != n_patients or not all(p.startswith(f"phantom-s{seed}-") for p in held):
            raise EchoSynthError(
                f"{out} holds a demo of {count} phantom patients (another --n-patients or "
                f"--seed); rerun with those settings to continue it, or use another --out"
            )
    vae_run, diffusion_run = out / "runs" / "vae-l64", out / "runs" / DEMO_MODEL
    synthetic = out / "synthetic" / f"{DEMO_MODEL}-nfe{DEMO_NFE}.zarr"

    def prepare_step():
        if store.exists():
            console.print(f"using {store}", highlight=False)
            return
        result = prepare(store, source="phantom", size=DEMO_SIZE, n_patients=n_patients, seed=seed)
        console.print(f"wrote {result.path}: {result.samples} images", highlight=False)

    steps = [
        ("prepare", prepare_step),
        ("train-vae", lambda: train_vae(
            store, 64, run=vae_run, preset="tiny", device=device, seed=seed,
        )),
        ("train-diffusion", lambda: train_diffusion(
            DEMO_MODEL, store, vae=vae_run, run=diffusion_run, preset="tiny", device=device,
            seed=seed, preview=preview_samples,
        )),
        ("sample", lambda: sample(
            run=diffusion_run, nfe=DEMO_NFE, compile=False, out=synthetic, device=device,
            seed=seed,
        )),
        ("evaluate", lambda: evaluate(
            [str(store), str(synthetic)], store, out / "evaluation", preset="tiny",
            device=device, seed=seed,
        )),
    ]  # fmt: skip
    report = None
    for name, step in steps:
        console.rule(f"[bold]demo: {name}")
        report = step()
    console.rule("[bold]demo: done")
    console.print(f"everything is under {out}", highlight=False)
    return report
