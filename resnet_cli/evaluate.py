"""`resnet-eval`: score a checkpoint on its dataset's test split.

Top-1/top-5 accuracy, loss, per-class accuracy and a confusion matrix, shown in the terminal
and written as eval.json + confusion.png. It recomputes exactly what training's evaluation
computed (same test images, preprocessing, batch size, precision policy and memory layout),
so a run's best.pt scores the run's best test_acc.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .config import ConfigError, DataConfig, tta_hflip_on
from .data.transforms import Preprocess

USAGE = """
usage: resnet-eval checkpoint=PATH [key=value ...]

Evaluate a checkpoint on the test split of the dataset it was trained on.

  checkpoint=PATH       a .pt file, or a run folder (uses its checkpoints/best.pt)
  data.KEY=VALUE        change one key of the stored data config (data.root=/data, data.limit_test=1000)
  data=PRESET           another dataset preset (mnist, fashion_mnist, cifar10, ...) instead
  device=auto           auto | cpu | cuda | cuda:N | mps
  precision=null        null: the training run's policy; fp32 | bf16 | fp16
  batch_size=null       null: the training run's trainer.eval_batch_size
  tta_hflip=null        null: as the training run scored (trainer.tta_hflip); true: average with mirrored images
  weights=raw           raw | ema: the EMA of the weights (runs with trainer.ema_decay)
  output_dir=null       null: the checkpoint's run folder
  trackers=true         also log to the training run's TensorBoard/MLflow run (logger=...), if it had any

Writes eval.json and confusion.png; preprocessing always comes from the checkpoint.
"""

# Keys whose values are file names: read literally (see inference.parse_args).
PATH_KEYS = ("checkpoint", "output_dir")
# The model expects the input it was trained on: these come from the checkpoint only.
PREPROCESSING_KEYS = ("resize", "normalize", "mean", "std")
# Keys of training's split and augmentation: only the test split is scored, plainly.
TRAINING_ONLY_KEYS = ("limit_train", "val_size", "augment", "hflip", "crop_padding", "erase_prob", "erase_scale",
                      "erase_ratio", "erase_value", "drop_last")
# Beyond this many classes a terminal matrix is unreadable: eval.json and the PNG hold it.
MAX_TERMINAL_CLASSES = 20


@dataclass
class EvalConfig:
    checkpoint: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    device: str = "auto"
    precision: Optional[str] = None
    batch_size: Optional[int] = None
    tta_hflip: Optional[bool] = None  # null: what the training run's evaluation did
    weights: str = "raw"  # raw | ema
    output_dir: Optional[str] = None
    trackers: bool = True  # also log to the TensorBoard/MLflow run of the checkpoint's training run


# ---------------------------------------------------------------- which data

def eval_data_config(stored: Mapping[str, Any], composed: Mapping[str, Any], given: set[str], prep: Preprocess,
                     train_cwd: Path | None = None) -> dict[str, Any]:
    """The data config to evaluate on: the checkpoint's stored data section (so the same test
    subset, limit_test included), with the user's `data.KEY=` values over it; or, after
    `data=PRESET`, the composed preset. Preprocessing is the checkpoint's either way."""
    keys = sorted({k.split(".", 1)[1].split(".")[0] for k in given if k.startswith("data.")})
    idle = [k for k in keys if k in TRAINING_ONLY_KEYS]
    if idle:  # accepted silently, they would look as if they changed the evaluation
        raise ConfigError(f"data.{idle[0]}: has no effect on evaluation (only the test split is scored, without "
                          "augmentation); data.limit_test, data.root and data=PRESET choose what is scored")
    fixed = [k for k in keys if k in PREPROCESSING_KEYS]
    if fixed:
        mean = list(prep.mean) if prep.mean else None
        raise ConfigError(f"data.{fixed[0]}: preprocessing comes from the checkpoint (size {prep.size}, mean {mean}) "
                          "and cannot be changed for evaluation")
    if "data" in given:
        cfg = dict(composed)
    else:
        cfg = dict(stored)
        cfg.update({k: composed[k] for k in keys})
        if "root" not in keys:
            cfg["root"] = _training_root(str(cfg.get("root", "data")), train_cwd)
    cfg.update(resize=prep.size, normalize=prep.mean is not None,
               mean=list(prep.mean) if prep.mean else None, std=list(prep.std) if prep.std else None)
    if cfg["name"] == "imagefolder":
        cfg["channels"] = prep.channels  # ImageFolder images are converted to the model's channels
    # Only the test split is scored; the training images mattered only through their mean/std,
    # which the checkpoint holds. Limiting them keeps memory (and device memory) small.
    # Synthetic data draws both splits at once and slices afterwards, so its test images stay put.
    # (The validation split is held out of the training images: nothing to do with the test split.)
    cfg["limit_train"], cfg["val_size"] = 1, None
    for key in ("limit_test",):
        if cfg.get(key) is not None and int(cfg[key]) < 1:
            raise ConfigError(f"data.{key}={cfg[key]}: must be >= 1 (or null for all)")
    return cfg


