"""The one settings layer: a preset table per kind of training, applied where a flag is unset.

As in EDM2's preset table, a preset (``paper``: the paper's settings, section III; ``tiny``: a
2-core CPU in minutes) is one row of values per kind of run (``vae``, ``diffusion``, ``seg``,
``cls``). Every command resolves its settings the same way (:func:`resolve`):

    defaults of the model  <  the preset's row  <  ``--config FILE.yaml``  <  flags

(the YAML file and the flags arrive together as the command's non-None options), and every run's
length follows one rule (:func:`training_steps`): ``steps`` if set, else ``epochs`` passes over
the training images, else ``kimg`` thousands of images. A length given on the command line
replaces the preset's length, whatever unit the preset uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edmcli.errors import EchoSynthError

_VAE = {
    "paper": {
        # Γ-VAE: 200 epochs, batch 12, channels 64·level (paper III.B, III.E)
        "base_channels": 64, "num_res_blocks": 2, "norm_groups": 32,
        "epochs": 200, "batch": 12, "lr": 1e-4, "weight_decay": 0.0, "warmup_steps": 500,
        "grad_clip": 1.0, "ema_decay": 0.999, "perceptual": "alex", "warmup_epochs": 5,
        "checkpoint_every": 2000, "log_every": 50, "grid_every": 2000, "num_workers": 2,
    },
    "tiny": {
        # 64² phantom images on a 2-core CPU in a few minutes. The latent term weighs 10, not
        # the authors' 1e-2. The Gamma posterior's noise is multiplicative (std = mean/√α), so
        # small latents are the most precise code: where the decoder can use fine detail (L128,
        # 2× down) the reconstruction term pays the encoder to code bright, detailed tissue as
        # small z, inverting the latent unless the latent term outweighs it. Measured on the
        # demo's 24-patient 64² phantom (300 steps): L128 latent-image correlation −0.85 at
        # weight 1 (−0.79 with the term on from step 0: not a warm-up effect), +0.99 at 10
        # (22.11 → 21.86 dB PSNR); L64 +0.94 at 1, +0.99 at 10 (19.83 → 19.72 dB).
        "base_channels": 16, "num_res_blocks": 1, "norm_groups": 8,
        "epochs": 60, "batch": 16, "lr": 2e-3, "weight_decay": 0.0, "warmup_steps": 20,
        "grad_clip": 1.0, "ema_decay": 0.95, "perceptual": "none", "warmup_epochs": 3,
        "w_latent": 10.0,
        "checkpoint_every": 100, "log_every": 20, "grid_every": 200, "num_workers": 0,
    },
}  # fmt: skip


# Diffusion training. Paper: 5×10⁵ training images (section III.E); the global batch is the
# model's (ModelSpec.paper_batch: 24 at 256² pixels, 54 at 128², 120 at 64² latents) unless a
# preset sets one; geometric augmentation only. ``class_cond``: None is the paper's map-only
# model; ``view`` / ``view-phase`` add a class embedding of the image's view (and phase) with
# classifier-free guidance dropout ``class_dropout`` (default 0.1; runs.diffusion_run). It is a
# setting of the rows, not a preset of its own: presets here are scales shared by every kind of
# run (and the registry's architectures), conditioning is orthogonal to scale.
_DIFFUSION = {
    "paper": {
        "kimg": 500, "lr": 1e-4, "weight_decay": 0.0, "warmup_steps": 1000, "grad_clip": 1.0,
        "ema_decay": 0.9999, "checkpoint_every": 5000, "log_every": 100, "grid_every": 5000,
        "validate_every": 5000, "num_workers": 4, "class_cond": None,
    },
    "tiny": {
        # pixel models at 64² or latent models at 16²/32² on a 2-core CPU in minutes
        "steps": 400, "batch": 16, "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 20,
        "grad_clip": 1.0, "ema_decay": 0.95, "checkpoint_every": 100, "log_every": 20,
        "grid_every": 200, "validate_every": 100, "num_workers": 0, "class_cond": None,
    },
}  # fmt: skip


# Downstream evaluation (``echo-synth evaluate --preset``). ``paper``: section III.C (256², Adam lr
# 1e-4; Adam = AdamW with weight decay 0; the paper names no batch size, EMA or clipping: none of
# the latter two), trained "until convergence": a run stops after ``patience`` validations (once
# per epoch: ``validate_every`` None) whose score (mean Dice / accuracy on real validation images,
# train_specs.choose_validation) does not beat the best by more than ``min_delta``, counted from
# step ``min_steps``, and at the latest at the paper's 250 epochs (``epochs``: the cap).
# Schedule (both presets): a linear warm-up, then reduce-on-plateau — the rate × ``plateau_factor``
# after ``plateau_patience`` validations without improvement, not below ``lr_min_ratio``·lr.
# EfficientNetV2-S from scratch is batch-normalised: its BN statistics and Adam's moment estimates
# start empty, and a warm-up avoids the large first updates that knock it into predicting one
# class (torchvision's own EfficientNetV2 recipe warms up linearly for 5 epochs). Its recipe then
# decays with a cosine over a fixed 600 epochs; here the length is not fixed: with early stopping
# most runs end long before the cap, so a cosine over 250 epochs would stop them at 0.6–0.9× the
# peak rate without ever annealing, while a plateau cut anneals when the validation signal
# stalls, and "stopped" then means "no gain at the lowered rate either" (patience > plateau
# patience: two cuts before a stop). It depends on the validation history only, so a run
# lengthened on resume (epochs and steps may change) takes the path of a run started that long
# (the cosine, ``lr_schedule: cosine``, would change course). ``min_delta`` 1e-3: 0.1 Dice points,
# and less than one validation image of 1000 for the classifier, whose score's cross-entropy
# tie-break (≤ 1e-4, downstream._CE_TIEBREAK) then never counts alone. ``min_steps``: the
# classifier may sit at chance for a while before it learns; flat validations before it do not
# count.
# ``tiny``: 64² phantom stores on a 2-core CPU, sized for the demo (two training stores × seg +
# cls): a step budget (``steps``) and an epoch cap (``epochs``), whichever comes first
# (run_length.run_length), with validations every 20–25 steps. The demo's real store has ≈ 80
# train images (5 steps per epoch: the cap of 80 epochs ends it at ≈ 400 steps), its synthetic
# store ≈ 440 (27 steps per epoch: the budget ends it at ≈ 15 epochs). Worst case (no early stop)
# at the per-step costs of docs/design.md: 4 runs × 400 steps ≈ 2 × (1.3 + 3.3) min; the lead's
# measurement is in the closing note. On larger stores give ``--epochs N`` (a length on
# the command line replaces both the budget and the cap); patience still ends the run.
# Measured before early stopping on a 50-patient 64² phantom store (160 train images, one CPU
# thread): segmentation ≈ 1 min to a validation mean Dice of 0.96; the classifier sits at chance
# for ~60 steps, then reaches 95–100 % validation accuracy, with dips that the weight EMA (0.9)
# smooths out. ``base_filters``/``max_filters``: DynUNet channels base·2^level, capped (MONAI's
# 2-D default is 32/512).
_EVAL = {
    "paper": {
        "seg": {
            "size": 256, "epochs": 250, "steps": None, "batch": 16, "lr": 1e-4,
            "weight_decay": 0.0, "warmup_steps": 200, "grad_clip": None, "ema_decay": 0.0,
            "lr_schedule": "plateau", "plateau_patience": 10, "plateau_factor": 0.5,
            "lr_min_ratio": 0.01, "patience": 25, "min_delta": 1e-3, "min_steps": 2000,
            "validate_every": None, "checkpoint_every": 2000, "log_every": 50,
            "num_workers": 2, "augment": True, "base_filters": 32, "max_filters": 512,
            "deep_supervision": True, "eval_batch": 32,
        },
        "cls": {
            "size": 256, "epochs": 250, "steps": None, "batch": 32, "lr": 1e-4,
            "weight_decay": 0.0, "warmup_steps": 500, "grad_clip": None, "ema_decay": 0.0,
            "lr_schedule": "plateau", "plateau_patience": 10, "plateau_factor": 0.5,
            "lr_min_ratio": 0.01, "patience": 25, "min_delta": 1e-3, "min_steps": 2000,
            "validate_every": None, "checkpoint_every": 2000, "log_every": 50,
            "num_workers": 2, "augment": True, "eval_batch": 64,
        },
    },
    "tiny": {
        "seg": {
            "size": 64, "epochs": 80, "steps": 400, "batch": 16, "lr": 2e-3,
            "weight_decay": 0.0, "warmup_steps": 20, "grad_clip": 1.0, "ema_decay": 0.9,
            "lr_schedule": "plateau", "plateau_patience": 3, "plateau_factor": 0.5,
            "lr_min_ratio": 0.01, "patience": 6, "min_delta": 1e-3, "min_steps": 100,
            "validate_every": 25, "checkpoint_every": 100, "log_every": 25,
            "num_workers": 0, "augment": True, "base_filters": 16, "max_filters": 128,
            "deep_supervision": True, "eval_batch": 32,
        },
        "cls": {
            "size": 64, "epochs": 80, "steps": 400, "batch": 16, "lr": 3e-4,
            "weight_decay": 0.0, "warmup_steps": 50, "grad_clip": 1.0, "ema_decay": 0.9,
            "lr_schedule": "plateau", "plateau_patience": 3, "plateau_factor": 0.5,
            "lr_min_ratio": 0.01, "patience": 6, "min_delta": 1e-3, "min_steps": 160,
            "validate_every": 20, "checkpoint_every": 100, "log_every": 20,
            "num_workers": 0, "augment": True, "eval_batch": 32,
        },
    },
}  # fmt: skip

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "vae": _VAE,
    "diffusion": _DIFFUSION,
    "seg": {name: rows["seg"] for name, rows in _EVAL.items()},
    "cls": {name: rows["cls"] for name, rows in _EVAL.items()},
}
"""Kind of run → preset name → values."""
PRESET_NAMES = ("paper", "tiny")
# Pixel side of the stores each preset is sized for; a latent model's network side is the
# pixel side × latent / 256 (the paper's latents are named by their side at 256²; the model
# registry's architectures per preset are sized for these).
PIXEL_SIZE = {"paper": 256, "tiny": 64}

# The pipelines' own rows (``echo-synth demo``, ``echo-synth study``): what they run, named here
# beside the presets they run at, not as constants of their modules.
# ``demo``: 64² phantom echoes of 50 patients split 5:1:4 (train:val:test; ≥ 20 test patients
# for a patient-level interval) → Γ-VAE L64 → EDM-L64 → a store sampled at NFE 35 (Heun with 18
# steps: the tiny model needs more than 5 steps, NFE 9) → evaluation, then a quick bench of the
# latent model against ``pixel_model``. ``class_cond``: the generator is also conditioned on
# the view (sampled at guidance scale 1: the class-conditional denoiser alone, no guidance);
# ``none`` is the paper's map-only model. What each costs and gives: the README's measured
# section.
# ``study``: the defaults of a study YAML file's settings that it leaves out (the paper's scale);
# its stores are sampled from the train maps (the val patients choose every run's checkpoint, so
# no run may have seen them) and, with fidelity, one probe store per store from the test maps.
PIPELINES: dict[str, dict[str, Any]] = {
    "demo": {
        "preset": "tiny", "size": 64, "n_patients": 50, "split_ratio": "5:1:4",
        "model": "edm-l64", "latent": 64, "nfe": 35, "class_cond": "view", "pixel_model": "edm",
        "generator": "faithful",
    },
    "study": {
        "source": "phantom", "size": 256, "train_preset": "paper", "evaluate_preset": "paper",
        "fidelity": True, "compile": False, "bench_peer": True, "out": "study", "seed": 0,
        "device": "auto", "sample_splits": "train", "generator": "paper",
    },
}  # fmt: skip
# Generator recipes: settings of train-vae, train-diffusion (latent models) and sample that
# make one generator, under what a command or study sets itself. ``paper``: the paper's (every
# command's defaults). ``faithful``: what measured best on the demo's phantom (README, "Beyond
# the paper"): the synthetic images sampled from the label maps as they are, and a Γ-VAE whose
# decoder also takes the label map (SPADE norms), trained with the power-spectrum term at weight
# 0.1. The paper's random affine + elastic map transforms cost most of the label fidelity
# (57.5 → 76.7 %; decoder ceiling 75.0 %) and 4 points of synthetic-trained Dice (72.4 → 76.5;
# real 79.5); the spectrum term gives the samples the phantom's high-frequency power (HF 0.020 →
# 0.044; real 0.055) at no downstream cost; the decoder with labels lifts the ceiling (75.0 →
# 82.0 %), label fidelity (76.3 → 82.6 %) and Dice (76.4 → 77.7) while decoding mostly from the
# latent (map following 0.06). Centred latents and a 4-channel Γ-VAE measured no better at the
# demo's scale and stay flags.
GENERATORS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {"vae": {}, "diffusion": {}, "sample": {}},
    "faithful": {
        "vae": {"w_spectrum": 0.1, "decoder_labels": True},
        "diffusion": {},
        "sample": {"transforms": False},
    },
}


VAE_ARCHITECTURE = ("latent_channels", "decoder_labels")
"""The Γ-VAE settings of a recipe that change the networks, and so what sampling costs
(``bench --generator`` measures them)."""


def changes_architecture(name: str) -> bool:
    """Whether generator recipe ``name`` changes a network of the latent models."""
    return any(key in generator_recipe(name)["vae"] for key in VAE_ARCHITECTURE)


def generator_recipe(name: str) -> dict[str, dict[str, Any]]:
    """The settings of generator recipe ``name`` (:data:`GENERATORS`), one sentence if unknown."""
    if name not in GENERATORS:
        raise EchoSynthError(f"generator {name!r} is unknown; choose from {', '.join(GENERATORS)}")
    return GENERATORS[name]


LENGTH_KEYS = ("steps", "epochs", "kimg")

# Settings a command may set that no preset row fixes (None there: the model or the code decides).
_OPTIONAL: dict[str, tuple[str, ...]] = {
    "vae": ("steps", "batch_gpu", "kl_direction", "prior_shape", "prior_rate", "w_recon",
            "w_perceptual", "w_kl", "augment", "latent_channels", "w_spectrum",
            "decoder_labels", "decoder_hidden"),
    "diffusion": ("steps", "kimg", "batch", "batch_gpu", "dropout", "spade_placement",
                  "model_channels", "augment", "noise_schedule", "learn_sigma", "clip_denoised",
                  "sigma_data", "class_dropout", "latent_norm", "latent_outside",
                  "p_mean", "p_std"),
    "seg": ("batch_gpu",),
    "cls": ("batch_gpu",),
}  # fmt: skip


def known_settings(kind: str) -> frozenset[str]:
    """Every setting name a run of ``kind`` takes."""
    rows = _rows(kind)
    return frozenset(k for row in rows.values() for k in row) | frozenset(_OPTIONAL[kind])


def _rows(kind: str) -> dict[str, dict[str, Any]]:
    if kind not in PRESETS:
        raise ValueError(f"Unknown kind of run {kind!r}; valid: {', '.join(PRESETS)}.")
    return PRESETS[kind]


def resolve(
    kind: str,
    preset: str,
    overrides: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The settings of a ``kind`` run: ``defaults`` < the ``preset`` row < non-None
    ``overrides``. A length in ``overrides`` (``steps``, ``epochs`` or ``kimg``) drops the
    preset's length first, so the length asked for is the one that counts."""
    rows = _rows(kind)
    if preset not in rows:
        raise EchoSynthError(f"preset {preset!r} is unknown; choose from {', '.join(rows)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - known_settings(kind))
    if unknown:
        raise EchoSynthError(
            f"{', '.join(unknown)}: not a setting of a {kind} run; valid: "
            + ", ".join(sorted(known_settings(kind)))
        )
    values = {**(defaults or {}), **rows[preset]}
    if any(k in given for k in LENGTH_KEYS):
        for key in LENGTH_KEYS:
            values.pop(key, None)
    values.update(given)
    return values


def training_steps(values: Mapping[str, Any], n_train: int) -> int:
    """The one step-count rule: ``steps``; else ``epochs`` × max(1, n_train // batch); else
    round(``kimg`` · 1000 / batch), at least 1. Zero or negative lengths are refused."""
    batch = int(values["batch"])
    if batch < 1:
        raise EchoSynthError(f"batch {batch} must be at least 1")
    for key in LENGTH_KEYS:
        value = values.get(key)
        if value is None:
            continue
        if value <= 0:
            raise EchoSynthError(f"{key} {value} must be positive")
        if key == "steps":
            return int(value)
        if key == "epochs":
            return int(value) * max(1, n_train // batch)
        return max(1, round(float(value) * 1000 / batch))
    raise EchoSynthError("the training length is not set: give steps, epochs or kimg")
