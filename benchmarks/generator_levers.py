"""One generator lever, measured on a finished demo: train a variant of the demo's diffusion model
(same store, same Γ-VAE unless ``--vae`` names another), sample its training and probe stores as
the demo does, evaluate them beside the demo's real-trained networks, and append one row.

    python benchmarks/generator_levers.py DEMO_DIR NAME [--set KEY=VALUE ...] [--vae RUN]
        [--sample KEY=VALUE ...] [--reuse RUN]

``--set`` overrides a ``train-diffusion`` setting (``steps=1600``, ``latent_norm=centred``,
``ema_decay=0.99``), ``--sample`` a ``sample`` option (``nfe=79``); ``--reuse`` samples an existing
run instead of training. The row (``DEMO_DIR/levers/rows.jsonl``, and printed as a Markdown table
of every row so far): label fidelity and classifier accuracy on the probe store (test maps),
decoder ceiling, HF/R3/AC1 of the synthetic store, synthetic-trained mean Dice and view accuracy
with the real-trained ones and the patient-bootstrap intervals of the gaps, training and sampling
seconds, sampling images/s. The evaluation runs in ``DEMO_DIR/evaluation`` so the real-trained
networks of the demo are reused, not retrained; each lever's report is kept in its folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from edmcli.settings import PIPELINES

DEMO = PIPELINES["demo"]


def _value(text: str) -> Any:
    return yaml.safe_load(text)


def _pairs(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.replace("-", "_")] = _value(value)
    return out


def _estimate(estimate: dict[str, Any] | None) -> dict[str, float] | None:
    if not estimate:
        return None
    boot = estimate["patient_bootstrap"]
    return {"value": estimate["value"], "low": boot["ci_low"], "high": boot["ci_high"]}


def row_of(report: dict[str, Any], store: Path) -> dict[str, Any]:
    """The lever's numbers from an evaluation ``report`` of [real, ``store``]."""
    from edmcli.data.store import DatasetStore
    from edmcli.data.texture import store_texture

    row: dict[str, Any] = {}
    for run in report["runs"]:
        metric = "dice_mean" if run["task"] == "seg" else "accuracy"
        key = f"{run['task']}_{run['kind']}"
        row[key] = _estimate(run["metrics"].get(metric))
        if run["kind"] == "synthetic":
            row[f"{run['task']}_gap"] = _estimate((run.get("gap_to_reference") or {}).get(metric))
    quality = report.get("quality") or {}
    judged = (quality.get("stores") or [{}])[0]
    summary = judged.get("summary") or {}
    row["label_fidelity"] = summary.get("label_dice")
    row["synthetic_accuracy"] = summary.get("synthetic_accuracy")
    row["diversity"] = summary.get("diversity")
    real = (quality.get("real") or {}).get("summary") or {}
    row["real_label_fidelity"] = real.get("label_dice")
    ceiling = ((judged.get("decoder_ceiling") or {}).get("label_fidelity") or {}).get("all")
    row["decoder_ceiling"] = ceiling["dice_mean"] if ceiling else None
    row["texture"] = store_texture(DatasetStore(store)).as_tuple()
    return row


def reconstruction_texture(vae_run: Path, store: Path, n: int = 80) -> tuple[float, ...]:
    """HF, R3, AC1 of the Γ-VAE's reconstructions of the first ``n`` test images (the texture a
    perfect generator of its latent space would reach)."""
    import torch

    from edmcli.data.dataset import EchoDataset
    from edmcli.data.labels import sector_mask
    from edmcli.data.texture import mean_texture
    from edmcli.runs.vae_run import load_vae_run

    vae = load_vae_run(vae_run, torch.device("cpu")).model
    data = EchoDataset(str(store), splits="test")
    items = [data[i] for i in range(min(n, len(data)))]
    images = torch.stack([it["image"] for it in items])
    labels = torch.stack([it["labels"] for it in items])
    with torch.no_grad():
        sector = sector_mask(labels)
        recon = vae.decode(vae.encode(images, sector), sector, labels)
    return mean_texture(recon.numpy(), labels.numpy()).as_tuple()


