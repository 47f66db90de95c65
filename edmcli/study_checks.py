"""The up-front check of a study file's stage options (:func:`check_stages`): every value a
stage would refuse, found before any stage runs, by each stage's own checks wherever they need
nothing an earlier stage writes, against the constants the commands use."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from edmcli.errors import EchoSynthError
from edmcli.settings import PIPELINES

STUDY = PIPELINES["study"]


@contextmanager
def _checking(where: str) -> Iterator[None]:
    """A stage's own refusal, prefixed with where in the study file it comes from (``FILE:
    section``); the model registry and the network configs refuse with ValueError."""
    try:
        yield
    except (EchoSynthError, ValueError) as exc:
        raise EchoSynthError(f"{where}: {exc}") from None


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "text",
               Path: "a path", type(None): "null"}  # fmt: skip


def check_types(
    values: dict[str, Any], hints: dict[str, Any], prefix: str, skip_none: bool = False
) -> None:
    """Each value of a type the stage takes for it (``hints``: the annotations of its
    parameters or settings; ``prefix`` names the section, ``FILE: section.``): YAML reads
    ``1e-3`` as text, which a stage would meet only deep in its work. Generic annotations
    (lists, mappings) are left to the stage's own checks; ``skip_none``: null means unset."""
    for key, value in values.items():
        hint = hints.get(key)
        if hint is None or (skip_none and value is None):
            continue
        accepted = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
        if not all(isinstance(t, type) and get_origin(t) is None for t in accepted):
            continue
        types = {*accepted, *((int,) if float in accepted else ()),
                 *((str,) if Path in accepted else ())}  # fmt: skip
        if isinstance(value, tuple(types)) and (bool in types or not isinstance(value, bool)):
            continue
        expected = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in accepted)
        note = ""
        if float in accepted and isinstance(value, str):
            try:
                float(value)
                note = " (YAML reads a number such as 1e-3 as text: write 1.0e-3)"
            except ValueError:
                pass
        raise EchoSynthError(f"{prefix}{key} must be {expected}, got {value!r}{note}")


def _check_choice(value: Any, choices: tuple[str, ...] | list[str], what: str) -> None:
    if value not in choices:
        raise EchoSynthError(f"{what} {value!r} is unknown; choose from {', '.join(choices)}")


def check_stages(config: dict[str, Any], path: Path, store: Path) -> None:
    """Check every stage's options before any stage runs (a loaded ``config``; ``store``: the
    study's dataset store): types, choices and ranges, by each stage's own checks wherever they
    need nothing an earlier stage writes — the prepare and bench plans whole; the training
    settings, the Γ-VAE and network configs and the engine's config of every run; the sampling
    solver, splits, guidance and NFE budget of every model; the evaluation's tasks, settings,
    checkpoint choice and jobs — against the constants the commands use. A stage's checks that
    read an earlier stage's output (a store's images, a run's checkpoint) run when it is
    planned."""
    from edmcli.bench.bench_plan import plan_bench
    from edmcli.data.prepare_plan import plan_prepare
    from edmcli.data.store import DatasetStore
    from edmcli.evaluation.evaluate_plan import plan_evaluate
    from edmcli.runs.distributed import process_layout, resolve_device
    from edmcli.training.engine import PRECISIONS

    seed, device = config["seed"], config["device"]
    world_size, _rank, local_rank = process_layout()
    with _checking(f"{path}: device"):
        device_used = str(resolve_device(device, local_rank))
    data = {k: v for k, v in config["data"].items() if k != "store"}
    check_types(data, get_type_hints(plan_prepare), f"{path}: data.")
    if store.exists():
        with _checking(f"{path}: data.store"):
            size = DatasetStore(store).image_size[0]
    else:
        with _checking(f"{path}: data"):
            size = plan_prepare(store, seed=seed, **data).size
    train = config["train"]
    precision = train.get("precision", "auto")
    with _checking(f"{path}: train.precision"):
        _check_choice(precision, PRECISIONS, "precision")
    classes = _check_training(config, path, store, size, world_size)
    _check_sampling(config, path, classes)
    evaluation = config["evaluate"]
    check_types({k: v for k, v in evaluation.items() if k != "tasks"},
                 get_type_hints(plan_evaluate), f"{path}: evaluate.")  # fmt: skip
    _check_evaluation(evaluation, path, seed, device_used, world_size)
    if config.get("bench") is not None:
        check_types(config["bench"], get_type_hints(plan_bench), f"{path}: bench.")
        from edmcli.study import study_nfes

        options = {"models": config["models"], "nfe": study_nfes(config),
                   "peer": STUDY["bench_peer"], **config["bench"], "device": device}  # fmt: skip
        with _checking(f"{path}: bench"):
            plan_bench(out=Path(config["out"]) / "bench", **options)


