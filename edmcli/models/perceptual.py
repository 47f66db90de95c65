"""The perceptual term of the Gamma-VAE loss: LPIPS restricted to the ultrasound sector.

LPIPS (Zhang et al. 2018, package ``lpips``) compares unit-normalised features of a frozen
ImageNet backbone through learned linear layers. The ``lpips`` package ships only those linear
layers; the backbone (AlexNet by default, VGG16 optional) comes from torchvision's ImageNet
weights in torch hub's cache: ``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth`` or
``vgg16-397923af.pth`` (``$TORCH_HOME/hub/checkpoints``, ``~/.cache/torch`` by default).

Loading, offline first. ``lpips.LPIPS(pretrained=True, net="alex")`` builds its backbone with
``torchvision.models.alexnet(pretrained=True)``, which calls
``torch.hub.load_state_dict_from_url``: it reads the cached file when present and downloads it
otherwise. Here the LPIPS module is built with a random backbone (``pnet_rand=True``: nothing is
fetched), then the backbone weights are read from the cache (the same
``load_state_dict_from_url``, which never downloads a file that is present) and copied in, key by
key, with their shapes checked. When the file is absent, :func:`build_perceptual` raises
:class:`MissingWeightsError` naming the file and the folder to put it in, unless
``allow_download=True`` lets torch hub fetch it. Backbone ``"none"`` trains without the term.

Masking and normalisation. Images (N, 1, H, W) in [0, 1] are multiplied by the sector mask,
mapped to [-1, 1] and repeated to three channels; LPIPS then runs with ``spatial=True``, which
returns its per-pixel distance map (each layer's map upsampled bilinearly to H x W, summed over
layers) instead of the spatial average. :class:`MaskedLPIPS` returns that map; the loss averages
it over the sector with :func:`edmcli.models.masked.masked_mean` (sum over in-sector pixels
divided by their count), like every other term.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "MIN_IMAGE_SIZE",
    "PERCEPTUAL_BACKBONES",
    "MaskedLPIPS",
    "MissingWeightsError",
    "backbone_weights_path",
    "build_perceptual",
]

PERCEPTUAL_BACKBONES: tuple[str, ...] = ("alex", "vgg", "none")
"""Valid perceptual backbones; ``"none"`` switches the perceptual term off."""


def _backbone(net: str) -> tuple[Any, Callable[..., nn.Module]]:
    """(torchvision weights enum, builder) of ``net``. torchvision and lpips are imported where a
    backbone is used, not with this module: run settings and plans read the names above."""
    import torchvision.models as tvm

    return {
        "alex": (tvm.AlexNet_Weights.IMAGENET1K_V1, tvm.alexnet),
        "vgg": (tvm.VGG16_Weights.IMAGENET1K_V1, tvm.vgg16),
    }[net]


MIN_IMAGE_SIZE: dict[str, int] = {"alex": 31, "vgg": 16}
"""Smallest image side each backbone accepts up to its last LPIPS layer (AlexNet relu5 after two
3x3/2 max-pools and an 11x11/4 convolution; VGG16 relu5_3 after four 2x2 max-pools)."""


class MissingWeightsError(FileNotFoundError):
    """The backbone weights of LPIPS are not in torch hub's cache (and were not downloaded)."""


def _check_backbone(net: str) -> None:
    if net not in PERCEPTUAL_BACKBONES:
        raise ValueError(
            f"perceptual backbone {net!r} is not one of {', '.join(PERCEPTUAL_BACKBONES)}."
        )


def backbone_weights_path(net: str) -> Path:
    """Where torch hub's cache keeps the ImageNet weights of backbone ``net`` ("alex", "vgg").

    Follows ``torch.hub.get_dir()``, i.e. ``$TORCH_HOME/hub/checkpoints/<file>``.

    Raises:
        ValueError: for an unknown backbone or ``"none"``.
    """
    _check_backbone(net)
    if net == "none":
        raise ValueError("perceptual backbone 'none' has no weights file.")
    file_name = Path(_backbone(net)[0].url).name
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def _load_backbone_state(net: str, allow_download: bool) -> dict[str, torch.Tensor]:
    path = backbone_weights_path(net)
    url = _backbone(net)[0].url
    missing = (
        f"LPIPS backbone {net!r} needs torchvision's ImageNet weights file {path.name} in "
        f"{path.parent} (torch hub's cache, set by $TORCH_HOME): copy {url} there from a machine "
        "with internet, or choose the perceptual backbone 'none'."
    )
    present = path.is_file()
    if not present and not allow_download:
        raise MissingWeightsError(missing)
    try:
        # Reads the cached file when present; downloads only when absent (allow_download).
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", check_hash=True, weights_only=True
        )
    except Exception as err:
        if present:
            raise ValueError(f"{path} could not be read as a state dict ({err}).") from err
        raise MissingWeightsError(f"{missing} Download failed: {err}.") from err


