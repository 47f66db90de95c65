"""Inception-v3 pool features (2048-D) for the Fréchet distance and KID of ``evaluate --fidelity``:
torchvision's ImageNet weights, read from torch hub's cache and never downloaded (a missing file
is a message naming it), images resized to 299² with grey repeated to RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import Inception_V3_Weights, inception_v3

from edmcli.models.perceptual import MissingWeightsError

INCEPTION_SIZE = 299
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def inception_weights_path() -> Path:
    """Where torch hub's cache keeps torchvision's Inception-v3 ImageNet weights
    (``torch.hub.get_dir()/checkpoints/inception_v3_google-0cc3c7bd.pth``)."""
    return (
        Path(torch.hub.get_dir())
        / "checkpoints"
        / Path(Inception_V3_Weights.IMAGENET1K_V1.url).name
    )


def inception_missing_message() -> str:
    """The one line that says which file to place for the Inception FID."""
    path = inception_weights_path()
    return (
        f"Inception FID skipped: it needs torchvision's ImageNet weights file {path.name} in "
        f"{path.parent} (torch hub's cache, set by $TORCH_HOME): copy "
        f"{Inception_V3_Weights.IMAGENET1K_V1.url} there from a machine with internet; the "
        "domain-feature metrics do not need it"
    )


def build_inception(device: torch.device | str = "cpu") -> nn.Module:
    """torchvision Inception-v3 with its ImageNet weights read from torch hub's cache (never
    downloaded) and the classifier removed: ``forward`` gives (N, 2048) pool features.

    Raises:
        MissingWeightsError: when the weights file is not in the cache (the message names it).
        ValueError: when the file is not an Inception-v3 state dict.
    """
    path = inception_weights_path()
    if not path.is_file():
        raise MissingWeightsError(inception_missing_message())
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = inception_v3(weights=None, aux_logits=True, transform_input=True,
                             init_weights=False)  # fmt: skip
        model.load_state_dict(state)
    except Exception as err:  # a damaged or foreign file
        raise ValueError(f"{path} is not a torchvision Inception-v3 state dict ({err})") from err
    model.fc = nn.Identity()
    return model.to(device).eval()


@torch.no_grad()
def inception_features(model: nn.Module, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    """(N, 2048) Inception pool features of (N, 1, H, W) images in [0, 1]: resized to 299²
    (bilinear), grey repeated to three channels, ImageNet-normalised (torchvision's
    ``transform_input`` maps that to the scaling the Google weights expect)."""
    device = next(model.parameters()).device
    mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1)
    out = []
    for start in range(0, len(images), batch):
        x = images[start : start + batch].to(device).float()
        x = F.interpolate(x, (INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", antialias=True)
        out.append(model((x.expand(-1, 3, -1, -1) - mean) / std).float().cpu())
    return torch.cat(out).numpy()
