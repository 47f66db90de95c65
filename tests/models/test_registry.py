"""The model registry: one spec per model, asked everywhere; a seventh model is one entry."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from edmcli.cli import app
from edmcli.data.prepare import prepare_phantom
from edmcli.models.diffusion_loss import EDMLoss
from edmcli.models.preconditioning import EDMPrecond
from edmcli.models.registry import (
    MODEL_NAMES,
    ModelSpec,
    build_loss,
    build_model,
    default_image_size,
    get_spec,
    is_latent,
    model_names,
    paper_reference,
    register_model,
    unregister_model,
)

runner = CliRunner()


def test_the_paper_models_and_their_facts():
    assert MODEL_NAMES == ("sdm", "edm", "ve", "vp", "edm-l128", "edm-l64")
    assert [n for n in MODEL_NAMES if is_latent(n)] == ["edm-l128", "edm-l64"]
    assert {n: get_spec(n).paper_batch for n in MODEL_NAMES} == {
        "sdm": 24, "edm": 24, "ve": 24, "vp": 24, "edm-l128": 54, "edm-l64": 120,
    }  # fmt: skip
    assert get_spec("sdm").nfe == 1000 and get_spec("edm").nfe == 35
    assert default_image_size("edm-l64", "paper") == 64
    assert default_image_size("edm-l128", "tiny") == 32
    assert default_image_size("vp", "paper") == 256
    assert get_spec("edm-l64").net_size(256) == 64 and get_spec("edm").net_size(64) == 64
    with pytest.raises(ValueError, match="valid names: sdm, edm"):
        get_spec("edm-l32")


def test_the_paper_throughput_reference_is_sdm_at_1000_nfe():
    assert [n for n in MODEL_NAMES if get_spec(n).paper_reference_nfe is not None] == ["sdm"]
    assert paper_reference() is get_spec("sdm") and paper_reference().paper_reference_nfe == 1000


def test_registering_twice_or_without_a_preset_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_model(get_spec("edm"))
    with pytest.raises(ValueError, match="preset"):
        register_model(ModelSpec("half", EDMPrecond, EDMLoss, {"paper": {}}))


class DummyPrecond(EDMPrecond):
    """A seventh model's own preconditioning: EDM with another σ_data."""

    def __init__(self, net, sigma_data: float = 0.25, **kwargs):
        super().__init__(net, sigma_data=sigma_data, **kwargs)


@pytest.fixture()
def dummy_model():
    tiny = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attention_resolutions=(),
                dropout=0.0, attention_head_channels=16, spade_hidden=16)  # fmt: skip
    spec = register_model(ModelSpec(
        "dummy", DummyPrecond, EDMLoss, {"paper": tiny, "tiny": tiny},
        solver="euler", schedule="edm", nfe=3, paper_batch=4,
    ))  # fmt: skip
    yield spec
    unregister_model("dummy")
    assert "dummy" not in model_names()


def test_a_seventh_model_is_one_entry_plus_its_classes(dummy_model, tmp_path):
    assert "dummy" in model_names()
    net = build_model("dummy", "tiny", image_size=16)
    assert isinstance(net, DummyPrecond) and net.sigma_data == 0.25
    assert isinstance(build_loss("dummy"), EDMLoss)
    store = tmp_path / "p16.zarr"
    prepare_phantom(store, n_patients=4, size=16, seed=1, split_ratio=(0.5, 0.25, 0.25))
    run = tmp_path / "runs" / "dummy"
    trained = runner.invoke(app, [
        "train-diffusion", "--model", "dummy", "--data", str(store), "--run", str(run),
        "--preset", "paper", "--steps", "2", "--device", "cpu", "--grid-every", "0",
        "--num-workers", "0", "--checkpoint-every", "2",
    ])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    assert "2 steps of batch 4" in trained.output  # the paper preset takes the spec's batch
    out = tmp_path / "dummy.zarr"
    sampled = runner.invoke(app, [
        "sample", "--run", str(run), "--k", "1", "--n", "2", "--batch", "2", "--chunk", "2",
        "--no-compile", "--device", "cpu", "--out", str(out),
    ])  # fmt: skip
    assert sampled.exit_code == 0, sampled.output
    assert "sampling dummy" in sampled.output and "euler" in sampled.output
    import zarr

    provenance = zarr.open_group(str(out), mode="r").attrs["echo_synth"]["provenance"]
    assert provenance["model"] == "dummy" and provenance["nfe"] == 3


def test_the_preset_table_has_one_row_per_model_and_preset():
    from edmcli.errors import EchoSynthError
    from edmcli.models.registry import PRESET_NAMES, preset_row, preset_table

    table = preset_table()
    assert set(table) == {(m, p) for m in model_names() for p in PRESET_NAMES}
    paper, tiny = table[("edm-l64", "paper")], table[("edm-l64", "tiny")]
    assert (paper.image_size, paper.net_size, paper.training["batch"]) == (256, 64, 120)
    assert (tiny.image_size, tiny.net_size, tiny.training["batch"]) == (64, 16, 16)
    assert table[("edm", "paper")].training["batch"] == 24 and "kimg" in paper.training
    assert table[("sdm", "paper")].architecture["model_channels"] == 256
    assert (table[("sdm", "tiny")].nfe, table[("edm", "tiny")].solver) == (1000, "heun")
    with pytest.raises(EchoSynthError, match="preset 'huge' is unknown"):
        preset_row("edm", "huge")
