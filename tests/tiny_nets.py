"""The small SPADE UNet configuration shared by the model tests."""

from __future__ import annotations

from edmcli.models.unet import SpadeUNetConfig


def small_config(**overrides) -> SpadeUNetConfig:
    """16² input, 16 channels, two levels, one block, no attention but the middle block."""
    values = dict(
        image_size=16,
        model_channels=16,
        channel_mult=(1, 2),
        num_blocks=1,
        attention_resolutions=(),
        dropout=0.0,
        attention_head_channels=16,
        spade_hidden=16,
    )
    values.update(overrides)
    return SpadeUNetConfig(**values)