def latent_match(run: Path, store: Path, n: int = 64, nfe: int = DEMO["nfe"]) -> dict[str, float]:
    """Do generated latents look like encoded real ones? For the first ``n`` train maps: the
    encoded latents of their real images and the latents the run generates for them (Heun at
    ``nfe``, undone normalisation, before decoding), compared inside the latent sector: the
    mean and the std over images at each position (correlation of the two maps, ratio of their
    averages), and HF, the share of power above half of Nyquist (:mod:`edmcli.data.texture`)."""
    import numpy as np
    import torch

    from edmcli.data.dataset import EchoDataset
    from edmcli.data.labels import sector_mask
    from edmcli.data.texture import high_frequency_share
    from edmcli.runs.diffusion_run import load_diffusion_run
    from edmcli.runs.folder import load_run_config
    from edmcli.sampling.nfe import plan
    from edmcli.sampling.pipeline import generate

    model = load_run_config(run)["model"]
    loaded = load_diffusion_run(model, run, torch.device("cpu"))
    vae, norm = loaded.vae.model, loaded.settings.norm
    data = EchoDataset(str(store), splits="train")
    items = [data[i] for i in range(min(n, len(data)))]
    images = torch.stack([it["image"] for it in items])
    labels = torch.stack([it["labels"] for it in items])
    classes = None
    if loaded.settings.class_cond:
        from edmcli.runs.diffusion_run import class_ids

        classes = class_ids(loaded.settings.class_cond, torch.tensor([it["view"] for it in items]),
                            torch.tensor([it["phase"] for it in items]))  # fmt: skip
    captured = []

    def keep(x, sector, labels):
        captured.append(norm.denormalise(x.float()))
        return torch.zeros(x.shape[0], 1, *sector.shape[-2:])

    with torch.no_grad():
        real = vae.encode(images, sector_mask(labels))
        for lo in range(0, len(items), 16):
            generate(loaded.net, model, labels[lo : lo + 16], range(lo, min(lo + 16, len(items))),
                     loaded.settings.net_size, solver="heun", steps=plan("heun", nfe).steps,
                     decode=keep, outside_value=norm.outside_value,
                     channels=loaded.settings.channels,
                     class_labels=None if classes is None else classes[lo : lo + 16])  # fmt: skip
    fake = torch.cat(captured)[:, :1]  # channel 0: the one tied to the image
    real = real[:, :1]
    inside = vae.latent_sector(sector_mask(labels)).bool()
    count = inside.float().sum(0)
    where = (count >= 2)[0]

    def moments(z):
        z = torch.where(inside, z, torch.zeros_like(z))
        mean = z.sum(0) / count.clamp_min(1)
        var = (torch.where(inside, z - mean, torch.zeros_like(z)) ** 2).sum(0) / count.clamp_min(1)
        return mean[0][where].numpy(), var[0][where].sqrt().numpy()

    (mr, sr), (mf, sf) = moments(real), moments(fake)

    def hf(z):
        return float(np.nanmean([high_frequency_share(a[0].numpy(), m[0].numpy())
                                 for a, m in zip(z, inside, strict=True)]))  # fmt: skip

    return {
        "mean_map_corr": float(np.corrcoef(mr, mf)[0, 1]),
        "std_map_corr": float(np.corrcoef(sr, sf)[0, 1]),
        "std_ratio": float(sf.mean() / sr.mean()),
        "mean_shift": float(mf.mean() - mr.mean()),
        "hf_real": hf(real),
        "hf_generated": hf(fake),
    }


