"""Config schemas and value checks.

The dataclasses are registered in Hydra's ConfigStore and sit first in every primary
config's defaults list, so a misspelled key or a wrong type fails at composition, naming
the key. `check_values` then rejects values that parse but make no sense, before any data
is read or model built. Both raise ConfigError, whose message is the one line a user sees.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .data.sources import DATASETS as DATASET_FACTS
from .errors import ConfigError
from .models.resnet import ModelSpec


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUGMENTS = ("none", "standard")
PIPELINES = ("auto", "memory", "loader")
PROGRESS = ("auto", "bar", "plain", "none")
CUDA_GRAPHS = ("auto", "true", "false")
TTA_HFLIP = ("auto", "true", "false")
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
    erase_value: float = 0.0  # after normalization: 0 is the mean (black with data.normalize=false)
    normalize: bool = True
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    pipeline: str = "auto"  # memory: decoded once onto the device; loader: DataLoader workers
    drop_last: bool = True  # full training batches only: one shape for cudnn autotuning and CUDA graphs
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
    ema_decay: Optional[float] = None  # EMA of the weights, evaluated and saved beside them; None: off
    # Evaluate on each image and its mirror image (averaged probabilities). auto: where training
    # flips the images (data.hflip with data.augment=standard), i.e. a mirror keeps its class; it
    # gained 0.002-0.003 test accuracy in every paired run measured, for ~5% more time (issue 13).
    tta_hflip: str = "auto"  # auto | true | false (a string, as cuda_graphs)
    # auto: on for single-process CUDA runs without trainer.compile; a step that is not
    # launch-bound (issue 12). A string: a command-line true/false arrives as "True"/"False".
    cuda_graphs: str = "auto"  # auto | true | false
    # CUDA: make the next batch on a side stream while the step runs (same batches); false
    # keeps it on the step's stream, to measure what the overlap gains or to rule it out.
    prefetch: bool = True


@dataclass
class SummaryConfig:
    depth: int = 3
    format: str = "table"  # table | json
    input_size: Optional[int] = None  # None: the dataset's (resized) size


@dataclass
class TensorBoardConfig:
    log_every_n_steps: int = 50  # train loss/acc/lr of the last N steps (rank 0's batches)
    flush_secs: int = 30


@dataclass
class MlflowConfig:
    tracking_uri: str = "outputs/mlruns"  # a folder (file store), sqlite:///FILE or http(s)://SERVER
    experiment_name: Optional[str] = None  # None: the sweep folder for a multirun, else "resnet-cli"
    run_name: Optional[str] = None  # None: the job's overrides (multirun) or the run folder's name
    log_checkpoint: bool = False  # also upload checkpoints/best.pt as an artifact


@dataclass
class LoggerConfig:
    """Experiment trackers (configs/logger/): each is on when its section is set."""

    tensorboard: Optional[TensorBoardConfig] = None
    mlflow: Optional[MlflowConfig] = None


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
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def schema_defaults() -> dict[str, Any]:
    """Every typed key's default, as plain containers."""
    return asdict(TrainConfig())


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
    for key, null in (("limit_train", "all"), ("limit_test", "all"), ("resize", "the native size")):
        _check(d[key] is None or d[key] >= 1, f"data.{key}", d[key], f"must be >= 1 (or null for {null})")
    _check(d["num_workers"] is None or d["num_workers"] >= 0, "data.num_workers", d["num_workers"], "must be >= 0")
    _check(d["augment"] in AUGMENTS, "data.augment", d["augment"], f"choose from {', '.join(AUGMENTS)}")
    _check(d["pipeline"] in PIPELINES, "data.pipeline", d["pipeline"], f"choose from {', '.join(PIPELINES)}")
    _check(d["crop_padding"] >= 0, "data.crop_padding", d["crop_padding"], "must be >= 0")
    _check(0 <= d["erase_prob"] <= 1, "data.erase_prob", d["erase_prob"], "must be in [0, 1] (0: no erasing)")
    _check(_interval(d["erase_scale"], 1.0), "data.erase_scale", list(d["erase_scale"]),
           "must be [lo, hi] with 0 < lo <= hi <= 1")
    _check(_interval(d["erase_ratio"], float("inf")), "data.erase_ratio", list(d["erase_ratio"]),
           "must be [lo, hi] with 0 < lo <= hi")
    if d["name"] == "synthetic":  # these sizes are the synthetic set's own; real sets have theirs
        for key, low in (("train_size", 1), ("test_size", 1), ("num_classes", 2), ("channels", 1), ("image_size", 1)):
            _check(d[key] >= low, f"data.{key}", d[key], f"must be >= {low}")
    if d["name"] == "imagefolder":  # images are read as grayscale or RGB
        _check(d["channels"] in (1, 3), "data.channels", d["channels"], "choose 1 (grayscale) or 3 (RGB) for imagefolder")
    _check_val_size(d, cfg["batch_size"])
    if (d["mean"] is None) != (d["std"] is None):  # one alone would be dropped for computed statistics
        key = "mean" if d["std"] is None else "std"
        _check(False, f"data.{key}", list(d[key]), "set data.mean and data.std together "
               "(or both null: computed from the training images)")
    if d["std"] is not None:
        _check(all(v > 0 for v in d["std"]), "data.std", list(d["std"]), "every entry must be > 0")
    _check(t["precision"] in PRECISIONS, "trainer.precision", t["precision"], f"choose from {', '.join(PRECISIONS)}")
    _check(0 <= t["label_smoothing"] < 1, "trainer.label_smoothing", t["label_smoothing"], "must be in [0, 1)")
    _check(t["grad_clip"] is None or t["grad_clip"] > 0, "trainer.grad_clip", t["grad_clip"], "must be > 0 or null")
    _check(t["eval_batch_size"] >= 1, "trainer.eval_batch_size", t["eval_batch_size"], "must be >= 1")
    _check(t["progress"] in PROGRESS, "trainer.progress", t["progress"], f"choose from {', '.join(PROGRESS)}")
    _check(str(t["cuda_graphs"]).lower() in CUDA_GRAPHS, "trainer.cuda_graphs", t["cuda_graphs"],
           f"choose from {', '.join(CUDA_GRAPHS)}")
    _check(str(t["tta_hflip"]).lower() in TTA_HFLIP, "trainer.tta_hflip", t["tta_hflip"],
           f"choose from {', '.join(TTA_HFLIP)}")
    _check(t["checkpoint_every_steps"] is None or t["checkpoint_every_steps"] >= 1,
           "trainer.checkpoint_every_steps", t["checkpoint_every_steps"], "must be >= 1 or null")
    _check(t["ema_decay"] is None or 0 < t["ema_decay"] < 1, "trainer.ema_decay", t["ema_decay"],
           "must be in (0, 1) (e.g. 0.999), or null for no EMA")
    opt = _plain(cfg["optimizer"])
    _check(bool(opt.get("_target_")), "optimizer", opt, "needs a _target_ (pick optimizer=sgd or adamw)")
    check_target_args("optimizer", opt, filled=("params",), own=OPTIMIZER_KEYS)
    _check_ranges("optimizer", opt, OPTIMIZER_RANGES)
    if opt.get("nesterov"):
        _check(opt.get("momentum", 0) > 0, "optimizer.nesterov", True, "needs optimizer.momentum > 0")
        _check(not opt.get("dampening"), "optimizer.dampening", opt.get("dampening"),
               "must be 0 with optimizer.nesterov=true (or set optimizer.nesterov=false)")
    sched = _plain(cfg["scheduler"])
    check_target_args("scheduler", sched, filled=("optimizer", "total_steps", "steps_per_epoch"))
    _check_ranges("scheduler", sched, SCHEDULER_RANGES)
    if "warmup_epochs" in sched:
        _check(0 <= sched["warmup_epochs"] <= cfg["epochs"], "scheduler.warmup_epochs", sched["warmup_epochs"],
               f"must be in [0, epochs={cfg['epochs']}]")
    s = cfg["summary"]
    _check(s["depth"] >= 1, "summary.depth", s["depth"], "must be >= 1")
    _check(s["format"] in ("table", "json"), "summary.format", s["format"], "choose from table, json")


