"""Fixtures shared by the unit tests.

`stage_inputs` lets registry-wide tests build any method, multi-stage ones included, without
knowing it: a method's last TrainStage may read earlier stages' outputs (`TrainStage.inputs`),
which the stage runner supplies in a trial; here each kind of stage output has one stand-in.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import pytest
import torch

from semiseg.config import Config, MethodConfig
from semiseg.checkpoint_io import CHECKPOINT_FILE
from semiseg.methods import METHODS, PseudoLabelStage, TrainStage
from semiseg.models import create_model
from semiseg.sam.store import PseudoLabelStore

@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    CPU float reductions are then bitwise reproducible, and tests don't oversubscribe 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


StageInputs = Callable[..., dict[str, str]]


@pytest.fixture(scope="session")
def stage_inputs(tmp_path_factory: pytest.TempPathFactory) -> StageInputs:
    """`stage_inputs(method, indices, (H, W), num_classes)`: the method params that its last
    stage reads from earlier stages, filled with stand-ins for the images at dataset `indices`
    (a PseudoLabelStage's output: a manifest of random labels, never a real mask; a TrainStage's:
    a checkpoint of a U-Net of `base_channels` and `depth`, the tests' small one unless given).
    {} for a single-stage method."""
    made: dict[tuple, str] = {}

    def manifest(indices: tuple[int, ...], shape: tuple[int, int], num_classes: int) -> str:
        key = (indices, shape, num_classes)
        if key not in made:
            store = PseudoLabelStore(tmp_path_factory.mktemp("pseudolabels"),
                                     [f"c{i}" for i in range(num_classes)])
            rng = np.random.default_rng(len(made))
            for index in indices:
                store.write(index, f"img{index}", rng.integers(0, num_classes, shape), {1: 0.9})
            made[key] = str(store.write_manifest())
        return made[key]

    def checkpoint(num_classes: int, base_channels: int, depth: int) -> str:
        """A TrainStage's output: a checkpoint folder whose model (`best_model`) is the small
        U-Net the registry-wide tests build (tests/test_methods_registry.py `build`), seeded,
        its head unbiased and sharpened so that, like a trained model, it predicts several
        classes (a fresh one predicts one class everywhere)."""
        key = ("checkpoint", num_classes, base_channels, depth)
        if key not in made:
            folder = tmp_path_factory.mktemp("checkpoint")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1)
                model = create_model("unet", 1, num_classes, base_channels=base_channels, depth=depth)
            with torch.no_grad():
                model.head.bias.zero_()
                model.head.weight.mul_(30.0)
            torch.save({"best_model": model.state_dict()}, folder / CHECKPOINT_FILE)
            made[key] = str(folder)
        return made[key]

    def inputs(method: str, indices: Iterable[int], shape: tuple[int, int], num_classes: int,
               base_channels: int = 4, depth: int = 2) -> dict[str, str]:
        stages = METHODS.get(method).stages(Config(method=MethodConfig(method)))
        kinds = {stage.name: type(stage) for stage in stages}
        params = {}
        for param, source in stages[-1].inputs.items():
            if kinds[source] is TrainStage:
                params[param] = checkpoint(num_classes, base_channels, depth)
            elif kinds[source] is PseudoLabelStage:
                params[param] = manifest(tuple(indices), tuple(shape), num_classes)
            else:
                pytest.fail(f"{method}: no stand-in for the output of a {kinds[source].__name__} "
                            f"(its param {param!r}); add one to tests/conftest.py")
        return params

    return inputs


def write_nnunet_dataset(root, variant: str = "v2", cases: int = 5, channels=("T2", "ADC"),
                         shape=(8, 8, 4), spacings=((1.0, 1.0, 1.0), (0.8, 0.8, 2.5))):
    """Write a tiny nnU-Net v2 raw dataset (variant "v2": CASE_0000.nii.gz per channel) or a
    Decathlon task ("msd": one 4D CASE.nii.gz) under `root`, with real NIfTI files; case i has
    spacing spacings[i % len] (affine diag(spacing)) and two boxes (classes 1 and 2) whose
    place depends on i, each channel showing them at its own contrast. Returns root."""
    import json

    import nibabel as nib

    rng = np.random.default_rng(0)
    names = [f"case{i:02d}" for i in range(cases)]
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    for i, case in enumerate(names):
        affine = np.diag([*spacings[i % len(spacings)], 1.0])
        label = np.zeros(shape, np.uint8)
        label[1 + i % 2:4 + i % 2, 1:5], label[5:7, 3 + i % 3:7, 1:] = 1, 2
        image = np.stack([label * (30.0 + 20 * c) + 10 * c + rng.normal(0, 2, shape)
                          for c in range(len(channels))], -1).astype(np.float32)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{case}.nii.gz")
        if variant == "msd":
            nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"{case}.nii.gz")
            (root / "imagesTr" / f"._{case}.nii.gz").write_bytes(b"\0\5\26\7")  # macOS fork
        for c in range(len(channels) if variant == "v2" else 0):
            nib.save(nib.Nifti1Image(image[..., c], affine), root / "imagesTr" / f"{case}_{c:04d}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), root / "imagesTs" / "test_0000.nii.gz")
    classes = ["background", "box", "bar"]
    spec = {"channel_names": dict(enumerate(channels)), "labels": {n: v for v, n in enumerate(classes)},
            "numTraining": cases, "file_ending": ".nii.gz"} if variant == "v2" else {
        "name": "Tiny", "modality": dict(enumerate(channels)), "labels": dict(enumerate(classes)),
        "numTraining": cases, "training": [{"image": f"./imagesTr/{c}.nii.gz",
                                            "label": f"./labelsTr/{c}.nii.gz"} for c in names],
        "test": ["./imagesTs/test_0000.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(spec, indent=1))
    return root


@pytest.fixture
def nnunet_dataset():
    """`write_nnunet_dataset` (above), for tests that need an nnU-Net or Decathlon folder."""
    return write_nnunet_dataset
