"""The quality section of ``evaluate --fidelity`` (:mod:`edmcli.evaluation.fidelity`): the decoder
ceiling, feature distances of the real set against itself, diversity, the offline LPIPS and
Inception notes, and ``evaluate --fidelity`` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fidelity_fakes import PNG, RollVAE, label_copy_store, real_test_set, reference_nets
from typer.testing import CliRunner

from edmcli.cli import app
from edmcli.data.store import DatasetStore
from edmcli.evaluation import fidelity as fd
from edmcli.evaluation.image_sets import ImageSet, load_synthetic
from edmcli.evaluation.inception import build_inception, inception_weights_path
from edmcli.evaluation.judges import label_fidelity, run_networks, view_accuracy

runner = CliRunner()


# --------------------------------------------------------------------------- decoder ceiling
def test_decoder_ceiling_is_the_label_fidelity_of_the_reconstructions(phantom_store, tmp_path):
    copies = load_synthetic([str(label_copy_store(phantom_store, tmp_path / "c.zarr"))], None, 0)
    exact = fd.decoder_ceiling(reference_nets(32), RollVAE(0), copies)
    assert exact["label_fidelity"]["all"]["dice_mean"] == 1.0 and exact["psnr_db"] > 100
    assert exact["images"] == len(copies.images) and exact["seconds"] > 0
    # a decoder that misplaces structures by 3 columns scores what a generator doing so scores
    shifted = fd.decoder_ceiling(reference_nets(32), RollVAE(3), copies)
    rolled = load_synthetic([str(label_copy_store(phantom_store, tmp_path / "r.zarr", shift=3))],
                            None, 0)  # fmt: skip
    direct = run_networks(reference_nets(32), rolled.images)
    want = label_fidelity(direct.seg_pred, rolled.labels, rolled.views)
    assert shifted["label_fidelity"]["all"]["dice_mean"] == pytest.approx(want["all"]["dice_mean"])
    assert shifted["label_fidelity"]["all"]["dice_mean"] < 1.0
    assert shifted["classifier_accuracy"] == view_accuracy(direct.cls_pred, rolled.views)


def test_decoder_ceiling_of_a_missing_or_mismatched_vae_is_a_note(tmp_path, monkeypatch):
    import edmcli.runs.vae_run as vae_run

    notes: list[str] = []
    real = ImageSet(torch.zeros(2, 1, 16, 16), torch.zeros(2, 16, 16, dtype=torch.uint8),
                    np.zeros(2, int), np.array(["p", "p"]), None, 2)  # fmt: skip
    assert fd._ceiling_of(reference_nets(16), str(tmp_path / "gone"), real, "cpu", notes) is None
    assert "cannot be loaded" in notes[-1] and "gone" in notes[-1]
    monkeypatch.setattr(
        vae_run,
        "load_vae_run",
        lambda *a, **k: type("L", (), {"model": RollVAE(), "sha256": "0" * 64}),
    )
    assert fd._ceiling_of(reference_nets(16), "v", real, "cpu", notes) is None
    assert "codes 32² images, the real test images are 16²" in notes[-1]


# --------------------------------------------------------------------------- distances, diversity
def test_the_real_set_against_itself(phantom_store):
    real, out = real_test_set(phantom_store)
    entry = fd.score_images(reference_nets(32), real, out, real.views, outputs=out)
    for space in ("segmenter", "classifier"):
        d = entry["distances"][space]["all"]
        assert d["fd"] == pytest.approx(0.0, abs=1e-9)
        assert d["precision"] == d["recall"] == d["coverage"] == 1.0
        assert d["n_real"] == d["n_synthetic"] == len(real.images)
    assert set(entry["distances"]["segmenter"]) == {"all", "A2C", "A4C"}
    assert entry["label_fidelity"]["all"]["n"] == len(real.images)
    assert entry["diversity"]["images"] is None and "source_index" in entry["diversity"]["note"]


def test_diversity_shows_a_generator_that_ignores_its_noise(phantom_store, tmp_path):
    copies = label_copy_store(phantom_store, tmp_path / "copies.zarr", k=3)
    noisy = label_copy_store(phantom_store, tmp_path / "noisy.zarr", k=3, noise=0.3)
    got = {}
    for name, store in (("copies", copies), ("noisy", noisy)):
        data = load_synthetic([str(store)], None, seed=0)
        got[name] = fd.diversity(data.images, data.labels, data.groups, "ssim")
    n_maps = len(DatasetStore(phantom_store).indices("train"))
    copies_div = got["copies"]["images"]
    assert copies_div["mean"] == pytest.approx(0.0, abs=1e-6)
    assert copies_div["pairs"] == 3 * n_maps and copies_div["groups"] == n_maps
    assert got["copies"]["label_maps"]["mean"] == 0.0  # the K maps are identical here
    assert got["copies"]["same_map"]["pairs"] == 3 * n_maps
    assert got["noisy"]["images"]["mean"] > 0.05
    single = label_copy_store(phantom_store, tmp_path / "k1.zarr", k=1)
    data = load_synthetic([str(single)], None, seed=0)
    assert "single sample" in fd.diversity(data.images, data.labels, data.groups)["note"]


def test_offline_lpips_and_inception_say_which_file_to_place(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    distance, note = fd.diversity_distance(64)
    assert distance == "ssim"
    assert "alexnet-owt-7be5be79.pth" in note and str(tmp_path / "hub" / "checkpoints") in note
    assert fd.diversity_distance(16)[1].startswith("diversity: 1 − SSIM (LPIPS needs")
    from edmcli.models.perceptual import MissingWeightsError

    with pytest.raises(MissingWeightsError) as err:
        build_inception()
    message = str(err.value)
    assert "inception_v3_google-0cc3c7bd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message and "TORCH_HOME" in message
    inception_weights_path().parent.mkdir(parents=True)
    inception_weights_path().write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="is not a torchvision Inception-v3 state dict"):
        build_inception()


# --------------------------------------------------------------------------- evaluate --fidelity
FAST = [
    "--preset", "tiny", "--size", "32", "--steps", "3", "--batch", "4", "--validate-every", "3",
    "--bootstrap", "50", "--device", "cpu",
]  # fmt: skip


def test_fidelity_needs_a_real_reference_run(phantom_store, tmp_path):
    store = label_copy_store(phantom_store, tmp_path / "copy.zarr")
    result = runner.invoke(app, ["evaluate", "--train", str(store), "--test", str(phantom_store),
                                 "--out", str(tmp_path / "e"), "--fidelity", *FAST])  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--fidelity judges synthetic images" in lines[0]
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_evaluate_with_fidelity_reports_quality_and_correlation(
    phantom_store, tmp_path, monkeypatch
):
    import edmcli.runs.vae_run as vae_run

    load = vae_run.load_vae_run  # the n5 store's "Γ-VAE" decodes exactly; n19's is gone
    loaded = type("Loaded", (), {"model": RollVAE(size=32), "sha256": "0" * 64})
    monkeypatch.setattr(
        vae_run, "load_vae_run", lambda run, *a: loaded if run.name == "exact" else load(run, *a)
    )
    vaes = {5: tmp_path / "exact", 19: tmp_path / "gone", 99: None}
    stores = [label_copy_store(phantom_store, tmp_path / f"n{nfe}.zarr", shift=s, nfe=nfe, seed=s,
                               vae_run=vaes[nfe])
              for nfe, s in ((5, 3), (19, 1), (99, 0))]  # fmt: skip
    args = ["evaluate", "--train", str(phantom_store), *(a for s in stores for a in
            ("--train", str(s))), "--test", str(phantom_store), "--out", str(tmp_path / "e"),
            "--fidelity", *FAST]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    quality = report["quality"]
    assert report["settings"]["fidelity"] is True
    assert quality["reference_runs"]["seg"].endswith(report["references"]["seg"])
    assert [s["nfe"] for s in quality["stores"]] == [5, 19, 99]
    for entry in quality["stores"]:
        assert entry["images_scored"] == entry["images_total"] == 48
        assert set(entry["distances"]) == {"segmenter", "classifier"}
        assert entry["distances"]["segmenter"]["all"]["dim"] == 64  # 16·2² at the 3rd level
        assert entry["seconds"]["total"] > 0 and "label_dice" in entry["summary"]
        assert entry["diversity"]["images"]["groups"] == 24
    assert quality["correlation"]["stores"] == [s["slug"] for s in quality["stores"]]
    ceiling = quality["stores"][0]["decoder_ceiling"]
    assert ceiling["vae_run"] == str(tmp_path / "exact")
    assert ceiling["checkpoint_sha256"] == "0" * 64
    assert ceiling["images"] == quality["real"]["images"]
    assert ceiling["label_fidelity"]["all"]["dice_mean"] == pytest.approx(
        quality["real"]["summary"]["label_dice"]
    )  # an exact decoder gives back the real images' own score
    assert [s["decoder_ceiling"] for s in quality["stores"][1:]] == [None, None]
    assert any("gone" in note and "cannot be loaded" in note for note in quality["notes"])
    md = (tmp_path / "e" / "report.md").read_text()
    assert "## Quality of the synthetic data" in md and "Which metric predicts utility" in md
    assert "### Decoder ceiling of the latent models" in md and "/exact` (`n5`)" in md
    assert (tmp_path / "e" / "plots" / "quality_vs_dice.png").read_bytes()[:4] == PNG
    assert "quality of n5" in result.output
