"""The one resize rule of label-derived maps (sector masks, SPADE one-hots, label maps)."""

from __future__ import annotations

import torch

from edmcli.data.labels import (
    NUM_CLASSES,
    label_onehot,
    resize_label_map,
    sector_mask,
)
from edmcli.data.store import DatasetStore
from edmcli.models.diffusion_loss import sector_mask_like
from edmcli.models.gamma_vae import latent_sector_mask
from edmcli.models.unet import labels_to_onehot


def _labels(store) -> torch.Tensor:
    return torch.from_numpy(DatasetStore(store).labels[:8].astype("int64"))


def test_at_the_store_size_it_is_the_exact_mask_and_one_hot(phantom_store):
    labels = _labels(phantom_store)
    assert torch.equal(sector_mask(labels)[:, 0].bool(), labels != 0)
    onehot = label_onehot(labels, 32)
    assert torch.equal(onehot.argmax(1), labels) and torch.equal(
        onehot.sum(1), torch.ones(8, 32, 32)
    )


def test_block_fractions_by_hand():
    labels = torch.tensor([[[0, 0, 1, 1], [0, 4, 1, 2], [4, 4, 3, 3], [4, 4, 3, 0]]])
    fractions = label_onehot(labels, 2)
    assert torch.allclose(fractions[0, :, 0, 0], torch.tensor([0.75, 0, 0, 0, 0.25]))
    assert torch.allclose(fractions[0, :, 0, 1], torch.tensor([0, 0.75, 0.25, 0, 0]))
    assert torch.allclose(fractions[0, :, 1, 1], torch.tensor([0.25, 0, 0, 0.75, 0]))
    assert torch.equal(sector_mask(labels, 2)[0, 0], torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    assert torch.equal(resize_label_map(labels, 2)[0], torch.tensor([[0, 1], [4, 3]]))
    ties = torch.tensor([[[0, 4], [4, 0]]])  # 50 % inside: in the sector, majority 0 (lower id)
    assert sector_mask(ties, 1).item() == 1.0 and resize_label_map(ties, 1).item() == 0


def test_every_user_of_a_smaller_mask_agrees(phantom_store):
    """The Γ-VAE's latent sector, the diffusion loss's mask and the UNet's one-hot at 8² are one
    rule (before: the VAE used area ≥ 0.5 and the loss nearest, disagreeing on pixels)."""
    labels = _labels(phantom_store)
    pixel = (labels != 0)[:, None]
    for size in (16, 8):
        rule = sector_mask(labels, size)
        assert torch.equal(latent_sector_mask(pixel, size), rule)
        assert torch.equal(sector_mask_like(labels != 0, torch.zeros(8, 1, size, size)), rule)
        onehot = labels_to_onehot(labels, size, NUM_CLASSES)
        assert torch.equal(onehot, label_onehot(labels, size))
        assert torch.equal((1 - onehot[:, :1] >= 0.5).float(), rule)
    nearest = torch.nn.functional.interpolate(pixel.float(), size=8, mode="nearest")
    assert not torch.equal(nearest, sector_mask(labels, 8))  # the rule is not nearest
