"""The SAM quality gate (semiseg.sam.gate): per class on val, SAM only where it raises Dice; per
image, only where SAM's predicted IoU and its agreement with the coarse mask pass; the gated
val pseudo-labels are never worse than the coarse ones, per class. And the SAM stage applies a
decision: a real (tiny, random) SAM built from segment_anything's modules."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from semiseg.errors import ConfigError, SemisegError
from semiseg.sam.config import SamConfig
from semiseg.sam.gate import GateDecision, agreement, combine, decide, gate_dice, sam_classes
from semiseg.sam.store import PseudoLabelStore

CLASSES = ["background", "a", "b"]


def square(y: int, x: int, size: int, shape: int = 16) -> np.ndarray:
    out = np.zeros((shape, shape), dtype=bool)
    out[y:y + size, x:x + size] = True
    return out


def scene(shift_b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """truth, coarse, refined: SAM fixes class a (coarse too small) and moves class b away by
    `shift_b` pixels (coarse exact)."""
    truth = np.zeros((16, 16), np.uint8)
    truth[square(1, 1, 6)], truth[square(9, 9, 5)] = 1, 2
    coarse = np.zeros_like(truth)
    coarse[square(2, 2, 4)], coarse[square(9, 9, 5)] = 1, 2
    refined = np.zeros_like(truth)
    refined[square(1, 1, 6)], refined[square(9 - shift_b, 9, 5)] = 1, 2
    return truth, coarse, refined


def test_combine_keeps_coarse_classes_exactly() -> None:
    _, coarse, refined = scene(3)
    out = combine(coarse, refined, [1], 3)
    assert np.array_equal(out == 2, coarse == 2)  # b keeps its coarse pixels
    assert np.array_equal(out == 1, (refined == 1) & (coarse != 2))  # a takes SAM's, minus b's
    assert np.array_equal(combine(coarse, refined, [], 3), coarse)
    assert np.array_equal(combine(coarse, refined, [1, 2], 3), refined)


def test_per_class_decision_on_val() -> None:
    truth, coarse, refined = scene(3)
    scores = np.array([[np.nan, 0.9, 0.9]] * 4)
    d = decide([coarse] * 4, [refined] * 4, scores, [truth] * 4, CLASSES, 0.5, 0.0)
    assert d.use_sam == [True, False] and d.accepted() == [1]
    assert d.dice_sam[0] == 1.0 > d.dice_coarse[0] and d.dice_sam[1] < d.dice_coarse[1] == 1.0
    assert d.dice_gated == [1.0, 1.0] and d.val_images == 4


def test_per_image_thresholds() -> None:
    agree = agreement(*scene(0)[2:0:-1], 3)  # refined vs coarse
    assert agree[1] == pytest.approx(16 / 36) and agree[2] == 1.0 and math.isnan(agree[0])
    scores = np.array([np.nan, 0.9, 0.3])
    assert sam_classes(scores, agree, [1, 2], 0.5, 0.4) == [1]  # b: SAM not confident
    assert sam_classes(scores, agree, [1, 2], 0.2, 0.5) == [2]  # a: too far from the coarse mask
    assert sam_classes(np.array([np.nan, np.nan, 0.9]), agree, [1, 2], 0.0, 0.0) == [2]  # a: no prompt


def test_a_class_only_failing_images_fixes_is_not_taken() -> None:
    """SAM helps class a in every image, but the per-image gate rejects it everywhere: nothing
    to gain on val, so the decision keeps the coarse masks."""
    truth, coarse, refined = scene(0)
    scores = np.array([[np.nan, 0.1, 0.9]] * 3)
    d = decide([coarse] * 3, [refined] * 3, scores, [truth] * 3, CLASSES, 0.5, 0.0)
    assert d.use_sam == [False, False] and d.image_pass[0] == 0.0 and d.dice_gated == d.dice_coarse


def test_gated_val_dice_never_below_coarse() -> None:
    """Random coarse / refined / truth maps: every class's gated val Dice >= its coarse Dice,
    strictly above for the classes that take SAM."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = 5
        truth = [rng.integers(0, 4, (8, 8)) for _ in range(n)]
        coarse = [np.where(rng.random((8, 8)) < 0.6, t, rng.integers(0, 4, (8, 8))) for t in truth]
        refined = [np.where(rng.random((8, 8)) < 0.6, t, rng.integers(0, 4, (8, 8))) for t in truth]
        scores = rng.random((n, 4))
        d = decide(coarse, refined, scores, truth, ["bg", "x", "y", "z"], 0.3, 0.2)
        for use, gated, base in zip(d.use_sam, d.dice_gated, d.dice_coarse):
            assert gated > base if use else gated == pytest.approx(base), trial
        assert d.use_sam.count(True) > 0 or trial != 0  # not vacuous: some class is taken