def _check_training(
    config: dict[str, Any], path: Path, store: Path, size: int, world_size: int
) -> dict[str, str | None]:
    """The Γ-VAE and diffusion runs' settings (as :func:`~edmcli.settings.resolve` takes them),
    Γ-VAE settings, network configs and engine configs; returns each model's class
    conditioning (None: label maps only)."""
    from dataclasses import fields

    from edmcli.models.registry import get_spec, precond_settings, preset_row, unet_config
    from edmcli.runs.diffusion_run import CLASS_CONDITIONS, check_class_cond
    from edmcli.runs.vae_run import VAESettings
    from edmcli.settings import PRESET_NAMES, resolve, training_steps
    from edmcli.training.diffusion_plan import (
        PRECOND_SETTINGS,
        UNET_SETTINGS,
        check_latent_norm,
        class_settings,
        latent_model_settings,
        noise_level_settings,
    )
    from edmcli.training.engine import TrainConfig
    from edmcli.training.vae_plan import check_perceptual_weights

    train, seed = config["train"], config["seed"]
    preset = train.get("preset", STUDY["train_preset"])
    precision = train.get("precision", "auto")
    engine = get_type_hints(TrainConfig)
    with _checking(f"{path}: train.preset"):
        _check_choice(preset, PRESET_NAMES, "preset")

    def check_engine(values: dict[str, Any]) -> None:  # the run's length counted on one image
        steps = training_steps(values, 1)
        TrainConfig.from_values(values, steps, precision, seed).validate(world_size)

    specs = [get_spec(model) for model in config["models"]]
    overrides = dict(train.get("vae") or {})
    check_types(overrides, {**engine, **get_type_hints(VAESettings)}, f"{path}: train.vae.",
                 skip_none=True)  # fmt: skip
    taken = {f.name for f in fields(VAESettings)} - {"data", "latent", "image_size"}
    for latent in sorted({spec.latent for spec in specs if spec.is_latent}):
        with _checking(f"{path}: train.vae"):
            values = resolve("vae", preset, overrides)
            settings = VAESettings(data=str(store), latent=latent, image_size=size,
                                   **{k: v for k, v in values.items()
                                      if k in taken and v is not None})  # fmt: skip
            settings.validate()
            check_perceptual_weights(settings.perceptual)
            check_engine(values)
    overrides = dict(train.get("diffusion") or {})
    check_types(overrides, engine, f"{path}: train.diffusion.", skip_none=True)
    classes: dict[str, str | None] = {}
    for spec in specs:
        with _checking(f"{path}: train.diffusion ({spec.name})"):
            row = preset_row(spec.name, preset).training
            own = latent_model_settings(overrides, spec.is_latent)
            values = resolve("diffusion", preset, own, defaults=row)
            check_latent_norm(values.get("latent_norm"), values.get("latent_outside"),
                              spec.name, spec.is_latent)  # fmt: skip
            noise_level_settings(values, spec.name)
            class_cond = check_class_cond(values.get("class_cond"))
            if class_cond is None or store.exists():  # reads the store's views for classes
                class_cond = class_settings(values, store)[0]
            unet = {k: values[k] for k in UNET_SETTINGS if values.get(k) is not None}
            precond = {k: values[k] for k in PRECOND_SETTINGS if values.get(k) is not None}
            if class_cond is not None:
                unet["num_classes"] = CLASS_CONDITIONS[class_cond]
            if precond.get("sigma_data", 1) <= 0:  # it divides the preconditioning's scales
                raise EchoSynthError(f"sigma_data {precond['sigma_data']} must be positive")
            net_size = size * spec.latent // 256 if spec.is_latent else size
            unet_config(spec.name, preset, net_size, precond=precond_settings(spec.name, **precond),
                        **unet)  # fmt: skip
            check_engine(values)
        classes[spec.name] = class_cond
    return classes


