"""The paper's study as one pipeline (``echo-synth study CONFIG.yaml``).

From one YAML file: prepare a dataset store → the Γ-VAEs the latent models need → every
diffusion model → a synthetic store per (model, NFE) → quality metrics and the evaluation of
every store against real-trained networks (the Fig. 3 plots) → ``bench`` with the evaluation as
its utility-per-cost frontier (the Fig. 4 plots). Each stage calls the function its command
calls, so each resumes on its own; ``study.json`` under ``out`` records every finished stage with
the settings it ran with, and a rerun skips a finished stage whose settings did not change (a
changed one runs again and resumes or refuses as its command would; changed data settings are
refused while the store prepared with the earlier ones, or a stage made from it, exists, since
the store would be used as it is). A refusal whose remedy is an option the study has not
(``--overwrite``, ``--run``) names what a study can do instead. The file layout is the
demo's: ``out/phantom64.zarr`` (or ``data.json``'s store), ``out/runs/``, ``out/synthetic/``,
``out/evaluation/``, ``out/bench/``.

Under ``torchrun`` every rank runs the study: training, sampling and evaluation distribute as
their commands do; ``prepare`` and ``bench`` run on the main rank while the others wait for its
mark in ``study.json``.

Why a command and not a shell script: stage skipping needs the settings each stage ran with,
and a YAML file checked up front (:func:`load_config`: an unknown key at any level, a misspelt
model; :func:`check_stages`: every stage's values, e.g. a task, solver or NFE budget that the
stage would refuse) fails in a second rather than after hours of training; the commands stay
available for a stage run by hand.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from edmcli.config import load_yaml_mapping
from edmcli.console import console, styled
from edmcli.errors import EchoSynthError
from edmcli.runs.output_folder import check_output_folder, mark_output_folder
from edmcli.settings import PIPELINES, generator_recipe, known_settings
from edmcli.study_checks import check_stages, check_types

SECTIONS: dict[str, tuple[str, ...]] = {
    "data": ("store", "source", "size", "n_patients", "split_ratio", "camus_dir", "folder",
             "image_glob", "label_template", "meta_pattern", "keep_aspect"),
    "train": ("preset", "precision", "vae", "diffusion"),
    "sample": ("nfe", "solver", "k", "splits", "batch", "compile", "guidance", "precision",
               "transforms", "privacy_filter", "frontier"),
    "distill": ("method", "steps", "batch", "lr", "ema_decay", "nfe"),
    "evaluate": ("preset", "tasks", "fidelity", "overrides", "precision", "checkpoint", "jobs"),
    "bench": ("preset", "models", "nfe", "batch", "repeats", "compile", "peer", "dtype"),
}  # fmt: skip
TOP = ("out", "seed", "device", "models", "generator", *SECTIONS)
# the settings mappings inside a section, and the kind of run whose settings they hold (None:
# the downstream tasks')
NESTED = (("train", "vae", "vae"), ("train", "diffusion", "diffusion"),
          ("evaluate", "overrides", None))  # fmt: skip
STAGES = ("prepare", "train-vae", "train-diffusion", "distill", "sample", "evaluate", "bench")
OPTIONAL_SECTIONS = ("bench", "distill")  # `null` or absent: no such stage
WAIT_POLL_S = 5.0
STUDY = PIPELINES["study"]  # what a config leaves out: one named row of the settings table


def load_config(path: Path) -> dict[str, Any]:
    """Read and check a study YAML file (a syntax error: one line with its line and column):
    known keys only, at every level (the sections and the settings mappings inside them), the
    models registered, NFEs ≥ 1, ``out``, ``seed`` and ``device`` of their types. The values of
    every stage's options: :func:`check_stages`."""
    from edmcli.evaluation.downstream import TASKS
    from edmcli.models.registry import MODEL_NAMES

    path = Path(path)
    config = load_yaml_mapping(path, "study config")
    _known(config, TOP, str(path))
    for section, keys in SECTIONS.items():
        value = config.get(section)
        if value is None and section in OPTIONAL_SECTIONS:
            config[section] = None
            continue  # `bench: null` (or absent): no bench stage
        if value is not None and not isinstance(value, dict):
            raise EchoSynthError(f"{path}: {section} must be a mapping, got {value!r}")
        config[section] = dict(value or {})
        _known(config[section], keys, f"{path}: {section}")
    for section, key, kind in NESTED:
        value = config[section].get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise EchoSynthError(f"{path}: {section}.{key} must be a mapping, got {value!r}")
        kinds = TASKS if kind is None else (kind,)
        known = sorted(set().union(*(known_settings(k) for k in kinds)))
        _known(value, tuple(known), f"{path}: {section}.{key}")
    models = config.get("models")
    if not models or not isinstance(models, list):
        raise EchoSynthError(f"{path}: models must be a list of models ({', '.join(MODEL_NAMES)})")
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown:
        raise EchoSynthError(
            f"{path}: unknown model {unknown[0]!r}; valid: {', '.join(MODEL_NAMES)}"
        )
    nfes = config["sample"].get("nfe")
    if (
        not nfes
        or not isinstance(nfes, list)
        or not all(isinstance(n, int) and n >= 1 for n in nfes)
    ):
        raise EchoSynthError(f"{path}: sample.nfe must be a list of integers ≥ 1, got {nfes!r}")
    _check_nfe_lists(config, path)
    for key in ("out", "seed", "device", "generator"):
        config.setdefault(key, STUDY[key])
    with _checking_generator(path):
        recipe = generator_recipe(str(config["generator"]))
    # the recipe's settings under the file's own (train.vae, train.diffusion, sample)
    train = config["train"]
    for kind in ("vae", "diffusion"):
        if recipe[kind]:
            train[kind] = {**recipe[kind], **(train.get(kind) or {})}
    config["sample"] = {**recipe["sample"], **config["sample"]}
    check_types(config, {"out": Path, "seed": int, "device": str}, f"{path}: ")
    return config


