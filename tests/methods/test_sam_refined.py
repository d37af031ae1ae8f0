"""sam_refined: pseudo-labels from a manifest, looked up by dataset index, warped by the engine
exactly like the image they belong to, filtered by SAM's score, with clear errors; its stages
(coarse model -> per round SAM pseudo-labels -> retrain) and its run identity (the sam section)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.config import load_config
from semiseg.data import load_dataset
from semiseg.data.splits import make_split
from semiseg.engine import build_trainer
from semiseg.errors import ConfigError, SemisegError
from semiseg.methods import (FULL_SUPERVISION_METHOD, Batch, PseudoLabelStage, TrainStage,
                             method_config)
from semiseg.methods.stages import check_stages, resolve_inputs
from semiseg.methods.sam_refined import SamRefined
from semiseg.models import create_model
from semiseg.sam.store import PseudoLabelStore

CLASSES = ["background", "a", "b"]


def manifest(root: Path, maps: dict[int, np.ndarray], scores: dict[int, dict[int, float]] | None = None) -> str:
    store = PseudoLabelStore(root, CLASSES)
    for index, labels in maps.items():
        store.write(index, f"img{index}", labels, (scores or {}).get(index, {}))
    return str(store.write_manifest())


def build(path: str, **params) -> SamRefined:
    model = create_model("unet", 1, 3, base_channels=4, depth=2)
    return SamRefined(model, method_config("sam_refined", {"manifest": path, **params}), 3)


def test_lookup_by_index_and_unknown_images_are_ignored(tmp_path: Path) -> None:
    maps = {2: np.full((8, 8), 1), 5: np.full((8, 8), 2)}
    method = build(manifest(tmp_path, maps))
    targets = method.fixed_targets(torch.tensor([5, 2, 3, 40]))
    assert targets[0].unique().tolist() == [2] and targets[1].unique().tolist() == [1]
    assert (targets[2] == -1).all() and (targets[3] == -1).all()


def test_low_sam_score_classes_are_ignored_not_background(tmp_path: Path) -> None:
    labels = np.zeros((8, 8), dtype=np.int64)
    labels[:4], labels[4:6] = 1, 2
    method = build(manifest(tmp_path, {0: labels}, {0: {1: 0.4, 2: 0.9}}), min_sam_iou=0.5)
    target = method.fixed_targets(torch.tensor([0]))[0]
    assert (target[:4] == -1).all() and (target[4:6] == 2).all() and (target[6:] == 0).all()


def test_needs_a_manifest() -> None:
    with pytest.raises(ConfigError, match="sam_refined needs method.params.manifest"):
        build("")


def test_pseudo_labels_of_another_size(tmp_path: Path) -> None:
    method = build(manifest(tmp_path, {0: np.zeros((8, 8), dtype=np.int64)}))
    labeled = Batch(torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16), torch.zeros(1, 16, 16, dtype=torch.long),
                    torch.tensor([1]))
    unlabeled = Batch(torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16), None, torch.tensor([0]))
    with pytest.raises(SemisegError, match=r"pseudo-labels are \(8, 8\), images \(16, 16\)"):
        method.training_step(labeled, unlabeled, 0)


def test_engine_warps_pseudo_labels_with_their_images(tmp_path: Path) -> None:
    """With the hidden masks themselves as pseudo-labels, the warped targets the method receives
    must equal the warped hidden masks wherever they carry a label: same affine, same pixels."""
    cfg = load_config(None, ["data.image_size=32", "data.num_images=40", "data.batch_size=4",
                             "model.base_channels=4", "model.depth=2", "train.device=cpu",
                             "data.label_fraction=0.25"])
    data = load_dataset(cfg.data)
    split = make_split(data, cfg.data, 0)
    store = PseudoLabelStore(tmp_path, data.classes)
    for index in split.unlabeled:
        store.write(index, data.ids[index], data.masks[index], {})
    cfg.method.name, cfg.method.params = "sam_refined", {"manifest": str(store.write_manifest())}
    trainer = build_trainer(cfg, data, split, torch.device("cpu"))
    for _ in range(3):
        batch, hidden = trainer._unlabeled_batch()
        labeled = batch.fixed_target >= 0
        assert batch.mask is None and labeled.float().mean() > 0.8
        assert torch.equal(batch.fixed_target[labeled], hidden[labeled])


@pytest.mark.parametrize("key, value, expected", [
    ("rounds", 0, "method.params.rounds=0: expected an integer >= 1"),
    ("rounds", -2, "method.params.rounds=-2: expected an integer >= 1"),
    ("unlabeled_weight", -1.0, "method.params.unlabeled_weight=-1.0: expected 0 or more"),
    ("min_sam_iou", 1.5, "method.params.min_sam_iou=1.5: expected a value in [0, 1]"),
])
def test_params_out_of_range(key: str, value, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        method_config("sam_refined", {key: value})


def test_stages_per_round(tmp_path: Path) -> None:
    """Round r's pseudo-labels come from round r-1's model (the coarse model first), and each
    retrain reads its round's manifest; the user's params reach every retrain."""
    cfg = load_config(None, ["method.name=sam_refined", "method.params={rounds: 2, min_sam_iou: 0.3}"])
    stages = SamRefined.stages(cfg)
    check_stages(stages, "sam_refined")
    assert [type(s) for s in stages] == [TrainStage, PseudoLabelStage, TrainStage,
                                         PseudoLabelStage, TrainStage]
    coarse, pseudo0, round0, pseudo1, round1 = stages
    assert (coarse.method, coarse.params) == (FULL_SUPERVISION_METHOD, {})
    assert (pseudo0.model, pseudo0.round, pseudo1.model, pseudo1.round) == ("coarse", 0, "round0", 1)
    for stage, pseudo in ((round0, pseudo0), (round1, pseudo1)):
        assert stage.method == "sam_refined" and stage.inputs == {"manifest": pseudo.name}
        params = resolve_inputs(stage, {pseudo.name: tmp_path / "manifest.parquet"})
        assert params == {"rounds": 2, "min_sam_iou": 0.3, "manifest": str(tmp_path / "manifest.parquet")}
    assert len(SamRefined.stages(load_config(None, ["method.name=sam_refined"]))) == 3


def test_sam_section_is_part_of_the_identity() -> None:
    """What changes the pseudo-labels changes sam_refined's config hash, and only its."""
    for method, shaped in (("sam_refined", True), ("supervised", False)):
        base = load_config(None, [f"method.name={method}"]).config_hash()
        other = load_config(None, [f"method.name={method}", "sam.model_type=tiny"]).config_hash()
        assert (other != base) is shaped, method
        # where and how fast pseudo-labels are made is not
        faster = load_config(None, [f"method.name={method}", "sam.num_actors=4"]).config_hash()
        assert faster == base, method
