"""Scoring a synthetic store with the real-trained networks (``evaluate --fidelity``): a store
whose images encode their own label maps, read back by a "segmenter" that decodes intensities,
has label fidelity 1; the pieces (classifier accuracy, feature distances, diversity, the
correlation table, the report section) on hand-made cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fake_reports import fake_report, fake_run
from torch import nn
from typer.testing import CliRunner

from edmcli.cli import app
from edmcli.data.labels import SECTOR
from edmcli.data.store import STRING_FIELDS, DatasetStore, create_store, mark_complete, write_block
from edmcli.evaluation import fidelity as fd
from edmcli.evaluation.metrics import dice_per_structure, hausdorff_distance
from edmcli.evaluation.report import write_report

runner = CliRunner()
STEP = 50  # intensity step per label id: label l is drawn as l·50 / 255
PNG = b"\x89PNG"


# --------------------------------------------------------------------------- helpers
def label_copy_store(real, path, k=2, shift=0, noise=0.0, model="edm-l64", nfe=9, seed=0,
                     vae_run=None):  # fmt: skip
    """A store posing as ``sample`` output from the train split of ``real``: ``k`` samples per
    source map, each image the map's labels drawn as intensities (rolled by ``shift`` columns:
    a generator that misplaces its structures; plus uniform noise of amplitude ``noise``)."""
    reader = DatasetStore(real)
    rows = reader.indices("train")
    labels = np.repeat(np.asarray(reader.labels.get_orthogonal_selection((rows,))), k, axis=0)
    images = np.roll(labels.astype(np.float64) * STEP, shift, axis=2)
    rng = np.random.default_rng(seed)
    images = np.clip(images + noise * 255 * rng.random(images.shape), 0, 255).round()
    n, h, w = labels.shape
    provenance = {
        "source": "synthetic", "model": model, "nfe": nfe, "solver": "heun",
        "run": str(path.parent / "no-such-run"), "label_store": str(real),
        "generator_patients": reader.patients(["train", "val"]),
    }  # fmt: skip
    if vae_run is not None:
        provenance["vae_run"] = str(vae_run)
    extra = {"source_index": np.dtype("int64"), "transform": np.dtype("int16"),
             "seed": np.dtype("int64")}  # fmt: skip
    group = create_store(path, n, h, w, {"provenance": provenance}, extra_fields=extra)
    columns = {name: np.repeat(reader.column(name)[rows], k) for name in STRING_FIELDS}
    columns["split"] = np.full(n, "train")
    columns["source_index"] = np.repeat(rows, k).astype(np.int64)
    columns["transform"] = np.tile(np.arange(k), len(rows)).astype(np.int16)
    columns["seed"] = np.arange(n, dtype=np.int64)
    write_block(group, 0, images.astype(np.uint8), labels, columns)
    mark_complete(group)
    return path


class LabelReader(nn.Module):
    """A "segmenter" that decodes intensities into label ids (0–3; the sector is background)
    and exposes a ``bottleneck`` whose pooled output is a feature vector."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))  # segment() asks for a parameter's device
        self.bottleneck = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.bottleneck(F.avg_pool2d(x, 4))  # features: 4×4 block means
        ids = torch.round(x[:, 0] * 255 / STEP).long().clamp(0, SECTOR)
        ids = torch.where(ids == SECTOR, torch.zeros_like(ids), ids)
        return F.one_hot(ids, 4).permute(0, 3, 1, 2).float() * 10