def table(rows: list[dict[str, Any]]) -> str:
    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}"

    def est(e):
        return "–" if not e else f"{100 * e['value']:.1f}"

    def gap(e):
        if not e:
            return "–"
        return f"{100 * e['value']:+.1f} [{100 * e['low']:+.1f}, {100 * e['high']:+.1f}]"

    lines = [
        "| lever | label fid. (real) | ceiling | cls acc. synth | HF / R3 / AC1 | Dice real / syn"
        " | Dice gap | acc. real / syn | acc. gap | latent std ratio / HF gen (real) | recon HF"
        " | train s | sample s | img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        hf, r3, ac1 = r["texture"]
        m = r.get("latent_match") or {}
        lines.append(
            f"| {r['name']} | {pct(r['label_fidelity'])} ({pct(r['real_label_fidelity'])}) | "
            f"{pct(r['decoder_ceiling'])} | {pct(r['synthetic_accuracy'])} | "
            f"{hf:.3f} / {r3:.3f} / {ac1:.3f} | {est(r.get('seg_real'))} / "
            f"{est(r.get('seg_synthetic'))} | {gap(r.get('seg_gap'))} | "
            f"{est(r.get('cls_real'))} / {est(r.get('cls_synthetic'))} | {gap(r.get('cls_gap'))} | "
            f"{m.get('std_ratio', float('nan')):.2f} / {m.get('hf_generated', float('nan')):.3f} "
            f"({m.get('hf_real', float('nan')):.3f}) | "
            f"{(r.get('recon_texture') or [float('nan')])[0]:.3f} | {r['train_s']:.0f} | "
            f"{r['sample_s']:.0f} | "
            f"{r['images_per_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("demo", type=Path)
    parser.add_argument("name")
    parser.add_argument("--set", action="append", default=[], dest="train_set")
    parser.add_argument("--sample", action="append", default=[], dest="sample_set")
    parser.add_argument("--vae", type=Path)
    parser.add_argument(
        "--vae-set",
        action="append",
        default=[],
        help="train a Γ-VAE for this lever with this train-vae setting",
    )
    parser.add_argument("--reuse", type=Path)
    parser.add_argument("--stores", type=Path, nargs=2, metavar=("SYNTHETIC", "PROBE"),
                        help="with --reuse: the run's stores, already sampled")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from edmcli.evaluation.evaluate import evaluate
    from edmcli.sampling.preview import preview_samples
    from edmcli.sampling.sample import sample
    from edmcli.training.diffusion import train_diffusion

    demo, model, nfe = args.demo, DEMO["model"], DEMO["nfe"]
    store = demo / f"phantom{DEMO['size']}.zarr"
    folder = demo / "levers" / args.name
    folder.mkdir(parents=True, exist_ok=True)
    run = args.reuse or folder / "run"
    train_s = 0.0
    vae, vae_row = args.vae or demo / "runs" / f"vae-l{DEMO['latent']}", {}
    if args.vae_set:
        from edmcli.training.vae import train_vae

        vae = folder / "vae"
        started = time.perf_counter()
        summary = train_vae(store, DEMO["latent"], run=vae, preset=DEMO["preset"], device="cpu",
                            seed=args.seed, **_pairs(args.vae_set))  # fmt: skip
        summary = summary or {}
        vae_row = {"vae_s": time.perf_counter() - started,
                   "vae_psnr": summary.get("val masked PSNR (dB)"),
                   "map_following": summary.get("map following (0 latent, 1 map)")}  # fmt: skip
    vae_row["recon_texture"] = reconstruction_texture(vae, store)
    if args.reuse is None:
        settings = {"class_cond": DEMO["class_cond"], **_pairs(args.train_set)}
        started = time.perf_counter()
        train_diffusion(model, store, vae=vae,
                        run=run, preset=DEMO["preset"], device="cpu", seed=args.seed,
                        preview=preview_samples, **settings)  # fmt: skip
        train_s = time.perf_counter() - started
    options = {"nfe": nfe, **_pairs(args.sample_set)}
    synthetic, probe = args.stores or (folder / "synthetic.zarr", folder / "probe.zarr")
    started = time.perf_counter()
    sample(
        run=run,
        compile=False,
        out=synthetic,
        device="cpu",
        seed=args.seed,
        splits="train",
        **options,
    )  # fmt: skip  (a complete store: checked, not sampled again)
    sample_s = time.perf_counter() - started
    sample(run=run, compile=False, out=probe, device="cpu", seed=args.seed, splits="test", k=1,
           **options)  # fmt: skip
    from edmcli.data.store import DatasetStore

    n_images = len(DatasetStore(synthetic))
    match = latent_match(run, store)
    report = evaluate([str(store), str(synthetic)], store, demo / "evaluation",
                      preset=DEMO["preset"], device="cpu", seed=args.seed, fidelity=True,
                      probes=[probe])  # fmt: skip
    shutil.copy(demo / "evaluation" / "report.json", folder / "report.json")
    row = {"name": args.name, "set": args.train_set, "sample": args.sample_set,
           **row_of(report, synthetic), **vae_row, "latent_match": match, "train_s": train_s,
           "sample_s": sample_s,
           "images_per_s": n_images / sample_s}  # fmt: skip
    rows_file = demo / "levers" / "rows.jsonl"
    with rows_file.open("a") as f:
        f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    print(table(rows))


if __name__ == "__main__":
    main()
