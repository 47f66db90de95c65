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
        sector = sector_mask(batch["labels"].to(device))
        out = model(image, sector, sample=False)
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
