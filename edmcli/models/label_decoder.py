"""The Γ-VAE decoder that also sees the label map (``train-vae --decoder-labels``, not the paper).

The paper's decoder maps the latent alone to the image; everything the image shows of the label
map (the cavities' dark blood pools, the bright myocardium, their boundaries) must then be coded in
a one-channel latent at a quarter of the image size. This decoder has the layout of MONAI's
``autoencoderkl`` decoder (a 3x3 convolution in, per level from the deepest: residual blocks, then
a nearest 2x upsampling and a 3x3 convolution; a final norm and 3x3 convolution out) with every
group norm replaced by :class:`edmcli.models.spade.SPADE` fed the label map at the feature size (the
class fractions of :func:`edmcli.data.labels.label_onehot`), as SPADE's generator does. The final
norm is followed by SiLU, as in SPADE and in the latent diffusion models' decoders (MONAI's has
none).

It can paint the map rather than decode the latent: :mod:`benchmarks.generator_levers` probes
that by decoding latents with a shifted map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edmcli.data.labels import NUM_CLASSES, label_onehot
from edmcli.models.spade import SPADE

__all__ = ["LabelDecoder"]


class _SpadeResBlock(nn.Module):
    """``x + conv(SiLU(SPADE(conv(SiLU(SPADE(x))))))``, a 1x1 convolution on the skip path when
    the channel count changes (MONAI's ``AEKLResBlock`` with SPADE norms)."""

    def __init__(self, c_in: int, c_out: int, groups: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.norm1 = SPADE(c_in, groups, NUM_CLASSES, hidden, eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = SPADE(c_out, groups, NUM_CLASSES, hidden, eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x, *self.norm1.modulation(onehot), silu=True)
        h = self.conv1(h)
        h = self.norm2(h, *self.norm2.modulation(onehot), silu=True)
        return self.skip(x) + self.conv2(h)


class LabelDecoder(nn.Module):
    """Latent (N, C, h, w) + label map (N, H, W) -> one-channel logits (N, 1, h·2^(L-1), ...).

    Args:
        in_channels: latent channels C.
        channels: channels per level, shallowest first (the encoder's).
        num_res_blocks: residual blocks per level.
        num_groups: group-norm groups (must divide every level's channels).
        eps: group-norm epsilon.
        hidden: channels of each SPADE modulation MLP's hidden layer (default: the deepest
            level's channels, at most 128, SPADE's width). The modulation runs at every
            resolution, the full image's included, so it sets the decoder's cost: at the tiny
            preset (48 channels) about 280 M multiply-adds per 64² image, for a decoder of 125 M
            without labels; with 16, 93 M, but the demo's synthetic-trained Dice measured 76.3
            instead of 77.7 (one training each; README, "Beyond the paper").
    """

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, ...],
        num_res_blocks: int,
        num_groups: int,
        eps: float = 1e-6,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        hidden = hidden or min(128, channels[-1])
        reversed_channels = list(reversed(channels))
        self.conv_in = nn.Conv2d(in_channels, reversed_channels[0], 3, padding=1)
        self.levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        c = reversed_channels[0]
        for i, c_out in enumerate(reversed_channels):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(_SpadeResBlock(c, c_out, num_groups, hidden, eps))
                c = c_out
            self.levels.append(blocks)
            if i < len(reversed_channels) - 1:
                self.upsamples.append(nn.Conv2d(c, c, 3, padding=1))
        self.norm_out = SPADE(c, num_groups, NUM_CLASSES, hidden, eps)
        self.conv_out = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1, H, W) for latents ``z`` and integer label maps ``labels`` (N, H, W) at
        the output size."""
        out_size = z.shape[-1] * 2 ** (len(self.levels) - 1)
        if labels.ndim != 3 or tuple(labels.shape[-2:]) != (out_size, out_size):
            raise ValueError(
                f"labels must be shaped (N, {out_size}, {out_size}) for a latent of side "
                f"{z.shape[-1]}, got {tuple(labels.shape)}."
            )
        if labels.shape[0] != z.shape[0]:
            raise ValueError(
                f"labels batch size {labels.shape[0]} differs from latent batch size {z.shape[0]}."
            )
        x = self.conv_in(z)
        for i, blocks in enumerate(self.levels):
            onehot = label_onehot(labels, x.shape[-1], dtype=x.dtype)
            for block in blocks:
                x = block(x, onehot)
            if i < len(self.upsamples):
                x = self.upsamples[i](F.interpolate(x, scale_factor=2.0, mode="nearest"))
        onehot = label_onehot(labels, x.shape[-1], dtype=x.dtype)
        x = self.norm_out(x, *self.norm_out.modulation(onehot), silu=True)
        return self.conv_out(x)
