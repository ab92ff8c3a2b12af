"""resnet-summary: a per-layer table (output shape, parameters, multiply-adds) of the model
that `resnet-train` would build from the same overrides.

It composes resnet-train's configs without running Hydra (no run folder, no log files) and
never opens dataset files: channels, classes and image size come from the config and the
dataset facts table, so it works offline on a machine without the data. The model is built
and run on the meta device, so even ResNet-152 at 224x224 costs no memory and no FLOPs.

MACs are counted for convolutions (output elements x in_channels/groups x kernel area) and
linear layers (output elements x in_features); biases, norms, activations, pooling and the
residual additions count 0, the convention behind torchvision's published GFLOPS figures.
"""

from __future__ import annotations

import json
import math
import sys
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # imported lazily at run time: `--help` and bad overrides stay fast
    from omegaconf import DictConfig
    from rich.console import Console
    from torch import nn

USAGE = """\
usage: resnet-summary [--config-dir DIR] [--config-name NAME] [KEY=VALUE ...]

Print the layers of the model resnet-train would build from the same overrides, for one
dummy image of the data's channels and size: output shapes, parameters, multiply-adds.
Reads no data and writes no files.

examples:
  resnet-summary model=resnet50 data=cifar10
  resnet-summary model=d2l_resnet18 data.resize=224 summary.depth=1
  resnet-summary model=resnet18 summary.input_size=224 summary.format=json
  resnet-summary --config-dir mine model=tiny     your own presets, as resnet-train reads them

summary keys:
  summary.depth=N          1: stem, stages, head; 2: + blocks; 3 (default): + their layers
  summary.format=table     table (rich on a terminal, plain text when piped) or json
  summary.input_size=S     image side (default: data.resize, else the dataset's own size)
"""

# Image side of each torchvision dataset as stored; DatasetInfo records channels and classes only.
NATIVE_SIZE = {"fashion_mnist": 28, "mnist": 28, "cifar10": 32, "cifar100": 32}
# An image folder's class count is known only from its folders, which we do not read;
# without model.num_classes we show ImageNet's 1000, build_model's default outside training.
IMAGEFOLDER_CLASSES = 1000
STEM_ROW = "stem"


# ---------------------------------------------------------------- input from the config alone

def data_facts(data: Mapping[str, Any]) -> tuple[int, int, int | None]:
    """(channels, classes, native image side or None) of the configured data, from the
    config and the dataset facts table only (no files are opened)."""
    from .config import ConfigError
    from .data.sources import DATASETS

    name = data["name"]
    if name == "synthetic":
        return int(data["channels"]), int(data["num_classes"]), int(data["image_size"])
    if name == "imagefolder":
        return int(data["channels"]), IMAGEFOLDER_CLASSES, None  # images of any size
    if name in DATASETS:
        info = DATASETS[name]
        return info.channels, info.num_classes, NATIVE_SIZE[name]
    raise ConfigError(f"data.name={name}: choose from {', '.join([*DATASETS, 'imagefolder', 'synthetic'])}")


def input_size(summary: Mapping[str, Any], data: Mapping[str, Any], native: int | None) -> int:
    """The image side: summary.input_size, else data.resize (what training feeds), else native."""
    from .config import ConfigError

    size = summary["input_size"]
    if size is not None and size < 1:
        raise ConfigError(f"summary.input_size={size}: must be >= 1 (or null for the data's size)")
    size = size or data["resize"] or native
    if size is None:
        raise ConfigError(f"data.name={data['name']}: images have no fixed size; "
                          "set summary.input_size or data.resize")
    return int(size)


def build_for_summary(cfg: DictConfig) -> tuple[nn.Module, tuple[int, int, int, int]]:
    """The model resnet-train would build, on the meta device, and its 1 x C x S x S input shape.

    model.in_channels / model.num_classes win over the data's, as in training."""
    import torch
    from omegaconf import OmegaConf

    from .models import ModelSpec, build_model, stage_sizes

    spec = ModelSpec.from_mapping(OmegaConf.to_container(cfg.model, resolve=True))
    channels, classes, native = data_facts(cfg.data)
    channels, classes = spec.in_channels or channels, spec.num_classes or classes
    size = input_size(cfg.summary, cfg.data, native)
    # Validates the spec (one line naming the key), then refuses an input too small for a
    # stage (one line naming the stage), both before anything runs.
    stage_sizes(spec, channels, size)
    with torch.device("meta"):
        model = build_model(spec, channels, classes)
        freeze = list(OmegaConf.select(cfg, "model.freeze") or [])
        if freeze:  # trainable vs non-trainable counts as training would have them
            from .finetune import freeze as freeze_parts

            freeze_parts(model, freeze)
    return model, (1, channels, size, size)


