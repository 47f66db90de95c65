"""The SPADE-conditioned diffusion UNet shared by all six generative models.

One configurable network covers the ADM layout of EDM (192 ch, mult 1-2-3-4, 3 blocks, attention
at 32/16/8) and the DDPM++/NCSN++-style layouts of VP/VE (128 ch, mult 2-2-2, skip scale
sqrt(1/2), additive noise embedding, Fourier features for NCSN++), see the presets of
:mod:`edmcli.models.registry`.

Layout (as the ADM UNet of Dhariwal & Nichol, reorganised by Karras et al.): an input conv, then
per level ``num_blocks`` residual blocks (a down-sampling residual block opens every level but the
first); a middle pair of blocks at the lowest resolution, the first with self-attention; then per
level, from low to high resolution, an up-sampling block (all levels but the lowest) and
``num_blocks + 1`` residual blocks that each take one encoder skip; finally norm, SiLU, conv.

Residual block: ``norm0 -> SiLU -> [resample] -> conv0 -> norm1 (+ noise embedding) -> SiLU ->
dropout -> conv1``, plus a (1x1 projected, resampled) skip, then optional multi-head
self-attention. Every norm is a group norm; where SPADE is placed (``spade_placement``) the norm is
:class:`~edmcli.models.spade.SPADE` and gets per-pixel ``gamma``/``beta`` from the label map:

* ``"decoder"``: middle, up-sampling and decoder blocks (the authors' EDMLX code; and SDM's
  "middle and output blocks");
* ``"all"``: every norm of the network, output norm included.

The noise embedding enters norm1 either as ADM's scale-shift (``adaptive_scale``; with SPADE it is
folded into gamma/beta so that the norm and SiLU stay one fused kernel call) or added to the
features before norm1 (DDPM++).

Since gamma/beta depend only on the label map, :meth:`SpadeUNet.spade_cache` computes them once
for a batch of label maps; ``forward(..., spade_cache=cache)`` reuses them at every noise level and
gives the same output, bit for bit, as the uncached path.

Optional class conditioning (``num_classes`` > 0; the default 0 is the paper's map-only network,
with no extra parameter): a learned embedding per class, plus a *null* class (index
``num_classes``, :attr:`SpadeUNet.null_class`), is added to the noise embedding before its last
SiLU, as ADM and NVlabs/edm add their class embedding (``forward(..., class_labels=c)``). The
class rows start as ADM's ``nn.Embedding`` (N(0, 1)); the null row starts at zero, i.e. as
NVlabs/edm's dropped label (a zero one-hot adds nothing), so the null class is the map-only path.
Missing ``class_labels`` mean the null class: the unconditional model of classifier-free guidance.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edmcli.data.labels import label_onehot
from edmcli.models.spade import SPADE, GroupNormAct, resolve_num_groups

__all__ = [
    "FourierEmbedding",
    "PositionalEmbedding",
    "SpadeCache",
    "SpadeUNet",
    "SpadeUNetConfig",
    "labels_to_onehot",
]

SPADE_PLACEMENTS = ("decoder", "all")
EMBEDDINGS = ("positional", "fourier")


@dataclass
class SpadeUNetConfig:
    """Architecture of :class:`SpadeUNet`.

    Args:
        image_size: spatial size (square) of the network input: pixels, or latent size.
        in_channels: channels of the input (1: grey-scale echo or one-channel Gamma-VAE latent).
        out_channels: channels of the output.
        model_channels: channels of the first level; level ``i`` has
            ``model_channels * channel_mult[i]``.
        channel_mult: channel multiplier per level; level ``i`` runs at ``image_size / 2**i``.
        num_blocks: residual blocks per level in the encoder (the decoder has one more).
        attention_resolutions: feature sizes with self-attention after every residual block
            (the middle block always has attention).
        dropout: dropout probability before the second conv of every residual block.
        num_groups: group-norm groups (fewer where a layer has under 4 channels per group).
        spade_placement: ``"decoder"`` or ``"all"``, see the module docstring.
        label_classes: classes of the label map (one-hot channels of the SPADE input).
        spade_hidden: hidden channels of every SPADE modulation MLP.
        embedding: noise-level features, ``"positional"`` (ADM, DDPM++) or ``"fourier"``
            (NCSN++, random frequencies of scale 16).
        emb_mult: embedding width as a multiple of ``model_channels``.
        noise_mult: width of the noise features as a multiple of ``model_channels``.
        adaptive_scale: ADM scale-shift norm (True) or additive embedding (False, DDPM++).
        skip_scale: factor applied after each residual sum (1 ADM, sqrt(1/2) DDPM++).
        attention_head_channels: channels per attention head; ``None`` for a single head.
        eps: group-norm epsilon.
        num_classes: classes of the optional class conditioning (e.g. 2 views, or 4
            view/phase pairs), embedded and added to the noise embedding; one more embedding is
            the null class. 0 (default): no class embedding (the paper's map-only network).
    """

    image_size: int = 64
    in_channels: int = 1
    out_channels: int = 1
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_blocks: int = 3
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    dropout: float = 0.1
    num_groups: int = 32
    spade_placement: str = "decoder"
    label_classes: int = 5
    spade_hidden: int = 128
    embedding: str = "positional"
    emb_mult: int = 4
    noise_mult: int = 1
    adaptive_scale: bool = True
    skip_scale: float = 1.0
    attention_head_channels: int | None = 64
    eps: float = 1e-5
    num_classes: int = 0

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        positive = {
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "model_channels": self.model_channels,
            "num_blocks": self.num_blocks,
            "num_groups": self.num_groups,
            "label_classes": self.label_classes,
            "spade_hidden": self.spade_hidden,
            "emb_mult": self.emb_mult,
            "noise_mult": self.noise_mult,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SpadeUNetConfig.{name} must be a positive integer, got {value}.")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(
                f"SpadeUNetConfig.channel_mult must be a non-empty list of positive integers, "
                f"got {self.channel_mult}."
            )
        levels = len(self.channel_mult)
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(
                f"SpadeUNetConfig.image_size ({self.image_size}) must be divisible by "
                f"2**(levels - 1) = {2 ** (levels - 1)} for {levels} levels."
            )
        if self.spade_placement not in SPADE_PLACEMENTS:
            raise ValueError(
                f"SpadeUNetConfig.spade_placement must be one of {SPADE_PLACEMENTS}, "
                f"got {self.spade_placement!r}."
            )
        if self.embedding not in EMBEDDINGS:
            raise ValueError(
                f"SpadeUNetConfig.embedding must be one of {EMBEDDINGS}, got {self.embedding!r}."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SpadeUNetConfig.dropout must be in [0, 1), got {self.dropout}.")
        if self.model_channels * self.noise_mult % 2:
            raise ValueError(
                "SpadeUNetConfig.model_channels * noise_mult must be even (sin/cos features)."
            )
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(
                f"SpadeUNetConfig.num_classes must be a non-negative integer, got "
                f"{self.num_classes}."
            )
        if self.skip_scale <= 0:
            raise ValueError(f"SpadeUNetConfig.skip_scale must be positive, got {self.skip_scale}.")
        if self.eps <= 0:
            raise ValueError(f"SpadeUNetConfig.eps must be positive, got {self.eps}.")
        head = self.attention_head_channels
        if head is not None:
            if head < 1:
                raise ValueError(
                    f"SpadeUNetConfig.attention_head_channels must be positive or None, got {head}."
                )
            for level in self.attention_levels():
                channels = self.model_channels * self.channel_mult[level]
                if channels % head:
                    raise ValueError(
                        f"SpadeUNetConfig.attention_head_channels ({head}) must divide the "
                        f"{channels} channels of the {self.image_size >> level}px attention level."
                    )

    def attention_levels(self) -> list[int]:
        """Levels with self-attention: listed resolutions, plus the lowest level (middle)."""
        last = len(self.channel_mult) - 1
        levels = [
            lvl for lvl in range(last + 1) if (self.image_size >> lvl) in self.attention_resolutions
        ]
        return levels if last in levels else [*levels, last]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists for tuples), for YAML run configs."""
        out = dataclasses.asdict(self)
        out["channel_mult"] = list(self.channel_mult)
        out["attention_resolutions"] = list(self.attention_resolutions)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SpadeUNetConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"Unknown SpadeUNetConfig field(s) {unknown}; valid fields: {sorted(known)}."
            )
        return cls(**dict(values))


