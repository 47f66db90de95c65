"""Putting a store in place: a failed write leaves nothing, an existing store needs --overwrite,
and --overwrite deletes only stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from edmcli.data.prepare import prepare_phantom
from edmcli.data.store import DatasetStore
from edmcli.data.store_replace import atomic_store_path, check_replaceable, replace_store
from edmcli.data.store_writer import create_store
from edmcli.errors import DataError

SIZE = 16


def _prepare(out: Path, **kwargs) -> Path:
    prepare_phantom(out, 6, SIZE, 0, (0.5, 0.25, 0.25), **kwargs)
    return out


def test_failed_write_leaves_no_store(tmp_path):
    out = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError):
        with atomic_store_path(out) as tmp:
            create_store(tmp, 4, 8, 8, {})
            raise RuntimeError("crash while writing")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_existing_store_needs_overwrite(tmp_path):
    out = tmp_path / "p.zarr"
    prepare_phantom(out, 1, 16, 0, (1, 0, 0))
    with pytest.raises(DataError, match="--overwrite"):
        prepare_phantom(out, 1, 16, 0, (1, 0, 0))
    prepare_phantom(out, 2, 16, 0, (1, 0, 0), overwrite=True)
    assert len(DatasetStore(out)) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr"]


def test_overwrite_refuses_a_folder_that_is_not_a_store(tmp_path):
    thesis = tmp_path / "mythesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("precious")
    with pytest.raises(DataError, match="refuses to delete .*not an echo-synth dataset store"):
        _prepare(thesis, overwrite=True)
    assert (thesis / "chapter1.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mythesis"]


def test_overwrite_replaces_a_store_and_an_empty_folder(tmp_path):
    out = _prepare(tmp_path / "p.zarr")
    before = DatasetStore(out).info["created"]
    prepare_phantom(out, 2, SIZE, 1, (1, 0, 0), overwrite=True)
    assert len(DatasetStore(out)) == 8 and DatasetStore(out).info["created"] >= before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr"]
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_phantom(empty, 1, SIZE, 0, (1, 0, 0), overwrite=True)
    assert len(DatasetStore(empty)) == 4


def test_check_replaceable_refusals(tmp_path, monkeypatch):
    store = _prepare(tmp_path / "s.zarr")
    check_replaceable(store)
    check_replaceable(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    link = tmp_path / "link.zarr"
    link.symlink_to(store)
    cases = {
        tmp_path / "notes.txt": "it is a file",
        link: "symbolic link",
        Path("/"): "current directory or a folder above it",
        tmp_path: "not an echo-synth dataset store",
    }
    for path, reason in cases.items():
        with pytest.raises(DataError, match=reason):
            check_replaceable(path)
    monkeypatch.chdir(store)
    for path in (Path("."), store, Path("..")):
        with pytest.raises(DataError, match="current directory or a folder above it"):
            check_replaceable(path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(store))
    with pytest.raises(DataError, match="home directory"):
        check_replaceable(store)
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    (store / "my-notes.txt").write_text("keep me")  # a store someone put a file into
    with pytest.raises(DataError, match="holds my-notes.txt"):
        replace_store(store)
    (store / "my-notes.txt").unlink()
    replace_store(store)
    assert not store.exists() and (tmp_path / "notes.txt").exists()


def test_leftover_partial_that_is_not_ours_is_kept(tmp_path):
    out = tmp_path / "p.zarr"
    foreign = tmp_path / ".p.zarr.partial"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="is in the way"):
        _prepare(out)
    assert (foreign / "keep.txt").exists() and not out.exists()
