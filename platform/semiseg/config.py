"""The config schema. Dataclasses are the schema, YAML files are instances, and dotted
`key=value` overrides on the command line patch them. The resolved config is a run's identity.

Each field's docstring (the string literal under it) is its documentation; `semiseg` errors
name the dotted key at fault and, where the choices are fixed, list them.

Loading checks everything that needs no disk and no cluster: types, ranges, registered names,
and every method setting the config can train (its own method and each combination of the
sweep grid: params in range, stages runnable). What depends on the driver's disk (data.root)
is checked by semiseg.preflight, before any trial.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from semiseg.config_schema import build, coerce_override, flatten, parse_yaml
from semiseg.data_config import DataConfig  # noqa: F401  (also importable from here)
from semiseg.errors import ConfigError
from semiseg.sam.config import SamConfig


@dataclass
class ModelConfig:
    name: str = "unet"
    """Model name from `semiseg.models` (a U-Net that exposes decoder features)."""
    base_channels: int = 16
    """Channels of the first U-Net stage; each deeper stage doubles them."""
    depth: int = 3
    """Number of down-sampling stages."""

    def __post_init__(self) -> None:
        for key in ("base_channels", "depth"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)}: expected a positive integer")


@dataclass
class MethodConfig:
    name: str = "supervised"
    """Method name; `semiseg methods` lists the choices."""
    params: dict[str, Any] = field(default_factory=dict)
    """Hyperparameters of the method, checked against its own Config dataclass."""


@dataclass
class TrainConfig:
    epochs: int = 12
    """Training epochs; the model is selected on val Dice after each one."""
    steps_per_epoch: int = 40
    """Optimizer steps per epoch, the same at every label fraction so budgets are comparable."""
    lr: float = 3e-3
    """Peak learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """Optimizer."""
    schedule: Literal["cosine", "poly", "constant"] = "cosine"
    """Learning-rate schedule over all steps."""
    amp: bool = True
    """Mixed precision (bf16 autocast); used only on a GPU."""
    grad_clip: float = 1.0
    """Gradient-norm clip; 0 turns it off."""
    seed: int = 0
    """Seed of the labeled subset, the initial weights and the augmentations."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device when run outside Ray; inside Ray Train the worker's device is used."""
    strong_blur_p: float = 0.5
    """Probability of a Gaussian blur in each strong view (semiseg.data.transforms.BLUR_P); 0
    turns blur off, the mni-tissue ablation of docs/RESULTS.md."""
    channels_last: bool = False
    """Model weights and batches in channels-last (NHWC) memory format, the layout of cuDNN's
    fastest convolutions. Off until measured (docs/BENCHMARKS.md, P6)."""
    compile: bool = False
    """torch.compile the networks in place (the model and any teacher, so checkpoints keep
    eager's keys) and the method's training step (semiseg.speed says where the step stays eager).
    Not bitwise equal to eager. Off until measured (docs/BENCHMARKS.md, P6)."""
    compile_backend: str = "inductor"
    """torch.compile backend for train.compile / train.cuda_graphs (inductor; aot_eager in tests)."""
    cuda_graphs: bool = False
    """Replay the fixed-shape training step as CUDA graphs (torch.compile mode='reduce-overhead';
    implies train.compile, needs compile_backend=inductor and a CUDA device). Off until measured."""

    def __post_init__(self) -> None:
        for key in ("epochs", "steps_per_epoch"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key}={getattr(self, key)}: expected a positive integer")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr}: expected a positive number")
        for key in ("weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}={getattr(self, key)}: expected 0 or more")
        _check_seed("train.seed", self.seed)
        if not 0.0 <= self.strong_blur_p <= 1.0:
            raise ConfigError(f"train.strong_blur_p={self.strong_blur_p}: expected a probability "
                              "in [0, 1]")
        if not self.compile_backend.strip():
            raise ConfigError("train.compile_backend='': expected a torch.compile backend name "
                              "such as inductor")
        if self.cuda_graphs and self.compile_backend != "inductor":
            raise ConfigError(f"train.cuda_graphs=true with train.compile_backend="
                              f"{self.compile_backend!r}: expected inductor (CUDA graphs are "
                              "inductor's mode='reduce-overhead')")
        if self.cuda_graphs and self.device == "cpu":
            raise ConfigError("train.cuda_graphs=true with train.device=cpu: CUDA graphs need a "
                              "CUDA device; set train.cuda_graphs=false")


