"""The 5× label-map transforms follow the reference augmentation (docs/reference.md)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from edmcli.data.augment import AugmentConfig, PairedAugment
from edmcli.data.label_transforms import (
    IDENTITY,
    LabelMapTransform,
    LabelTransformConfig,
)
from edmcli.data.labels import LV, OUTSIDE, SECTOR
from edmcli.data.phantom import generate_patient
from edmcli.data.store import DatasetStore

SIZE = 256
SEEDS = range(200)


@pytest.fixture(scope="module")
def maps() -> list[np.ndarray]:
    """Eight phantom label maps at 256² (two patients, A2C/A4C × ED/ES)."""
    return [r["labels"] for p in range(2) for r in generate_patient(3, p, SIZE)]


def _only(**fields) -> LabelTransformConfig:
    return replace(IDENTITY, **fields)


def _lv(labels: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(labels == LV)
    return np.stack([rows, cols]).astype(np.float64)


def test_identity_parameters_return_the_input_exactly(maps, phantom_store):
    random = np.random.default_rng(0).integers(0, 5, size=(SIZE, SIZE)).astype(np.uint8)
    transform = LabelMapTransform(SIZE, IDENTITY)
    for labels in [*maps, random]:
        for seed in (0, 1, 12345):
            np.testing.assert_array_equal(transform.move(labels, seed), labels)
            np.testing.assert_array_equal(transform(labels, seed), labels)
    grid = np.stack(np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij"))
    np.testing.assert_array_equal(transform.coordinates(transform.draw(7)), grid)
    small = DatasetStore(phantom_store).labels[:]
    transform = LabelMapTransform(small.shape[-1], IDENTITY)
    for seed, labels in enumerate(small):
        np.testing.assert_array_equal(transform(labels, seed), labels)


def test_affine_resizes_the_lv_by_one_scale_drawn_in_the_reference_range(maps):
    transform = LabelMapTransform(SIZE, LabelTransformConfig(elastic_max_displacement=0.0))
    labels = maps[0]
    area = (labels == LV).sum()
    ratios, drawn = [], []
    for seed in SEEDS:
        ratios.append(np.sqrt((transform.move(labels, seed) == LV).sum() / area))
        drawn.append(transform.draw(seed).scale)
    ratios, drawn = np.array(ratios), np.array(drawn)
    # torchvision's scale=(0.8, 1.05) enlarges the map by s: median 0.925, never beyond the range
    assert abs(np.median(ratios) - 0.925) < 0.02
    assert ratios.min() > 0.78 and ratios.max() < 1.07
    assert ratios.min() < 0.82 and ratios.max() > 1.03  # the whole range is used
    np.testing.assert_allclose(ratios, drawn, atol=0.01)  # the map is resized by the drawn s


def test_scale_is_isotropic(maps):
    transform = LabelMapTransform(SIZE, _only(scale=(0.8, 1.05)))
    labels = maps[2]
    spread = _lv(labels).std(axis=1)
    for seed in range(50):
        ratio = _lv(transform.move(labels, seed)).std(axis=1) / spread  # (rows, columns)
        s = transform.draw(seed).scale
        # both axes follow the one drawn s (nearest-neighbour edges: ≈ 1 % on a 12 px spread)
        np.testing.assert_allclose(ratio, [s, s], atol=0.015)
        assert abs(ratio[0] - ratio[1]) < 0.02


def test_translation_moves_rows_only_by_at_most_5_percent(maps):
    transform = LabelMapTransform(SIZE, _only(translate_rows=0.05))
    labels = maps[1]
    centre = _lv(labels).mean(axis=1)
    shifts = []
    for seed in SEEDS:
        moved = _lv(transform.move(labels, seed)).mean(axis=1) - centre
        assert abs(moved[1]) <= 0.5
        assert abs(moved[0] - transform.draw(seed).shift_rows) <= 0.5
        shifts.append(moved[0])
    shifts = np.abs(shifts)
    assert shifts.max() <= 0.05 * SIZE + 0.5
    assert shifts.max() > 0.04 * SIZE  # up to 5 %, in both directions
    assert min(shifts) < 0.01 * SIZE


def test_shear_acts_along_x_only(maps):
    transform = LabelMapTransform(SIZE, _only(shear_deg=5.0))
    labels = maps[3]
    rows = np.arange(SIZE, dtype=np.float64)[:, None].repeat(SIZE, axis=1)
    per_row = (labels == LV).sum(axis=1)
    column_moves = []
    for seed in range(50):
        draw = transform.draw(seed)
        np.testing.assert_array_equal(transform.coordinates(draw)[0], rows)
        moved = transform.move(labels, seed)
        np.testing.assert_array_equal((moved == LV).sum(axis=1), per_row)  # rows unchanged
        column_moves.append(abs(_lv(moved)[1].mean() - _lv(labels)[1].mean()))
    assert max(column_moves) > 1.5  # the shear does move columns


def test_elastic_displacement_has_the_reference_size():
    config = _only(
        elastic_control_points=10, elastic_max_displacement=30.0, elastic_locked_borders=1
    )
    transform = LabelMapTransform(SIZE, config)
    assert transform.max_displacement == 30.0
    grid = np.stack(np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij"))
    per_seed, control_max, edge = [], [], []
    for seed in SEEDS:
        draw = transform.draw(seed)
        control = draw.control
        assert control.shape == (2, 10, 10)
        ring = np.ones((10, 10), dtype=bool)
        ring[1:-1, 1:-1] = False
        assert np.all(control[:, ring] == 0)  # the locked border control points
        control_max.append(np.abs(control).max())
        field = transform.displacement(draw)
        assert field.shape == (2, SIZE, SIZE)
        per_seed.append(np.abs(field).max(axis=(1, 2)))
        edges = [field[:, 0], field[:, -1], field[:, :, 0], field[:, :, -1]]
        edge.append(max(np.abs(e).max() for e in edges))
        if seed < 5:  # the field is what the resampling uses
            np.testing.assert_allclose(transform.coordinates(draw), grid + field, atol=1e-9)
    per_seed = np.array(per_seed)  # (seeds, axis)
    assert per_seed.max() <= 30.0 + 1e-9  # never beyond the maximum, on either axis
    assert per_seed.max(axis=0).min() > 22.5  # approached on both axes
    assert max(control_max) > 29.5
    assert np.mean(per_seed.max(axis=1) >= 15.0) >= 0.9
    # torchio's geometry: the locked ring lies one cell outside the image, so its edge is damped
    assert max(edge) <= 30.0 * 5 / 6 + 1e-9
    two = LabelMapTransform(SIZE, replace(config, elastic_locked_borders=2))
    for seed in range(20):
        field = two.displacement(two.draw(seed))
        assert np.abs(field[:, [0, -1]]).max() <= 5.0 + 1e-9
        assert np.abs(field[:, :, [0, -1]]).max() <= 5.0 + 1e-9
    half = LabelMapTransform(SIZE // 2, config)  # the maximum scales with the size
    assert max(np.abs(half.displacement(half.draw(s))).max() for s in range(20)) <= 15.0
    all_locked = LabelMapTransform(SIZE, replace(config, elastic_locked_borders=5))
    assert not np.any(all_locked.displacement(all_locked.draw(0)))


def test_seeded_and_kept_inside_the_sector(maps, phantom_store):
    small = DatasetStore(phantom_store).labels[:4]
    for labels in [*maps, *small]:
        transform = LabelMapTransform(labels.shape[-1])
        first = transform(labels, 11)
        again = LabelMapTransform(labels.shape[-1])(labels.copy(), 11)
        np.testing.assert_array_equal(first, again)
        assert not np.array_equal(first, transform(labels, 12))
        for seed in (11, 12, 2**32 - 1):
            out = transform(labels, seed)
            moved = transform.move(labels, seed)
            assert out.dtype == np.uint8 and out.shape == labels.shape
            assert set(np.unique(out)) <= {0, 1, 2, 3, 4}
            np.testing.assert_array_equal(out != OUTSIDE, labels != OUTSIDE)  # the fan stays
            sector = labels != OUTSIDE
            structure = (moved != OUTSIDE) & (moved != SECTOR)
            np.testing.assert_array_equal(out[sector & structure], moved[sector & structure])
            assert np.all(out[sector & ~structure] == SECTOR)


def test_config_validation():
    LabelTransformConfig(**{**IDENTITY.__dict__})
    for bad in (
        {"scale": (0.0, 1.0)},
        {"scale": (1.1, 1.0)},
        {"rotate_deg": -1.0},
        {"elastic_control_points": 3},
        {"elastic_locked_borders": -1},
    ):
        with pytest.raises(ValueError):
            LabelTransformConfig(**bad)
    with pytest.raises(ValueError, match="256"):
        LabelMapTransform(SIZE)(np.zeros((32, 32), dtype=np.uint8), 0)


@pytest.mark.parametrize("scale", [(1.1, 1.2), (0.8, 0.9)])
def test_paired_augment_resizes_the_image_by_the_drawn_scale(scale):
    size = 64
    config = AugmentConfig(affine_prob=1.0, rotate_deg=0.0, translate=0.0, scale=scale,
                           shear=0.0, intensity=False)  # fmt: skip
    augment = PairedAugment(config, (size, size))
    rows, cols = np.mgrid[:size, :size]
    disc = (rows - 31.5) ** 2 + (cols - 31.5) ** 2 <= 12.0**2
    item = {
        "image": torch.from_numpy(disc[None].astype(np.float32)),
        "labels": torch.from_numpy(disc.astype(np.int64)),
    }
    spread = np.array([rows[disc].std(), cols[disc].std()])
    for seed in range(10):
        labels = augment(item, np.random.default_rng(seed))["labels"].numpy() == 1
        ratio = np.array([rows[labels].std(), cols[labels].std()]) / spread
        assert np.all(ratio > scale[0] - 0.03) and np.all(ratio < scale[1] + 0.03), ratio
