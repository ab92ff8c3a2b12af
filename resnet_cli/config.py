"""Config schemas and value checks.

The dataclasses are registered in Hydra's ConfigStore and sit first in every primary
config's defaults list, so a misspelled key or a wrong type fails at composition, naming
the key. `check_values` then rejects values that parse but make no sense, before any data
is read or model built. Both raise ConfigError, whose message is the one line a user sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .data.sources import DATASETS as DATASET_FACTS
from .models.resnet import ModelSpec


class ConfigError(ValueError):
    """Bad user input. The message is one line: key, value given, what is allowed."""


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUGMENTS = ("none", "standard")
PIPELINES = ("auto", "memory", "loader")
PROGRESS = ("auto", "bar", "plain", "none")
DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic")


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    root: str = "data"
    download: bool = True
    cache_dir: Optional[str] = None  # where to extract when root is read-only (default ~/.cache/resnet-cli)
    resize: Optional[int] = None  # None keeps the native size
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    # Training images held out (always the same ones, whatever the seed) for model selection.
    val_size: Optional[int] = None
    augment: str = "standard"
    hflip: bool = True  # only where a mirrored image is still the same class (not digits)
    crop_padding: int = 4
    # Random erasing (Zhong et al. 2020) with augment=standard; torchvision's defaults.
    erase_prob: float = 0.0
    erase_scale: list[float] = field(default_factory=lambda: [0.02, 0.33])  # of the image's area
    erase_ratio: list[float] = field(default_factory=lambda: [0.3, 3.3])  # height / width
    erase_value: float = 0.0  # after normalization: 0 is the mean
    normalize: bool = True
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    pipeline: str = "auto"  # memory: decoded once onto the device; loader: DataLoader workers
    num_workers: Optional[int] = None  # None: sized to the machine
    # synthetic data only
    image_size: int = 28
    channels: int = 1
    num_classes: int = 10
    train_size: int = 512
    test_size: int = 256


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool = True
    compile: bool = False
    label_smoothing: float = 0.0
    grad_clip: Optional[float] = None  # max global grad norm
    eval_batch_size: int = 1024
    skip_nonfinite: bool = False
    sync_batchnorm: bool = False
    cudnn_benchmark: bool = True
    progress: str = "auto"  # auto (bar on a terminal) | bar | plain | none
    checkpoint_every_steps: Optional[int] = None  # also save mid-epoch; None: each epoch end


@dataclass
class SummaryConfig:
    depth: int = 3
    format: str = "table"  # table | json
    input_size: Optional[int] = None  # None: the dataset's (resized) size


@dataclass
class TrainConfig:
    lr: float = 0.05
    epochs: int = 10
    batch_size: int = 256
    seed: int = 0
    resume: Optional[str] = None
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    summary: SummaryConfig = field(default_factory=SummaryConfig)


def register_schemas() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value}: {allowed}")


def check_values(cfg: Mapping[str, Any]) -> None:
    """Range and choice checks that a type system cannot express (plain dict or DictConfig)."""
    _check(cfg["lr"] > 0, "lr", cfg["lr"], "must be > 0")
    _check(cfg["epochs"] >= 1, "epochs", cfg["epochs"], "must be >= 1")
    _check(cfg["batch_size"] >= 1, "batch_size", cfg["batch_size"], "must be >= 1")
    d, t = cfg["data"], cfg["trainer"]
    _check(d["name"] in DATASETS, "data.name", d["name"], f"choose from {', '.join(DATASETS)}")
    for key in ("limit_train", "limit_test", "resize"):
        _check(d[key] is None or d[key] >= 1, f"data.{key}", d[key], "must be >= 1 (or null for all)")
    _check(d["num_workers"] is None or d["num_workers"] >= 0, "data.num_workers", d["num_workers"], "must be >= 0")
    _check(d["augment"] in AUGMENTS, "data.augment", d["augment"], f"choose from {', '.join(AUGMENTS)}")
    _check(d["pipeline"] in PIPELINES, "data.pipeline", d["pipeline"], f"choose from {', '.join(PIPELINES)}")
    _check(d["crop_padding"] >= 0, "data.crop_padding", d["crop_padding"], "must be >= 0")
    _check(0 <= d["erase_prob"] <= 1, "data.erase_prob", d["erase_prob"], "must be in [0, 1] (0: no erasing)")
    _check(_interval(d["erase_scale"], 1.0), "data.erase_scale", list(d["erase_scale"]),
           "must be [lo, hi] with 0 < lo <= hi <= 1")
    _check(_interval(d["erase_ratio"], float("inf")), "data.erase_ratio", list(d["erase_ratio"]),
           "must be [lo, hi] with 0 < lo <= hi")
    _check_val_size(d, cfg["batch_size"])
    if d["std"] is not None:
        _check(all(v > 0 for v in d["std"]), "data.std", list(d["std"]), "every entry must be > 0")
    _check(t["precision"] in PRECISIONS, "trainer.precision", t["precision"], f"choose from {', '.join(PRECISIONS)}")
    _check(0 <= t["label_smoothing"] < 1, "trainer.label_smoothing", t["label_smoothing"], "must be in [0, 1)")
    _check(t["grad_clip"] is None or t["grad_clip"] > 0, "trainer.grad_clip", t["grad_clip"], "must be > 0 or null")
    _check(t["eval_batch_size"] >= 1, "trainer.eval_batch_size", t["eval_batch_size"], "must be >= 1")
    _check(t["progress"] in PROGRESS, "trainer.progress", t["progress"], f"choose from {', '.join(PROGRESS)}")
    _check(t["checkpoint_every_steps"] is None or t["checkpoint_every_steps"] >= 1,
           "trainer.checkpoint_every_steps", t["checkpoint_every_steps"], "must be >= 1 or null")
    opt = cfg["optimizer"]
    _check(bool(opt.get("_target_")), "optimizer", dict(opt), "needs a _target_ (pick optimizer=sgd or adamw)")
    if "momentum" in opt:
        _check(0 <= opt["momentum"] < 1, "optimizer.momentum", opt["momentum"], "must be in [0, 1)")
    if "weight_decay" in opt:
        _check(opt["weight_decay"] >= 0, "optimizer.weight_decay", opt["weight_decay"], "must be >= 0")
    if opt.get("nesterov"):
        _check(opt.get("momentum", 0) > 0, "optimizer.nesterov", True, "needs optimizer.momentum > 0")
    sched = cfg["scheduler"]
    if "warmup_epochs" in sched:
        _check(0 <= sched["warmup_epochs"] <= cfg["epochs"], "scheduler.warmup_epochs", sched["warmup_epochs"],
               f"must be in [0, epochs={cfg['epochs']}]")
    s = cfg["summary"]
    _check(s["depth"] >= 1, "summary.depth", s["depth"], "must be >= 1")
    _check(s["format"] in ("table", "json"), "summary.format", s["format"], "choose from table, json")


def _interval(v: Any, top: float) -> bool:
    return len(v) == 2 and 0 < v[0] <= v[1] <= top


def _check_val_size(d: Mapping[str, Any], batch_size: int) -> None:
    val = d["val_size"]
    if val is None:
        return
    _check(val >= 1, "data.val_size", val, "must be >= 1 (or null for no validation split)")
    sizes = [d["limit_train"], d["train_size"] if d["name"] == "synthetic" else None,
             DATASET_FACTS[d["name"]].train_images if d["name"] in DATASET_FACTS else None]
    known = [n for n in sizes if n is not None]
    if known:  # an image folder's size is only known once read: load_data checks it then
        pool = min(known)
        _check(pool - val >= batch_size, "data.val_size", val,
               f"must leave at least one batch of training images ({pool} - {val} < batch_size={batch_size})")


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Resolved plain dict: what checkpoints store and what inner functions take."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


__all__ = ["ConfigError", "DataConfig", "MISSING", "SummaryConfig", "TrainConfig", "TrainerConfig",
           "check_values", "register_schemas", "to_container"]