def _training_root(root: str, train_cwd: Path | None) -> str:
    """A relative data.root is relative to where training ran; use that folder when the
    current one has no such path (evaluating from elsewhere should not download again)."""
    p = Path(root).expanduser()
    if p.is_absolute() or p.exists() or train_cwd is None or not (train_cwd / p).exists():
        return root
    return str(train_cwd / p)


def training_cwd(run_dir: Path) -> Path | None:
    """The working directory of the training run, from Hydra's record of it."""
    import yaml

    try:
        record = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())
        return Path(record["hydra"]["runtime"]["cwd"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def _data_channels(cfg: Mapping[str, Any]) -> int:
    from .data.sources import DATASETS

    if cfg["name"] in DATASETS:
        return DATASETS[cfg["name"]].channels
    return int(cfg.get("channels") or 3)


# ---------------------------------------------------------------- the evaluation

def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows: true class; columns: predicted class."""
    idx = targets.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def ema_weights(ckpt: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The checkpoint with its EMA weights as the model (AveragedModel keeps them under module.)."""
    ema = ckpt.get("ema")
    if not ema:
        raise ConfigError(f"weights=ema: checkpoint {path} holds no EMA weights (train with trainer.ema_decay=0.999)")
    return {**ckpt, "model": {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}}


def evaluate_checkpoint(ckpt: Mapping[str, Any], path: Path, data_cfg: Mapping[str, Any], device: torch.device,
                        precision: str, batch_size: int | None = None, tta_hflip: bool | None = None
                        ) -> dict[str, Any]:
    """Score the checkpoint on data_cfg's test split. Returns the eval.json dict."""
    from .data import DataError, load_data
    from .engine import configure_cuda, evaluate
    from .inference import load_model

    cfg = ckpt["config"]
    channels_last = bool(cfg.get("trainer", {}).get("channels_last", True))
    configure_cuda(device, bool(cfg.get("trainer", {}).get("cudnn_benchmark", True)))
    loaded = load_model(ckpt, path, device, channels_last)
    if _data_channels(data_cfg) != loaded.in_channels:
        raise DataError(f"data={data_cfg['name']}: {_data_channels(data_cfg)}-channel images, but the model takes "
                        f"{loaded.in_channels} channel(s)")
    eval_bs = int(batch_size or cfg.get("trainer", {}).get("eval_batch_size", 1024))
    if eval_bs < 1:
        raise ConfigError(f"batch_size={eval_bs}: must be >= 1")
    data = load_data(data_cfg, int(cfg.get("batch_size", 256)), eval_bs, int(cfg.get("seed", 0)), device)
    if data.num_classes != loaded.num_classes:
        raise DataError(f"data={data_cfg['name']}: {data.num_classes} classes, but the model has "
                        f"{loaded.num_classes} outputs")
    if tta_hflip is None:  # as the training run scored it, so best.pt scores its best_test_acc
        tta_hflip = tta_hflip_on(cfg.get("trainer", {}), cfg.get("data", {}))
    # Padded to one batch shape on CUDA, as the training run's evaluation is (train.py): the same
    # kernels for the last batch, so best.pt scores the run's best_test_acc there too.
    ev = evaluate(loaded.model, data.test.batches(), device, precision, channels_last, topk=(1, 5), collect=True,
                  fixed_batch=eval_bs if device.type == "cuda" else None, tta_hflip=tta_hflip)
    n = loaded.num_classes
    conf = confusion_matrix(ev["preds"], ev["targets"], n)
    support, correct = conf.sum(1), conf.diag()
    per_class = [{"label": i, "name": loaded.class_names[i], "images": int(support[i]), "correct": int(correct[i]),
                  "accuracy": (int(correct[i]) / int(support[i])) if int(support[i]) else None} for i in range(n)]
    warnings = []
    if list(data.class_names) != loaded.class_names:
        warnings.append(f"the dataset's class names ({', '.join(map(str, data.class_names[:3]))}, ...) differ from "
                        f"the checkpoint's ({', '.join(loaded.class_names[:3])}, ...); reporting the checkpoint's")
    return {
        "checkpoint": str(path.resolve()), "epoch": loaded.epoch, "step": loaded.step, "when": loaded.when(),
        "model": loaded.model_name,
        "dataset": data_cfg["name"], "split": "test", "images": ev["images"],
        "top1": ev["top1"], "top5": ev["top5"], "loss": ev["loss"],
        "topk_note": None if n >= 5 else f"{n} classes: top5 is top-{n}",
        "device": str(device), "precision": precision, "batch_size": eval_bs, "tta_hflip": tta_hflip,
        "class_names": loaded.class_names, "per_class": per_class,
        "confusion": conf.tolist(),  # rows: true class, columns: predicted class
        # the data config used (limit_train left out: only the test split was read)
        "data": {k: v for k, v in data_cfg.items() if k != "limit_train"}, "warnings": warnings,
    }


# ---------------------------------------------------------------- showing and writing

def confusion_png(result: Mapping[str, Any]) -> bytes:
    """Row-normalized colours (each true class sums to 1), raw counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    conf = np.asarray(result["confusion"], dtype=np.int64)
    n = conf.shape[0]
    rows = conf.sum(1, keepdims=True)
    frac = np.divide(conf, rows, out=np.zeros(conf.shape, dtype=float), where=rows > 0)
    side = min(4 + 0.45 * n, 16)
    fig, ax = plt.subplots(figsize=(side + 1, side), dpi=110)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 30:
        names = result["class_names"]
        ax.set_xticks(range(n), names, rotation=90 if n > 10 or max(map(len, names)) > 6 else 0, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
    if n <= MAX_TERMINAL_CLASSES:
        for i in range(n):
            for j in range(n):
                if conf[i, j]:
                    ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{result['model']} on {result['dataset']} ({Path(result['checkpoint']).name}, "
                 f"{result['when']}): top-1 {result['top1']:.4f}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(result: Mapping[str, Any], out_dir: Path) -> list[Path]:
    from .checkpoint import atomic_write_bytes, atomic_write_json

    json_path, png_path = out_dir / "eval.json", out_dir / "confusion.png"
    atomic_write_json(json_path, result)
    atomic_write_bytes(png_path, confusion_png(result))
    return [json_path, png_path]


def show(result: Mapping[str, Any], stream=None) -> None:
    from rich.markup import escape  # names and paths are the user's: "[old] cat" is text, not a style

    from .inference import console, table

    stream = stream or sys.stdout
    con = console(stream)
    tty = stream.isatty()
    extras = [x for x, on in (("EMA weights", result.get("weights") == "ema"), ("hflip TTA", result.get("tta_hflip")))
              if on]
    con.print(escape(f"{result['model']} ({Path(result['checkpoint']).name}, {result['when']}) on "
                     f"{result['dataset']} test: {result['images']:,} images, "
                     + ", ".join([result["device"], result["precision"], *extras])))
    con.print(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  loss {result['loss']:.4f}")
    con.print("")

    t = table(stream, "per-class accuracy")
    for col in ("label", "name", "images", "correct", "accuracy"):
        t.add_column(col, justify="left" if col == "name" else "right")
    for row in result["per_class"]:
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        t.add_row(str(row["label"]), escape(row["name"]), str(row["images"]), str(row["correct"]), acc)
    if not tty:
        con.print("per-class accuracy")
    con.print(t)
    con.print("")

    conf, names = result["confusion"], result["class_names"]
    n = len(names)
    if n > MAX_TERMINAL_CLASSES:
        con.print(f"confusion matrix: {n} classes, too many for a terminal; see confusion.png and eval.json")
        return
    title = "confusion matrix (rows: true, columns: predicted)"
    t = table(stream, title)
    t.add_column("true \\ pred", justify="left")
    for j in range(n):
        t.add_column(str(j), justify="right")
    for i in range(n):
        cells = []
        for j in range(n):
            v = str(conf[i][j]) if conf[i][j] else ("." if tty else "0")
            cells.append(f"[bold green]{v}[/]" if tty and i == j and conf[i][j] else v)
        t.add_row(escape(f"{i} {names[i]}"), *cells)
    if not tty:
        con.print(title)
    con.print(t)


# ---------------------------------------------------------------- the command

def run(argv: list[str]) -> dict[str, Any]:
    from .checkpoint import load_checkpoint
    from .inference import (as_device, as_precision, check_output_folder, eval_preprocess, output_errors, parse_args,
                            require, resolve_checkpoint, run_dir_of)

    args = parse_args("eval", EvalConfig, argv, PATH_KEYS, USAGE)
    cfg = args.cfg
    path = resolve_checkpoint(require(cfg, "checkpoint", "checkpoint=outputs/DATE/TIME/checkpoints/best.pt"))
    device = as_device(cfg["device"])
    ckpt = load_checkpoint(path, map_location="cpu")
    if cfg["weights"] not in ("raw", "ema"):
        raise ConfigError(f"weights={cfg['weights']}: choose from raw, ema")
    if cfg["weights"] == "ema":
        ckpt = ema_weights(ckpt, path)
    run_dir = run_dir_of(path)
    data_cfg = eval_data_config(ckpt["config"]["data"], cfg["data"], args.given, eval_preprocess(ckpt, path),
                                training_cwd(run_dir))
    if cfg["batch_size"] is not None and cfg["batch_size"] < 1:
        raise ConfigError(f"batch_size={cfg['batch_size']}: must be >= 1")
    precision = as_precision(cfg["precision"], ckpt["config"], device)
    out_dir = Path(cfg["output_dir"]).expanduser() if cfg["output_dir"] else run_dir
    check_output_folder("output_dir", cfg["output_dir"] or out_dir, out_dir)
    result = evaluate_checkpoint(ckpt, path, data_cfg, device, precision, cfg["batch_size"], cfg["tta_hflip"])
    result["weights"] = cfg["weights"]
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    # The report first: a reader that goes away mid-table (`| head`) must not cost the files.
    with output_errors(out_dir):
        written = write_report(result, out_dir)
    logged: list[str] = []
    other_data = sorted(k for k in args.given if k == "data" or k.startswith("data."))
    if cfg["trackers"] and other_data and "trackers" not in args.given:
        # The run's trackers hold the evaluation of its own test split: a subset or another
        # dataset would replace it there (same step, same names). Typed trackers=true logs anyway.
        logged = [f"not logged to the run's trackers: {other_data[0]} changes what is scored (trackers=true logs it)"]
    elif cfg["trackers"]:
        from .trackers import log_evaluation

        logged = log_evaluation(run_dir, result, written, int(ckpt["epoch"]), int(ckpt.get("step") or 0))
    show(result)
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    for where in logged:
        print(f"logged to {where}" if not where.startswith("not ") else f"warning: {where}", file=sys.stderr)
    return result


def main() -> None:
    from .cli import user_errors

    with user_errors():
        run(sys.argv[1:])


if __name__ == "__main__":
    main()