def tta_hflip_on(trainer: Mapping[str, Any], data: Mapping[str, Any]) -> bool:
    """Whether a run's evaluation averages each image with its mirror image. Reads checkpoints'
    configs too, from before `auto` (a plain bool, or no key: off)."""
    value = str(trainer.get("tta_hflip", False)).lower()  # a command-line `true` arrives as "True"
    if value == "auto":  # as training flips: data.hflip, unless augmentation is off altogether
        return bool(data.get("hflip", False)) and data.get("augment", "none") != "none"
    return value == "true"


# Keys of the optimizer section that resnet-cli reads itself (not passed to the optimizer).
OPTIMIZER_KEYS = ("decay_norm_bias",)
# (test, what is allowed) per key, for the keys of torch's optimizers and resnet_cli.schedules.
OPTIMIZER_RANGES = {
    "lr": (lambda v: v > 0, "must be > 0"),
    "momentum": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "dampening": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "eps": (lambda v: v > 0, "must be > 0"),
    "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)"),
}
SCHEDULER_RANGES = {
    "warmup_start": (lambda v: 0 < v <= 1, "must be in (0, 1] (a fraction of lr)"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "must be in [0, 1] (a fraction of lr)"),
    "gamma": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "milestones": (lambda v: all(0 < m < 1 for m in v), "must be fractions of the run, each in (0, 1)"),
    "pct_start": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "div_factor": (lambda v: v > 0, "must be > 0"),
    "final_div_factor": (lambda v: v > 0, "must be > 0"),
    "max_warmup_fraction": (lambda v: 0 <= v <= 1, "must be in [0, 1] (a fraction of the run)"),
}