# ---------------------------------------------------------------- the summary itself

def _own_macs(module: nn.Module, output: Any) -> int:
    """Multiply-adds of the module's own op (children excluded); 0 for all but conv/linear."""
    from torch import nn

    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def _first_tensor(output: Any):
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return None


def trace(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """Run one dummy input through the model; for every submodule that ran (by name, in
    registration order): its first output shape and the MACs of its own op over all calls
    (a block's ReLU runs more than once)."""
    import torch

    calls: dict[str, dict[str, Any]] = {}

    def hook(name: str):
        def record(module, inputs, output) -> None:
            out = _first_tensor(output)
            entry = calls.setdefault(name, {"output_shape": None, "own_macs": 0})
            if out is not None:
                if entry["output_shape"] is None:
                    entry["output_shape"] = list(out.shape)
                entry["own_macs"] += _own_macs(module, out)
        return record

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    named = [(name, module) for name, module in model.named_modules() if name]  # "" is the model itself
    handles = [module.register_forward_hook(hook(name)) for name, module in named]
    was_training = model.training
    try:
        model.eval()  # batch norm in training mode refuses a batch of one 1x1 image
        with torch.no_grad():
            model(torch.zeros(input_shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {name: calls[name] for name, _ in named if name in calls}


def _subtree_macs(calls: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """MACs of every module with all its descendants (each call adds to all its ancestors)."""
    totals: dict[str, int] = {}
    for name, call in calls.items():
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            totals[prefix] = totals.get(prefix, 0) + call["own_macs"]
    return totals


def _count(params) -> int:
    return sum(p.numel() for p in params)


def _row(name: str, type_: str, shape, params: int, macs: int, depth: int) -> dict[str, Any]:
    return {"name": name, "type": type_, "output_shape": shape, "params": params, "macs": macs,
            "depth": depth}


def summarize(model: nn.Module, input_shape: tuple[int, ...], depth: int = 3) -> dict[str, Any]:
    """Rows of the model's layers down to `depth` levels, plus totals, as plain data.

    Level 1 is the model's top-level modules, except that the stem's modules (a ResNet's
    `stem_names`: conv1, bn1, relu, maxpool) are grouped under one `stem` row, the way the
    reference prints its first Sequential; they appear below it from level 2 on. A row's
    params and MACs include its children's, so the level-1 rows add up to the totals."""
    calls = trace(model, input_shape)
    macs = _subtree_macs(calls)
    modules = dict(model.named_modules())
    stem = [n for n in getattr(model, "stem_names", ()) if n in calls]

    def level(name: str) -> int:
        top = name.split(".", 1)[0]
        return name.count(".") + 1 + (top in stem)

    rows = []
    for name, call in calls.items():
        if stem and name == stem[0]:
            rows.append(_row(STEM_ROW, "Stem", calls[stem[-1]]["output_shape"],
                             _count(p for n in stem for p in modules[n].parameters()),
                             sum(macs[n] for n in stem), 1))
        if level(name) <= depth:
            module = modules[name]
            rows.append(_row(name, type(module).__name__, call["output_shape"], _count(module.parameters()),
                             macs[name], level(name)))

    params = list(model.parameters())
    return {
        "model": getattr(getattr(model, "spec", None), "name", type(model).__name__),
        "input_shape": list(input_shape),
        "rows": rows,
        "total_params": _count(params),
        "trainable_params": _count(p for p in params if p.requires_grad),
        "total_macs": sum(c["own_macs"] for c in calls.values()),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
    }


# ---------------------------------------------------------------- rendering

COLUMNS = ("Layer", "Type", "Output shape", "Params", "MACs")


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def _cells(row: Mapping[str, Any]) -> list[str]:
    shape = "-" if row["output_shape"] is None else "[" + ", ".join(map(str, row["output_shape"])) + "]"
    indent = "  " * (row["depth"] - 1)  # the tree, which full dotted names alone hide at a glance
    return [indent + row["name"], row["type"], shape, f"{row['params']:,}", f"{row['macs']:,}"]


def _totals(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    total, trainable = summary["total_params"], summary["trainable_params"]
    return [
        ("Total params", f"{total:,}"),
        ("Trainable params", f"{trainable:,}"),
        ("Non-trainable params", f"{total - trainable:,}"),
        ("Total MACs", f"{summary['total_macs']:,} ({_human(summary['total_macs'])})"),
        ("Params size (MB)", f"{summary['param_bytes'] / 1e6:.2f}"),
    ]


def _title(summary: Mapping[str, Any]) -> str:
    return f"{summary['model']}, input {list(summary['input_shape'])}"


def render_text(summary: Mapping[str, Any]) -> str:
    """Plain aligned text (for pipes and files): no escape codes, no wrapping."""
    table = [list(COLUMNS)] + [_cells(r) for r in summary["rows"]]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]

    def fmt(line: list[str]) -> str:
        # Text columns left-aligned, numbers right-aligned.
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))

    rule = "-" * len(fmt(table[0]))
    label = max(len(k) for k, _ in _totals(summary))
    lines = [_title(summary), rule.replace("-", "="), fmt(table[0]), rule, *map(fmt, table[1:]), rule.replace("-", "=")]
    lines += [f"{k + ':':<{label + 1}} {v}" for k, v in _totals(summary)]
    return "\n".join(lines) + "\n"


def render_rich(summary: Mapping[str, Any], console: Console) -> None:
    from rich.table import Table

    table = Table(title=_title(summary), title_justify="left")
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="right" if i >= 3 else "left", no_wrap=i != 1)
    nested = any(row["depth"] > 1 for row in summary["rows"])
    for row in summary["rows"]:  # bold marks the top level when there is a tree below it
        table.add_row(*_cells(row), style="bold" if nested and row["depth"] == 1 else None)
    console.print(table)
    for k, v in _totals(summary):
        console.print(f"[bold]{k}:[/bold] {v}", highlight=False)


def render_json(summary: Mapping[str, Any]) -> str:
    return json.dumps(summary, indent=2) + "\n"


def emit(summary: Mapping[str, Any], fmt: str, console: Console | None = None) -> None:
    """json: only JSON on stdout; table: rich on a terminal, plain text otherwise."""
    from rich.console import Console

    console = console or Console()
    if fmt == "json":
        console.file.write(render_json(summary))
    elif console.is_terminal:
        render_rich(summary, console)
    else:
        console.file.write(render_text(summary))
    console.file.flush()


# ---------------------------------------------------------------- entry point

CONFIG_FLAGS = ("--config-dir", "-cd", "--config-name", "-cn")


def main(argv: list[str] | None = None) -> None:
    from .cli import compose, config_source, split_argv, user_errors
    from .config import ConfigError, check_values

    argv = sys.argv[1:] if argv is None else argv
    flags, overrides = split_argv(argv)
    if any(f in ("-h", "--help") for f in flags):
        print(USAGE, end="")
        return
    with user_errors():
        # Your own presets, as resnet-train reads them (configuration.md): the same two flags
        unknown = [f for f in flags if f.startswith("-") and f.split("=")[0] not in CONFIG_FLAGS]
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown flag; resnet-summary takes key=value overrides, --config-dir "
                              "and --config-name (see resnet-summary --help)")
        name, primary_dir, search = config_source(flags)
        cfg = compose(name, overrides + search, primary_dir=primary_dir)
        check_values(cfg)  # same range checks as resnet-train, summary.depth/format included
        model, shape = build_for_summary(cfg)
        summary = summarize(model, shape, int(cfg.summary.depth))
        emit(summary, cfg.summary.format)  # inside: `resnet-summary | head` is a closed pipe, not a traceback


if __name__ == "__main__":
    main()
