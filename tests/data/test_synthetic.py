"""The synthetic chest-radiograph phantoms: determinism, shapes, classes, overlap, hardness."""

import numpy as np
import pytest

from semiseg.config import DataConfig
from semiseg.data import load_dataset
from semiseg.data.synthetic import CLASSES, PAINT_ORDER, make_phantom


def _data(n: int = 24, size: int = 32):
    return load_dataset(DataConfig(name="synthetic", image_size=size, num_images=n))


def test_shapes_dtypes_groups_and_normalisation():
    d = _data(12)
    assert d.images.shape == d.masks.shape == (12, 32, 32)
    assert d.images.dtype == np.float32 and d.masks.dtype == np.int64
    assert d.classes == CLASSES and d.num_classes >= 4 and d.source == "synthetic"
    assert d.ids == d.groups == [f"phantom{i:05d}" for i in range(12)]
    assert np.allclose(d.images.mean(axis=(1, 2)), 0, atol=1e-4)
    assert np.allclose(d.images.std(axis=(1, 2)), 1, atol=1e-3)


def test_deterministic_and_independent_of_num_images():
    a, b, c = _data(10), _data(10), _data(30)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert np.array_equal(a.images, c.images[:10]) and np.array_equal(a.masks, c.masks[:10])
    assert not np.array_equal(c.masks[0], c.masks[1])  # phantoms differ from each other


@pytest.mark.parametrize("size", [32, 64, 128])
def test_draws_at_any_size_with_the_same_anatomy(size):
    small, big = make_phantom(3, 32), make_phantom(3, size)
    assert big.image.shape == big.mask.shape == (size, size)
    step = size // 32
    # Nearest-downsampled labels of the big phantom match the small one almost everywhere.
    assert (big.mask[step // 2 :: step, step // 2 :: step] == small.mask).mean() > 0.9


def test_every_class_present_in_most_images():
    d = _data(30)
    for c in range(d.num_classes):
        assert (d.masks == c).any(axis=(1, 2)).mean() >= 0.9, CLASSES[c]


def test_structures_overlap_and_labels_follow_priority():
    overlaps = 0
    for i in range(20):
        p = make_phantom(i, 48)
        s = p.supports
        overlaps += bool((s["heart"] & s["lung"]).any()) and bool((s["heart"] & s["spine"]).any())
        # Later entries of PAINT_ORDER win: heart > spine > lung > background.
        covered = np.zeros_like(p.mask, dtype=bool)
        for name in reversed(PAINT_ORDER):
            own = s[name] & ~covered
            assert (p.mask[own] == CLASSES.index(name)).all()
            covered |= s[name]
        assert (p.mask[~covered] == 0).all()
    assert overlaps >= 18


def test_not_thresholdable():
    # A single global intensity threshold must not separate lung from the rest any better
    # than always answering "not lung": intensities of the classes overlap.
    d = _data(30)
    x, is_lung = d.images.ravel(), d.masks.ravel() == CLASSES.index("lung")
    trivial = 1 - is_lung.mean()
    best = max(((x < t) == is_lung).mean() for t in np.linspace(-3, 3, 61))
    assert best < trivial + 0.03


def test_phantoms_with_a_strong_negative_warp_stay_finite():
    # Phantoms 295 and 1040 once had NaN pixels: a fractional gamma of a negative attenuation.
    for index in (295, 1040):
        assert np.isfinite(make_phantom(index, 64).image).all()
