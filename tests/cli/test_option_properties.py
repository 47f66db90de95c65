"""Property tests (hypothesis) over every numeric option of every command and over the store
reader (issue 25): any finite, non-finite, huge, negative or zero value either passes the
command's checks or is refused with one ``error:`` line and exit 2 (never a traceback, never
exit 1), and nothing is written anywhere by a refused command or by its checks; a store with any
damaged byte either reads or is refused with one DataError sentence.

The work after the checks (training, sampling, ...) is replaced by a stub that stops the command
as soon as its plan accepted the values: the property is about the checks, in bounded time
(``derandomize``: the same examples in every CI run)."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plan_stores import fake_diffusion_run, files

from edmcli import cli
from edmcli.cli import main

# command → (its arguments besides the one under test, the function that runs the plan)
COMMANDS = {
    "prepare": (lambda w: ["--out", w / "new.zarr", "--n-patients", "3", "--size", "16"],
                "edmcli.data.prepare.run_prepare"),
    "train-vae": (lambda w: ["--data", w / "data.zarr", "--latent", "64", "--run", w / "vae",
                             "--preset", "tiny", "--device", "cpu"],
                  "edmcli.training.vae.run_train_vae"),
    "train-diffusion": (lambda w: ["--model", "edm", "--data", w / "data.zarr", "--run",
                                   w / "edm", "--preset", "tiny", "--device", "cpu"],
                        "edmcli.training.diffusion.run_train_diffusion"),
    "sample": (lambda w: ["--run", w / "runs" / "edm", "--out", w / "syn.zarr", "--device",
                          "cpu", "--no-compile"], "edmcli.sampling.sample.run_sample"),
    "evaluate": (lambda w: ["--train", w / "data.zarr", "--test", w / "data.zarr", "--out",
                            w / "eval", "--preset", "tiny", "--device", "cpu"],
                 "edmcli.evaluation.evaluate.run_evaluate"),
    "bench": (lambda w: ["--out", w / "bench", "--preset", "tiny", "--device", "cpu"],
              "edmcli.bench.bench.run_bench"),
}  # fmt: skip
FUNCTIONS = {"prepare": cli.prepare, "train-vae": cli.train_vae,
             "train-diffusion": cli.train_diffusion, "sample": cli.sample,
             "evaluate": cli.evaluate, "bench": cli.bench}  # fmt: skip
SKIPPED = {"threads"}  # torch.set_num_threads of the test process itself: tested on its own


def numeric_options(fn) -> list[tuple[str, type]]:
    """Every ``int``/``float`` option of a command function (``int | None`` included)."""
    found = []
    for name, param in inspect.signature(fn, eval_str=True).parameters.items():
        annotation = param.annotation
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        kinds = set(typing.get_args(annotation)) or {annotation}
        for kind in (int, float):
            if kind in kinds and name not in SKIPPED:
                found.append((name, kind))
    return found


OPTIONS = [(command, name, kind) for command, fn in FUNCTIONS.items()
           for name, kind in numeric_options(fn)]  # fmt: skip
EDGE_FLOATS = ["nan", "-nan", "inf", "-inf", "1e309", "-1e309", "0", "-0.0", "1e-320", "1e300",
               "-1e300", "-1", "0.5", "2"]  # fmt: skip
EDGE_INTS = ["0", "-1", "1", "2", str(2**31), str(2**63), str(-(2**63) - 1), str(10**30)]


def values(kind: type):
    if kind is float:
        return st.one_of(st.sampled_from(EDGE_FLOATS),
                         st.floats(allow_nan=True, allow_infinity=True).map(repr))  # fmt: skip
    return st.one_of(st.sampled_from(EDGE_INTS), st.integers(-(10**20), 10**20).map(str))


class Planned(Exception):
    """The stub of a command's work: its checks accepted every value."""


@pytest.fixture(scope="module")
def world(tmp_path_factory, phantom_store):
    """A store and a (weightless) diffusion run whose plans pass with default values."""
    import shutil

    root = tmp_path_factory.mktemp("props")
    shutil.copytree(phantom_store, root / "data.zarr")
    fake_diffusion_run(root / "runs", "edm", data=root / "data.zarr", model="edm")
    return root


def test_the_commands_have_the_numeric_options_the_property_covers():
    covered = {(c, n) for c, n, _ in OPTIONS}
    assert {("sample", "churn"), ("sample", "guidance"), ("train-diffusion", "sigma_data"),
            ("train-vae", "lr"), ("evaluate", "bootstrap_fraction"), ("prepare", "size"),
            ("bench", "repeats")} <= covered  # fmt: skip
    assert len(OPTIONS) > 60


@settings(max_examples=160, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_any_numeric_value_passes_the_checks_or_is_one_line_and_exit_2(
    data, world, monkeypatch, capsys
):
    import importlib

    command, name, kind = data.draw(st.sampled_from(OPTIONS), label="option")
    value = data.draw(values(kind), label="value")
    args, runner = COMMANDS[command]
    module, function = runner.rsplit(".", 1)

    def planned(*_args, **_kwargs):
        raise Planned

    monkeypatch.setattr(importlib.import_module(module), function, planned)
    monkeypatch.chdir(world)
    before = files(world)
    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        code = main([command, *map(str, args(world)), f"--{name.replace('_', '-')}", value])
    except Planned:
        code = None  # accepted by the checks; the work itself is not this property's
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    if code is not None:
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, f"{command} --{name} {value}: exit {code}\n{err[-2000:]}"
        assert "Traceback" not in err
        assert lines and lines[-1].startswith("error:"), err
        assert len([line for line in lines if line.startswith("error:")]) == 1, err
    assert files(world) == before, f"{command} --{name} {value} wrote files"


def _flip(store: Path, file: str, offset: int, mask: int) -> None:
    path = store / file
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= mask
    path.write_bytes(bytes(data))


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_a_store_with_any_damaged_byte_reads_or_is_one_sentence(data, world, tmp_path_factory):
    import shutil

    from edmcli.data.store import DatasetStore
    from edmcli.errors import DataError

    store = Path(shutil.copytree(world / "data.zarr", tmp_path_factory.mktemp("damaged") / "d"))
    chunk_files = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())
    file = data.draw(st.sampled_from(chunk_files), label="file")
    cut = data.draw(st.booleans(), label="truncate")
    offset = data.draw(st.integers(0, 1 << 20), label="offset")
    if cut:
        path = store / file
        path.write_bytes(path.read_bytes()[: offset % max(1, path.stat().st_size)])
    else:
        _flip(store, file, offset, data.draw(st.integers(1, 255), label="mask"))
    try:
        reader = DatasetStore(store)
        reader.images[:], reader.labels[:]
        for name in reader.fields:
            reader.column(name)
    except DataError as exc:
        assert "\n" not in str(exc) and str(store) in str(exc)


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(value=st.one_of(st.sampled_from(EDGE_INTS), st.integers(-(10**20), 10**20)))
def test_any_thread_count_is_taken_or_refused_in_one_sentence(value):
    from edmcli.errors import EchoSynthError
    from edmcli.threads import configure_threads

    threads = torch.get_num_threads()
    try:
        plan = configure_threads(int(value))
        assert plan.threads == int(value) == torch.get_num_threads()
    except EchoSynthError as exc:
        assert "--threads" in str(exc) and "\n" not in str(exc)
    finally:
        torch.set_num_threads(threads)
