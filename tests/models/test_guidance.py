"""Classifier-free guidance (edmcli.models.guidance): the formula, and guided denoisers of every
preconditioning and the DDPM model against separate conditional and unconditional calls."""

from __future__ import annotations

import pytest
import torch
from class_nets import class_inputs, class_model

from edmcli.models.ddpm import DDPMEpsModel
from edmcli.models.guidance import guidance_branches, guide
from edmcli.models.preconditioning import EDMPrecond, VEPrecond, VPPrecond

PRECONDS = [EDMPrecond, VEPrecond, VPPrecond, DDPMEpsModel]


def test_guide_is_the_cfg_formula():
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    assert torch.equal(guide(u, c, 0.0), u) and torch.equal(guide(u, c, 1.0), c)
    assert torch.equal(guide(u, c, 2.0), torch.tensor([5.0, 2.0]))  # u + 2 (c - u)
    assert torch.equal(guide(u, c, 0.5), torch.tensor([2.0, -1.0]))
    assert [guidance_branches(w) for w in (None, 0.0, 1.0, 1.5, 3.0)] == [1, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="finite"):
        guidance_branches(float("nan"))


def test_the_words_name_the_scale_that_the_formula_uses():
    """Before: the docstring cited Ho & Salimans for a w whose 1 means "no guidance" (theirs is
    this w − 1), and the demo called its w = 1 run classifier-free guidance."""
    import inspect
    import re
    from pathlib import Path

    import edmcli.models.guidance as guidance
    from edmcli.demo import front_page

    u, c, w = torch.tensor([0.5]), torch.tensor([2.0]), 3.0
    ho_salimans = w - 1  # their (1 + w') c − w' u
    assert torch.allclose(guide(u, c, w), (1 + ho_salimans) * c - ho_salimans * u)
    readme = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())
    for text in (" ".join(inspect.getdoc(guidance).split()), readme):
        assert "D = D_uncond + w (D_cond − D_uncond)" in text or (
            "D = D_uncond + w (D_cond - D_uncond)" in text
        )
        assert re.search(r"Ho & Salimans[^.]*w − 1|Ho & Salimans[^.]*w' is this w − 1", text)
    source = inspect.getsource(front_page)
    assert "classifier-free guidance w = 1" not in source and "no guidance" in source


@pytest.mark.parametrize("cls", PRECONDS)
def test_guidance_one_is_conditional_and_zero_unconditional_exactly(cls):
    model = class_model(cls)
    x, labels = class_inputs()
    classes = torch.tensor([0, 3, 1])
    with torch.no_grad():
        cond = model(x, 0.6, labels, class_labels=classes)
        uncond = model(x, 0.6, labels)
        assert torch.equal(model(x, 0.6, labels, class_labels=classes, guidance=1.0), cond)
        assert torch.equal(model(x, 0.6, labels, class_labels=classes, guidance=0.0), uncond)
        assert not torch.equal(cond, uncond)


@pytest.mark.parametrize("cls", [EDMPrecond, VEPrecond, VPPrecond])
@pytest.mark.parametrize("w", [0.5, 2.5])
def test_batched_two_branch_guidance_equals_two_separate_calls(cls, w):
    model = class_model(cls)
    x, labels = class_inputs()
    classes = torch.tensor([2, 0, 1])
    sigma = torch.tensor([0.3, 1.0, 7.0])  # one noise level per sample
    with torch.no_grad():
        cond = model(x, sigma, labels, class_labels=classes)
        uncond = model(x, sigma, labels)
        expected = uncond + w * (cond - uncond)
        by_labels = model(x, sigma, labels, class_labels=classes, guidance=w)
        cache = model.spade_cache(labels)
        by_cache = model(x, sigma, spade_cache=cache, class_labels=classes, guidance=w)
        by_tiled = model(x, sigma, spade_cache=cache.tile(2), class_labels=classes, guidance=w)
    # batch 6 vs batch 3 kernels round differently; VE's c_out = sigma (7) scales that noise
    torch.testing.assert_close(by_labels, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(by_cache, by_tiled)
    torch.testing.assert_close(by_cache, by_labels, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ddpm_guidance_guides_eps_before_the_clip_and_keeps_the_conditional_variance(learn_sigma):
    model = class_model(DDPMEpsModel, learn_sigma=learn_sigma, clip_denoised=True)
    x, labels = class_inputs()
    x = x * 3  # far enough out that the clip acts
    classes = torch.tensor([1, 1, 0])
    sigma = torch.tensor(2.0)
    w = 3.0
    with torch.no_grad():
        eps_c, v_c = model(x, sigma, labels, class_labels=classes, return_raw=True)
        eps_u, _ = model(x, sigma, labels, return_raw=True)
        expected = (x - sigma * (eps_u + w * (eps_c - eps_u))).clamp(-1, 1)
        if learn_sigma:
            denoised, frac = model(
                x, sigma, labels, class_labels=classes, guidance=w, return_variance=True
            )
            torch.testing.assert_close(frac, (v_c + 1) / 2, rtol=1e-5, atol=1e-5)
        else:
            denoised = model(x, sigma, labels, class_labels=classes, guidance=w)
    torch.testing.assert_close(denoised, expected, rtol=1e-4, atol=1e-4)  # batch-6 rounding
    assert (expected.abs() == 1).any()  # the clip did act on the guided estimate


def test_tiled_cache_repeats_every_modulation():
    model = class_model()
    _, labels = class_inputs()
    cache = model.spade_cache(labels)
    tiled = cache.tile(2)
    assert tiled.batch_size == 6 and tiled.tiles == 2 and tiled.nbytes == 2 * cache.nbytes
    for key, (gamma, beta) in cache.params.items():
        assert torch.equal(tiled.params[key][0], torch.cat([gamma, gamma]))
        assert torch.equal(tiled.params[key][1], torch.cat([beta, beta]))
    x, _ = class_inputs()
    with pytest.raises(ValueError, match="tiled"):
        model(x[:2], 1.0, spade_cache=cache, class_labels=torch.tensor([0, 1]), guidance=2.0)
