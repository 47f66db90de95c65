"""Class conditioning of the SPADE UNet and classifier-free guidance in the preconditionings."""

from __future__ import annotations

import pytest
import torch
from tiny_nets import randomize_zero_init, small_config

from edmcli.models.diffusion_loss import EDMLoss
from edmcli.models.preconditioning import (
    DDPMEpsModel,
    EDMPrecond,
    VEPrecond,
    VPPrecond,
    guidance_branches,
    guide,
)
from edmcli.models.unet import SpadeUNet
from edmcli.runs.diffusion_run import CLASS_CONDITIONS, class_ids

PRECONDS = [EDMPrecond, VEPrecond, VPPrecond, DDPMEpsModel]


def _inputs(n: int = 3, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    labels = torch.randint(0, 5, (n, size, size), generator=g)
    return x, labels


def _conditional(cls=EDMPrecond, num_classes: int = 4, seed: int = 0, **kw):
    torch.manual_seed(seed)
    config = small_config(num_classes=num_classes)
    if cls is DDPMEpsModel and kw.get("learn_sigma"):
        config = small_config(num_classes=num_classes, out_channels=2)
    model = cls(SpadeUNet(config), **kw)
    randomize_zero_init(model, seed)
    with torch.no_grad():  # a trained null class is not zero
        model.net.map_class.weight[num_classes].normal_(0, 0.5)
    return model.eval()


def test_default_network_has_no_class_parameters_and_is_the_null_branch():
    """The map-only network (num_classes 0) has no class parameter; loaded into a conditional
    network, whose null class starts at zero, the null class reproduces it bit for bit."""
    torch.manual_seed(0)
    plain = randomize_zero_init(EDMPrecond(SpadeUNet(small_config()))).eval()
    assert plain.net.map_class is None and plain.net.null_class is None
    assert not [k for k in plain.state_dict() if "class" in k]
    conditional = EDMPrecond(SpadeUNet(small_config(num_classes=2))).eval()
    assert torch.count_nonzero(conditional.net.map_class.weight[2]) == 0  # null row starts at 0
    missing, unexpected = conditional.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["net.map_class.weight"] and unexpected == []
    x, labels = _inputs()
    with torch.no_grad():
        expected = plain(x, 0.8, labels)
        null = torch.full((3,), 2)
        assert torch.equal(conditional(x, 0.8, labels), expected)  # no class_labels: null
        assert torch.equal(conditional(x, 0.8, labels, class_labels=null), expected)
        assert expected.shape == x.shape


def test_the_class_changes_the_output_of_its_own_sample_only():
    model = _conditional()
    x, labels = _inputs()
    with torch.no_grad():
        a = model(x, 1.0, labels, class_labels=torch.tensor([0, 1, 2]))
        b = model(x, 1.0, labels, class_labels=torch.tensor([3, 1, 2]))
    assert (a[0] - b[0]).abs().max() > 1e-3
    torch.testing.assert_close(a[1:], b[1:], rtol=0, atol=1e-6)


def test_bad_class_labels_are_refused():
    model = _conditional(num_classes=2)
    x, labels = _inputs()
    with pytest.raises(ValueError, match="classes 0..1 or the null class 2"):
        model(x, 1.0, labels, class_labels=torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="shape"):
        model(x, 1.0, labels, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        model(x, 1.0, labels, class_labels=torch.tensor([0.0, 1.0, 1.0]))
    plain = EDMPrecond(SpadeUNet(small_config())).eval()
    with pytest.raises(ValueError, match="no class embedding"):
        plain(x, 1.0, labels, class_labels=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="trained with classes"):
        plain(x, 1.0, labels, guidance=2.0)
    with pytest.raises(ValueError, match="needs class_labels"):
        model(x, 1.0, labels, guidance=2.0)


def test_guide_is_the_cfg_formula():
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    assert torch.equal(guide(u, c, 0.0), u) and torch.equal(guide(u, c, 1.0), c)
    assert torch.equal(guide(u, c, 2.0), torch.tensor([5.0, 2.0]))  # u + 2 (c - u)
    assert torch.equal(guide(u, c, 0.5), torch.tensor([2.0, -1.0]))
    assert [guidance_branches(w) for w in (None, 0.0, 1.0, 1.5, 3.0)] == [1, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="finite"):
        guidance_branches(float("nan"))


@pytest.mark.parametrize("cls", PRECONDS)
def test_guidance_one_is_conditional_and_zero_unconditional_exactly(cls):
    model = _conditional(cls)
    x, labels = _inputs()
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
    model = _conditional(cls)
    x, labels = _inputs()
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
    model = _conditional(DDPMEpsModel, learn_sigma=learn_sigma, clip_denoised=True)
    x, labels = _inputs()
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
    model = _conditional()
    _, labels = _inputs()
    cache = model.spade_cache(labels)
    tiled = cache.tile(2)
    assert tiled.batch_size == 6 and tiled.tiles == 2 and tiled.nbytes == 2 * cache.nbytes
    for key, (gamma, beta) in cache.params.items():
        assert torch.equal(tiled.params[key][0], torch.cat([gamma, gamma]))
        assert torch.equal(tiled.params[key][1], torch.cat([beta, beta]))
    x, _ = _inputs()
    with pytest.raises(ValueError, match="tiled"):
        model(x[:2], 1.0, spade_cache=cache, class_labels=torch.tensor([0, 1]), guidance=2.0)


def test_class_ids_of_views_and_phases():
    views = torch.tensor([0, 1, 0, 1, -1, 1])
    phases = torch.tensor([0, 0, 1, 1, 0, -1])
    assert class_ids("view", views, phases).tolist() == [0, 1, 0, 1, 2, 1]
    assert class_ids("view-phase", views, phases).tolist() == [0, 2, 1, 3, 4, 4]
    assert CLASS_CONDITIONS == {"view": 2, "view-phase": 4}


def test_dropped_samples_train_only_the_null_embedding():
    """With every class dropped, the loss's gradient reaches the null row of the embedding and no
    class row; with real classes, only the rows used."""
    model = _conditional(num_classes=4).train()
    x, labels = _inputs(4)
    sector = labels > 0
    loss_fn = EDMLoss()
    for classes, used in ((torch.full((4,), 4), {4}), (torch.tensor([0, 0, 2, 2]), {0, 2})):
        model.zero_grad()
        loss, _ = loss_fn(model, x.clamp(-1, 1), labels, sector, class_labels=classes)
        loss.backward()
        grad = model.net.map_class.weight.grad.abs().sum(dim=1)
        assert {int(k) for k in torch.nonzero(grad).flatten()} == used
