"""The quality section of ``evaluate --fidelity`` (:mod:`edmcli.evaluation.fidelity`): the decoder
ceiling, feature distances of the real set against itself, diversity, the offline LPIPS and
Inception notes, and ``evaluate --fidelity`` end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from fidelity_fakes import (
    PNG,
    LabelReader,
    RollVAE,
    label_copy_store,
    real_test_set,
    reference_nets,
)
from torch import nn
from typer.testing import CliRunner

from edmcli.cli import app
from edmcli.data.store import DatasetStore
from edmcli.evaluation import fidelity as fd
from edmcli.evaluation.downstream import load_split
from edmcli.evaluation.image_sets import ImageSet, load_synthetic, real_image_set
from edmcli.evaluation.inception import build_inception, inception_weights_path
from edmcli.evaluation.judges import (
    ReferenceNetworks,
    label_fidelity,
    run_networks,
    view_accuracy,
)

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


# --------------------------------------------------------------------------- matched sizes
@pytest.fixture(scope="module")
def larger_store(tmp_path_factory):
    """40 phantom patients at 32², 16 of them in the test split (64 test images)."""
    from edmcli.data.prepare import prepare_phantom

    out = tmp_path_factory.mktemp("larger") / "p40.zarr"
    prepare_phantom(out, n_patients=40, size=32, seed=8, split_ratio=(0.5, 0.1, 0.4))
    return out


# --------------------------------------------------------------------------- distances, diversity
def test_the_real_set_against_itself(larger_store):
    real, out = real_test_set(larger_store)
    whole = fd.feature_distances(out.features, real.views, out.features, real.views)
    for space in ("segmenter", "classifier"):
        d = whole[space]["all"]
        assert d["fd"] == pytest.approx(0.0, abs=1e-9)
        assert d["precision"] == d["recall"] == d["coverage"] == 1.0
        assert d["n_real"] == d["n_synthetic"] == len(real.images)
    entry = fd.score_images(reference_nets(32), real, out, real, outputs=out)
    halves = fd.real_halves(real.patients, 0)
    for space in ("segmenter", "classifier", "radiomics"):
        d = entry["distances"][space]["all"]  # at the floor's sizes, over its draws
        assert d["draws"] == len(halves) == fd.FLOOR_DRAWS
        assert d["n_synthetic"] == pytest.approx(np.mean([a.sum() for a, _ in halves]))
        assert d["n_real"] == pytest.approx(np.mean([b.sum() for _, b in halves]))
        assert set(d["spread"]) == set(fd.MATCHED_METRICS)
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
    probes = [label_copy_store(phantom_store, tmp_path / f"p{nfe}.zarr", shift=s, nfe=nfe, k=1,
                               splits=("test",))
              for nfe, s in ((5, 3), (99, 0))]  # fmt: skip
    args = ["evaluate", "--train", str(phantom_store), *(a for s in stores for a in
            ("--train", str(s))), "--test", str(phantom_store), "--out", str(tmp_path / "e"),
            "--fidelity", *(a for p in probes for a in ("--probe", str(p))), *FAST]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    quality = report["quality"]
    assert report["settings"]["fidelity"] is True
    assert quality["reference_runs"]["seg"].endswith(report["references"]["seg"])
    assert [s["nfe"] for s in quality["stores"]] == [5, 19, 99]
    for entry in quality["stores"]:
        assert entry["images_scored"] == entry["images_total"] == 48
        assert set(entry["distances"]) == {"segmenter", "classifier", "radiomics"}
        # 3 test patients: halves of 4 and 8 images, too few for the matched distances
        assert "more than 5 images" in entry["distances"]["segmenter"]["all"]["skipped"]
        assert entry["seconds"]["total"] > 0
        assert entry["diversity"]["images"]["groups"] == 24
    judged = [(s["judged_on"]["store"], "label_dice" in s["summary"]) for s in quality["stores"]]
    assert judged == [(str(probes[0]), True), (None, False), (str(probes[1]), True)]
    assert report["settings"]["probes"] == {
        quality["stores"][0]["slug"]: str(probes[0]),
        quality["stores"][2]["slug"]: str(probes[1]),
    }
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


# --------------------------------------------------------------------------- judged on unseen maps
def _quality(phantom_store, stores, monkeypatch, probes=None, grid_dir=None):
    """``quality_section`` of synthetic ``stores`` judged by the stand-in networks, as if a seg
    reference run had trained on the train split of ``phantom_store`` and been chosen on its
    val split."""
    from edmcli.evaluation.downstream import DownstreamSettings, load_split
    from edmcli.evaluation.train_specs import TrainSpec

    monkeypatch.setattr(fd, "load_reference_networks",
                        lambda refs, device: (reference_nets(32), []))  # fmt: skip
    reference = DownstreamSettings(task="seg", train_stores=[str(phantom_store)],
                                   val_store=str(phantom_store), val_split="val",
                                   checkpoint="best", size=32)  # fmt: skip
    real_spec = TrainSpec("real", [str(phantom_store)], "real", "real-0", "real", [{}])
    plans = [{"task": "seg", "spec": real_spec, "settings": reference, "run_dir": "ref"}]
    for store in stores:
        prov = DatasetStore(store).info["provenance"]
        spec = TrainSpec(str(store), [str(store)], store.stem, f"{store.stem}-0", "synthetic",
                         [prov], model=prov["model"], nfe=prov["nfe"])  # fmt: skip
        plans.append({"task": "seg", "spec": spec, "settings": reference, "run_dir": "x"})
    test = {"seg": load_split(str(phantom_store), "test")}
    return fd.quality_section(plans, test, torch.device("cpu"), probes=probes or {},
                              grid_dir=grid_dir)  # fmt: skip


def test_label_fidelity_skips_maps_the_judges_trained_on(phantom_store, tmp_path, monkeypatch):
    """Before: every row was judged, though the real-trained segmenter had trained on the real
    images of most conditioning maps. Rows of train and val patients are now left out."""
    seen = label_copy_store(phantom_store, tmp_path / "seen.zarr", splits=("train", "val"))
    mixed = label_copy_store(phantom_store, tmp_path / "mixed.zarr", shift=2,
                             splits=("train", "test"))  # fmt: skip
    quality = _quality(phantom_store, [seen, mixed], monkeypatch)
    by_label = {s["label"]: s for s in quality["stores"]}
    assert by_label["seen"]["images_judged"] == 0 and by_label["seen"]["images_scored"] > 0
    assert (
        by_label["seen"]["label_fidelity"] is None
        and "label_dice" not in (by_label["seen"]["summary"])
    )
    note = by_label["seen"]["judged_on"]["note"]
    assert "--splits test" in note and "--probe" in note and note in quality["notes"]
    assert "segmenter" in by_label["seen"]["distances"]  # distances still use every image
    reader = DatasetStore(mixed)
    test_patients = set(DatasetStore(phantom_store).patients("test"))
    unseen = np.isin(reader.column("patient"), list(test_patients))
    entry = by_label["mixed"]
    assert entry["images_judged"] == int(unseen.sum()) < entry["images_scored"]
    data = load_synthetic([str(mixed)], None, 0)
    keep = np.isin(data.patients, list(test_patients))
    out = run_networks(reference_nets(32), data.images[torch.from_numpy(keep)])
    expected = label_fidelity(out.seg_pred, data.labels[torch.from_numpy(keep)],
                              data.views[keep])  # fmt: skip
    assert entry["label_fidelity"]["all"]["dice_mean"] == pytest.approx(
        expected["all"]["dice_mean"]
    )


def test_a_probe_store_judges_its_generators_label_fidelity(phantom_store, tmp_path,
                                                            monkeypatch):  # fmt: skip
    store = label_copy_store(phantom_store, tmp_path / "train-maps.zarr")  # exact copies
    probe = label_copy_store(phantom_store, tmp_path / "probe.zarr", shift=3, k=1,
                             splits=("test",))  # fmt: skip
    quality = _quality(phantom_store, [store], monkeypatch,
                       probes={"train-maps-0": str(probe)})  # fmt: skip
    entry = quality["stores"][0]
    n_test = len(DatasetStore(phantom_store).indices("test"))
    assert entry["judged_on"]["store"] == str(probe) and entry["images_judged"] == n_test
    assert entry["images_scored"] == len(DatasetStore(store))  # distances on the store itself
    assert entry["summary"]["label_dice"] < 0.99  # the probe's shifted structures, not the copies
    assert not any("--probe" in note for note in quality["notes"])


def _real_images_as_synthetic(real, path, split="train"):
    """A store posing as ``sample`` output that holds the real images of ``split``: a perfect
    generator of other patients."""
    from edmcli.data.store_format import STRING_FIELDS
    from edmcli.data.store_writer import create_store, mark_complete, write_block

    reader = DatasetStore(real)
    rows = reader.indices(split)
    images = np.asarray(reader.images.get_orthogonal_selection((rows,)))
    labels = np.asarray(reader.labels.get_orthogonal_selection((rows,)))
    prov = {"source": "synthetic", "model": "edm-l64", "nfe": 9, "solver": "heun",
            "generator_patients": reader.patients(["train", "val"])}  # fmt: skip
    group = create_store(path, len(rows), *images.shape[-2:], {"provenance": prov})
    columns = {name: reader.column(name)[rows] for name in STRING_FIELDS}
    columns["split"] = np.full(len(rows), "train")
    write_block(group, 0, images, labels, columns)
    mark_complete(group)
    return path


class LoudFeatures(nn.Module):
    """Features of a classifier whose few loudest dimensions carry nothing about the image:
    ``loud`` noise dimensions 100× larger than 16 informative ones (4×4 block means)."""

    def __init__(self, loud: int = 4) -> None:
        super().__init__()
        self.loud = loud
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = 100 * torch.randn(len(x), self.loud, generator=self.generator)
        return torch.cat([noise, torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)], 1)


class LoudClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))
        self.avgpool = LoudFeatures()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.avgpool(x)
        return torch.tensor([[0.0, 1.0]]).expand(len(x), 2)


def _scored(real_store, store, nets):
    real = real_image_set(load_split(str(real_store), "test"))
    real_out = run_networks(nets, real.images)
    floor = fd.real_reference_entry(real, real_out)
    entry = fd.score_images(nets, load_synthetic([str(store)], None, 0), real_out, real)
    return floor, entry


def test_real_images_of_other_patients_score_within_the_floors_spread(larger_store, tmp_path):
    """Before: the store was scored with all its images against all real ones, the floor at
    half against half, so a perfect generator scored far *below* the real row."""
    store = _real_images_as_synthetic(larger_store, tmp_path / "perfect.zarr")
    floor, entry = _scored(larger_store, store, reference_nets(32))
    for space in ("segmenter", "classifier", "radiomics"):
        mine, ref = entry["distances"][space]["all"], floor["halves"]["distances"][space]["all"]
        assert mine["n_synthetic"] == ref["n_synthetic"] and mine["n_real"] == ref["n_real"]
        for name in ("fd", "kid"):
            width = 3 * max(ref["spread"][name], mine["spread"][name])
            assert abs(mine[name] - ref[name]) <= width, (space, name, mine[name], ref[name])


def test_standardised_features_separate_a_shuffled_pixel_store(larger_store, tmp_path):
    """The real classifier's FD was dominated by a few extreme activations: every store scored
    alike. Standardised on the real images, the informative dimensions count."""
    perfect = _real_images_as_synthetic(larger_store, tmp_path / "perfect.zarr")
    shuffled = _real_images_as_synthetic(larger_store, tmp_path / "shuffled.zarr")
    group = zarr.open_group(str(shuffled), mode="r+")
    images = np.asarray(group["images"][:])
    rng = np.random.default_rng(0)
    flat = images.reshape(len(images), -1)
    group["images"][:] = np.stack([rng.permutation(row) for row in flat]).reshape(images.shape)
    nets = ReferenceNetworks(LabelReader(), 32, LoudClassifier(), 32, batch=16)
    floor, good = _scored(larger_store, perfect, nets)
    _, bad = _scored(larger_store, shuffled, nets)
    ref = floor["halves"]["distances"]["classifier"]["all"]
    good_fd = good["distances"]["classifier"]["all"]["fd"]
    bad_fd = bad["distances"]["classifier"]["all"]["fd"]
    assert bad_fd > ref["fd"] + 10 * ref["spread"]["fd"] and bad_fd > 5 * good_fd
    # without standardisation the loud dimensions' noise hides the difference
    real = run_networks(nets, real_image_set(load_split(str(larger_store), "test")).images)
    raw = [
        fd.frechet_distance_from_features(
            run_networks(nets, load_synthetic([str(s)], None, 0).images).features["classifier"],
            real.features["classifier"],
        )
        for s in (perfect, shuffled)
    ]
    assert raw[1] < 2 * raw[0]


def test_one_extreme_image_cannot_decide_a_distance():
    """Before the clip, a few synthetic images with extreme activations set the classifier FD of
    the demo's store alone (9.6e5 against a floor of 714)."""
    rng = np.random.default_rng(0)
    real = {"classifier": rng.normal(size=(80, 16))}
    synthetic = rng.normal(size=(80, 16))
    synthetic[3] = 1e4
    scale = fd.feature_scale(real)
    z = fd.standardise({"classifier": synthetic}, scale)["classifier"]
    assert np.abs(z).max() == fd.WINSOR
    reference = fd.standardise(real, scale)["classifier"]
    assert fd.frechet_distance_from_features(z, reference) < 20
    assert fd.frechet_distance_from_features(synthetic, real["classifier"]) > 1e6  # raw


