"""The settings layer: defaults < preset < overrides, and the one step-count rule."""

from __future__ import annotations

import pytest

from edmcli.errors import EchoSynthError
from edmcli.settings import PRESETS, known_settings, resolve, training_steps


def test_every_kind_has_both_presets():
    assert set(PRESETS) == {"vae", "diffusion", "seg", "cls"}
    for rows in PRESETS.values():
        assert set(rows) == {"paper", "tiny"}


def test_precedence_defaults_preset_overrides():
    values = resolve("diffusion", "paper", {"lr": 5e-5, "batch_gpu": None}, {"batch": 120})
    assert values["batch"] == 120 and values["lr"] == 5e-5 and "batch_gpu" not in values
    assert resolve("diffusion", "tiny", {}, {"batch": 120})["batch"] == 16  # the preset wins
    assert resolve("diffusion", "tiny", {"batch": 4}, {"batch": 120})["batch"] == 4


def test_a_given_length_replaces_the_presets_length():
    tiny = resolve("diffusion", "tiny", {})
    assert training_steps(tiny, n_train=1000) == 400
    by_kimg = resolve("diffusion", "tiny", {"kimg": 1.6})
    assert "steps" not in by_kimg and training_steps(by_kimg, 1000) == 100  # 1600 / 16
    by_epochs = resolve("vae", "tiny", {"epochs": 2})
    assert training_steps(by_epochs, n_train=100) == 2 * (100 // 16)
    assert training_steps(resolve("seg", "tiny", {"epochs": 3}), n_train=64) == 3 * 4
    assert training_steps(resolve("vae", "tiny", {"steps": 7}), n_train=100) == 7


@pytest.mark.parametrize(
    "kind, length", [("vae", {"steps": 0}), ("vae", {"epochs": -1}), ("diffusion", {"kimg": 0})]
)
def test_non_positive_lengths_are_refused(kind, length):
    with pytest.raises(EchoSynthError, match="must be positive"):
        training_steps(resolve(kind, "tiny", length), n_train=100)


def test_unknown_setting_and_preset():
    with pytest.raises(EchoSynthError, match="not a setting of a vae run"):
        resolve("vae", "tiny", {"kimg": 3})
    with pytest.raises(EchoSynthError, match="preset 'huge' is unknown"):
        resolve("seg", "huge", {})
    assert "deep_supervision" in known_settings("seg")
    assert "deep_supervision" not in known_settings("cls")