def _nfe_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value)
    )


def _check_nfe_lists(config: dict[str, Any], path: Path) -> None:
    """``sample.frontier`` (solver → NFEs: more stores per model, for the Dice-vs-cost frontier)
    and ``distill.nfe`` (the students' NFEs, default all they are made for) are lists of NFEs."""
    from edmcli.training.distill_plan import STUDENT_NFES

    frontier = config["sample"].get("frontier")
    if frontier is not None:
        if not isinstance(frontier, dict) or not all(map(_nfe_list, frontier.values())):
            raise EchoSynthError(
                f"{path}: sample.frontier maps a solver to a list of NFEs (dpmpp_3m: [4, 8]), "
                f"got {frontier!r}"
            )
    if config.get("distill") is not None:
        nfes = config["distill"].setdefault("nfe", list(STUDENT_NFES))
        if not _nfe_list(nfes) or not set(nfes) <= set(STUDENT_NFES):
            raise EchoSynthError(
                f"{path}: distill.nfe must list NFEs a student is made for "
                f"({', '.join(map(str, STUDENT_NFES))}), got {nfes!r}"
            )


def study_nfes(config: dict[str, Any]) -> list[int]:
    """Every NFE a study samples at (the bench's curve): 1, sample.nfe, the frontier's, the
    students'."""
    nfes = {1, *config["sample"]["nfe"]}
    for more in (config["sample"].get("frontier") or {}).values():
        nfes |= set(more)
    nfes |= set((config.get("distill") or {}).get("nfe") or [])
    return sorted(nfes)


@contextmanager
def _checking_generator(path: Path) -> Iterator[None]:
    try:
        yield
    except EchoSynthError as exc:
        raise EchoSynthError(f"{path}: {exc}") from None


def _known(values: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise EchoSynthError(f"{where}: unknown setting {unknown[0]!r}; known: {', '.join(keys)}")


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class StudyLog:
    """``study.json``: the finished stages, each with its settings and wall time."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / "study.json"

    def read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"format": "echo-synth-study", "stages": {}}
        try:
            return json.loads(self.path.read_text())
        except json.JSONDecodeError:
            raise EchoSynthError(
                f"{self.path} is corrupt; delete it to rerun every stage"
            ) from None

    def done(self, key: str, settings: Any) -> bool:
        entry = self.read()["stages"].get(key)
        return bool(entry) and entry["settings"] == _plain(settings)

    def mark(self, key: str, settings: Any, wall_s: float) -> None:
        record = self.read()
        record["stages"][key] = {"settings": _plain(settings), "wall_s": round(wall_s, 1)}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, self.path)

    def check_prepared(self, settings: dict[str, Any], store: Path, config: Path) -> None:
        """Refuse data ``settings`` other than those the study's store was prepared with (the
        ``prepare`` record) while that store or a stage made from it exists: the store would
        be used as it is, and the finished stages skipped, under the new settings. A setting
        left out and the same setting given at prepare's default are the same."""
        stages = self.read()["stages"]
        entry = stages.get("prepare")
        if entry is None:
            return
        old, new = _prepare_settings(entry["settings"]), _prepare_settings(_plain(settings))
        diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        diffs = [k for k in diffs if k != "store"] or diffs  # a default path follows the rest
        later = [k for k in stages if k != "prepare"]
        if not diffs or not (later or store.exists()):
            return  # nothing made from the earlier data: prepare runs with the new settings
        changed = ", ".join(f"data.{k} is {new.get(k)!r} (was {old.get(k)!r})" for k in diffs)
        them = "them" if len(diffs) > 1 else "it"
        if later:
            raise EchoSynthError(
                f"{config}: {changed}, but {self.path} records {store} as prepared with the "
                f"earlier data and {len(later)} stages made from it ({later[0]}, …); put "
                f"{them} back, or {NEW_STUDY}"
            )
        raise EchoSynthError(
            f"{config}: {changed}, but {store} was prepared with the earlier data "
            f"({self.path}); put {them} back, delete {store} to prepare it again, or {NEW_STUDY}"
        )


