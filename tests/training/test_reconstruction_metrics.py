from __future__ import annotations

import math

import torch

from edmcli.training.reconstruction import masked_psnr, masked_ssim, mean_image


def test_masked_psnr_hand_computed():
    target = torch.zeros(1, 1, 4, 4)
    pred = torch.zeros(1, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1  # 8 pixels inside
    pred[..., 0, :] = 0.1  # 4 pixels off by 0.1 inside → MSE = 4·0.01/8
    pred[..., 3, :] = 0.9  # outside: ignored
    expected = 10 * math.log10(1 / (4 * 0.01 / 8))
    assert abs(float(masked_psnr(pred, target, mask)[0]) - expected) < 1e-4


def test_masked_ssim_is_one_for_identical_and_ignores_outside():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, 24, 24, generator=g)
    mask = torch.zeros(2, 1, 24, 24)
    mask[..., 4:20, 4:20] = 1
    assert torch.allclose(masked_ssim(image, image, mask), torch.ones(2))
    other = image.clone()
    other[..., :1, :] = 0  # outside the mask, beyond the 7×7 window of any in-mask pixel
    assert torch.allclose(masked_ssim(other, image, mask), torch.ones(2))
    noisy = image + 0.2 * torch.randn(image.shape, generator=g)
    assert (masked_ssim(noisy, image, mask) < 0.9).all()


def test_identity_to_mean_baseline():
    image = torch.tensor([[[[0.2, 0.4], [0.9, 0.0]]]])
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    torch.testing.assert_close(mean_image(image, mask), torch.tensor([[[[0.3, 0.3], [0, 0]]]]))
