"""The dataset card: licence terms follow the data a store derives from."""

from __future__ import annotations

import shutil

import zarr

from edmcli.data.card import CAMUS_LICENCE, UNKNOWN_LICENCE, render_card, source_kinds, write_card
from edmcli.data.store import DatasetStore
from edmcli.data.store_format import ATTRS_KEY


def _with_provenance(src, dst, provenance):
    shutil.copytree(src, dst)
    group = zarr.open_group(str(dst), mode="r+")
    group.attrs[ATTRS_KEY] = {**group.attrs[ATTRS_KEY], "provenance": provenance}
    return dst


def test_camus_terms_are_inherited_by_derived_stores(phantom_store, tmp_path):
    camus = _with_provenance(phantom_store, tmp_path / "camus.zarr",
                             {"source": "camus-nifti", "path": "/data/CAMUS"})  # fmt: skip
    assert CAMUS_LICENCE in render_card(DatasetStore(camus))
    synthetic = {"source": "synthetic", "label_store": str(camus), "generator_stores": []}
    assert source_kinds(synthetic) == {"camus"}
    # maps of a phantom store, but a generator trained on CAMUS images: CAMUS terms
    mixed = {"source": "synthetic", "label_store": str(phantom_store),
             "generator_stores": [str(camus)]}  # fmt: skip
    assert source_kinds(mixed) == {"camus", "phantom"}
    folder = {"source": "folder"}
    assert source_kinds(folder) == {"folder"}
    gone = {"source": "synthetic", "label_store": str(tmp_path / "moved.zarr")}
    assert source_kinds(gone) == {"unknown"}
    store = _with_provenance(phantom_store, tmp_path / "s.zarr", mixed)
    text = render_card(DatasetStore(store))
    assert CAMUS_LICENCE in text and "non-commercial" in text
    folder_store = _with_provenance(phantom_store, tmp_path / "f.zarr", folder)
    assert UNKNOWN_LICENCE in render_card(DatasetStore(folder_store))


def test_verdicts_are_kept_beside_the_card_and_the_store_still_verifies(phantom_store, tmp_path):
    store = tmp_path / "p.zarr"
    shutil.copytree(phantom_store, store)
    flagged = {"1.0": {"all": 0.5, "A2C": 0.25, "A4C": 0.75},
               "5.0": {"all": 1.0, "A2C": 1.0, "A4C": 1.0}}  # fmt: skip
    memo = {"by": "echo-synth memorisation", "reference": {"images": 40},
            "spaces": {"pixel": {"flagged": flagged}}}  # fmt: skip
    card = write_card(store, memorisation=memo)
    text = card.read_text()
    assert "| pixel | 50.0 % | 25.0 % | 75.0 % | 100.0 % | 100.0 % | 100.0 % |" in text
    write_card(store)  # re-rendered: the verdicts stay
    assert "| pixel | 50.0 %" in card.read_text()
    DatasetStore(store).verify()  # the card and its JSON change no array