def test_gate_dice_counts_a_correct_empty_prediction() -> None:
    assert gate_dice(np.zeros((4, 4)), np.zeros((4, 4)), 3).tolist() == [1.0, 1.0]


def test_needs_val_images() -> None:
    with pytest.raises(SemisegError, match="needs val images.*sam.gate=false"):
        decide([], [], np.empty((0, 3)), [], CLASSES, 0.5, 0.5)


def test_decision_is_stored_logged_and_checked(tmp_path: Path) -> None:
    truth, coarse, refined = scene(3)
    d = decide([coarse], [refined], np.array([[np.nan, 0.9, 0.9]]), [truth], CLASSES, 0.5, 0.4)
    store = PseudoLabelStore(tmp_path, CLASSES)
    assert store.read_gate() is None
    store.write_gate(d)
    assert store.read_gate() == d
    metrics = d.metrics()
    assert metrics["sam/gate/a/use_sam"] == 1.0 and metrics["sam/gate/b/use_sam"] == 0.0
    assert metrics["sam/gate/b/dice_coarse"] == 1.0 and metrics["sam/gate/b/dice_sam"] < 1.0
    assert "a: SAM (val Dice coarse" in d.table() and "b: coarse" in d.table()
    (tmp_path / "gate" / "gate.json").write_text("{not json")
    with pytest.raises(SemisegError, match="gate.json: not a gate decision.*delete it"):
        store.read_gate()


def test_gate_config() -> None:
    for key in ("gate_min_score", "gate_min_agreement"):
        with pytest.raises(ConfigError, match=f"sam.{key}=1.5: expected a value in \\[0, 1\\]"):
            SamConfig(**{key: 1.5})
    before = {"model_type", "checkpoint", "components", "min_component_size", "two_stage"}
    assert set(SamConfig(gate=False, native_resolution=False).identity()) == before  # old hashes kept
    assert SamConfig().identity()["gate"] == {"min_score": 0.5, "min_agreement": 0.5}


def test_sam_stage_applies_the_decision() -> None:
    """The stage with a real (tiny, random) SAM: no class allowed gives the coarse maps back,
    every class allowed at zero thresholds gives SAM's, and the row fields say which."""
    from semiseg.distributed.pseudolabel import SamStage
    from semiseg.sam.refiner import to_uint8_rgb

    rng = np.random.default_rng(0)
    coarse = np.zeros((2, 16, 16), np.uint8)
    coarse[:, 2:9, 2:9], coarse[:, 10:14, 9:15] = 1, 2
    rgb = [to_uint8_rgb(rng.normal(size=(32, 32)).astype(np.float32)) for _ in range(2)]

    def run(use_sam, **cfg) -> dict:
        stage = SamStage({"model_type": "tiny", "min_component_size": 1, **cfg}, "", 3, use_sam)
        return stage({"rgb": np.array(rgb), "coarse": coarse.copy()})

    none = run([])
    assert np.array_equal(none["refined"], coarse) and not none["used"].any()
    every = run([1, 2], gate_min_score=0.0, gate_min_agreement=0.0)
    assert every["sam"].shape == (2, 16, 16) and every["native_shape"].tolist() == [[32, 32]] * 2
    passed = (every["scores"][:, 1:] >= 0) & (every["agreement"][:, 1:] >= 0)
    assert np.array_equal(every["used"][:, 1:], passed)
    for i in range(2):
        assert np.array_equal(every["refined"][i], combine(coarse[i], every["sam"][i],
                                                           np.flatnonzero(every["used"][i]), 3))
    assert np.array_equal(run(None)["refined"], every["sam"])  # gate off: SAM's maps as they are