def _check_sampling(config: dict[str, Any], path: Path, classes: dict[str, str | None]) -> None:
    """The sampling options: types, the solver, splits and precision, the guidance scale (a
    class-conditional model's only) and every NFE budget that each model's solver can spend."""
    from edmcli.data.labels import SPLITS
    from edmcli.models.registry import get_spec
    from edmcli.sampling.sample_plan import MAX_GUIDANCE, guided_plan, plan_sample
    from edmcli.sampling.solvers import SOLVERS
    from edmcli.training.engine import PRECISIONS

    options = {k: v for k, v in config["sample"].items() if k not in ("nfe", "frontier")}
    where = f"{path}: sample"
    check_types(options, get_type_hints(plan_sample), f"{where}.")
    for key in ("k", "batch"):
        if options.get(key, 1) < 1:
            raise EchoSynthError(f"{where}.{key} {options[key]} must be at least 1")
    splits = options.get("splits", STUDY["sample_splits"])
    names = splits.split(",") if isinstance(splits, str) else splits
    if not isinstance(names, list) or not names:
        raise EchoSynthError(f"{where}.splits must name splits of {', '.join(SPLITS)}")
    with _checking(where):
        for name in names:
            _check_choice(str(name).strip(), SPLITS, "split")
        if "precision" in options:
            _check_choice(options["precision"], PRECISIONS, "precision")
        if options.get("solver") is not None:
            _check_choice(options["solver"], tuple(SOLVERS), "solver")
    guidance = options.get("guidance")
    if guidance is not None and not 0 <= guidance <= MAX_GUIDANCE:
        raise EchoSynthError(f"{where}.guidance {guidance} must be a number from 0 to "
                             f"{MAX_GUIDANCE:g}")  # fmt: skip
    for model, class_cond in classes.items():
        if guidance is not None and class_cond is None:
            raise EchoSynthError(
                f"{where}.guidance needs a model trained with classes (train.diffusion.class_cond "
                f"view); {model} is trained on label maps only"
            )
        scale = (1.0 if guidance is None else float(guidance)) if class_cond else None
        solver = options.get("solver") or get_spec(model).solver
        for nfe in config["sample"]["nfe"]:
            with _checking(f"{where}.nfe ({model})"):
                guided_plan(solver, nfe, scale)
        for other, nfes in (config["sample"].get("frontier") or {}).items():
            with _checking(f"{where}.frontier"):
                _check_choice(other, tuple(s for s in SOLVERS if s != "consistency"), "solver")
            for nfe in nfes:
                with _checking(f"{where}.frontier.{other} ({model})"):
                    guided_plan(other, nfe, scale)
    _check_distill(config, path)


def _check_distill(config: dict[str, Any], path: Path) -> None:
    """A ``distill`` section: its settings' types and method, and an EDM-family model to distil;
    a student samples at the conditional model alone (no guidance)."""
    from edmcli.training.distill_plan import METHODS, is_edm

    options = config.get("distill")
    if options is None:
        return
    where = f"{path}: distill"
    hints = {"method": str, "steps": int, "batch": int, "lr": float, "ema_decay": float}
    check_types({k: v for k, v in options.items() if k != "nfe"}, hints, f"{where}.")
    with _checking(where):
        _check_choice(options.get("method", "ect"), METHODS, "method")
    if not any(is_edm(m) for m in config["models"]):
        raise EchoSynthError(
            f"{where}: distill tunes EDM-family models (edm, edm-l64, edm-l128); the study has "
            f"none ({', '.join(config['models'])})"
        )
    if config["sample"].get("guidance") not in (None, 1, 1.0):
        raise EchoSynthError(
            f"{where}: a student samples the conditional model alone; sample.guidance "
            f"{config['sample']['guidance']} applies to its teacher only (drop one)"
        )


def _check_evaluation(
    evaluation: dict[str, Any], path: Path, seed: int, device: str, world_size: int
) -> None:
    """The evaluation's tasks, preset and settings of each task (and the engine's config of
    its runs), checkpoint choice, precision and jobs."""
    from edmcli.evaluation.downstream import TASKS
    from edmcli.evaluation.evaluate_plan import resolve_task_values
    from edmcli.evaluation.run_pool import check_jobs
    from edmcli.evaluation.train_specs import CHECKPOINT_CHOICES
    from edmcli.training.engine import PRECISIONS, TrainConfig

    where = f"{path}: evaluate"
    tasks = evaluation.get("tasks", list(TASKS))
    if not isinstance(tasks, list) or not tasks:
        raise EchoSynthError(f"{where}.tasks must be a list of {', '.join(TASKS)}, got {tasks!r}")
    overrides = dict(evaluation.get("overrides") or {})
    check_types(overrides, get_type_hints(TrainConfig), f"{where}.overrides.", skip_none=True)
    preset = evaluation.get("preset", STUDY["evaluate_preset"])
    with _checking(where):
        if "precision" in evaluation:
            _check_choice(evaluation["precision"], PRECISIONS, "precision")
        for task in tasks:
            _check_choice(task, TASKS, "task")
            values = resolve_task_values(preset, task, overrides)
            values["validate_every"] = values.get("validate_every") or 1  # None: once an epoch
            precision = evaluation.get("precision", "auto")
            TrainConfig.from_values(values, 1, precision, seed).validate(world_size)
        if "checkpoint" in evaluation:
            _check_choice(evaluation["checkpoint"], CHECKPOINT_CHOICES, "checkpoint")
        if "jobs" in evaluation:
            check_jobs(evaluation["jobs"], device, world_size)
