"""LPIPS loading from a temporary torch hub cache (never the network) and sector masking."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import lpips
import pytest
import torch
import torchvision

from edmcli.models.perceptual import (
    MIN_IMAGE_SIZE,
    PERCEPTUAL_BACKBONES,
    MaskedLPIPS,
    MissingWeightsError,
    backbone_weights_path,
    build_perceptual,
)

ALEX_FILE = "alexnet-owt-7be5be79.pth"
VGG_FILE = "vgg16-397923af.pth"


@pytest.fixture(autouse=True)
def _one_thread():
    """Small inputs run fastest on one thread; two threads stall on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _no_download(*args, **kwargs):
    raise AssertionError(f"a download was attempted: {args}")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def alex_cache(tmp_path_factory):
    """A torch home whose hub cache holds a (randomly initialised) AlexNet state dict."""
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    state = torchvision.models.alexnet(weights=None).state_dict()
    torch.save(state, checkpoints / ALEX_FILE)
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    yield home, features
    (checkpoints / ALEX_FILE).unlink()  # 233 MB: do not leave it in pytest's kept temp dirs


@pytest.fixture(scope="module")
def alex_lpips(alex_cache):
    home, _ = alex_cache
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        mp.setattr(torch.hub, "download_url_to_file", _no_download)
        return build_perceptual("alex")


def _images(size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    sector = torch.zeros(2, 1, size, size, dtype=torch.bool)
    sector[..., 4:, 6:-6] = True
    image = torch.rand(2, 1, size, size, generator=g) * sector
    recon = torch.rand(2, 1, size, size, generator=g) * sector
    return image, recon, sector


def test_unknown_backbone_and_none():
    with pytest.raises(ValueError, match="'squeeze' is not one of alex, vgg, none"):
        build_perceptual("squeeze")
    assert PERCEPTUAL_BACKBONES == ("alex", "vgg", "none")
    assert build_perceptual("none") is None


@pytest.mark.parametrize(("net", "file_name"), [("alex", ALEX_FILE), ("vgg", VGG_FILE)])
def test_missing_weights_name_the_exact_file(empty_cache, net, file_name):
    expected = empty_cache / file_name
    assert backbone_weights_path(net) == expected
    with pytest.raises(MissingWeightsError) as info:
        build_perceptual(net)
    assert str(expected.parent) in str(info.value) and file_name in str(info.value)
    assert "'none'" in str(info.value)


def test_failed_download_gives_the_same_message(empty_cache, monkeypatch):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(MissingWeightsError, match="Download failed"):
        build_perceptual("alex", allow_download=True)


def test_loads_backbone_from_cache_without_network(alex_lpips, alex_cache):
    _, features = alex_cache
    model = alex_lpips.lpips
    # Every backbone tensor comes from the cached file (lpips keeps features[i] as child "i").
    copied = {
        f"features.{index}.{name}": tensor
        for slice_ in model.net.children()
        for index, layer in slice_.named_children()
        for name, tensor in layer.state_dict().items()
    }
    assert copied.keys() == features.keys()
    for key, tensor in features.items():
        torch.testing.assert_close(copied[key], tensor, rtol=0, atol=0)
    # The linear layers are the calibrated ones shipped in the lpips package.
    shipped = torch.load(
        Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth",
        map_location="cpu",
        weights_only=True,
    )
    for key, tensor in shipped.items():
        torch.testing.assert_close(model.state_dict()[key], tensor, rtol=0, atol=0)
    assert not any(p.requires_grad for p in alex_lpips.parameters())
    alex_lpips.train()
    assert not model.training  # dropout in the linear layers stays off


def test_masked_distance_map(alex_lpips):
    image, recon, sector = _images()
    recon.requires_grad_(True)
    dist = alex_lpips(image, recon, sector)
    assert dist.shape == (2, 1, 32, 32)
    assert bool((dist > 0).all())
    same = alex_lpips(image, image, sector)
    torch.testing.assert_close(same, torch.zeros_like(same), rtol=0, atol=1e-6)
    # Pixels outside the sector are masked before LPIPS: changing them changes nothing.
    noisy = recon.detach() + 0.7 * (~sector)
    torch.testing.assert_close(alex_lpips(image, noisy, sector), dist.detach())
    dist.mean().backward()
    assert recon.grad is not None and recon.grad[sector].abs().sum() > 0


def test_minimum_image_size_is_the_backbones(alex_lpips):
    size = MIN_IMAGE_SIZE["alex"]
    image, recon, sector = _images(size)
    assert alex_lpips(image, recon, sector).shape == (2, 1, size, size)
    image, recon, sector = _images(size - 1)
    with pytest.raises(ValueError, match=f"at least {size}x{size}"):
        alex_lpips(image, recon, sector)
    # and the network itself rejects that size: the check only words its error clearly
    with pytest.raises(RuntimeError):
        alex_lpips.lpips(image.expand(-1, 3, -1, -1), recon.expand(-1, 3, -1, -1))


def test_unreadable_or_foreign_weights_file(empty_cache, alex_cache):
    _, features = alex_cache
    empty_cache.mkdir(parents=True)
    (empty_cache / ALEX_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read as a state dict"):
        MaskedLPIPS("alex")
    torch.save(features, empty_cache / VGG_FILE)  # AlexNet features under VGG's name
    with pytest.raises(ValueError, match="not a torchvision vgg16 state dict"):
        MaskedLPIPS("vgg")
