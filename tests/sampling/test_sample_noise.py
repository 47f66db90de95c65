"""Per-sample noise of sampling (:class:`edmcli.sampling.pipeline.SampleNoise`): the start noise
from per-sample CPU generators, a stochastic step's noise from per-sample generators on the
sampling device, drawn there; on the CPU the numbers are those of the earlier path (one CPU
generator per sample, every draw copied), and an image depends only on its label map and seed."""

from __future__ import annotations

import pytest
import torch
from tiny_nets import randomize_zero_init

from edmcli.models.registry import build_model
from edmcli.sampling import pipeline
from edmcli.sampling.pipeline import SampleNoise, generate

SHAPE = (1, 8, 8)


class CopiedNoise:
    """The earlier path: one CPU generator per sample, start and every step drawn on the CPU
    from it and copied to the device."""

    def __init__(self, seeds, shape, device):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.device = shape, device

    def draw(self) -> torch.Tensor:
        parts = [torch.randn(self.shape, generator=g) for g in self.generators]
        return torch.stack(parts).to(self.device)

    def __call__(self, _step: int) -> torch.Tensor:
        return self.draw()


@pytest.fixture(scope="module")
def sdm():
    torch.manual_seed(0)
    net = build_model("sdm", "tiny", image_size=8, channel_mult=(1,), spade_hidden=8)
    return randomize_zero_init(net, seed=1).eval()


def _labels(n: int) -> torch.Tensor:
    labels = torch.randint(1, 5, (n, 8, 8), generator=torch.Generator().manual_seed(4))
    labels[:, :, :2] = 0
    return labels


def test_cpu_noise_is_bit_identical_to_the_copied_cpu_path():
    seeds = [3, 11, 7]
    new, old = SampleNoise(seeds, SHAPE, "cpu"), CopiedNoise(seeds, SHAPE, torch.device("cpu"))
    assert torch.equal(new.draw(), old.draw())
    for step in range(4):
        assert torch.equal(new(step), old(step))


def test_ancestral_images_on_the_cpu_are_those_of_the_copied_path(sdm, monkeypatch):
    labels = _labels(3)

    def images() -> torch.Tensor:
        return generate(sdm, "sdm", labels, [5, 6, 9], 8, solver="ddpm_ancestral", steps=6)

    new = images()
    monkeypatch.setattr(pipeline, "SampleNoise", CopiedNoise)
    assert torch.equal(new, images())


def test_step_noise_is_drawn_on_the_requested_device(monkeypatch):
    device = torch.device("cpu")
    noise = SampleNoise([1, 2], SHAPE, device)
    assert [g.device for g in noise.step_generators] == [device, device]
    calls = []
    randn = torch.randn

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", spy)
    z = noise(0)
    assert z.device == device and z.shape == (2, *SHAPE)
    assert len(calls) == 2  # one draw per sample, each from its own generator...
    for kwargs in calls:  # ...made on the device, by a generator of the device: no copy
        assert torch.device(kwargs["device"]) == device
        assert kwargs["generator"].device == device


def test_the_noise_of_a_sample_depends_on_its_seed_alone():
    pair, alone = SampleNoise([5, 8], SHAPE, "cpu"), SampleNoise([8], SHAPE, "cpu")
    again = SampleNoise([5, 8], SHAPE, "cpu")
    start = pair.draw()
    assert torch.equal(start[1], alone.draw()[0]) and torch.equal(start, again.draw())
    for step in range(3):
        z = pair(step)
        assert torch.equal(z[1], alone(step)[0]) and torch.equal(z, again(step))
        assert not torch.equal(z[0], z[1])


def test_same_seeds_give_the_same_images_whatever_the_batch(sdm):
    labels = _labels(3)
    kwargs = {"solver": "ddpm_ancestral", "steps": 5}
    batch = generate(sdm, "sdm", labels, [5, 6, 9], 8, **kwargs)
    assert torch.equal(batch, generate(sdm, "sdm", labels, [5, 6, 9], 8, **kwargs))
    alone = generate(sdm, "sdm", labels[1:2], [6], 8, **kwargs)
    torch.testing.assert_close(alone[0], batch[1], rtol=1e-5, atol=1e-6)
    other = generate(sdm, "sdm", labels[1:2], [7], 8, **kwargs)
    assert not torch.allclose(other[0], batch[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_step_noise_is_drawn_on_the_gpu_with_per_sample_seeds(sdm):
    device = torch.device("cuda")
    noise = SampleNoise([5, 8], SHAPE, device)
    assert all(g.device.type == "cuda" for g in noise.step_generators)
    # the start comes from the CPU generators: the same on every device
    assert torch.equal(noise.draw().cpu(), SampleNoise([5, 8], SHAPE, "cpu").draw())
    alone, again = SampleNoise([8], SHAPE, device), SampleNoise([5, 8], SHAPE, device)
    alone.draw(), again.draw()
    for step in range(3):
        z = noise(step)
        assert z.device.type == "cuda"
        assert torch.equal(z[1], alone(step)[0]) and torch.equal(z, again(step))
    net, labels = sdm.to(device), _labels(2).to(device)
    kwargs = {"solver": "ddpm_ancestral", "steps": 5}
    first = generate(net, "sdm", labels, [5, 6], 8, **kwargs)
    assert torch.equal(first, generate(net, "sdm", labels, [5, 6], 8, **kwargs))
    sdm.to("cpu")