@dataclass(frozen=True)
class SpadeCache:
    """Precomputed SPADE modulations of one batch of label maps.

    ``params`` maps the dotted name of each cached SPADE layer to its ``(gamma, beta)``, each
    (N, C, h, w). Layers missing from the cache (a memory budget was given) are computed from the
    label map at every forward.
    """

    params: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    batch_size: int = 0
    tiles: int = 1  # the batch is the label maps' batch repeated this many times (tile())

    def __len__(self) -> int:
        return len(self.params)

    def __contains__(self, key: object) -> bool:
        return key in self.params

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(g.nbytes + b.nbytes for g, b in self.params.values())

    def tile(self, times: int) -> SpadeCache:
        """The cache of the batch repeated ``times`` times (``[maps; maps; ...]``): one copy of
        every (gamma, beta), no SPADE recomputation. Classifier-free guidance runs its
        conditional and unconditional branches as one forward on the doubled batch."""
        if times < 1:
            raise ValueError(f"times must be a positive integer, got {times}.")
        if times == 1:
            return self
        params = {
            key: (torch.cat([g] * times), torch.cat([b] * times))
            for key, (g, b) in self.params.items()
        }
        return SpadeCache(params=params, batch_size=self.batch_size * times,
                          tiles=self.tiles * times)  # fmt: skip


