"""Fine-tuning: start from pretrained weights (`model.init_from`), freeze parts of the network
(`model.freeze`), and train the backbone at a lower lr than the classifier
(`model.backbone_lr_scale`). Issue 14.

`init_from` takes a torchvision state_dict file (resnet18-f37072fd.pth, ...), a resnet-cli
checkpoint, or a dict holding a state_dict under "model" or "state_dict". Shapes must match
this model's, with two exceptions that fine-tuning needs: a stem with other input channels
(adapted as timm's `adapt_input_conv` does) and a classifier with another number of classes
(replaced by the new model's own, freshly initialized one).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .checkpoint import exported_format, unpickler_detail
from .models.resnet import ModelConfigError

log = logging.getLogger("resnet_cli")

HEAD = "fc"
# Prefixes that wrappers add to state_dict keys: DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def part_names(num_stages: int) -> list[str]:
    return ["stem"] + [f"layer{i + 1}" for i in range(num_stages)] + [HEAD]


def check(model_cfg: Mapping[str, Any], resuming: bool) -> None:
    """The fine-tuning keys, before anything is loaded (the weights' shapes are checked
    once the model is built)."""
    check_freeze(list(model_cfg.get("freeze") or []), len(model_cfg["layers"]))
    scale = model_cfg.get("backbone_lr_scale")
    if scale is not None and not scale > 0:
        raise ModelConfigError(f"model.backbone_lr_scale={scale}: must be > 0 (or null: the same lr)")
    path = model_cfg.get("init_from")
    if path and not resuming:
        why = _not_a_weights_file(path)
        if why:
            raise ModelConfigError(f"model.init_from={path}: {why}")


def check_freeze(names: list[str], num_stages: int) -> None:
    allowed = part_names(num_stages)
    for name in names:
        if name not in allowed:
            raise ModelConfigError(f"model.freeze=[{', '.join(names)}]: unknown part {name}; "
                                   f"choose from {', '.join(allowed)}")
    if names and set(allowed) <= set(names):
        raise ModelConfigError(f"model.freeze=[{', '.join(names)}]: that is every part, nothing is left to train; "
                               f"leave at least one of {', '.join(allowed)} out")


# ---------------------------------------------------------------- reading weights

def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, what the file was). Tensors and plain containers only (weights_only)."""
    from .checkpoint import FORMAT

    p = Path(path).expanduser()
    why = _not_a_weights_file(path)
    if why:
        raise ModelConfigError(f"model.init_from={path}: {why}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler fails in many ways (even IndexError) on damaged or foreign files
        raise ModelConfigError(f"model.init_from={path}: {_unreadable(e)}") from None
    kind = "state_dict"
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        obj, kind = obj["model"], f"resnet-cli checkpoint, epoch {obj.get('epoch')}"
    elif isinstance(obj, Mapping) and not _is_state_dict(obj):
        inner = next((k for k in ("model", "state_dict") if _is_state_dict(obj.get(k))), None)
        if inner is None:
            raise ModelConfigError(f"model.init_from={path}: holds no state_dict (a dict of tensors, or one "
                                   "under 'model' or 'state_dict')")
        obj, kind = obj[inner], f"state_dict under '{inner}'"
    if not _is_state_dict(obj):
        raise ModelConfigError(f"model.init_from={path}: holds a {type(obj).__name__}, not a state_dict")
    return {_strip(k): v for k, v in obj.items()}, kind


WHAT_TO_GIVE = "give a resnet-cli checkpoint (RUN/checkpoints/best.pt) or a state_dict file"


def _not_a_weights_file(path: str | Path) -> str | None:
    """Why `path` cannot be a weights file, from what it is rather than what torch.load says;
    None when it may be one."""
    p = Path(path).expanduser()
    if p.is_dir():
        best = next((b for b in (p / "checkpoints" / "best.pt", p / "best.pt") if b.is_file()), None)
        if best:
            return f"is a folder, not a file; give the checkpoint in it, {best} (or last.pt beside it)"
        return f"is a folder, not a file; {WHAT_TO_GIVE}"
    if not p.exists():
        return "no such file"
    if not p.is_file():
        return f"is not a regular file; {WHAT_TO_GIVE}"
    if p.stat().st_size == 0:
        return f"is an empty file; {WHAT_TO_GIVE}"
    exported = exported_format(p)
    if exported:
        # torch.load would warn (two lines on stderr) and then fail: TorchScript and torch.export
        # archives hold a compiled program whose weights are not a state_dict.
        return (f"is {exported} (an exported model, as resnet-export writes): a compiled program, not "
                "weights to start from; give the checkpoint it was exported from (RUN/checkpoints/best.pt) "
                "or a state_dict file")
    return None


def _unreadable(e: Exception) -> str:
    """What a torch.load(weights_only=True) failure means for the user, as the checkpoint loader
    (checkpoint.load_checkpoint) words it for resume= and checkpoint=."""
    detail = unpickler_detail(e)
    if "global" in detail.lower():
        return ("holds pickled objects other than tensors and plain data, such as a whole model saved with "
                f"torch.save(model) (refused for safety); {WHAT_TO_GIVE} (torch.save(model.state_dict(), FILE))")
    detail = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
    return f"not a PyTorch weights file, or damaged ({detail[:120]}); {WHAT_TO_GIVE}"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """An RGB stem's filters for `in_channels` inputs (timm's adapt_input_conv): summed for
    one channel (a gray image then gets the response the RGB filters give to that gray in
    all three channels); else repeated and scaled so activations keep their size."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = math.ceil(in_channels / weight.shape[1])
    return weight.repeat(1, repeat, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def stem_conv_key(model: nn.Module) -> str:
    """The state_dict key of the first convolution's weight (the one that sees the image)."""
    name = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    return f"{name}.weight"


def fitted_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> tuple[dict, int, list[str]]:
    """`state` made to fit `model`: (state_dict to load strictly, how many tensors came from
    `state`, what was changed)."""
    own = model.state_dict()
    stem, notes, out = stem_conv_key(model), [], {}
    extra = [k for k in state if k not in own]
    if extra:  # checked first: a missing stage also changes the classifier's input width
        raise ModelConfigError(f"model.init_from={path}: {extra[0]} {tuple(state[extra[0]].shape)} is not in this "
                               f"model ({len(extra)} such keys); is it another architecture?")
    for key, mine in own.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):  # older files predate this buffer
                continue
            raise ModelConfigError(f"model.init_from={path}: has no {key} (this model's {tuple(mine.shape)}); "
                                   "is it another architecture? pick the model preset it was trained as")
        theirs = state[key]
        if theirs.shape == mine.shape:
            out[key] = theirs
        elif key == stem and theirs.ndim == 4 and theirs.shape[0] == mine.shape[0] and theirs.shape[2:] == mine.shape[2:]:
            out[key] = adapt_input_conv(theirs, mine.shape[1])
            how = "summing the RGB filters" if mine.shape[1] == 1 else "repeating and scaling the filters"
            notes.append(f"{key} adapted from {theirs.shape[1]} to {mine.shape[1]} input channel(s) by {how}")
        elif key.split(".")[0] == HEAD and theirs.shape[1:] == mine.shape[1:]:
            if key.endswith("weight"):
                notes.append(f"classifier {HEAD} replaced: {theirs.shape[0]} -> {mine.shape[0]} classes, "
                             "newly initialized")
        else:
            raise ModelConfigError(f"model.init_from={path}: {key} has shape {tuple(theirs.shape)} there but "
                                   f"{tuple(mine.shape)} in this model (only the stem's input channels and the "
                                   "number of classes may differ)")
    return {**own, **out}, len(out), notes