class AlwaysA4C(nn.Module):
    """A "classifier" that says A4C for every image; ``avgpool`` gives its features."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))
        self.avgpool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.avgpool(x)
        return torch.tensor([[0.0, 1.0]]).expand(len(x), 2)


def _nets(size: int) -> fd.ReferenceNetworks:
    return fd.ReferenceNetworks(LabelReader(), size, AlwaysA4C(), size, batch=16)


def _real(store) -> tuple[fd.ImageSet, fd.NetworkOutputs]:
    from edmcli.evaluation.downstream import load_split

    data = fd.real_image_set(load_split(store, "test"))
    size = int(data.images.shape[-1])
    return data, fd.run_networks(_nets(size), data.images)


# --------------------------------------------------------------------------- label fidelity
def test_a_store_that_copies_its_label_maps_has_label_fidelity_one(phantom_store, tmp_path):
    store = label_copy_store(phantom_store, tmp_path / "copy.zarr")
    data = fd.load_synthetic([str(store)], None, seed=0)
    assert len(data.images) == data.total == 2 * len(DatasetStore(phantom_store).indices("train"))
    out = fd.run_networks(_nets(32), data.images)
    assert out.features["segmenter"].shape == (len(data.images), 1)  # pooled (B, 1, 8, 8)
    fidelity = fd.label_fidelity(out.seg_pred, data.labels, data.views)
    assert set(fidelity) == {"all", "A2C", "A4C"}
    for entry in fidelity.values():
        assert entry["dice_mean"] == 1.0 and set(entry["dice"].values()) == {1.0}
        assert set(entry["hd95_px"].values()) == {0.0}
        assert set(entry["hd95_failures"].values()) == {0}
    assert fidelity["A2C"]["n"] + fidelity["A4C"]["n"] == fidelity["all"]["n"]


def test_misplaced_structures_lower_label_fidelity(phantom_store, tmp_path):
    scores = []
    for shift in (0, 1, 3):
        store = label_copy_store(phantom_store, tmp_path / f"s{shift}.zarr", shift=shift)
        data = fd.load_synthetic([str(store)], None, seed=0)
        out = fd.run_networks(_nets(32), data.images)
        scores.append(fd.label_fidelity(out.seg_pred, data.labels, data.views)["all"])
    dice = [s["dice_mean"] for s in scores]
    hd = [s["hd95_px"]["lv_endocardium"] for s in scores]
    assert dice[0] == 1.0 > dice[1] > dice[2]
    assert hd[0] == 0.0 < hd[1] < hd[2]
    # a 3-pixel shift moves the LV's boundary by 3 pixels: its HD95 cannot exceed that much
    assert hd[2] <= 3.0 + 1e-9


def test_fast_dice_and_hd95_equal_the_downstream_metrics():
    g = torch.Generator().manual_seed(0)
    x = F.avg_pool2d(torch.rand(12, 1, 20, 20, generator=g), 5, 1, 2)[:, 0]
    a = (x * 12).long() % 5
    b = torch.roll(a, 1, 2)
    a[0], b[0] = 0, 0  # both empty
    a[1] = 4  # only the sector: every structure missing from the prediction
    np.testing.assert_allclose(fd.structure_dice(a, b), dice_per_structure(a, b), atol=1e-12)
    values, failed = fd.structure_hd95(a, b)
    for name, structure in (("lv_endocardium", 1), ("lv_myocardium", 2), ("left_atrium", 3)):
        ref, ref_failed = hausdorff_distance(a, b, structure, percentile=95)
        np.testing.assert_allclose(values[name], ref, rtol=1e-5, atol=1e-5)
        assert (failed[name] == ref_failed).all()


def test_classifier_accuracy_on_synthetic_images_by_hand(phantom_store, tmp_path):
    store = label_copy_store(phantom_store, tmp_path / "copy.zarr")
    data = fd.load_synthetic([str(store)], None, seed=0)
    views, features = fd.classifier_outputs(AlwaysA4C(), data.images, 32)
    assert features.shape == (len(data.images), 1)  # the hook pools (B, 1, 2, 2) over space
    acc = fd.view_accuracy(views, data.views)
    share_a4c = float((data.views == 1).mean())  # a classifier that always says A4C
    assert acc["all"]["accuracy"] == pytest.approx(share_a4c)
    assert acc["A4C"]["accuracy"] == 1.0 and acc["A2C"]["accuracy"] == 0.0
    assert fd.view_accuracy(views, np.full(len(views), -1)) is None


# --------------------------------------------------------------------------- decoder ceiling
class RollVAE(nn.Module):
    """A "Γ-VAE" whose latent is the image and whose decoder shifts it ``shift`` columns."""

    def __init__(self, shift: int = 0, size: int = 32) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))
        self.shift = shift
        self.config = type("Config", (), {"image_size": size})()

    def encode(self, image: torch.Tensor, sector: torch.Tensor) -> torch.Tensor:
        return image

    def decode(self, latent: torch.Tensor, sector: torch.Tensor) -> torch.Tensor:
        return torch.roll(latent, self.shift, dims=3)


def test_decoder_ceiling_is_the_label_fidelity_of_the_reconstructions(phantom_store, tmp_path):
    copies = fd.load_synthetic([str(label_copy_store(phantom_store, tmp_path / "c.zarr"))], None, 0)
    exact = fd.decoder_ceiling(_nets(32), RollVAE(0), copies)
    assert exact["label_fidelity"]["all"]["dice_mean"] == 1.0 and exact["psnr_db"] > 100
    assert exact["images"] == len(copies.images) and exact["seconds"] > 0
    # a decoder that misplaces structures by 3 columns scores what a generator doing so scores
    shifted = fd.decoder_ceiling(_nets(32), RollVAE(3), copies)
    rolled = fd.load_synthetic([str(label_copy_store(phantom_store, tmp_path / "r.zarr", shift=3))],
                               None, 0)  # fmt: skip
    direct = fd.run_networks(_nets(32), rolled.images)
    want = fd.label_fidelity(direct.seg_pred, rolled.labels, rolled.views)
    assert shifted["label_fidelity"]["all"]["dice_mean"] == pytest.approx(want["all"]["dice_mean"])
    assert shifted["label_fidelity"]["all"]["dice_mean"] < 1.0
    assert shifted["classifier_accuracy"] == fd.view_accuracy(direct.cls_pred, rolled.views)


def test_decoder_ceiling_of_a_missing_or_mismatched_vae_is_a_note(tmp_path, monkeypatch):
    import edmcli.runs.vae_run as vae_run

    notes: list[str] = []
    real = fd.ImageSet(torch.zeros(2, 1, 16, 16), torch.zeros(2, 16, 16, dtype=torch.uint8),
                       np.zeros(2, int), np.array(["p", "p"]), None, 2)  # fmt: skip
    assert fd._ceiling_of(_nets(16), str(tmp_path / "gone"), real, "cpu", notes) is None
    assert "cannot be loaded" in notes[-1] and "gone" in notes[-1]
    monkeypatch.setattr(
        vae_run,
        "load_vae_run",
        lambda *a, **k: type("L", (), {"model": RollVAE(), "sha256": "0" * 64}),
    )
    assert fd._ceiling_of(_nets(16), "v", real, "cpu", notes) is None
    assert "codes 32² images, the real test images are 16²" in notes[-1]


# --------------------------------------------------------------------------- distances, diversity
def test_the_real_set_against_itself(phantom_store):
    real, out = _real(phantom_store)
    entry = fd.score_images(_nets(32), real, out, real.views, outputs=out)
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
        data = fd.load_synthetic([str(store)], None, seed=0)
        got[name] = fd.diversity(data.images, data.labels, data.groups, "ssim")
    n_maps = len(DatasetStore(phantom_store).indices("train"))
    copies_div = got["copies"]["images"]
    assert copies_div["mean"] == pytest.approx(0.0, abs=1e-6)
    assert copies_div["pairs"] == 3 * n_maps and copies_div["groups"] == n_maps
    assert got["copies"]["label_maps"]["mean"] == 0.0  # the K maps are identical here
    assert got["copies"]["same_map"]["pairs"] == 3 * n_maps
    assert got["noisy"]["images"]["mean"] > 0.05
    single = label_copy_store(phantom_store, tmp_path / "k1.zarr", k=1)
    data = fd.load_synthetic([str(single)], None, seed=0)
    assert "single sample" in fd.diversity(data.images, data.labels, data.groups)["note"]


def test_the_selection_keeps_whole_source_groups():
    groups = np.repeat(np.arange(20), 5)
    rows = fd.select_groups(groups, len(groups), 23, seed=1)
    assert len(rows) == 25 and np.all(np.diff(rows) > 0)  # five whole groups, sorted
    assert np.all(np.bincount(groups[rows], minlength=20) % 5 == 0)
    assert np.array_equal(rows, fd.select_groups(groups, len(groups), 23, seed=1))
    assert len(fd.select_groups(groups, len(groups), None, seed=1)) == 100
    assert len(fd.select_groups(None, 100, 30, seed=1)) == 30


def test_offline_lpips_and_inception_say_which_file_to_place(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    distance, note = fd.diversity_distance(64)
    assert distance == "ssim"
    assert "alexnet-owt-7be5be79.pth" in note and str(tmp_path / "hub" / "checkpoints") in note
    assert fd.diversity_distance(16)[1].startswith("diversity: 1 − SSIM (LPIPS needs")
    from edmcli.models.perceptual import MissingWeightsError

    with pytest.raises(MissingWeightsError) as err:
        fd.build_inception()
    message = str(err.value)
    assert "inception_v3_google-0cc3c7bd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message and "TORCH_HOME" in message
    fd.inception_weights_path().parent.mkdir(parents=True)
    fd.inception_weights_path().write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="is not a torchvision Inception-v3 state dict"):
        fd.build_inception()


# --------------------------------------------------------------------------- correlation, report
def _run(name, task, model=None, nfe=None, kind="synthetic", **metrics):
    return fake_run(name, task, kind, model, nfe, spacing_mm=False, **metrics)


@pytest.mark.slow
def test_correlation_table_and_report_section(phantom_store, tmp_path):
    real, real_out = _real(phantom_store)
    quality_stores, runs = (
        [],
        [
            _run("seg-real", "seg", kind="real", dice_mean=0.9),
            _run("cls-real", "cls", kind="real", accuracy=0.9, balanced_accuracy=0.9),
        ],
    )
    for k, shift in enumerate((0, 1, 2, 4)):  # more NFE, fewer misplaced pixels, better Dice
        nfe = (99, 35, 9, 5)[k]
        store = label_copy_store(phantom_store, tmp_path / f"n{nfe}.zarr", shift=shift, seed=k,
                                 noise=0.02 * k, nfe=nfe)  # fmt: skip
        data = fd.load_synthetic([str(store)], None, seed=0)
        entry = fd.score_images(_nets(32), data, real_out, real.views)
        quality_stores.append({"label": f"edm-l64 {nfe}", "slug": f"s{nfe}",
                               "model": "edm-l64", "nfe": nfe, "solver": "heun",
                               "stores": [str(store)], **entry})  # fmt: skip
        runs.append(_run(f"seg-s{nfe}", "seg", "edm-l64", nfe, dice_mean=0.85 - 0.1 * k))
        runs.append(_run(f"cls-s{nfe}", "cls", "edm-l64", nfe, accuracy=0.8, balanced_accuracy=0.8))
    report = fake_report(runs)
    quality = {
        "reference_runs": {"seg": "runs/seg-real", "cls": "runs/cls-real"}, "max_images": None,
        "selection": "every image", "diversity_distance": "ssim", "notes": ["a note"],
        "feature_spaces": {"segmenter": "segmenter bottleneck",
                           "classifier": "classifier penultimate layer"},
        "real": fd.real_reference_entry(real, real_out),
        "stores": quality_stores, "seconds": 1.0, "correlation": None,
    }  # fmt: skip
    real_entry = quality["real"]
    assert real_entry["images"] == len(real.images) and "halves" in real_entry
    assert 0.0 <= real_entry["summary"]["label_dice"] < 1.0  # echoes are not label codes
    corr = fd.correlation_table(quality, report, iterations=200)
    rows = {r["metric"]: r for r in corr["rows"]}
    assert rows["label_dice"]["dice_mean"]["rho"] == pytest.approx(1.0)  # the same ranking
    assert rows["label_hd95_lv"]["dice_mean"]["rho"] == pytest.approx(-1.0)
    assert rows["label_dice"]["accuracy"]["rho"] is None  # constant accuracies: no ρ (null)
    assert {"label_dice", "label_hd95_lv"} <= set(corr["best"]["dice_mean"])
    assert corr["best"]["accuracy"] == []  # the accuracies are all equal: no ρ
    assert fd.correlation_table({**quality, "stores": quality_stores[:2]}, report) is None
    report["quality"] = {**quality, "correlation": corr}
    written = {p.name for p in write_report(report, tmp_path / "out")}
    assert {"quality_vs_nfe.png", "quality_vs_dice.png"} <= written
    for name in ("quality_vs_nfe", "quality_vs_dice"):
        assert (tmp_path / "out" / "plots" / f"{name}.png").read_bytes()[:4] == PNG
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Quality of the synthetic data (`--fidelity`)" in md
    assert "### Which metric predicts utility" in md and "label fidelity: mean Dice" in md
    assert "| edm-l64 99 | edm-l64 | 99 | 85.0 |" in md  # next to its downstream Dice
    assert "Tracks best" in md


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
