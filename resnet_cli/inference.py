"""What `resnet-eval`, `resnet-predict` and `resnet-export` share: reading their `key=value`
arguments, and turning a checkpoint back into an eval-mode model plus its preprocessing.

A checkpoint carries everything needed (architecture, weights, the training config, the
preprocessing facts and class names), so none of these commands asks the user to repeat how
the model was trained.
"""

from __future__ import annotations

import difflib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .checkpoint import CheckpointError
from .config import ConfigError
from .data.transforms import Preprocess
from .overrides import override_key

USAGE_EXIT = 0


# ---------------------------------------------------------------- arguments

@dataclass
class Args:
    """A command's arguments: the composed config (plain dict) and the keys the user set."""

    cfg: dict[str, Any]
    given: set[str]  # keys named on the command line ("data" for a data=<preset> choice)


def parse_args(name: str, schema: type, argv: list[str], path_keys: tuple[str, ...], usage: str) -> Args:
    """`key=value` arguments composed with configs/<name>.yaml over `schema` (typed, so a
    misspelled key or a wrong type is one line naming the key).

    Values of `path_keys` are taken literally, not through Hydra's override grammar: file
    names may hold spaces, commas, brackets or '=' that the grammar would reject or reparse."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage.strip())
        sys.exit(USAGE_EXIT)
    flags = [a for a in argv if a.startswith("-")]
    if flags:
        raise ConfigError(f"{flags[0]}: unknown option; arguments are key=value (see --help)")
    raw: dict[str, str] = {}
    overrides: list[str] = []
    for a in argv:
        if "=" not in a:
            raise ConfigError(f"{a}: not a key=value argument (see --help)")
        key, value = a.split("=", 1)
        if key in path_keys:
            raw[key] = value
        else:
            overrides.append(a)
    cfg = compose(name, schema, overrides)
    for key in path_keys:
        if key in raw:
            cfg[key] = raw[key] or None
    return Args(cfg, {override_key(o) for o in overrides} | set(raw))


def compose(name: str, schema: type, overrides: list[str]) -> dict[str, Any]:
    """configs/<name>.yaml with the overrides, as a resolved plain dict. Hydra's compose API:
    no run folder, no logging setup, nothing written."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from .cli import hydra_error_line
    from .paths import config_dir

    ConfigStore.instance().store(name=f"{name}_schema", node=schema)
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=name):
        try:
            cfg = hydra_compose(config_name=name, overrides=overrides)
            out = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except Exception as e:  # Hydra and OmegaConf raise many types; all are bad input here
            if full_error:
                raise
            raise ConfigError(_unknown_key_line(e, schema) or hydra_error_line(e, overrides)) from None
    out.pop("hydra", None)
    return out  # type: ignore[return-value]


def _unknown_key_line(e: BaseException, schema: type) -> str | None:
    """'key: unknown key; did you mean ...?' from this command's schema (cli's version hints
    with resnet-train's keys)."""
    cause = e.__cause__ or e.__context__ or e
    key = getattr(cause, "full_key", None)
    if not key or not ("not in struct" in str(cause) or "Could not override" in str(e)):
        return None
    node: Any = schema
    *parents, leaf = key.split(".")
    for p in parents:
        sub = {f.name: f for f in fields(node)}.get(p) if is_dataclass(node) else None
        if sub is None:
            return f"{key}: unknown key"
        node = _field_type(node, sub)
    if not is_dataclass(node):
        return f"{key}: unknown key"
    keys = [f.name for f in fields(node)]
    close = difflib.get_close_matches(leaf, keys, n=1)
    where = ".".join(parents)
    hint = f"; did you mean {'.'.join(parents + close)}?" if close else ""
    return f"{key}: unknown key{hint} (keys{' of ' + where if where else ''}: {', '.join(keys)})"


def _field_type(owner: type, f) -> Any:
    import typing

    return typing.get_type_hints(owner).get(f.name)


def require(cfg: Mapping[str, Any], key: str, example: str) -> Any:
    value = cfg.get(key)
    if value in (None, ""):
        raise ConfigError(f"{key}: required; e.g. {example}")
    return value


def as_device(spec: str) -> torch.device:
    """resolve_device, with messages naming this command's `device=` key."""
    from .engine import resolve_device

    try:
        return resolve_device(str(spec))
    except ConfigError as e:
        raise ConfigError(str(e).replace("trainer.device=", "device=", 1)) from None


def as_precision(spec: str | None, ckpt_cfg: Mapping[str, Any], device: torch.device) -> str:
    """The training run's precision policy (`auto` by default) applied on this device, unless
    `precision=` says otherwise: evaluation then computes what training's evaluation did."""
    from .config import PRECISIONS
    from .engine import resolve_precision

    value = spec if spec is not None else ckpt_cfg.get("trainer", {}).get("precision", "auto")
    if value not in PRECISIONS:
        raise ConfigError(f"precision={value}: choose from {', '.join(PRECISIONS)}")
    try:
        return resolve_precision(value, device)
    except ConfigError as e:
        raise ConfigError(str(e).replace("trainer.precision=", "precision=", 1)) from None


# ---------------------------------------------------------------- checkpoints