NEW_STUDY = "set out to a new folder for a study with the new settings"
# the tails of a run folder's refusals (edmcli.runs.folder) that name an option the study has
# not: its runs are OUT/runs/NAME
_RUN_ADVICE = ("use another --run", "choose another --run")


def _prepare_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A ``prepare`` record's settings with the defaults it leaves out (prepare's own, the
    study's source and size), so that a default given is the same as one left out."""
    import inspect

    from edmcli.data.prepare_plan import plan_prepare

    params = inspect.signature(plan_prepare).parameters.values()
    defaults = {p.name: p.default for p in params
                if p.kind is p.KEYWORD_ONLY and p.name not in ("seed", "overwrite")}  # fmt: skip
    return {**defaults, "source": STUDY["source"], "size": STUDY["size"], **settings}


@contextmanager
def _study_advice(
    log: StudyLog,
    key: str,
    settings: Any,
    config: Path,
    section: str,
    output: Path | None,
) -> Iterator[None]:
    """A stage command's refusal whose remedy is an option the study does not have, told as
    what a study can do: an ``output`` store that the stage's command did not write with
    these settings (``--overwrite``: the settings that changed since ``study.json`` recorded
    the stage, put back, or a new study), a run folder started with other settings
    (``--run``: a new study)."""
    from edmcli.sampling.sample_plan import output_exists_error

    try:
        yield
    except EchoSynthError as exc:
        text = str(exc)
        if output is not None and text == str(output_exists_error(output)):
            message = _changed_output(log, key, settings, config, section, output)
            raise EchoSynthError(message) from None
        for tail in _RUN_ADVICE:
            if text.endswith(tail):
                raise EchoSynthError(f"study: {key}: {text[: -len(tail)]}{NEW_STUDY}") from None
        raise


def _changed_output(
    log: StudyLog, key: str, settings: Any, config: Path, section: str, output: Path
) -> str:
    """The refusal of a sampled store that its stage's new ``settings`` would not write."""
    stages = log.read()["stages"]
    old, new = (stages.get(key) or {}).get("settings") or {}, _plain(settings)
    diffs = [k for k in sorted(set(old) | set(new)) if old and old.get(k) != new.get(k)]
    if not diffs:
        return (
            f"{config}: {output} exists but {log.path} records no {key} that made it with "
            f"these settings; move it away, or {NEW_STUDY}"
        )
    changed = ", ".join(
        f"{k if k in TOP else f'{section}.{k}'} is {new.get(k)!r} (was {old.get(k)!r})"
        for k in diffs
    )
    them = "them" if len(diffs) > 1 else "it"
    if "evaluate" in stages:  # evaluated: a new store would leave the evaluation stale
        return (
            f"{config}: {changed}, but {output} was sampled with the earlier settings and "
            f"evaluated ({log.path}); put {them} back, or {NEW_STUDY}"
        )
    return (
        f"{config}: {changed}, but {output} was sampled with the earlier settings "
        f"({log.path}); put {them} back, delete {output} to sample it again, or {NEW_STUDY}"
    )


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True)
class _Using:
    """The plan of a prepare stage whose store exists: it is used as it is."""

    store: Path

    def describe(self) -> list[str]:
        return [f"using {self.store}"]


