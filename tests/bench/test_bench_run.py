"""``echo-synth bench --run``: a trained latent run is measured with its own weights and Γ-VAE
(its decoder's FLOPs counted on the meta device without loading the run there), a C-channel Γ-VAE
whose decoder takes the label map included."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("vae", [{}, {"latent_channels": 2, "decoder_labels": True}],
                         ids=["paper", "c2-labels"])  # fmt: skip
def test_bench_measures_a_trained_latent_run(phantom_store, tmp_path, vae):
    from edmcli.bench.bench import bench
    from edmcli.training.diffusion import train_diffusion
    from edmcli.training.vae import train_vae

    tiny = {"preset": "tiny", "steps": 2, "device": "cpu", "checkpoint_every": 2}
    train_vae(phantom_store, 64, run=tmp_path / "vae", **tiny, **vae)
    run = tmp_path / "edm-l64"
    train_diffusion("edm-l64", phantom_store, vae=tmp_path / "vae", run=run, **tiny)
    result = bench(run=[run], nfe=["1", "3"], repeats=1, peer=False, device="cpu",
                   out=tmp_path / "bench")  # fmt: skip
    (entry,) = result["scales"][0]["entries"]
    assert entry["model"] == "edm-l64" and entry["label"] == run.name
    assert entry["weights"] == f"trained run {run}"
    assert entry["flops_per_image"]["decode"] > 0  # the Γ-VAE decoder counted
    assert entry["timings"]["decode"]["median_s"] > 0  # and decoded with the run's weights
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["complete"]