def _plain(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def _kind(default: Any) -> tuple[tuple[type, ...], str] | None:
    """What a keyword's default says its values must be (torch's annotations are too loose)."""
    if isinstance(default, bool):
        return (bool,), "true or false"
    if isinstance(default, (int, float)):
        return (int, float), "a number"
    if isinstance(default, (list, tuple)):
        return (list, tuple), "a list"
    if isinstance(default, str):
        return (str,), "a string"
    return None


def check_target_args(section: str, node: Mapping[str, Any], filled: tuple[str, ...] = (),
                      own: tuple[str, ...] = ()) -> None:
    """The optimizer and scheduler sections are open dicts passed to their `_target_`, so Hydra
    cannot type them: check each key against the target's signature instead (issue 11), naming
    the key, before anything runs. `filled`: arguments the trainer supplies itself."""
    target = node.get("_target_")
    if not target:
        # `scheduler=none`: nothing is built, so a key given to it would be silently ignored
        stray = [k for k in node if not str(k).startswith("_") and k not in own]
        if stray:
            raise ConfigError(f"{section}.{stray[0]}: this {section} builds nothing (_target_: null, as "
                              f"{section}=none), so the key would be ignored; choose a {section} that takes it")
        return
    try:
        from hydra.utils import get_object

        fn = get_object(target)
        params = dict(inspect.signature(fn).parameters)
    except Exception:
        raise ConfigError(f"{section}._target_={target}: cannot be imported") from None
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [k for k, p in params.items() if k not in filled and p.kind not in
               (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)] + list(own)
    for key, value in node.items():
        if key.startswith("_") or key in own:
            continue
        if key in filled:
            raise ConfigError(f"{section}.{key}: set by the trainer, not a config key")
        if key not in params:
            if open_kwargs:
                continue
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {section}.{close[0]}?" if close else ""
            raise ConfigError(f"{section}.{key}: unknown key for {target}{hint} (keys: {', '.join(allowed)})")
        kind = _kind(params[key].default)
        if value is not None and kind is not None:
            types, what = kind
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                raise ConfigError(f"{section}.{key}={value}: must be {what}")


def _check_ranges(section: str, node: Mapping[str, Any], ranges: Mapping[str, tuple[Any, str]]) -> None:
    for key, (ok, allowed) in ranges.items():
        if node.get(key) is not None:
            _check(ok(node[key]), f"{section}.{key}", node[key], allowed)


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


__all__ = ["ConfigError", "DataConfig", "LoggerConfig", "MISSING", "MlflowConfig", "TensorBoardConfig", "SummaryConfig", "TrainConfig", "TrainerConfig",
           "check_values", "register_schemas", "to_container"]
