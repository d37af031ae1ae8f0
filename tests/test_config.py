"""Config loading, dotted overrides, validation messages (method params and every combination of
the sweep grid included), the driver's path checks and the run identity (config_hash)."""

from __future__ import annotations

from pathlib import Path

import pytest

from semiseg.config import Config, MethodConfig, load_config, method_grid
from semiseg.errors import ConfigError, RegistryError, SemisegError
from semiseg.preflight import check_paths

REPO = Path(__file__).resolve().parents[1]
# Experiment configs; experiments/schedules/ holds Kubernetes manifests (tests/test_schedules.py).
EXPERIMENTS = sorted(p for p in (REPO / "experiments").glob("**/*.yaml") if "schedules" not in p.parts)


@pytest.fixture
def repo_root() -> Path:
    return REPO


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- loading ---------------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.data.name == "synthetic"
    assert cfg.method.name == "supervised"
    assert cfg.train.optimizer == "adamw"
    assert isinstance(cfg.train.lr, float)


def test_quickstart_loads(repo_root: Path) -> None:
    cfg = load_config(repo_root / "experiments" / "quickstart.yaml")
    assert cfg.data.name == "synthetic"
    assert cfg.sweep.methods == ["supervised"]
    assert cfg.sweep.label_fractions == [0.05, 0.25, 1.0]
    assert cfg.tracking.experiment == "quickstart"
    # ints in YAML become floats where the schema says float
    assert isinstance(cfg.ray.cpus_per_worker, float) and cfg.ray.cpus_per_worker == 1.0


def test_experiments_exist() -> None:
    assert EXPERIMENTS, "no experiments/**/*.yaml found"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[str(p.relative_to(REPO)) for p in EXPERIMENTS])
def test_every_experiment_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert len(cfg.config_hash()) == 16


# ---- overrides -------------------------------------------------------------------------------


def test_overrides_apply_with_types() -> None:
    cfg = load_config(None, [
        "train.epochs=3", "sweep.seeds=[0,1]", "method.name=supervised",
        "data.label_fraction=0.25", "train.lr=1", "train.amp=false",
    ])
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.sweep.seeds == [0, 1] and all(type(s) is int for s in cfg.sweep.seeds)
    assert cfg.method.name == "supervised"
    assert cfg.data.label_fraction == 0.25
    # an int is accepted for a float field, and stored as a float
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.train.amp is False


def test_override_patches_a_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "train:\n  epochs: 7\n  seed: 4\n")
    cfg = load_config(path, ["train.epochs=2"])
    assert cfg.train.epochs == 2
    assert cfg.train.seed == 4  # untouched keys keep the file's values


@pytest.mark.parametrize("text,expected", [("1e-4", 1e-4), ("3E-3", 3e-3), ("2.5e+1", 25.0), ("0.5", 0.5)])
def test_scientific_notation_float(text: str, expected: float) -> None:
    # PyYAML reads "1e-4" (no dot) as a string; float fields must still accept it.
    cfg = load_config(None, [f"train.lr={text}"])
    assert cfg.train.lr == pytest.approx(expected) and type(cfg.train.lr) is float


def test_scientific_notation_in_file(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "train:\n  lr: 1e-4\n  weight_decay: 5e-2\n"))
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.weight_decay == pytest.approx(5e-2)


def test_override_without_equals() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


# ---- unknown keys ----------------------------------------------------------------------------


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "train.lrr" in msg
    assert "valid keys" in msg and "train.lr" in msg and "train.epochs" in msg
    assert str(path) in msg


def test_unknown_top_level_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, "trian:\n  epochs: 2\n"))
    msg = str(info.value)
    assert "trian" in msg
    for section in ("data", "model", "method", "train", "ray", "tracking", "sweep"):
        assert section in msg


def test_unknown_override_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.nope") as info:
        load_config(None, ["train.nope=1"])
    assert "train.epochs" in str(info.value)


# ---- bad values ------------------------------------------------------------------------------