def _check_backbone_state(net: str, state: dict[str, torch.Tensor]) -> None:
    # Compare with torchvision's architecture built on the meta device (no memory, no init).
    build = _backbone(net)[1]
    with torch.device("meta"):
        features = build(weights=None).features
    for name, tensor in features.state_dict().items():
        key = f"features.{name}"
        if key not in state or tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{backbone_weights_path(net)} is not a torchvision {build.__name__} "
                f"state dict (missing or mis-shaped {key})."
            )


class MaskedLPIPS(nn.Module):
    """Frozen LPIPS (linear layers v0.1) returning a per-pixel distance map inside the sector.

    Args:
        net: backbone, ``"alex"`` or ``"vgg"``.
        allow_download: let torch hub download missing backbone weights (default: never).

    Raises:
        ValueError: for an unknown backbone or an unreadable weights file.
        MissingWeightsError: when the backbone weights are not cached (message names the file).
    """

    def __init__(self, net: str = "alex", *, allow_download: bool = False) -> None:
        super().__init__()
        _check_backbone(net)
        if net == "none":
            raise ValueError("MaskedLPIPS needs a backbone; use build_perceptual('none') for none.")
        state = _load_backbone_state(net, allow_download)
        _check_backbone_state(net, state)
        import lpips

        with warnings.catch_warnings():
            # lpips builds its random backbone through torchvision's deprecated `pretrained=`.
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(
                pretrained=True, net=net, pnet_rand=True, spatial=True, verbose=False
            )
        with torch.no_grad():  # lpips keeps torchvision's `features[i]` as child `str(i)`
            for slice_ in model.net.children():
                for index, layer in slice_.named_children():
                    for name, tensor in layer.state_dict().items():
                        tensor.copy_(state[f"features.{index}.{name}"])
        self.backbone = net
        self.lpips = model
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> MaskedLPIPS:
        """Stay in eval mode (LPIPS's linear layers carry dropout), whatever ``mode`` says."""
        return super().train(False)

    def forward(
        self, image: torch.Tensor, recon: torch.Tensor, sector: torch.Tensor
    ) -> torch.Tensor:
        """LPIPS distance map between two images, both masked to the sector first.

        Args:
            image: (N, 1, H, W) in [0, 1].
            recon: (N, 1, H, W) in [0, 1]; gradients flow to it.
            sector: (N, 1, H, W) bool or {0, 1} float.

        Returns:
            (N, 1, H, W) per-pixel distances; average them over the sector with ``masked_mean``.
        """
        if image.ndim != 4 or image.shape[1] != 1 or image.shape != recon.shape:
            raise ValueError(
                f"image and recon must both be shaped (N, 1, H, W), got {tuple(image.shape)} "
                f"and {tuple(recon.shape)}."
            )
        if sector.shape != image.shape:
            raise ValueError(
                f"sector shape {tuple(sector.shape)} differs from image shape {tuple(image.shape)}."
            )
        min_size = MIN_IMAGE_SIZE[self.backbone]
        if min(image.shape[-2:]) < min_size:
            raise ValueError(
                f"LPIPS with backbone {self.backbone!r} needs images of at least "
                f"{min_size}x{min_size}, got {image.shape[-2]}x{image.shape[-1]}."
            )
        mask = sector.to(recon.dtype)
        x = (image.to(recon.dtype) * mask * 2 - 1).expand(-1, 3, -1, -1)
        y = (recon * mask * 2 - 1).expand(-1, 3, -1, -1)
        return self.lpips(x, y)


def build_perceptual(net: str = "alex", *, allow_download: bool = False) -> MaskedLPIPS | None:
    """Build the perceptual term's module, or ``None`` for backbone ``"none"``.

    Args:
        net: one of :data:`PERCEPTUAL_BACKBONES` (``"alex"`` default, ``"vgg"``, ``"none"``).
        allow_download: let torch hub download missing backbone weights (default: never; the
            weights must be in ``torch.hub.get_dir()/checkpoints``).

    Raises:
        ValueError: for an unknown backbone (the message lists the valid ones).
        MissingWeightsError: when the backbone weights are not cached.
    """
    _check_backbone(net)
    if net == "none":
        return None
    return MaskedLPIPS(net, allow_download=allow_download)