# ---------------------------------------------------------------- freezing and lr

class EvalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that stays in eval mode: a frozen part keeps its running statistics, as the
    frozen backbones of torchvision's detection models do. Same state_dict as BatchNorm2d."""

    def train(self, mode: bool = True) -> "EvalBatchNorm2d":
        return super().train(False)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """torch's SyncBatchNorm.convert_sync_batchnorm, except for frozen BatchNorm: torch's would
    turn an EvalBatchNorm2d into a SyncBatchNorm that trains (batch statistics, updated running
    statistics), so a frozen part would differ from a single-process run. A frozen layer uses
    its running statistics and has nothing to sync."""
    if isinstance(module, EvalBatchNorm2d):
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child)
        if converted is not child:
            module.add_module(name, converted)
    return module


def parts(model: nn.Module) -> dict[str, list[str]]:
    """Part name -> the top-level module names it covers."""
    stages = list(model.stage_names)
    return {"stem": list(model.stem_names), **{s: [s] for s in stages}, HEAD: [HEAD]}


def freeze(model: nn.Module, names: list[str]) -> None:
    check_freeze(names, len(model.stage_names))
    tops = {t for name in names for t in parts(model)[name]}
    for full, module in list(model.named_modules()):
        if full.split(".")[0] not in tops:
            continue
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)
        if type(module) is nn.BatchNorm2d:
            frozen = EvalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats)
            frozen.load_state_dict(module.state_dict())
            frozen.requires_grad_(False)
            parent, _, leaf = full.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, frozen)


def lr_groups(groups: list[dict[str, Any]], model: nn.Module, backbone_lr: float) -> list[dict[str, Any]]:
    """Each param group split in two: the classifier's parameters first (at the optimizer's
    lr, which metrics.jsonl reports), then the backbone's at `backbone_lr`."""
    head = {id(p) for p in getattr(model, HEAD).parameters()}
    heads, backbones = [], []
    for g in groups:
        params = list(g["params"])
        heads.append({**g, "params": [p for p in params if id(p) in head]})
        backbones.append({**g, "params": [p for p in params if id(p) not in head], "lr": backbone_lr})
    return [g for g in heads + backbones if g["params"]]


# ---------------------------------------------------------------- the one call in training

def init_model(model: nn.Module, model_cfg: Mapping[str, Any], resuming: bool = False) -> None:
    """Load `model.init_from` (not when resuming: the checkpoint has the weights), then
    freeze `model.freeze`. Call before moving the model to its device."""
    path = model_cfg.get("init_from")
    names = list(model_cfg.get("freeze") or [])
    notes: list[str] = []
    if path and not resuming:
        state, kind = read_state_dict(path)
        fitted, loaded, notes = fitted_state(model, state, path)
        model.load_state_dict(fitted)
        log.info("init_from %s (%s): %d tensors loaded%s", path, kind, loaded, "".join(f"; {n}" for n in notes))
    if names and not resuming:
        # Legal, but rarely meant: a frozen part that was not loaded keeps its random weights.
        if not path:
            log.warning("model.freeze=[%s] without model.init_from: the frozen parts keep their random initial "
                        "weights", ",".join(names))
        elif HEAD in names and any(n.startswith(f"classifier {HEAD} replaced") for n in notes):
            log.warning("model.freeze: %s was newly initialized (its classes differ from the file's), so frozen it "
                        "stays random; leave it out of model.freeze", HEAD)
    if names:
        freeze(model, names)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        with_bn = " (their BatchNorm statistics too)" if set(names) - {HEAD} else ""
        log.info("frozen: %s%s; %s parameters left to train", ", ".join(names), with_bn, f"{trainable:,}")

