"""Class conditioning of the SPADE UNet: class embedding, null class, class ids, training."""

from __future__ import annotations

import pytest
import torch
from class_nets import class_inputs, class_model
from tiny_nets import randomize_zero_init, small_config

from edmcli.models.diffusion_loss import EDMLoss
from edmcli.models.preconditioning import EDMPrecond
from edmcli.models.unet import SpadeUNet
from edmcli.runs.diffusion_run import CLASS_CONDITIONS, class_ids


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
    x, labels = class_inputs()
    with torch.no_grad():
        expected = plain(x, 0.8, labels)
        null = torch.full((3,), 2)
        assert torch.equal(conditional(x, 0.8, labels), expected)  # no class_labels: null
        assert torch.equal(conditional(x, 0.8, labels, class_labels=null), expected)
        assert expected.shape == x.shape


def test_the_class_changes_the_output_of_its_own_sample_only():
    model = class_model()
    x, labels = class_inputs()
    with torch.no_grad():
        a = model(x, 1.0, labels, class_labels=torch.tensor([0, 1, 2]))
        b = model(x, 1.0, labels, class_labels=torch.tensor([3, 1, 2]))
    assert (a[0] - b[0]).abs().max() > 1e-3
    torch.testing.assert_close(a[1:], b[1:], rtol=0, atol=1e-6)


def test_bad_class_labels_are_refused():
    model = class_model(num_classes=2)
    x, labels = class_inputs()
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


def test_class_ids_of_views_and_phases():
    views = torch.tensor([0, 1, 0, 1, -1, 1])
    phases = torch.tensor([0, 0, 1, 1, 0, -1])
    assert class_ids("view", views, phases).tolist() == [0, 1, 0, 1, 2, 1]
    assert class_ids("view-phase", views, phases).tolist() == [0, 2, 1, 3, 4, 4]
    assert CLASS_CONDITIONS == {"view": 2, "view-phase": 4}


def test_dropped_samples_train_only_the_null_embedding():
    """With every class dropped, the loss's gradient reaches the null row of the embedding and no
    class row; with real classes, only the rows used."""
    model = class_model(num_classes=4).train()
    x, labels = class_inputs(4)
    sector = labels > 0
    loss_fn = EDMLoss()
    for classes, used in ((torch.full((4,), 4), {4}), (torch.tensor([0, 0, 2, 2]), {0, 2})):
        model.zero_grad()
        loss, _ = loss_fn(model, x.clamp(-1, 1), labels, sector, class_labels=classes)
        loss.backward()
        grad = model.net.map_class.weight.grad.abs().sum(dim=1)
        assert {int(k) for k in torch.nonzero(grad).flatten()} == used
