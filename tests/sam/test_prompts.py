"""Prompts from coarse masks: components, boxes, interior points, negatives, empty classes."""

from __future__ import annotations

import numpy as np
import pytest

from semiseg.sam.prompts import box_of, components, interior_point, prompts_from_mask


def disk(shape: tuple[int, int], cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.fixture
def coarse() -> np.ndarray:
    mask = np.zeros((64, 64), dtype=np.int64)
    mask[disk(mask.shape, 20, 15, 8)] = 1   # large blob of class 1
    mask[disk(mask.shape, 20, 45, 4)] = 1   # small blob of class 1
    mask[50:56, 10:30] = 2                   # a bar of class 2
    return mask


def test_largest_component_only(coarse: np.ndarray) -> None:
    comps = components(coarse == 1, "largest")
    assert len(comps) == 1 and comps[0][20, 15] and not comps[0][20, 45]


def test_all_components_above_size(coarse: np.ndarray) -> None:
    assert len(components(coarse == 1, "all", min_size=1)) == 2
    assert len(components(coarse == 1, "all", min_size=100)) == 1  # the r=4 disk has < 100 pixels
    with pytest.raises(ValueError, match="component policy"):
        components(coarse == 1, "biggest")


def test_box_is_the_extent(coarse: np.ndarray) -> None:
    assert box_of(coarse == 2) == (10.0, 50.0, 29.0, 55.0)


def test_interior_point_is_the_centre_of_a_disk() -> None:
    assert interior_point(disk((40, 40), 17, 23, 9)) == (23.0, 17.0)


def test_prompts_negatives_are_other_classes_points(coarse: np.ndarray) -> None:
    prompts = prompts_from_mask(coarse, num_classes=4)
    assert [p.class_id for p in prompts] == [1, 2]  # class 3 is absent: no prompt, no crash
    one, two = prompts
    assert one.point == (15.0, 20.0)
    assert one.negatives == (two.point,) and two.negatives == (one.point,)
    coords, labels = one.points()
    assert coords.tolist() == [[15.0, 20.0], list(two.point)] and labels.tolist() == [1, 0]


def test_components_of_one_class_are_not_each_others_negatives(coarse: np.ndarray) -> None:
    prompts = prompts_from_mask(coarse, 3, policy="all")
    class_one = [p for p in prompts if p.class_id == 1]
    assert len(class_one) == 2
    class_two_point = next(p.point for p in prompts if p.class_id == 2)
    assert all(p.negatives == (class_two_point,) for p in class_one)


def test_empty_mask_gives_no_prompts() -> None:
    assert prompts_from_mask(np.zeros((16, 16), dtype=np.int64), 3) == []
