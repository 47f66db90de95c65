"""Classifier-free guidance of a class-conditional SPADE UNet.

``class_labels`` (N,) go to the UNet as NVlabs/edm passes its ``class_labels`` (None: the null
class). ``guidance`` w gives D = D_uncond + w (D_cond - D_uncond) (:func:`guide`). This w is the
*guidance scale* of diffusers (``guidance_scale``) and of Karras et al. 2024; Ho & Salimans (2022)
write the same combination as (1 + w') D_cond − w' D_uncond, so their w' is this w − 1 (their w' =
0, "no guidance", is w = 1 here). None or 1 is the conditional denoiser alone: no guidance, one
network evaluation; 0 the unconditional one (null class), one evaluation; any other w evaluates both
branches as *one* forward of the doubled batch (conditional first), with the SPADE gamma/beta of the
label maps shared by both (:meth:`~edmcli.models.unet.SpadeCache.tile`): two network evaluations per
sample (:func:`guidance_branches`). The combination is taken on the raw output F
(:func:`guided_net_output`), where D is affine in F with the same coefficients for both branches
(EDM, VE, VP of :mod:`edmcli.models.preconditioning`); for DDPM (:mod:`edmcli.models.ddpm`) on eps,
before x_0 is clipped, with the learned variance of the conditional branch (GLIDE's and ADM's
guidance).
"""

from __future__ import annotations

import math

import torch

from edmcli.models.unet import SpadeCache, SpadeUNet

__all__ = ["guidance_branches", "guide", "guided_net_output"]


def guide(uncond: torch.Tensor, cond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance at scale ``w`` (module docstring: Ho & Salimans' w is w − 1):
    ``uncond + w (cond - uncond)``; w = 1 gives ``cond`` (no guidance), w = 0 ``uncond``, w > 1
    extrapolates away from the unconditional estimate."""
    return torch.lerp(uncond, cond, float(w))


def guidance_branches(guidance: float | None) -> int:
    """Network evaluations per sample of one denoiser call with scale ``guidance``: 1 for None,
    1 (the conditional branch only) and 0 (the unconditional branch only), else 2."""
    if guidance is not None and not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance}.")
    return 1 if guidance is None or guidance in (0.0, 1.0) else 2


def guided_net_output(
    net: SpadeUNet,
    x: torch.Tensor,
    noise_labels: torch.Tensor,
    labels: torch.Tensor | None,
    spade_cache: SpadeCache | None,
    class_labels: torch.Tensor | None,
    guidance: float | None,
    guided_channels: int | None = None,
) -> torch.Tensor:
    """The raw UNet output F in fp32, guided with scale ``guidance`` (module docstring).

    Two branches run as one forward of ``[x; x]`` with classes ``[class_labels; null]`` and the
    label maps' SPADE modulations tiled (a ``spade_cache`` of the N maps is tiled at this call; one
    already tiled by ``tile(2)`` for the 2N batch is used as is: build that once per batch).
    ``guided_channels``: only the first that many output channels are guided, the rest are the
    conditional branch's (DDPM's learned variance)."""
    if guidance_branches(guidance) == 1:
        if guidance == 0.0:
            class_labels = None  # the null class: the unconditional denoiser
        extra = {} if class_labels is None else {"class_labels": class_labels}
        return net(x, noise_labels, labels=labels, spade_cache=spade_cache, **extra).float()
    null = net.null_class
    if null is None:
        raise ValueError("guidance needs a network trained with classes (num_classes > 0).")
    if class_labels is None:
        raise ValueError("guidance needs class_labels (the conditional branch's classes).")
    n = x.shape[0]
    if spade_cache is not None and spade_cache.batch_size == n:
        spade_cache = spade_cache.tile(2)
    elif spade_cache is not None and (spade_cache.batch_size != 2 * n or spade_cache.tiles % 2):
        raise ValueError(
            f"a guided call on {n} samples takes a spade_cache of {n} label maps or one tiled "
            f"twice ({2 * n}), got one of {spade_cache.batch_size}."
        )
    class_labels = torch.as_tensor(class_labels, device=x.device)
    classes = torch.cat([class_labels, torch.full_like(class_labels, null)])
    out = net(
        torch.cat([x, x]),
        torch.cat([noise_labels, noise_labels]),
        labels=None if labels is None else torch.cat([labels, labels]),
        spade_cache=spade_cache,
        class_labels=classes,
    ).float()
    cond, uncond = out[:n], out[n:]
    if guided_channels is None or guided_channels >= out.shape[1]:
        return guide(uncond, cond, guidance)
    k = guided_channels
    return torch.cat([guide(uncond[:, :k], cond[:, :k], guidance), cond[:, k:]], dim=1)