@dataclass
class RayConfig:
    address: str = ""
    """'' joins $RAY_ADDRESS when set (as inside `ray job submit`), else starts a local Ray;
    'local' always starts one; 'auto' or 'host:port' joins that cluster."""
    num_workers: int = 1
    """Ray Train workers per trial (DDP across them)."""
    use_gpu: bool = False
    """Give each Train worker a GPU share (gpus_per_worker)."""
    gpus_per_worker: float = 1.0
    """GPUs per Train worker; fractions such as 0.25 pack several trials onto one GPU."""
    cpus_per_worker: float = 1.0
    """CPUs per Train worker (also its torch thread count)."""
    max_concurrent_trials: int = 2
    """Trials that run at once."""
    storage_path: str = "ray_results"
    """Where Ray keeps checkpoints; shared storage (s3://, NFS) on a multi-node cluster."""
    max_failures: int = 1
    """Times a trial's worker group is restarted from its last checkpoint after a failure."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: auto is nccl with GPUs, gloo without."""

    def __post_init__(self) -> None:
        if self.num_workers <= 0 or self.max_concurrent_trials <= 0:
            raise ConfigError("ray.num_workers and ray.max_concurrent_trials must be positive")
        if self.gpus_per_worker <= 0 or self.cpus_per_worker <= 0:
            raise ConfigError("ray.gpus_per_worker and ray.cpus_per_worker must be positive")
        if self.max_failures < 0:
            raise ConfigError(f"ray.max_failures={self.max_failures}: expected 0 or more")


@dataclass
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI; empty means $MLFLOW_TRACKING_URI, else sqlite under ./mlruns."""
    experiment: str = "semiseg"
    """MLflow experiment name."""
    overlays: int = 4
    """Test images whose prediction overlays are logged as PNG."""
    log_model: bool = True
    """Log each trial's final checkpoint.pt as artifact model/ (reusable by run id, e.g. by
    `semiseg pseudolabel --checkpoint RUN_ID`); a few MB per trial. Also logs the model selected
    on val as the run's MLflow PyTorch model (pt2, with signature and input example), for
    `mlflow.pytorch.load_model` and the model registry."""
    system_metrics: bool = False
    """Log MLflow's system metrics (system/cpu_utilization_percentage, memory, GPU where
    nvidia-ml-py sees one) of the rank-0 worker's machine every 10 s
    ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) while it trains."""

    def __post_init__(self) -> None:
        if self.overlays < 0:
            raise ConfigError(f"tracking.overlays={self.overlays}: expected 0 or more")


@dataclass
class SweepConfig:
    methods: list[str] = field(default_factory=lambda: ["supervised"])
    """Methods to compare."""
    label_fractions: list[float] = field(default_factory=lambda: [0.05, 0.25, 1.0])
    """Label fractions to sweep."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds to repeat each setting with."""
    params: dict[str, list[Any]] = field(default_factory=dict)
    """Method hyperparameter grids as 'method.param': [values], e.g. 'pseudo_label.threshold'."""
    full_supervision: bool = False
    """Also run supervised at label fraction 1.0 for each seed: the upper bound to compare with."""
    scheduler: Literal["fifo", "asha"] = "fifo"
    """fifo runs every trial to the end; asha stops trials whose val Dice lags (Li et al. 2020)."""
    grace_period: int = 2
    """ASHA: epochs every trial runs before it can be stopped."""

    def __post_init__(self) -> None:
        if self.grace_period <= 0:
            raise ConfigError(f"sweep.grace_period={self.grace_period}: expected a positive integer")
        for key in ("methods", "label_fractions", "seeds"):
            if not getattr(self, key):
                raise ConfigError(f"sweep.{key} is empty: expected at least one value")
        for f in self.label_fractions:
            if not 0.0 < f <= 1.0:
                raise ConfigError(f"sweep.label_fractions has {f}: expected values in (0, 1]")
        for seed in self.seeds:
            _check_seed("sweep.seeds", seed)