def run_study(
    config_path: Path, *, only: list[str] | None = None, dry_run: bool = False
) -> dict[str, Any]:
    """Run (or resume) the study of ``config_path``; ``only``: a subset of :data:`STAGES`.
    Returns the ``study.json`` record. ``dry_run``: plan every stage instead (each stage's
    ``plan_*``: its refusals and resolved settings, printed), write nothing; a stage whose input
    an earlier, unfinished stage makes is listed as waiting for it (its plan needs that input)."""
    from edmcli.models.registry import get_spec

    config = load_config(config_path)
    for stage in only or []:
        if stage not in STAGES:
            raise EchoSynthError(f"--only {stage!r}: choose from {', '.join(STAGES)}")
    out = Path(config["out"])
    check_output_folder(out, "study", option=f"{config_path}: out")
    log = StudyLog(out)
    seed, device, models = config["seed"], config["device"], config["models"]
    data = dict(config["data"])
    size = data.get("size", STUDY["size"])
    source = data.get("source", STUDY["source"])
    store = Path(data.pop("store", None) or out / f"{source}{size}.zarr")
    prepare_settings = {"store": str(store), **data}
    check_stages(config, Path(config_path), store)
    log.check_prepared(prepare_settings, store, config_path)
    if not dry_run:
        mark_output_folder(out, "study")
    train = config["train"]
    preset = train.get("preset", STUDY["train_preset"])
    latents = sorted({get_spec(m).latent for m in models if get_spec(m).is_latent})
    runs = out / "runs"
    pending: set[str] = set()  # dry run: stages that would run, so later ones wait for them

    def stage(
        name: str,
        key: str,
        settings: Any,
        work: Callable[[], Any],
        plan: Callable[[], Any],
        needs: tuple[str, ...] = (),
        main_only: bool = False,
        section: str = "",
        output: Path | None = None,
    ):
        if only and name not in only:
            return
        if log.done(key, settings):
            console.print(f"study: {key} done, skipped", highlight=False)
            return
        advice = partial(_study_advice, log, key, settings, config_path, section, output)
        if dry_run:
            waits = [k for k in needs if k in pending]
            if waits:
                pending.add(key)
                console.print(f"study: {key}: planned once {waits[0]} has run", highlight=False)
                return
            with advice():
                planned = plan()
            if not isinstance(planned, _Using):  # an existing store: nothing to wait for
                pending.add(key)
            console.print(f"study: {key}: would run", highlight=False)
            for line in planned.describe():
                console.print(f"  {line}", highlight=False)
            return
        console.rule(styled(f"study: {key}"))
        if main_only and not _is_main():
            while not log.done(key, settings):  # the main rank marks it when it is done
                time.sleep(WAIT_POLL_S)
            return
        start = time.perf_counter()
        with advice():
            work()
        if _is_main():
            log.mark(key, settings, time.perf_counter() - start)

    from edmcli.bench.bench import bench
    from edmcli.bench.bench_plan import plan_bench
    from edmcli.data.prepare import prepare
    from edmcli.data.prepare_plan import plan_prepare
    from edmcli.evaluation.evaluate import evaluate
    from edmcli.evaluation.evaluate_plan import plan_evaluate
    from edmcli.sampling.preview import preview_samples
    from edmcli.sampling.sample import sample
    from edmcli.sampling.sample_plan import plan_sample
    from edmcli.training.diffusion import train_diffusion
    from edmcli.training.diffusion_plan import latent_model_settings, plan_train_diffusion
    from edmcli.training.distill import distill
    from edmcli.training.distill_plan import is_edm, plan_distill
    from edmcli.training.vae import train_vae
    from edmcli.training.vae_plan import plan_train_vae

    def prepare_store():
        if store.exists():
            console.print(f"using {store}", highlight=False)
            return
        prepare(store, seed=seed, **data)

    def plan_store():
        if store.exists():
            return _Using(store)
        return plan_prepare(store, seed=seed, **data)

    stage("prepare", "prepare", prepare_settings, prepare_store, plan_store, main_only=True)
    common = {"preset": preset, "device": device, "seed": seed,
              "precision": train.get("precision", "auto")}  # fmt: skip
    vae_settings = {**common, **(train.get("vae") or {})}
    for latent in latents:
        args = (store, latent)
        kwargs = {"run": runs / f"vae-l{latent}", **vae_settings}
        stage("train-vae", f"train-vae l{latent}", vae_settings,
              partial(train_vae, *args, **kwargs), partial(plan_train_vae, *args, **kwargs),
              needs=("prepare",))  # fmt: skip
    diffusion_settings = {**common, **(train.get("diffusion") or {})}
    for model in models:
        spec = get_spec(model)
        vae = runs / f"vae-l{spec.latent}" if spec.is_latent else None
        settings = latent_model_settings(diffusion_settings, spec.is_latent)
        kwargs = {"vae": vae, "run": runs / model, "preview": preview_samples, **settings}
        needs = ("prepare", f"train-vae l{spec.latent}") if spec.is_latent else ("prepare",)
        stage("train-diffusion", f"train-diffusion {model}", settings,
              partial(train_diffusion, model, store, **kwargs),
              partial(plan_train_diffusion, model, store, **kwargs), needs=needs)  # fmt: skip
    sampling = {"compile": STUDY["compile"], "splits": STUDY["sample_splits"], **config["sample"],
                "seed": seed, "device": device}  # fmt: skip
    nfes = sampling.pop("nfe")
    frontier = sampling.pop("frontier", None) or {}
    evaluation = {"preset": STUDY["evaluate_preset"], "fidelity": STUDY["fidelity"],
                  **config["evaluate"], "seed": seed, "device": device}  # fmt: skip
    # the probe of each store: the same generator and settings on the test maps, one sample per
    # map, judged for label fidelity only (never trained on)
    probing = {**sampling, "splits": "test", "k": 1}
    synthetic, probes, sample_keys = [], [], []

    def sample_stage(key: str, run: str, nfe: int, path: Path, options: dict, needs: str) -> None:
        sample_keys.append(key)
        kwargs = {"run": runs / run, "nfe": nfe, "out": path, **options}
        stage("sample", key, options, partial(sample, **kwargs),
              partial(plan_sample, **kwargs), needs=(needs,),
              section="sample", output=path)  # fmt: skip

    def stores(run: str, name: str, nfe: int, needs: str, solver: str | None = None) -> None:
        """The training store and its probe of ``run`` at ``nfe`` (``solver``: not the
        default's), named ``name-nfeN``."""
        extra = {} if solver is None else {"solver": solver}
        synthetic.append(out / "synthetic" / f"{name}-nfe{nfe}.zarr")
        sample_stage(f"sample {name} nfe {nfe}", run, nfe, synthetic[-1], {**sampling, **extra},
                     needs)  # fmt: skip
        if evaluation["fidelity"]:
            probes.append(out / "synthetic" / f"{name}-nfe{nfe}-probe.zarr")
            sample_stage(f"probe {name} nfe {nfe}", run, nfe, probes[-1], {**probing, **extra},
                         needs)  # fmt: skip

    students = [m for m in models if config.get("distill") is not None and is_edm(m)]
    distill_settings = {k: v for k, v in (config.get("distill") or {}).items() if k != "nfe"}
    for model in students:
        kwargs = {"run": runs / f"{model}-student", "preview": preview_samples, "seed": seed,
                  "device": device, **distill_settings}  # fmt: skip
        stage("distill", f"distill {model}", distill_settings,
              partial(distill, runs / model, **kwargs),
              partial(plan_distill, runs / model, **kwargs),
              needs=(f"train-diffusion {model}",))  # fmt: skip
    for model in models:
        for nfe in nfes:
            stores(model, model, nfe, f"train-diffusion {model}")
        for solver, more in frontier.items():
            for nfe in more:
                stores(model, f"{model}-{solver}", nfe, f"train-diffusion {model}", solver)
        if model in students:
            for nfe in config["distill"]["nfe"]:
                stores(f"{model}-student", f"{model}-student", nfe, f"distill {model}")
    train_specs = [str(store), *map(str, synthetic)]
    if probes:
        evaluation["probes"] = probes
    args = (train_specs, store, out / "evaluation")
    stage("evaluate", "evaluate", {**evaluation, "train": train_specs,
                                   "probes": [str(p) for p in probes]},
          partial(evaluate, *args, **evaluation), partial(plan_evaluate, *args, **evaluation),
          needs=("prepare", *sample_keys))  # fmt: skip
    if config.get("bench") is not None:
        options = {"models": models, "nfe": study_nfes(config), "peer": STUDY["bench_peer"],
                   **config["bench"], "device": device}  # fmt: skip
        kwargs = {"out": out / "bench", "reports": [out / "evaluation"], **options}
        stage("bench", "bench", options, partial(bench, **kwargs), partial(plan_bench, **kwargs),
              needs=("evaluate",), main_only=True)  # fmt: skip
    if dry_run:
        console.print(f"study: dry run, nothing written; {len(pending)} stages to run",
                      highlight=False)  # fmt: skip
        return log.read()
    record = log.read()
    console.rule(styled("study: done"))
    console.print(f"everything is under {out}; stages in {log.path}", highlight=False)
    return record