def resolve_checkpoint(target: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder (its checkpoints/best.pt, else last.pt)."""
    p = Path(target).expanduser()
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            for folder in (p / "checkpoints", p):  # the run folder, or its checkpoints/ itself
                if (folder / name).is_file():
                    return folder / name
        raise CheckpointError(f"checkpoint={target}: a folder without checkpoints/best.pt or last.pt "
                              "(give a .pt file or a resnet-train run folder)")
    return p


def run_dir_of(ckpt_path: Path) -> Path:
    """RUN/checkpoints/x.pt -> RUN; any other file -> its folder."""
    ckpt_path = ckpt_path.resolve()
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent


def eval_preprocess(ckpt: Mapping[str, Any], path: Path) -> Preprocess:
    """The checkpoint's preprocessing without augmentation (what evaluation applies)."""
    d = ckpt.get("preprocess")
    if not isinstance(d, Mapping):
        raise CheckpointError(f"checkpoint {path}: incomplete (no 'preprocess')")
    tup = (lambda v: tuple(float(x) for x in v) if v is not None else None)
    return Preprocess(channels=int(d["channels"]), size=int(d["size"]), mean=tup(d.get("mean")),
                      std=tup(d.get("std")), augment=False, hflip=bool(d.get("hflip", False)),
                      crop_padding=int(d.get("crop_padding", 0)))


@dataclass
class Loaded:
    """A checkpoint made usable: the eval-mode model and the facts around it."""

    model: nn.Module
    prep: Preprocess
    class_names: list[str]
    num_classes: int
    in_channels: int
    model_name: str
    config: dict[str, Any]
    path: Path
    epoch: int  # epochs done
    step: int = 0  # steps into the next epoch (a mid-epoch last.pt)

    def when(self) -> str:
        """`epoch 2`, or `epoch 3, step 40` for a mid-epoch checkpoint: as the stop message
        of an interrupted run (`stopped at epoch 3, step 40/64`) and its resume say it."""
        return f"epoch {self.epoch + 1}, step {self.step}" if self.step else f"epoch {self.epoch}"


def load_model(ckpt: Mapping[str, Any], path: Path, device: torch.device | str = "cpu",
               channels_last: bool = False) -> Loaded:
    """Rebuild the network as training did (channels and classes from the model config, else
    from the data) and load the weights strictly: a checkpoint that does not fit is refused."""
    from .models import build_model
    from .models.resnet import ModelSpec

    cfg = ckpt["config"]
    prep = eval_preprocess(ckpt, path)
    spec = ModelSpec.from_mapping(cfg["model"])
    in_ch = int(spec.in_channels or prep.channels)
    ncls = int(spec.num_classes or ckpt.get("num_classes") or len(ckpt.get("class_names") or []))
    if not ncls:
        raise CheckpointError(f"checkpoint {path}: incomplete (no 'num_classes')")
    model = build_model(spec, in_channels=in_ch, num_classes=ncls)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        # torch's first line only says "Error(s) in loading state_dict for ResNet:"; the next says what
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
        raise CheckpointError(f"checkpoint {path}: weights do not fit its model config ({detail[:160]})") from None
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    names = [str(n) for n in (ckpt.get("class_names") or [])]
    if len(names) != ncls:  # a model head wider than the data's classes: name what we can
        names = (names + [f"class_{i}" for i in range(len(names), ncls)])[:ncls]
    return Loaded(model, prep, names, ncls, in_ch, spec.name, cfg, path, int(ckpt.get("epoch", 0)),
                  int(ckpt.get("step", 0) or 0))


def open_checkpoint(target: str | os.PathLike, device: torch.device | str = "cpu",
                    channels_last: bool = False) -> Loaded:
    from .checkpoint import load_checkpoint

    path = resolve_checkpoint(target)
    return load_model(load_checkpoint(path, map_location="cpu"), path, device, channels_last)


# ---------------------------------------------------------------- output

def check_output_folder(key: str, value: Any, folder: Path) -> None:
    """Refuse an output folder that cannot be written before any work is done."""
    from .checkpoint import writable_folder_error

    why = writable_folder_error(folder)
    if why:
        raise ConfigError(f"{key}={value}: cannot write there ({why}); choose a writable folder")


@contextmanager
def output_errors(where: Path) -> Iterator[None]:
    """A failed write (disk full, folder gone) -> OutputError: one line, exit code 1. Files
    are written atomically, so the one that failed is as it was (issue 11, item 8)."""
    from .checkpoint import OutputError

    try:
        yield
    except OSError as e:
        raise OutputError(f"cannot write {e.filename or where}: {e.strerror or e}; "
                          "files written before are intact") from None



def console(stream=None):
    """A rich console: styled on a terminal; when piped, plain and never wrapped."""
    from rich.console import Console

    stream = stream or sys.stdout
    if stream.isatty():
        return Console(file=stream)
    return Console(file=stream, width=10_000, no_color=True, highlight=False, soft_wrap=True)


def table(stream, title: str | None = None, **kwargs):
    """A rich Table; box-drawn on a terminal, whitespace-aligned columns when piped."""
    from rich import box
    from rich.table import Table

    if stream.isatty():
        return Table(title=title, box=box.SIMPLE_HEAD, **kwargs)
    return Table(title=None, box=None, show_edge=False, pad_edge=False, **kwargs)


__all__ = ["Args", "Loaded", "as_device", "as_precision", "check_output_folder", "compose", "console", "eval_preprocess", "load_model",
           "open_checkpoint", "output_errors", "parse_args", "require", "resolve_checkpoint", "run_dir_of", "table"]
