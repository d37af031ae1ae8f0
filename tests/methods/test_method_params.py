"""Range checks on method hyperparameters: an out-of-range value fails when the config is
built, with a message naming the key, the value and the expected range; values at the closed
ends of a range are accepted."""

from __future__ import annotations

import pytest

from semiseg.errors import ConfigError
from semiseg.methods import method_config

BAD = [
    ("mean_teacher", "ema_decay", 1.0, "expected a value in [0, 1)"),
    ("mean_teacher", "ema_decay", -0.1, "expected a value in [0, 1)"),
    ("mean_teacher", "consistency_weight", -1.0, "expected a value >= 0"),
    ("mean_teacher", "rampup_fraction", 1.5, "expected a value in [0, 1]"),
    ("mean_teacher", "cutmix_p", -0.5, "expected a value in [0, 1]"),
    ("pseudo_label", "threshold", 1.2, "expected a value in [0, 1]"),
    ("pseudo_label", "unlabeled_weight", -1.0, "expected a value >= 0"),
    ("pseudo_label", "rampup_fraction", -0.1, "expected a value in [0, 1]"),
    ("pseudo_label", "cutmix_p", 2.0, "expected a value in [0, 1]"),
    ("reference_guided", "k", 0, "expected an integer >= 1"),
    ("reference_guided", "bank_size", 0, "expected an integer >= 1"),
    ("reference_guided", "chunk_size", -4, "expected an integer >= 1"),
    ("reference_guided", "similarity_threshold", 1.5, "expected a value in [-1, 1]"),
    ("reference_guided", "unlabeled_weight", -1.0, "expected a value >= 0"),
    ("reference_guided", "feature_ema", 1.0, "expected a value in [0, 1)"),
    ("reference_guided", "rampup_fraction", 2.0, "expected a value in [0, 1]"),
    ("low_confidence", "threshold", -0.1, "expected a value in [0, 1]"),
    ("low_confidence", "separation_weight", -1.0, "expected a value >= 0"),
    ("low_confidence", "prototype_momentum", 1.0, "expected a value in [0, 1)"),
    ("low_confidence", "temperature", 0.0, "expected a value > 0"),
    ("low_confidence", "rampup_fraction", 1.01, "expected a value in [0, 1]"),
    ("local_contrastive", "temperature", -0.1, "expected a value > 0"),
    ("local_contrastive", "contrastive_weight", -1.0, "expected a value >= 0"),
    ("local_contrastive", "positives", 0, "expected an integer >= 1"),
    ("local_contrastive", "min_class_pixels", 0, "expected an integer >= 1"),
    ("local_contrastive", "rounds", 0, "expected an integer >= 1"),
    ("local_contrastive", "min_agreement", 1.5, "expected a value in [0, 1]"),
]


@pytest.mark.parametrize("name, key, value, expected", BAD)
def test_out_of_range_value_names_key_value_and_range(name, key, value, expected) -> None:
    with pytest.raises(ConfigError) as err:
        method_config(name, {key: value})
    assert f"method.params.{key}={value!r}: {expected}" in str(err.value)
    assert repr(name) in str(err.value)  # and the method it belongs to


@pytest.mark.parametrize("name, params", [
    ("mean_teacher", {"ema_decay": 0.0, "consistency_weight": 0.0, "rampup_fraction": 1.0,
                      "cutmix_p": 1.0}),
    ("pseudo_label", {"threshold": 1.0, "unlabeled_weight": 0.0, "rampup_fraction": 0.0,
                      "cutmix_p": 0.0}),
    ("reference_guided", {"k": 1, "bank_size": 1, "chunk_size": 1, "similarity_threshold": -1.0,
                          "feature_ema": 0.0}),
    ("low_confidence", {"threshold": 0.0, "prototype_momentum": 0.0, "temperature": 1e-3}),
    ("local_contrastive", {"positives": 1, "min_class_pixels": 1, "rounds": 1,
                           "min_agreement": 1.0}),
])
def test_values_at_the_ends_of_a_range_are_accepted(name, params) -> None:
    cfg = method_config(name, params)
    assert all(getattr(cfg, k) == v for k, v in params.items())