def _check_seed(key: str, seed: int) -> None:
    # numpy's generators refuse negative seeds, and the engine seeds torch generators with
    # seed * 1000 + rank, which must stay below 2**64: [0, 2**32) is safe for both.
    if not 0 <= seed < 2**32:
        raise ConfigError(f"{key}={seed}: expected an integer in [0, 2**32)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    """The dataset and its split."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """The training method and its hyperparameters."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation loop."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Where and how trials run."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Where runs are recorded."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """The grid `semiseg sweep` runs."""
    sam: SamConfig = field(default_factory=SamConfig)
    """SAM pseudo-label refinement (`semiseg pseudolabel`, method sam_refined)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """What determines a trained model: not where it ran nor where it was logged."""
        d = self.to_dict()
        identity = {k: d[k] for k in ("data", "model", "method", "train")}
        identity["data"] = self.data.identity()  # new fields at their old behaviour left out
        for section, key in _options_at_earlier_behaviour(self):
            identity[section].pop(key, None)
        from semiseg.methods import METHODS  # here: the registry imports torch code

        for section in METHODS.get(self.method.name).identity_sections:  # e.g. sam_refined: "sam"
            value = getattr(self, section)
            identity[section] = value.identity() if hasattr(value, "identity") else d[section]
        return identity

    def config_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        return flatten(self.to_dict())


def from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Build and validate a Config from plain data (a parsed YAML file, a Ray trial config)."""
    cfg = build(Config, data, prefix="", source=source)
    _check_names(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when path is None) and apply `key=value` overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        file = Path(path)
        source = str(file)
        data = parse_yaml(_read_text(file), str(file)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        coerce_override(data, item)
    return from_dict(data, source=source)


def _read_text(file: Path) -> str:
    if not file.is_file():
        what = "is a directory, not a file" if file.is_dir() else "not found"
        raise ConfigError(f"config file {what}: {file.absolute()} (expected a YAML file)")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not a UTF-8 text file ({exc.reason} at byte {exc.start}); "
                          "expected a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the config file ({exc.strerror or exc})") from None


def method_grid(cfg: Config) -> list[MethodConfig]:
    """Every method setting the sweep trains: each of sweep.methods with each combination of its
    sweep.params grid values, on top of method.params where it is the config's own method."""
    settings = []
    for method in cfg.sweep.methods:
        own = cfg.method.params if method == cfg.method.name else {}
        grid = {k.split(".", 1)[1]: v for k, v in cfg.sweep.params.items() if k.startswith(method + ".")}
        for values in itertools.product(*grid.values()):
            settings.append(MethodConfig(method, {**own, **dict(zip(grid, values))}))
    return settings


def _check_names(cfg: Config) -> None:
    # Imported here: the registries import torch code, which the schema itself does not need.
    from semiseg.data import DATASETS
    from semiseg.methods import METHODS, check_method_params

    DATASETS.get(cfg.data.name)
    for name in [cfg.method.name, *cfg.sweep.methods]:
        METHODS.get(name)
    for key in cfg.sweep.params:
        method, _, param = key.partition(".")
        if method not in cfg.sweep.methods or not param:
            raise ConfigError(
                f"sweep.params key {key!r}: expected 'method.param' with method in "
                f"sweep.methods ({', '.join(cfg.sweep.methods)})"
            )
        check_method_params(method, {param: None}, check_values=False)
    _check_methods(cfg)


def _check_methods(cfg: Config) -> None:
    """Every method setting the config can train is valid (params in range, stages runnable):
    its own method, and each combination of the sweep grid, so a bad value fails here, where
    the config loads, before any trial or run exists."""
    from semiseg.methods import check_method

    check_method(cfg)
    for setting in method_grid(cfg):
        if setting == cfg.method:
            continue
        try:
            check_method(dataclasses.replace(cfg, method=setting))
        except ConfigError as exc:
            raise ConfigError(f"sweep grid ({setting.name} with {setting.params}): {exc}") from None


# Datasets whose `data.label_unit: auto` is `case` (their SegData.label_unit): under auto they
# no longer draw labels as before the option existed, so it stays in their identity.
CASE_UNIT_DATASETS = frozenset({"nifti", "nnunet"})


def _options_at_earlier_behaviour(cfg: "Config") -> list[tuple[str, str]]:
    """(section, key) of options added after results were recorded, at a value that trains
    exactly what the code before them trained: left out of the identity, so adding an option
    keeps every finished trial's hash and a resumed sweep still skips it."""
    keys = []
    if cfg.data.labeled_cases == 0:
        keys.append(("data", "labeled_cases"))
    unit = cfg.data.label_unit
    if unit == "image" or (unit == "auto" and cfg.data.name not in CASE_UNIT_DATASETS):
        keys.append(("data", "label_unit"))
    if cfg.train.strong_blur_p == 0.5:  # transforms.BLUR_P, the only blur before the option
        keys.append(("train", "strong_blur_p"))
    return keys
