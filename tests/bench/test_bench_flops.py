"""FLOP counting against hand counts and the paper networks' reference numbers, the γ/β split,
the peak table, and the width search of the MONAI peer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edmcli.bench.flops import count_flops, mfu, network_flops, peak_flops
from edmcli.bench.peer import match_widths, monai_kwargs, width_steps
from edmcli.models.registry import build_model, unet_config


def conv_flops(n, c_in, c_out, k, h_out, w_out):
    """2 × multiply-adds of a dense 2-D convolution (bias not counted)."""
    return 2 * n * c_in * c_out * k * k * h_out * w_out


def test_counter_matches_a_hand_count_of_convolutions_and_a_linear_layer():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8×8 → 8×8
        nn.Conv2d(8, 4, 3, stride=2, padding=1),  # 8×8 → 4×4
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )
    x = torch.randn(2, 3, 8, 8)
    counted = count_flops(lambda: net(x))
    by_hand = conv_flops(2, 3, 8, 3, 8, 8) + conv_flops(2, 8, 4, 3, 4, 4) + 2 * 2 * 64 * 10
    assert counted.total == by_hand == 76288
    assert counted.by_op["aten.convolution"] == 55296 + 18432
    assert counted.by_op["aten.addmm"] == 2560


def test_cached_nfe_plus_cache_build_is_the_uncached_nfe_and_scales_with_the_batch():
    for name, size in (("edm-l64", 16), ("sdm", 32)):
        flops = network_flops(lambda n=name, s=size: build_model(n, "tiny", s), size, 64)
        # the cache holds exactly the SPADE MLPs' work of one NFE: nothing more, nothing less
        assert flops.uncached == flops.cached + flops.spade_cache
        assert 0 < flops.spade_share < 1
        with torch.device("meta"):
            net = build_model(name, "tiny", size).eval()
        x = torch.zeros(3, 1, size, size, device="meta")
        labels = torch.zeros(3, 64, 64, dtype=torch.long, device="meta")
        three = count_flops(lambda net=net, x=x, labels=labels: net(x, torch.ones(3), labels))
        assert three.total == 3 * flops.uncached


def test_paper_edm_l64_reproduces_the_reference_flops():
    """docs/reference.md (the authors' networks): EDM-L64 382 M parameters, 326 GFLOP per NFE of
    which 107 in the SPADE MLPs (33 %)."""
    flops = network_flops(lambda: build_model("edm-l64", "paper", 64), 64, 256)
    assert flops.params == pytest.approx(382e6, rel=0.01)
    assert flops.uncached / 1e9 == pytest.approx(326, rel=0.05)
    assert flops.spade_cache / 1e9 == pytest.approx(107, rel=0.05)
    assert flops.spade_share == pytest.approx(0.33, abs=0.02)


@pytest.mark.slow
def test_paper_pixel_and_l128_flops_and_the_throughput_ceilings():
    """EDM 256² 4666 and EDM-L128 1209 GFLOP per NFE, so the ceilings EDM-L64 / EDM ≈ 14.3× and
    EDM-L64 / EDM-L128 ≈ 3.7× and the γ/β cache ≈ 1.49× per NFE."""
    count = {
        name: network_flops(lambda n=name, s=size: build_model(n, "paper", s), size, 256)
        for name, size in (("edm", 256), ("edm-l128", 128), ("edm-l64", 64))
    }
    assert count["edm"].uncached / 1e9 == pytest.approx(4666, rel=0.05)
    assert count["edm-l128"].uncached / 1e9 == pytest.approx(1209, rel=0.05)
    assert count["edm"].uncached / count["edm-l64"].uncached == pytest.approx(14.3, rel=0.03)
    assert count["edm-l128"].uncached / count["edm-l64"].uncached == pytest.approx(3.7, rel=0.03)
    for flops in count.values():
        assert flops.uncached / flops.cached == pytest.approx(1.49, rel=0.03)


def test_peaks_are_looked_up_by_whole_words_most_specific_first():
    assert peak_flops("NVIDIA GeForce RTX 3090", "bf16") == 71e12
    assert peak_flops("NVIDIA GeForce RTX 3090 Ti", "bf16") == 80e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.5e12)
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA L4", "tf32") == 60e12
    assert peak_flops("NVIDIA L40S", "tf32") == 183e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 units
    assert peak_flops("NVIDIA A10G", "bf16") is None  # not A10: unknown
    assert peak_flops("cpu", "fp32") is None
    assert mfu(50e12, 100e12) == 0.5 and mfu(1.0, None) is None
    with pytest.raises(ValueError):
        peak_flops("NVIDIA H200", "fp8")


def test_width_search_meets_a_quadratic_cost_on_the_step_grid():
    """FLOPs of a UNet are quadratic in its widths. On a fine grid the search lands within 1 %;
    on a coarse one (no point within 1 %) it stops where no one-step move gets closer."""
    weights = (4.0, 2.0, 1.0)

    def flops_of(w):
        return sum(a * c * c for a, c in zip(weights, w, strict=True)) + 1000.0

    def error(w):
        return abs(flops_of(w) / target - 1)

    base = (32, 64, 96)
    target = 1.37 * flops_of(base)
    widths, flops = match_widths(base, flops_of, target, steps=(2, 2, 4))
    assert flops == flops_of(widths) and error(widths) <= 0.01
    assert widths[0] % 2 == 0 and widths[1] % 2 == 0 and widths[2] % 4 == 0
    steps = (8, 8, 16)
    widths, _ = match_widths(base, flops_of, target, steps=steps)
    assert all(w % s == 0 for w, s in zip(widths, steps, strict=True))
    moves = [
        widths[:i] + (widths[i] + d,) + widths[i + 1 :]
        for i, s in enumerate(steps)
        for d in (s, -s)
    ]
    assert 0.01 < error(widths) <= min(error(m) for m in moves)
    with pytest.raises(ValueError):
        match_widths(base, flops_of, target, steps=(8, 8))


def test_monai_arguments_keep_our_structure():
    config = unet_config("edm-l64", "paper", 64)
    kwargs = monai_kwargs(config, (192, 448, 640, 832))
    assert kwargs["attention_levels"] == (False, True, True, True)  # 32, 16, 8 (and the middle)
    assert kwargs["num_res_blocks"] == 3 and kwargs["spade_intermediate_channels"] == 128
    assert kwargs["norm_num_groups"] == 32 and kwargs["num_head_channels"] == (64,) * 4
    assert width_steps(config) == (32, 64, 64, 64)
