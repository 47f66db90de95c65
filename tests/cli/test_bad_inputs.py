"""The bad-input table: every mistake below ends in one ``error:`` line on stderr, exit 2, no
traceback, and nothing written (``main`` is the console entry point)."""

from __future__ import annotations

import pytest

from edmcli.cli import EXIT_CODES, main, user_errors
from edmcli.errors import Interrupted


def _config(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def _mine(tmp_path):
    """A folder holding a user's own report."""
    (tmp_path / "mypaper").mkdir()
    (tmp_path / "mypaper" / "report.md").write_text("my own words")
    return tmp_path / "mypaper"


def _edm_run(tmp_path, store):
    from plan_stores import fake_diffusion_run

    return fake_diffusion_run(tmp_path / "runs", "edm", data=store, model="edm")


def _vae_run(tmp_path):
    from plan_stores import fake_vae_run

    return fake_vae_run(tmp_path / "vae")


# (name, argv builder, expected fragment of the one line)
CASES = [
    ("config syntax error", lambda t, s: ["prepare", "--out", t / "o.zarr", "--config",
                                          _config(t, "a: [1\n")], "is not valid YAML (line 2"),
    ("config not a mapping", lambda t, s: ["prepare", "--out", t / "o.zarr", "--config",
                                           _config(t, "[1, 2]\n")], "must be a mapping"),
    ("config missing", lambda t, s: ["prepare", "--out", t / "o.zarr", "--config",
                                     t / "none.yaml"], "does not exist"),
    ("config unknown key", lambda t, s: ["prepare", "--out", t / "o.zarr", "--config",
                                         _config(t, "sizes: 3\n")], "unknown option 'sizes'"),
    ("config bad value names file and key", lambda t, s: [
        "prepare", "--out", t / "o.zarr", "--config", _config(t, "size: abc\n")],
        "key 'size' of the --config file"),
    ("unknown option", lambda t, s: ["prepare", "--bogus"], "No such option: --bogus"),
    ("size too large", lambda t, s: ["prepare", "--out", t / "o.zarr", "--size", "100000"],
     "larger than 2048"),
    ("size no model can use", lambda t, s: ["prepare", "--out", t / "o.zarr", "--size", "63"],
     "--size 63 is not a multiple of 8"),
    ("split ratio without train", lambda t, s: ["prepare", "--out", t / "o.zarr",
                                                "--split-ratio", "0:1:1"], "positive train"),
    ("overwrite the working directory", lambda t, s: ["prepare", "--out", ".", "--overwrite"],
     "."),
    ("output parent is a file", lambda t, s: ["prepare", "--out", t / "f.txt" / "o.zarr"],
     "f.txt"),
    ("overwrite a folder that is not a store", lambda t, s: [
        "prepare", "--out", t / "notes", "--overwrite"], "notes"),
    ("batch 0", lambda t, s: ["train-vae", "--data", s, "--latent", "64", "--run", t / "r",
                              "--batch", "0", "--device", "cpu"], "batch 0"),
    ("negative lr", lambda t, s: ["train-vae", "--data", s, "--latent", "64", "--run", t / "r",
                                  "--lr", "-0.001", "--device", "cpu"], "lr -0.001"),
    ("ema decay 2", lambda t, s: ["train-vae", "--data", s, "--latent", "64", "--run", t / "r",
                                  "--ema-decay", "2", "--device", "cpu"], "ema_decay 2"),
    ("negative workers", lambda t, s: ["train-vae", "--data", s, "--latent", "64", "--run",
                                       t / "r", "--num-workers", "-1", "--device", "cpu"],
     "num_workers -1"),
    ("steps 0", lambda t, s: ["train-vae", "--data", s, "--latent", "64", "--run", t / "r",
                              "--steps", "0", "--device", "cpu"], "steps 0 must be positive"),
    ("negative churn", lambda t, s: ["sample", "--model", "edm", "--churn", "-5"],
     "churn -5.0 must be at least 0"),
    ("unknown model", lambda t, s: ["sample", "--model", "edm-l32"], "edm-l32"),
    # non-finite floats, refused in one place for every command (issue 25)
    ("sigma data 0", lambda t, s: ["train-diffusion", "--model", "edm", "--data", s, "--run",
                                   t / "r", "--sigma-data", "0", "--device", "cpu"],
     "--sigma-data 0.0 must be positive"),
    ("churn nan", lambda t, s: ["sample", "--model", "edm", "--churn", "nan"],
     "--churn nan must be a finite number"),
    ("guidance inf", lambda t, s: ["sample", "--model", "edm", "--guidance", "inf"],
     "--guidance inf must be a finite number"),
    ("lr nan", lambda t, s: ["train-vae", "--data", s, "--latent", "64", "--run", t / "r",
                             "--lr", "nan", "--device", "cpu"], "--lr nan must be a finite"),
    ("bootstrap fraction nan", lambda t, s: ["evaluate", "--train", s, "--test", s, "--out",
                                             t / "e", "--bootstrap-fraction", "nan"],
     "--bootstrap-fraction nan must be a finite number"),
    ("evaluate into a folder of the user's files", lambda t, s: [
        "evaluate", "--train", s, "--test", s, "--out", _mine(t), "--preset", "tiny"],
     "already holds files echo-synth did not write"),
    ("demo into a file", lambda t, s: ["demo", "--out", t / "f.txt"], "is a file"),
    ("demo with an unknown conditioning", lambda t, s: ["demo", "--out", t / "d", "--class-cond",
                                                        "views"], "--class-cond 'views'"),
    ("demo with an unknown generator", lambda t, s: ["demo", "--out", t / "d", "--generator",
                                                     "best"], "generator 'best' is unknown"),
    ("evaluate patience 0", lambda t, s: ["evaluate", "--train", s, "--test", s, "--out", t / "e",
                                          "--preset", "tiny", "--patience", "0", "--device",
                                          "cpu"], "patience"),
    ("unknown lr schedule", lambda t, s: ["evaluate", "--train", s, "--test", s, "--lr-schedule",
                                          "step"], "'step' is not one of"),
    ("markup in a path", lambda t, s: ["info", t / "[old] :smile:"], "[old] :smile:"),
    # issue 25, round two
    ("bench --run naming a store", lambda t, s: ["bench", "--run", s, "--out", t / "b"],
     "is a dataset store, not a run folder"),
    ("sample into its own label store", lambda t, s: ["sample", "--run", _edm_run(t, s),
                                                      "--labels", s, "--out", s, "--overwrite"],
     "is the label store"),
    ("train-diffusion on a Γ-VAE run", lambda t, s: [
        "train-diffusion", "--model", "edm", "--data", s, "--run", _vae_run(t), "--preset",
        "tiny", "--device", "cpu"], "is a Γ-VAE run, not a diffusion run"),
    ("a seed the generators cannot take", lambda t, s: ["prepare", "--out", t / "o.zarr",
                                                        "--seed", "-1"], "--seed -1 must be"),
    ("threads past any machine", lambda t, s: ["info", s, "--threads", str(10**20)],
     "must be from 1 to 1024"),
    ("evaluate batch 0", lambda t, s: ["evaluate", "--train", s, "--test", s, "--out", t / "e",
                                       "--preset", "tiny", "--batch", "0", "--device", "cpu"],
     "batch 0 must be at least 1"),
    ("study YAML error", lambda t, s: ["study", _config(t, "out: x\nmodels: [edm\n")],
     "is not valid YAML (line 3, column 1"),
    ("study task misspelt", lambda t, s: ["study", _config(
        t, f"out: {t / 'st'}\nmodels: [edm]\nsample: {{nfe: [5]}}\nevaluate: {{tasks: [segg]}}\n"
        "data: {n_patients: 10, size: 16}\n")],
     "task 'segg' is unknown"),
    ("a legal 255-byte output name", lambda t, s: ["prepare", "--out", t / ("a" * 250 + ".zarr")],
     "so it may be at most 242 bytes"),
]  # fmt: skip


@pytest.mark.parametrize("name, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(name, argv, expected, tmp_path, phantom_store, capsys,
                                           monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.txt").write_text("keep")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("keep")
    args = [str(a) for a in argv(tmp_path, phantom_store)]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert expected in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "keep"


def test_interruption_exits_130_and_the_table_documents_it():
    @user_errors
    def stopped():
        raise Interrupted("interrupted at step 4; rerun the same command to resume")

    import typer

    with pytest.raises(typer.Exit) as exit_info:
        stopped()
    assert exit_info.value.exit_code == 130 and 130 in EXIT_CODES and 2 in EXIT_CODES


def test_a_bad_label_id_past_the_first_maps_is_refused_before_any_work(tmp_path, capsys):
    import zarr

    from edmcli.data.prepare import prepare_phantom

    store = tmp_path / "p.zarr"
    prepare_phantom(store, n_patients=20, size=16, seed=1, split_ratio=(0.5, 0.25, 0.25))
    group = zarr.open_group(str(store), mode="r+")
    labels = group["labels"][70]
    labels[3, 3] = 7
    group["labels"][70] = labels
    from edmcli.data.store import DatasetStore

    assert DatasetStore(store).invalid_label_values() == [7]
    code = main(["evaluate", "--train", str(store), "--test", str(store), "--out",
                 str(tmp_path / "e"), "--preset", "tiny", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "label values [7] outside the convention" in err
    assert not (tmp_path / "e").exists()
    code = main(["train-diffusion", "--model", "edm", "--data", str(store), "--run",
                 str(tmp_path / "r"), "--preset", "tiny", "--device", "cpu"])  # fmt: skip
    assert code == 2 and "label values [7]" in capsys.readouterr().err
