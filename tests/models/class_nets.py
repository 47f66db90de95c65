"""Class-conditional networks and their inputs, shared by the class-conditioning and the
classifier-free guidance tests."""

from __future__ import annotations

import torch
from tiny_nets import randomize_zero_init, small_config

from edmcli.models.ddpm import DDPMEpsModel
from edmcli.models.preconditioning import EDMPrecond
from edmcli.models.unet import SpadeUNet


def class_inputs(n: int = 3, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    labels = torch.randint(0, 5, (n, size, size), generator=g)
    return x, labels


def class_model(cls=EDMPrecond, num_classes: int = 4, seed: int = 0, **kw):
    torch.manual_seed(seed)
    config = small_config(num_classes=num_classes)
    if cls is DDPMEpsModel and kw.get("learn_sigma"):
        config = small_config(num_classes=num_classes, out_channels=2)
    model = cls(SpadeUNet(config), **kw)
    randomize_zero_init(model, seed)
    with torch.no_grad():  # a trained null class is not zero
        model.net.map_class.weight[num_classes].normal_(0, 0.5)
    return model.eval()