@pytest.mark.parametrize("override,fragments", [
    ("train.epochs=abc", ["train.epochs", "int"]),
    ("train.amp=3", ["train.amp", "bool"]),
    ("train.optimizer=adam", ["train.optimizer", "adamw", "sgd"]),
    ("train.schedule=step", ["train.schedule", "cosine", "poly", "constant"]),
    ("data.batch_size=0", ["data.batch_size", "positive"]),
    ("data.batch_size=-1", ["data.batch_size", "positive"]),
    ("data.label_fraction=0", ["data.label_fraction", "(0, 1]"]),
    ("data.label_fraction=1.5", ["data.label_fraction", "(0, 1]"]),
    ("train.epochs=0", ["train.epochs", "positive"]),
    ("train.lr=0", ["train.lr", "positive"]),
    ("train.lr=abc", ["train.lr", "float"]),
    ("sweep.seeds=3", ["sweep.seeds", "list"]),
    ("sweep.seeds=[0,x]", ["sweep.seeds[1]", "int"]),
])
def test_bad_values(override: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_config_error_is_semiseg_error() -> None:
    with pytest.raises(SemisegError):
        load_config(None, ["train.epochs=abc"])


# ---- files -----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "missing.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(path)
    assert "missing.yaml" in str(info.value)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "train:\n  epochs: [1, 2\n  lr: : :\n", name="broken.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "broken.yaml" in str(info.value)
    assert "YAML" in str(info.value)


def test_top_level_list(tmp_path: Path) -> None:
    path = _write(tmp_path, "- train\n- data\n", name="list.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "list.yaml" in str(info.value)


def test_section_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train"):
        load_config(_write(tmp_path, "train: 5\n"))


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")) == Config()


# ---- names checked against the registries ----------------------------------------------------


def test_unknown_dataset() -> None:
    with pytest.raises(RegistryError) as info:
        load_config(None, ["data.name=imagenet"])
    assert isinstance(info.value, SemisegError)
    assert "imagenet" in str(info.value) and "synthetic" in str(info.value)


def test_unknown_method() -> None:
    with pytest.raises(RegistryError) as info:
        load_config(None, ["method.name=magic"])
    assert isinstance(info.value, SemisegError)
    assert "magic" in str(info.value) and "supervised" in str(info.value)


def test_unknown_sweep_method() -> None:
    with pytest.raises(RegistryError, match="supervised"):
        load_config(None, ["sweep.methods=[supervised,magic]"])


def test_unknown_method_param() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["method.name=supervised", "method.params={threshold: 0.9}"])
    assert "threshold" in str(info.value) and "supervised" in str(info.value)


def test_bad_sweep_params_key() -> None:
    with pytest.raises(ConfigError, match="sweep.params"):
        load_config(None, ["sweep.params={magic.threshold: [0.9]}"])


# ---- method params: in range at load, for the method and every sweep grid combination --------

# (method, param, out-of-range value): one example per method, so each Config's checks count.
OUT_OF_RANGE = [
    ("sam_refined", "rounds", 0),
    ("sam_refined", "unlabeled_weight", -1),
    ("mean_teacher", "consistency_weight", -0.5),
    ("mean_teacher", "ema_decay", 1.5),
    ("pseudo_label", "threshold", 1.5),
    ("pseudo_label", "unlabeled_weight", -1),
    ("reference_guided", "k", 0),
    ("local_contrastive", "temperature", 0),
    ("low_confidence", "separation_weight", -1),
]
OUT_OF_RANGE_IDS = [f"{m}.{k}={v}" for m, k, v in OUT_OF_RANGE]


@pytest.mark.parametrize("method, key, value", OUT_OF_RANGE, ids=OUT_OF_RANGE_IDS)
def test_method_params_out_of_range(method: str, key: str, value) -> None:
    with pytest.raises(ConfigError, match=f"method.params.{key}="):
        load_config(None, [f"method.name={method}", f"method.params.{key}={value}"])


@pytest.mark.parametrize("method, key, value", OUT_OF_RANGE, ids=OUT_OF_RANGE_IDS)
def test_sweep_grid_value_out_of_range(method: str, key: str, value) -> None:
    """A bad value anywhere in the grid fails at load, naming the key, though the config's own
    method is another one and the other grid values are fine."""
    with pytest.raises(ConfigError, match=f"method.params.{key}=") as info:
        load_config(None, [f"sweep.methods=[supervised,{method}]",
                           f"sweep.params={{{method}.{key}: [{value}]}}"])
    assert method in str(info.value) and "sweep grid" in str(info.value)


def test_sweep_grid_combination_of_two_params_is_checked() -> None:
    """Every combination is built, not each value alone with the defaults."""
    cfg = load_config(None, ["sweep.methods=[sam_refined]",
                             "sweep.params={sam_refined.rounds: [1, 2], sam_refined.min_sam_iou: [0.0, 0.5]}"])
    settings = method_grid(cfg)
    assert [s.params for s in settings] == [
        {"rounds": 1, "min_sam_iou": 0.0}, {"rounds": 1, "min_sam_iou": 0.5},
        {"rounds": 2, "min_sam_iou": 0.0}, {"rounds": 2, "min_sam_iou": 0.5}]
    assert all(s == MethodConfig("sam_refined", s.params) for s in settings)


def test_method_grid_keeps_the_config_s_own_params() -> None:
    cfg = load_config(None, ["method.name=pseudo_label", "method.params={unlabeled_weight: 0.5}",
                             "sweep.methods=[supervised,pseudo_label]",
                             "sweep.params={pseudo_label.threshold: [0.9, 0.95]}"])
    assert method_grid(cfg) == [
        MethodConfig("supervised", {}),
        MethodConfig("pseudo_label", {"unlabeled_weight": 0.5, "threshold": 0.9}),
        MethodConfig("pseudo_label", {"unlabeled_weight": 0.5, "threshold": 0.95})]


# ---- data.root: checked on disk by the driver, not by loading ---------------------------------


def test_data_root_is_checked_by_the_driver_not_at_load(tmp_path: Path, monkeypatch) -> None:
    missing = tmp_path / "no_such_data"
    cfg = load_config(None, ["data.name=folder", f"data.root={missing}"])  # loading stays pure
    with pytest.raises(ConfigError, match=f"data.root={missing}: no such folder"):
        check_paths(cfg)
    (tmp_path / "data").mkdir()
    cfg = load_config(None, ["data.name=folder", "data.root=data"])
    monkeypatch.chdir(tmp_path)
    check_paths(cfg)
    assert cfg.data.root == str((tmp_path / "data").resolve())  # absolute: trials run elsewhere


# ---- identity --------------------------------------------------------------------------------


def test_config_hash_identity() -> None:
    base = load_config(None).config_hash()
    assert load_config(None).config_hash() == base
    assert load_config(None, ["train.seed=1"]).config_hash() != base
    assert load_config(None, ["data.label_fraction=0.25"]).config_hash() != base
    # where a run executes or is logged is not part of its identity
    assert load_config(None, ["ray.num_workers=4"]).config_hash() == base
    assert load_config(None, ["tracking.experiment=other"]).config_hash() == base
    assert load_config(None, ["sweep.seeds=[0,1,2]"]).config_hash() == base


def test_flat() -> None:
    flat = load_config(None, ["train.lr=0.01"]).flat()
    assert flat["train.lr"] == 0.01
    assert flat["data.name"] == "synthetic"
    assert flat["sweep.seeds"] == [0]
    assert flat["method.params"] == {}
    assert all(not isinstance(v, dict) or not v for v in flat.values())
    assert "train" not in flat


def test_options_added_later_keep_earlier_hashes_at_their_earlier_behaviour() -> None:
    """The hash a results sweep recorded (docs/RESULTS.md, commit 91ed285) must not move when a
    data option is added at a value that trains the same model, or a resumed sweep retrains all."""
    base = ["method.name=supervised"]
    cfg = load_config(REPO / "experiments" / "results_synthetic.yaml", base)
    assert cfg.config_hash() == "d1a5a7984b161621"
    for changed in ("data.label_unit=case", "data.normalize=dataset", "data.native_size=256"):
        assert load_config(REPO / "experiments" / "results_synthetic.yaml", [*base, changed]).config_hash() != cfg.config_hash()
    image = load_config(REPO / "experiments" / "results_synthetic.yaml", [*base, "data.label_unit=image"])
    assert image.config_hash() == cfg.config_hash()
    # nifti's `auto` is `case`: it trains something else than before, so its hash differs.
    nifti = [*base, "data.name=nifti"]
    assert "label_unit" in load_config(None, nifti).identity()["data"]
    assert "label_unit" not in load_config(None, [*nifti, "data.label_unit=image"]).identity()["data"]
    # train.strong_blur_p at the blur every recorded trial used keeps its hash; off is a new model.
    from semiseg.data.transforms import BLUR_P

    at_default = load_config(REPO / "experiments" / "results_synthetic.yaml", [*base, f"train.strong_blur_p={BLUR_P}"])
    assert at_default.config_hash() == cfg.config_hash()
    off = load_config(REPO / "experiments" / "results_synthetic.yaml", [*base, "train.strong_blur_p=0"])
    assert off.config_hash() != cfg.config_hash() and off.identity()["train"]["strong_blur_p"] == 0


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_strong_blur_p_outside_a_probability_names_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.strong_blur_p.*expected a probability"):
        load_config(None, [f"train.strong_blur_p={value}"])
