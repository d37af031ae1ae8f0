"""data.normalize (semiseg.data.normalize): statistics from the training split only (val and
test images hold extreme values that must never reach them), nnU-Net's CT scheme by hand,
`image` unchanged, the option's bad inputs, and its place in the run identity."""

from __future__ import annotations

import numpy as np
import pytest

from semiseg.config import load_config
from semiseg.data import DATASETS, SegData, load_dataset
from semiseg.data.base import normalise
from semiseg.data.normalize import normalize_dataset, training_indices
from semiseg.data.splits import make_split
from semiseg.data_config import DataConfig
from semiseg.errors import ConfigError, DatasetError

CFG = DataConfig(name="fixture", image_size=4, split_seed=3, val_fraction=0.2, test_fraction=0.2)


def _data(held_out_value: float | None = None, foreground: bool = True) -> SegData:
    """10 patients of 2 images each (4 x 4): foreground square of intensity ~100 + 10 * patient,
    background ~0. With held_out_value, every val / test pixel is set to it."""
    rng = np.random.default_rng(0)
    masks = np.zeros((20, 4, 4), dtype=np.int64)
    if foreground:
        masks[:, 1:3, 1:3] = 1
    groups = [f"p{i // 2}" for i in range(20)]
    images = rng.normal(0.0, 3.0, (20, 4, 4)) + masks * (100.0 + 10.0 * (np.arange(20) // 2))[:, None, None]
    data = SegData(images.astype(np.float32), masks, groups, [f"img{i}" for i in range(20)],
                   ["background", "organ"], "fixture")
    if held_out_value is not None:
        split = make_split(data, CFG, seed=0)
        data.images[split.val + split.test] = held_out_value
    return data


@pytest.mark.parametrize("mode", ["dataset", "ct"])
def test_val_and_test_intensities_never_feed_the_statistics(mode: str) -> None:
    cfg = DataConfig(**{**CFG.__dict__, "normalize": mode})
    plain, extreme = _data(), _data(held_out_value=1e6)
    train = training_indices(plain, cfg)
    split = make_split(plain, cfg, seed=5)
    assert train == sorted(split.labeled + split.unlabeled)  # any seed: the same training split
    assert not set(train) & set(split.val + split.test)
    normalize_dataset(plain, cfg)
    normalize_dataset(extreme, cfg)
    assert plain.intensity == extreme.intensity  # 1e6 in every val / test pixel changes nothing
    np.testing.assert_array_equal(plain.images[train], extreme.images[train])
    # ... and they are the training pixels' own statistics, by hand
    raw = _data().images[train].astype(np.float64)
    values = raw[_data().masks[train] > 0] if mode == "ct" else raw.ravel()
    assert plain.intensity.mean[0] == pytest.approx(values.mean())
    assert plain.intensity.std[0] == pytest.approx(values.std())


def test_ct_clips_to_the_training_foreground_percentiles_then_z_scores() -> None:
    cfg = DataConfig(**{**CFG.__dict__, "normalize": "ct"})
    data = _data(held_out_value=1e6)
    raw = data.images.copy()
    train = training_indices(data, cfg)
    fg = raw[train][data.masks[train] > 0].astype(np.float64)
    lower, upper = np.percentile(fg, [0.5, 99.5])
    mean, std = fg.mean(), fg.std()  # nnU-Net: of the unclipped foreground
    normalize_dataset(data, cfg)
    stats = data.intensity
    assert (stats.lower[0], stats.upper[0]) == pytest.approx((lower, upper))
    np.testing.assert_allclose(data.images, (np.clip(raw, lower, upper) - mean) / std, rtol=1e-5,
                               atol=1e-5)
    held_out = sorted(set(range(20)) - set(train))
    assert data.images[held_out] == pytest.approx((upper - mean) / std)  # 1e6 clipped to upper
    # background pixels of training images lie below the window: clipped to the lower bound
    assert data.images[train][data.masks[train] == 0].min() == pytest.approx((lower - mean) / std)


def test_image_mode_is_the_per_image_z_score_of_the_raw_builder_output() -> None:
    cfg = DataConfig(name="synthetic", image_size=16, num_images=6)
    raw = DATASETS.get("synthetic")(cfg).images
    assert np.abs(raw.mean(axis=(1, 2))).max() > 1e-2  # the builder leaves intensities raw
    data = load_dataset(cfg)
    np.testing.assert_array_equal(data.images, np.stack([normalise(x) for x in raw]))
    assert data.intensity is None


def test_ct_without_training_foreground_is_refused() -> None:
    with pytest.raises(DatasetError, match=r"data.normalize=ct .* foreground \(mask > 0\) pixels "
                                           r"of the 12 training image\(s\), and none has any"):
        normalize_dataset(_data(foreground=False), DataConfig(**{**CFG.__dict__, "normalize": "ct"}))


def test_dataset_mode_on_constant_training_images_is_refused() -> None:
    data = _data()
    data.images[:] = 7.0
    with pytest.raises(DatasetError, match="channel 0 of the training images is constant"):
        normalize_dataset(data, DataConfig(**{**CFG.__dict__, "normalize": "dataset"}))


def test_a_builder_that_normalised_itself_is_refused_for_dataset_statistics() -> None:
    data = _data()
    data.images = np.stack([normalise(x) for x in data.images])
    with pytest.raises(DatasetError, match="builder returned per-image normalised images"):
        normalize_dataset(data, DataConfig(**{**CFG.__dict__, "normalize": "ct"}))


def test_unknown_normalize_value_names_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError, match="data.normalize='minmax' is not a valid choice; "
                                          "choose one of: image, dataset, ct"):
        load_config(None, ["data.normalize=minmax"])


def test_normalize_is_identity_but_its_default_leaves_the_hash_alone() -> None:
    default = load_config(None)
    assert "normalize" not in default.identity()["data"]  # configs from before keep their hash
    assert load_config(None, ["data.normalize=image"]).config_hash() == default.config_hash()
    ct = load_config(None, ["data.normalize=ct"])
    assert ct.identity()["data"]["normalize"] == "ct" and ct.config_hash() != default.config_hash()
    assert default.flat()["data.normalize"] == "image"  # still logged as a param