# --------------------------------------------------------------------------- memorisation
def test_quality_section_checks_memorisation_and_writes_the_cards(larger_store, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    """A store of the generator's own training images is flagged whole, in pixel space and in
    the segmenter's features; real images of patients it never saw are not; the cards say so."""

    from edmcli.data.card import CARD_FILE
    from edmcli.data.store_format import ATTRS_KEY
    from edmcli.evaluation.evaluate import write_cards

    reader = DatasetStore(larger_store)
    run = tmp_path / "edm-run"
    run.mkdir()
    (run / "training_patients.json").write_text(
        json.dumps({"store": str(larger_store), "patients": reader.patients("train")})
    )
    stores = []
    for name, split in (("copies", "train"), ("others", "val")):
        store = _real_images_as_synthetic(larger_store, tmp_path / f"{name}.zarr", split)
        group = zarr.open_group(str(store), mode="r+")
        info = group.attrs[ATTRS_KEY]
        group.attrs[ATTRS_KEY] = {**info, "provenance": {**info["provenance"], "run": str(run)}}
        stores.append(store)
    quality = _quality(larger_store, stores, monkeypatch)
    by_label = {s["label"]: s["memorisation"] for s in quality["stores"]}
    copies, others = by_label["copies"], by_label["others"]
    assert copies["training"]["images"] == len(reader.indices("train"))
    assert copies["reference"]["images"] == len(reader.indices("test"))
    for space in ("pixel", "segmenter"):
        assert copies["spaces"][space]["flagged"]["1.0"]["all"] == 1.0
        assert copies["spaces"][space]["nearest_is_own_source_patient"] == 1.0
        assert others["spaces"][space]["flagged"]["5.0"]["all"] <= 0.25
    from edmcli.evaluation.report.markdown import memorisation_markdown

    table = "\n".join(memorisation_markdown(quality))
    assert "### Memorisation" in table and "| copies | pixel | 100.0 | 100.0 | 100.0 |" in table
    write_cards(quality, tmp_path / "report.md")
    card = (stores[0] / CARD_FILE).read_text()
    assert "Memorisation (evaluate --fidelity)" in card and "| pixel | 100.0 %" in card
    assert str(tmp_path / "report.md") in card
    assert "| FD (segmenter bottleneck) |" in card  # the metrics by their titles


def test_the_source_image_check_flags_copies_and_not_a_generator_that_follows_its_maps(
    larger_store, tmp_path
):
    """Each image against the real image of its own source map, calibrated by the probe (the
    same generator on new patients' maps): a map-following generator that never copies sits at
    the percentile; one that returns its training images is flagged whole."""
    from edmcli.evaluation.memorisation import source_image_check
    from edmcli.runs.memorisation import store_source_distances

    follows = label_copy_store(larger_store, tmp_path / "follows.zarr", noise=0.3, seed=1)
    probe = label_copy_store(larger_store, tmp_path / "probe.zarr", k=1, noise=0.3, seed=2,
                             splits=("test",))  # fmt: skip
    check = source_image_check([follows], probe, percentiles=(5, 50))
    assert check["reference_images"] == len(DatasetStore(probe))
    assert check["flagged"]["5.0"]["all"] <= 0.15
    assert 0.3 <= check["flagged"]["50.0"]["all"] <= 0.7
    # the same store with each image replaced by its source map's real image: all flagged
    copies = tmp_path / "copies.zarr"
    shutil.copytree(follows, copies)
    group = zarr.open_group(str(copies), mode="r+")
    rows = DatasetStore(follows).column("source_index")
    group["images"][:] = np.asarray(DatasetStore(larger_store).images.oindex[rows])
    distances, _ = store_source_distances(copies)
    assert np.allclose(distances, 0.0, atol=1e-6)
    check = source_image_check([copies], probe)
    assert check["flagged"]["1.0"] == {"all": 1.0, "A2C": 1.0, "A4C": 1.0}


def test_memorisation_command_with_a_probe(larger_store, tmp_path):
    from edmcli.data.card import CARD_FILE

    store = label_copy_store(larger_store, tmp_path / "s.zarr", noise=0.3, seed=1)
    probe = label_copy_store(larger_store, tmp_path / "p.zarr", k=1, noise=0.3, seed=2,
                             splits=("test",))  # fmt: skip
    run = tmp_path / "no-such-run"  # the run label_copy_store records
    run.mkdir()
    patients = DatasetStore(larger_store).patients(["train", "val"])
    (run / "training_patients.json").write_text(
        json.dumps({"store": str(larger_store), "patients": patients})
    )
    result = runner.invoke(app, ["memorisation", str(store), "--probe", str(probe)])
    assert result.exit_code == 0, result.output
    assert "source image: flagged P1 all" in result.output
    saved = json.loads((tmp_path / "s-memorisation.json").read_text())
    assert set(saved["spaces"]) == {"pixel", "source_image"}
    assert saved["reference"]["images"] == len(DatasetStore(larger_store).indices("test"))
    assert "| source_image |" in (store / CARD_FILE).read_text()
    assert (tmp_path / "s-memorisation.png").is_file()
    bad = runner.invoke(app, ["memorisation", str(larger_store)])
    assert bad.exit_code == 2 and "is not a synthetic store" in bad.output
    from edmcli.data.prepare import prepare_phantom

    small = tmp_path / "p16.zarr"
    prepare_phantom(small, 8, 16, 1, (0.5, 0.0, 0.5))
    bad = runner.invoke(app, ["memorisation", str(store), "--reference", str(small)])
    assert bad.exit_code == 2 and "differ in image size (16×16, 32×32)" in bad.output


def test_a_privacy_filtered_store_is_another_generator_for_the_probes():
    from edmcli.evaluation.train_specs import generator_identity

    plain = {"checkpoint_sha256": "a", "nfe": 35, "solver": "heun"}
    filtered = {**plain, "privacy_filter": {"percentile": 5.0, "threshold": 0.9}}
    assert generator_identity(plain) != generator_identity(filtered)
    assert generator_identity(filtered) == generator_identity(
        {**plain, "privacy_filter": {"percentile": 5.0, "threshold": 0.8}}
    )


def test_memorisation_of_images_of_another_size_is_a_note():
    from edmcli.runs.memorisation import MemorisationReference, TrainingImages

    def images(n, side):
        maps = torch.zeros(n, side, side, dtype=torch.uint8)
        return ImageSet(torch.zeros(n, 1, side, side), maps, np.zeros(n, int),
                        np.array(["p"] * n), None, n)  # fmt: skip

    small = images(30, 16)
    training = TrainingImages(small.images, small.labels, small.patients, [])
    against = MemorisationReference.build(training, small)
    notes: list[str] = []
    entry = fd.memorisation_entry({"run": "r"}, images(3, 32), None, None, images(30, 32), None,
                                  {("r",): against}, notes)  # fmt: skip
    assert entry is None and "differ in size (16×16, 32×32)" in notes[-1]