def labels_to_onehot(
    labels: torch.Tensor, size: int, num_classes: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """SPADE's input (N, K, size, size) for an integer label map (N, H, W): the one resize rule
    of :mod:`edmcli.data.labels` (area-averaged one-hot, i.e. class fractions per pixel)."""
    return label_onehot(labels, size, num_classes, dtype)


class PositionalEmbedding(nn.Module):
    """Sinusoidal features of a scalar (ADM / DDPM++ timestep embedding)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = (1.0 / self.max_positions) ** (freqs / (half - (1 if self.endpoint else 0)))
        x = torch.outer(x.float(), freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (NCSN++), frequencies ~ N(0, scale^2)."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x.float(), (2 * math.pi) * self.freqs.float())
        return torch.cat([x.cos(), x.sin()], dim=1)


class _Modulations:
    """Per-forward source of SPADE ``(gamma, beta)``: the cache, else the label map (one-hot
    resized once per feature size)."""

    def __init__(
        self,
        labels: torch.Tensor | None,
        cache: SpadeCache | None,
        num_classes: int,
        dtype: torch.dtype,
    ) -> None:
        self.labels = labels
        self.cache = cache.params if cache is not None else {}
        self.num_classes = num_classes
        self.dtype = dtype
        self.onehots: dict[int, torch.Tensor] = {}

    def __call__(self, layer: SPADE) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self.cache.get(layer.key)
        if cached is not None:
            return cached
        if self.labels is None:
            raise ValueError(
                f"SPADE layer {layer.key!r} is not in the spade_cache and no labels were given."
            )
        onehot = self.onehots.get(layer.resolution)
        if onehot is None:
            onehot = labels_to_onehot(self.labels, layer.resolution, self.num_classes, self.dtype)
            self.onehots[layer.resolution] = onehot
        return layer.modulation(onehot)


def _make_norm(
    channels: int, resolution: int, spade: bool, cfg: SpadeUNetConfig
) -> SPADE | GroupNormAct:
    groups = resolve_num_groups(channels, cfg.num_groups)
    if not spade:
        return GroupNormAct(channels, groups, cfg.eps)
    layer = SPADE(channels, groups, cfg.label_classes, cfg.spade_hidden, cfg.eps)
    layer.resolution = resolution  # the key is set by SpadeUNet once the tree is built
    return layer


def _apply_norm(
    norm: SPADE | GroupNormAct,
    x: torch.Tensor,
    mods: _Modulations,
    silu: bool,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    if isinstance(norm, GroupNormAct):
        return norm(x, silu=silu, scale=scale, shift=shift)
    gamma, beta = mods(norm)
    if scale is not None and shift is not None:
        # (x_hat (1 + g) + b)(1 + s) + t  ==  x_hat (1 + g') + b'  with
        # g' = g + s + g s  and  b' = b (1 + s) + t: keeps norm + SiLU one fused call.
        gamma = gamma + torch.addcmul(scale, gamma, scale)
        beta = torch.addcmul(shift, beta, scale + 1)
    return norm(x, gamma.to(x.dtype), beta.to(x.dtype), silu=silu)


class _ResBlock(nn.Module):
    """Residual block with optional resampling and self-attention (see module docstring)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        in_res: int,
        cfg: SpadeUNetConfig,
        *,
        spade: bool,
        resample: str | None = None,
        attention: bool = False,
        takes_skip: bool = False,
    ) -> None:
        super().__init__()
        out_res = {None: in_res, "down": in_res // 2, "up": in_res * 2}[resample]
        emb_channels = cfg.model_channels * cfg.emb_mult
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resample = resample
        self.takes_skip = takes_skip
        self.adaptive_scale = cfg.adaptive_scale
        self.skip_scale = cfg.skip_scale
        self.dropout = cfg.dropout
        self.norm0 = _make_norm(in_channels, in_res, spade, cfg)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, out_channels * (2 if cfg.adaptive_scale else 1))
        self.norm1 = _make_norm(out_channels, out_res, spade, cfg)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.num_heads = 0
        if attention:
            head = cfg.attention_head_channels
            self.num_heads = out_channels // head if head else 1
            self.norm2 = _make_norm(out_channels, out_res, spade, cfg)
            self.qkv = nn.Conv2d(out_channels, out_channels * 3, 1)
            self.proj = nn.Conv2d(out_channels, out_channels, 1)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, mods: _Modulations) -> torch.Tensor:
        orig = x
        h = self.conv0(self._resample(_apply_norm(self.norm0, x, mods, silu=True)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = _apply_norm(self.norm1, h, mods, silu=True, scale=scale, shift=shift)
        else:
            h = _apply_norm(self.norm1, h + params, mods, silu=True)
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        skip = self._resample(orig)
        if self.skip is not None:
            skip = self.skip(skip)
        x = (h + skip) * self.skip_scale
        if self.num_heads:
            n, c, hh, ww = x.shape
            qkv = self.qkv(_apply_norm(self.norm2, x, mods, silu=False))
            q, k, v = qkv.reshape(n, 3, self.num_heads, c // self.num_heads, hh * ww).unbind(1)
            a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.mT)
            a = a.transpose(-1, -2).reshape(n, c, hh, ww)
            x = (self.proj(a) + x) * self.skip_scale
        return x


class SpadeUNet(nn.Module):
    """SPADE-conditioned diffusion UNet.

    ``forward(x, noise_labels, labels=None, spade_cache=None, *, class_labels=None)`` maps noisy
    input ``x`` (N, in_channels, S, S), the per-sample noise conditioning ``noise_labels`` (N,)
    (c_noise of the preconditioning, or the DDPM timestep) and an integer label map ``labels``
    (N, H, W) with ids ``0..label_classes-1`` at any resolution (image resolution; it is resized
    to each feature size by the one rule of :mod:`edmcli.data.labels`) to the raw network output
    F (N, out_channels, S, S). ``class_labels`` (N,) (networks with ``num_classes`` > 0 only):
    classes ``0..num_classes-1`` or the null class ``num_classes``; None: the null class.

    Label values are range-checked on CPU only (a check on an accelerator would force a host
    sync); elsewhere an out-of-range id gives an all-zero one-hot pixel.
    """

    def __init__(self, config: SpadeUNetConfig) -> None:
        super().__init__()
        if not isinstance(config, SpadeUNetConfig):
            raise ValueError(f"config must be a SpadeUNetConfig, got {type(config).__name__}.")
        cfg = self.config = config
        levels = len(cfg.channel_mult)
        attn_levels = set(cfg.attention_levels())
        enc_spade = cfg.spade_placement == "all"
        noise_channels = cfg.model_channels * cfg.noise_mult
        emb_channels = cfg.model_channels * cfg.emb_mult

        if cfg.embedding == "positional":
            self.map_noise: nn.Module = PositionalEmbedding(noise_channels)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_layer0 = nn.Linear(noise_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)
        self.map_class: nn.Embedding | None = None
        if cfg.num_classes:
            self.map_class = nn.Embedding(cfg.num_classes + 1, emb_channels)
            with torch.no_grad():
                self.map_class.weight[cfg.num_classes].zero_()  # the null class adds nothing

        self.enc = nn.ModuleDict()
        skips: list[int] = []
        cout = cfg.in_channels
        for level, mult in enumerate(cfg.channel_mult):
            res = cfg.image_size >> level
            if level == 0:
                cout = cfg.model_channels * mult
                self.enc[f"{res}x{res}_conv"] = nn.Conv2d(cfg.in_channels, cout, 3, padding=1)
            else:
                self.enc[f"{res}x{res}_down"] = _ResBlock(
                    cout, cout, res * 2, cfg, spade=enc_spade, resample="down"
                )
            skips.append(cout)
            for idx in range(cfg.num_blocks):
                cin, cout = cout, cfg.model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = _ResBlock(
                    cin, cout, res, cfg, spade=enc_spade, attention=level in attn_levels
                )
                skips.append(cout)

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            res = cfg.image_size >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = _ResBlock(
                    cout, cout, res, cfg, spade=True, attention=True
                )
                self.dec[f"{res}x{res}_in1"] = _ResBlock(cout, cout, res, cfg, spade=True)
            else:
                self.dec[f"{res}x{res}_up"] = _ResBlock(
                    cout, cout, res // 2, cfg, spade=True, resample="up"
                )
            for idx in range(cfg.num_blocks + 1):
                cin, cout = cout + skips.pop(), cfg.model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = _ResBlock(
                    cin, cout, res, cfg, spade=True, attention=level in attn_levels, takes_skip=True
                )
        self.out_norm = _make_norm(cout, cfg.image_size, enc_spade, cfg)
        self.out_conv = nn.Conv2d(cout, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

        keys = []
        for name, module in self.named_modules():
            if isinstance(module, SPADE):
                module.key = name
                keys.append(name)
        self._spade_keys = tuple(keys)

    # ------------------------------------------------------------------ SPADE helpers
    def spade_layers(self) -> list[tuple[str, SPADE]]:
        """``(name, layer)`` of every SPADE layer, in module order."""
        return [(key, self.get_submodule(key)) for key in self._spade_keys]

    @property
    def num_spade_layers(self) -> int:
        return len(self._spade_keys)

    @property
    def null_class(self) -> int | None:
        """Index of the null class (``num_classes``); None for a network without classes."""
        return self.config.num_classes if self.config.num_classes else None

    def _class_embedding(self, class_labels: torch.Tensor | None, n: int, device) -> torch.Tensor:
        """(n, emb) embedding of ``class_labels`` (n,), the null class where None."""
        k = self.config.num_classes
        if class_labels is None:
            class_labels = torch.full((n,), k, dtype=torch.long, device=device)
        class_labels = torch.as_tensor(class_labels, device=device)
        if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool:
            raise ValueError(f"class_labels must hold integer classes, got {class_labels.dtype}.")
        if class_labels.shape != (n,):
            raise ValueError(
                f"class_labels must have shape ({n},), got {tuple(class_labels.shape)}."
            )
        checkable = class_labels.device.type == "cpu" and not torch.compiler.is_compiling()
        if checkable and n and (int(class_labels.min()) < 0 or int(class_labels.max()) > k):
            raise ValueError(
                f"class_labels must hold classes 0..{k - 1} or the null class {k}, found "
                f"{int(class_labels.min())}..{int(class_labels.max())}."
            )
        return self.map_class(class_labels.long())

    def _spade_dtype(self) -> torch.dtype:
        if not self._spade_keys:
            return torch.float32
        return self.get_submodule(self._spade_keys[0]).shared.weight.dtype

    def _check_labels(self, labels: torch.Tensor, batch: int | None = None) -> None:
        if labels.ndim != 3:
            raise ValueError(
                f"labels must be an integer label map (N, H, W), got shape {tuple(labels.shape)}."
            )
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"labels must have an integer dtype, got {labels.dtype}.")
        if batch is not None and labels.shape[0] != batch:
            raise ValueError(
                f"labels hold {labels.shape[0]} maps but the input batch has {batch} samples."
            )
        if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.config.label_classes:
                raise ValueError(
                    f"labels must hold ids 0..{self.config.label_classes - 1}, found {lo}..{hi}."
                )

    def spade_cache(self, labels: torch.Tensor, max_bytes: int | None = None) -> SpadeCache:
        """Precompute ``(gamma, beta)`` of every SPADE layer for a batch of label maps.

        Args:
            labels: integer label map (N, H, W).
            max_bytes: optional memory budget; layers are cached from the smallest feature size
                up while they fit, the rest is computed at every forward (which then also needs
                ``labels``). ``None`` caches every layer.

        The cache holds tensors with autograd history if built with grad enabled; samplers build
        it under ``torch.no_grad()``.
        """
        self._check_labels(labels)
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be non-negative or None, got {max_bytes}.")
        mods = _Modulations(labels, None, self.config.label_classes, self._spade_dtype())
        layers = self.spade_layers()
        if max_bytes is not None:
            layers = sorted(layers, key=lambda item: item[1].resolution)
        params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        used = 0
        n = labels.shape[0]
        elem = torch.empty((), dtype=self._spade_dtype(), device="cpu").element_size()
        for name, layer in layers:
            if max_bytes is not None:
                cost = 2 * n * layer.num_channels * layer.resolution**2 * elem
                if used + cost > max_bytes:
                    break
                used += cost
            params[name] = mods(layer)
        return SpadeCache(params=params, batch_size=n)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        labels: torch.Tensor | None = None,
        spade_cache: SpadeCache | None = None,
        *,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        n = x.shape[0]
        if (
            x.ndim != 4
            or x.shape[1] != cfg.in_channels
            or x.shape[-2:]
            != (
                cfg.image_size,
                cfg.image_size,
            )
        ):
            raise ValueError(
                f"x must have shape (N, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), "
                f"got {tuple(x.shape)}."
            )
        noise_labels = torch.as_tensor(noise_labels, device=x.device)
        if noise_labels.ndim == 0:
            noise_labels = noise_labels.expand(n)
        if noise_labels.shape != (n,):
            raise ValueError(
                f"noise_labels must have shape ({n},) or be a scalar, got "
                f"{tuple(noise_labels.shape)}."
            )
        if labels is not None:
            self._check_labels(labels, n)
        if spade_cache is not None and spade_cache.batch_size != n:
            raise ValueError(
                f"spade_cache was built for {spade_cache.batch_size} label maps but the input "
                f"batch has {n} samples."
            )
        if labels is None and (spade_cache is None or len(spade_cache) < self.num_spade_layers):
            raise ValueError("labels are required unless spade_cache holds every SPADE layer.")
        if class_labels is not None and self.map_class is None:
            raise ValueError(
                "class_labels were given but this network has no class embedding (num_classes 0)."
            )
        mods = _Modulations(labels, spade_cache, cfg.label_classes, self._spade_dtype())

        emb = F.silu(self.map_layer0(self.map_noise(noise_labels).to(x.dtype)))
        emb = self.map_layer1(emb)
        if self.map_class is not None:
            emb = emb + self._class_embedding(class_labels, n, x.device).to(emb.dtype)
        emb = F.silu(emb)

        skips = []
        for module in self.enc.values():
            x = module(x, emb, mods) if isinstance(module, _ResBlock) else module(x)
            skips.append(x)
        for block in self.dec.values():
            if block.takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb, mods)
        return self.out_conv(_apply_norm(self.out_norm, x, mods, silu=True))
