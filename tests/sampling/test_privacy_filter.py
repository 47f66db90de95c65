"""``sample --privacy-filter P``: too-close samples redrawn with recorded seeds, resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from echo_process import echo_synth
from typer.testing import CliRunner

from edmcli.cli import app
from edmcli.data.prepare import prepare_phantom
from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError
from edmcli.runs.memorisation import MemorisationReference, generator_training_images
from edmcli.sampling.privacy import MAX_REDRAWS, REDRAW_STREAM, PrivacyFilter, ordinal
from edmcli.sampling.sample import sample_seed

runner = CliRunner()


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


class _Check:
    """Stand-in check: an image is 'too close' while its mean grey level is below 100."""

    def pixel_statistic(self, images, labels):
        return images.flatten(1).mean(1).numpy() * 255


def _filter() -> PrivacyFilter:
    return PrivacyFilter(_Check(), 5.0, 100.0, {})


def test_apply_redraws_only_the_close_samples_with_new_seeds():
    pixels = torch.tensor([50, 150, 60], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    labels = torch.full((3, 2, 2), 4)
    calls = []

    def redraw(rows, seeds):  # the first redraw of row 0 is still dark, the second is bright
        calls.append((rows.tolist(), list(seeds)))
        values = [200 if s >= 1002 or r == 2 else 10 for r, s in zip(rows, seeds, strict=True)]
        return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)

    out, seeds, redraws = _filter().apply(
        pixels, labels, [7, 8, 9], new_seed=lambda row, a: 1000 + a, redraw=redraw, first=40
    )
    assert calls == [([0, 2], [1001, 1001]), ([0], [1002])]
    assert seeds == [1002, 8, 1001] and redraws.tolist() == [2, 0, 1]
    assert out[:, 0, 0, 0].tolist() == [200, 150, 200]
    assert pixels[:, 0, 0, 0].tolist() == [50, 150, 60]  # the input is left as it was


def test_ordinals():
    assert [ordinal(p) for p in (1, 2, 3, 5, 11, 12, 21, 2.5)] == [
        "1st", "2nd", "3rd", "5th", "11th", "12th", "21st", "2.5th"]  # fmt: skip


def test_apply_stops_with_one_line_after_the_last_redraw():
    pixels = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    dark = lambda rows, seeds: torch.zeros(len(rows), 1, 2, 2, dtype=torch.uint8)  # noqa: E731
    with pytest.raises(EchoSynthError, match=f"sample 40 stayed closer .* the 5th percentile .* "
                       f"after {MAX_REDRAWS}"):  # fmt: skip
        _filter().apply(pixels, torch.full((2, 2, 2), 4), [1, 2], lambda r, a: a, dark, 40)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny EDM-L64 on a 32² phantom with 24 test images (enough to calibrate)."""
    root = tmp_path_factory.mktemp("privacy")
    store = root / "p32.zarr"
    prepare_phantom(store, n_patients=16, size=32, seed=3, split_ratio=(0.5, 0.125, 0.375))
    common = ["--preset", "tiny", "--batch", "4", "--device", "cpu"]
    _ok(["train-vae", "--data", str(store), "--latent", "64", "--run", str(root / "vae"),
         "--steps", "4", "--base-channels", "8", *common])  # fmt: skip
    _ok(["train-diffusion", "--model", "edm-l64", "--data", str(store), "--vae",
         str(root / "vae"), "--run", str(root / "edm"), "--steps", "4", "--model-channels", "16",
         "--grid-every", "0", *common])  # fmt: skip
    return root


def _args(runs, out, percentile):
    return ["sample", "--run", str(runs / "edm"), "--n", "24", "--nfe", "3", "--chunk", "8",
            "--batch", "4", "--no-compile", "--device", "cpu", "--privacy-filter",
            str(percentile), "--out", str(out)]  # fmt: skip


@pytest.mark.slow  # a kill-and-resume drill (two subprocesses)
def test_the_filter_redraws_records_and_resumes_byte_identically(runs, tmp_path):
    out = tmp_path / "filtered.zarr"
    printed = _ok(_args(runs, out, 50)).output
    store = DatasetStore(out)
    summary = json.loads((tmp_path / "filtered-summary.json").read_text())
    assert summary["samples redrawn"] == int((store.column("redraws") > 0).sum())
    assert summary["redraws"] == int(store.column("redraws").sum()) and "P50" in printed
    record = store.info["provenance"]["privacy_filter"]
    assert record["percentile"] == 50 and record["reference"]["images"] == 24
    assert record["reference"]["split"] == "test" and record["training"]["images"] == 40
    redraws, seeds = store.column("redraws"), store.column("seed")
    assert redraws.sum() > 0, "at P50 some samples must have been redrawn"
    for i in range(len(store)):
        expected = (sample_seed(0, i) if redraws[i] == 0
                    else sample_seed(0, i, REDRAW_STREAM + int(redraws[i])))  # fmt: skip
        assert seeds[i] == expected
    # every sample written is at least as far as the threshold
    training = generator_training_images([runs / "edm", runs / "vae"])
    check = MemorisationReference.build(training, training)
    images = torch.from_numpy(store.images[:].astype(np.float32) / 255)
    statistic = check.pixel_statistic(images, torch.from_numpy(store.labels[:]))
    assert np.all(statistic >= record["threshold"])
    # the same command killed after its first shard and rerun gives the same bytes
    cut = tmp_path / "cut.zarr"
    args = _args(runs, cut, 50)
    assert echo_synth(args, fault="sample-shard:1").returncode == -9
    assert zarr.open_group(str(cut), mode="r")["shard_done"][:].tolist() == [True, False, False]
    assert echo_synth(args).returncode == 0
    again = DatasetStore(cut)
    for name in ("images", "labels", "seed", "redraws"):
        np.testing.assert_array_equal(np.asarray(again.group[name][:]),
                                      np.asarray(store.group[name][:]), err_msg=name)  # fmt: skip


def test_refusals(runs, tmp_path):
    for bad in ("0", "60"):
        result = runner.invoke(app, _args(runs, tmp_path / "x.zarr", bad))
        assert result.exit_code == 2 and "must be a percentile in (0, 50]" in result.output
    assert not (tmp_path / "x.zarr").exists()
