"""Image quality of reconstructions inside the sector: masked PSNR and masked SSIM.

PSNR uses the mean squared error over in-sector pixels (data range 1). SSIM uses MONAI's SSIM map
(Gaussian window) averaged over the in-sector pixels where the window lies inside the image, so
the black background, identical in both images, does not inflate the score.
"""

from __future__ import annotations

import torch
from monai.metrics.regression import compute_ssim_and_cs

from edmcli.data.labels import sector_mask
from edmcli.models.gamma_vae import area_downsample

SSIM_KERNEL = 7
SSIM_SIGMA = 1.5


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB over ``mask`` (all (N, 1, H, W), images in [0, 1])."""
    mask = mask.to(pred.dtype)
    mse = ((pred - target) ** 2 * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def masked_ssim(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM averaged over ``mask``."""
    ssim_map, _ = compute_ssim_and_cs(
        pred.float(),
        target.float(),
        spatial_dims=2,
        kernel_size=(SSIM_KERNEL, SSIM_KERNEL),
        kernel_sigma=(SSIM_SIGMA, SSIM_SIGMA),
        data_range=1.0,
    )
    r = SSIM_KERNEL // 2
    inner = mask[..., r : mask.shape[-2] - r, r : mask.shape[-1] - r].to(ssim_map.dtype)
    return (ssim_map * inner).flatten(1).sum(1) / inner.flatten(1).sum(1).clamp_min(1)


def mean_image(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The identity-to-mean baseline: each image replaced by its mean in-sector intensity."""
    mask = mask.to(target.dtype)
    mean = (target * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)
    return mean.view(-1, 1, 1, 1) * mask


@torch.no_grad()
def reconstruction_quality(model, loader, device: torch.device) -> dict[str, float]:
    """Mean masked PSNR/SSIM of ``model`` (posterior-mean reconstructions) and of the
    identity-to-mean baseline over a loader of dataset items, and the Pearson correlation of the
    latent E[z] (its channel 0) with the image downsampled to latent size inside the latent
    sector (close to 1 when the latent term ties the latent to the anatomy)."""
    sums = {"psnr": 0.0, "ssim": 0.0, "baseline_psnr": 0.0, "baseline_ssim": 0.0}
    count = 0
    latents, smalls = [], []
    model.eval()
    for batch in loader:
        image = batch["image"].to(device)
        labels = batch["labels"].to(device)
        sector = sector_mask(labels)
        out = model(image, sector, sample=False, labels=labels)
        recon = out.recon
        inside = out.latent_sector.bool()
        latents.append(out.z[:, :1][inside])  # the channel the latent term ties to the image
        smalls.append(area_downsample(image * sector, out.z.shape[-1])[inside])
        baseline = mean_image(image, sector)
        sums["psnr"] += float(masked_psnr(recon, image, sector).sum())
        sums["ssim"] += float(masked_ssim(recon, image, sector).sum())
        sums["baseline_psnr"] += float(masked_psnr(baseline, image, sector).sum())
        sums["baseline_ssim"] += float(masked_ssim(baseline, image, sector).sum())
        count += image.shape[0]
    result = {k: v / max(count, 1) for k, v in sums.items()}
    pair = torch.stack([torch.cat(latents), torch.cat(smalls)]).double()
    result["latent_correlation"] = float(torch.corrcoef(pair)[0, 1])
    result["images"] = count
    return result


def shift_structures(labels: torch.Tensor, shift: int) -> torch.Tensor:
    """Label maps (N, H, W) with the heart's structures moved ``shift`` pixels to the right and
    the sector left where it is: inside the sector each pixel takes the label of the pixel
    ``shift`` to its left, structures never leave the sector, and outside stays outside."""
    from edmcli.data.labels import OUTSIDE, SECTOR

    moved = torch.roll(labels, shift, dims=-1)
    inside = labels != OUTSIDE
    moved = torch.where(moved == OUTSIDE, torch.full_like(moved, SECTOR), moved)
    return torch.where(inside, moved, labels)


@torch.no_grad()
def map_following(model, images: torch.Tensor, labels: torch.Tensor, shift: int = 4) -> float:
    """How much a decoder with labels paints the map instead of decoding the latent: each image
    is encoded with its own map and decoded with (a) its map, giving R, and (b) the map with the
    structures shifted by ``shift`` pixels (:func:`shift_structures`), giving D. Returns
    ``mse(D, R) / (mse(D, R) + mse(D, roll(R, shift)))`` over the sector pixels that the shifted
    structures cover in either map: 0 when the image follows the latent (D = R: every decoder
    without labels), 1 when the decoder paints the map (D = R moved with it), 0.5 halfway."""
    sector = sector_mask(labels)
    latent = model.encode(images, sector)
    shifted = shift_structures(labels, shift)
    own = model.decode(latent, sector, labels)
    moved = model.decode(latent, sector, shifted)
    where = ((labels != shifted) | (torch.roll(labels, shift, dims=-1) != labels)).unsqueeze(1)
    where = where & sector.bool() & torch.roll(sector.bool(), shift, dims=-1)
    n = where.sum().clamp_min(1)
    to_own = ((moved - own) ** 2)[where].sum() / n
    to_moved = ((moved - torch.roll(own, shift, dims=-1)) ** 2)[where].sum() / n
    return float(to_own / (to_own + to_moved).clamp_min(1e-12))
