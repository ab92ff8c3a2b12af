"""A generic ResNet built from data (a preset is a handful of keys; see configs/model/).

Top-level names follow torchvision (conv1, bn1, relu, maxpool, layer1..N, avgpool, fc), so
the ImageNet presets load torchvision's state_dicts with strict=True.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ModelConfigError
from .blocks import BLOCKS, PREACT_BLOCKS, NormLayer
from .stems import STEMS

SHORTCUTS = ("projection", "identity", "conv")
INITS = ("kaiming", "xavier")


@dataclass
class ModelSpec:
    """Everything that defines an architecture. Mirrors configs/model/*.yaml."""

    name: str = "custom"
    block: str = "basic"
    layers: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    stem: str = "imagenet"
    stem_width: int | None = None  # None: the first stage's width
    shortcut: str = "projection"
    residual: bool = True  # False: the plain network (same layers, no skips)
    groups: int = 1
    width_per_group: int = 64
    zero_init_residual: bool = False
    init: str = "kaiming"
    conv_bias: bool = False  # the d2l reference keeps PyTorch's default conv biases
    in_channels: int | None = None  # None: from the dataset (3 outside training)
    num_classes: int | None = None  # None: from the dataset (1000 outside training)
    # Fine-tuning (resnet_cli/finetune.py; training only, build_model ignores them)
    init_from: str | None = None  # a torchvision state_dict file or a resnet-cli checkpoint
    freeze: list[str] | None = None  # parts to keep fixed: stem, layer1..layerN, fc
    backbone_lr_scale: float | None = None  # the backbone's lr / the classifier's; None: the same

    def validate(self) -> None:
        def bad(key: str, value: Any, allowed: str) -> ModelConfigError:
            return ModelConfigError(f"model.{key}={value}: {allowed}")

        if self.block not in BLOCKS:
            raise bad("block", self.block, f"unknown block; choose from {', '.join(BLOCKS)}")
        if self.stem not in STEMS:
            raise bad("stem", self.stem, f"unknown stem; choose from {', '.join(STEMS)}")
        if self.shortcut not in SHORTCUTS:
            raise bad("shortcut", self.shortcut, f"unknown shortcut; choose from {', '.join(SHORTCUTS)}")
        if self.init not in INITS:
            raise bad("init", self.init, f"unknown init; choose from {', '.join(INITS)}")
        if not self.layers:
            raise bad("layers", self.layers, "needs at least one stage")
        if len(self.layers) != len(self.widths):
            raise ModelConfigError(
                f"model.layers has {len(self.layers)} stages but model.widths has {len(self.widths)}; "
                "give one width per stage")
        for key in ("layers", "widths"):
            values = getattr(self, key)
            if any(int(v) < 1 for v in values):
                raise bad(key, list(values), "every entry must be >= 1")
        for key in ("groups", "width_per_group", "stem_width", "in_channels", "num_classes"):
            value = getattr(self, key)
            if value is not None and int(value) < 1:
                raise bad(key, value, "must be >= 1")
        if self.groups > 1 or self.width_per_group != 64:
            if self.block in ("basic", "preact_basic"):
                raise ModelConfigError(
                    f"model.groups={self.groups}, model.width_per_group={self.width_per_group}: "
                    f"block={self.block} supports only groups=1, width_per_group=64; use a bottleneck block")
            for w in self.widths:
                if int(w * self.width_per_group / 64.0) < 1:
                    raise ModelConfigError(
                        f"model.widths={list(self.widths)}, model.width_per_group={self.width_per_group}: "
                        f"a bottleneck of width {w} gets {w * self.width_per_group / 64.0:.2g} channels per group; "
                        "each needs >= 1 (widths * width_per_group / 64 >= 1)")
        if self.zero_init_residual and not self.residual:
            # Without the skip, a block whose last BatchNorm starts at zero outputs zero: the
            # net passes nothing forward and only the classifier's bias would learn.
            raise bad("zero_init_residual", True, "needs model.residual=true (a plain net would output zeros)")
        if self.stem == "deep" and int(self.stem_width or self.widths[0]) < 2:
            key, value = ("stem_width", self.stem_width) if self.stem_width else ("widths", list(self.widths))
            raise bad(key, value, "the stem's width must be >= 2 for stem=deep (its first convs have half of it)")
        if self.shortcut == "identity":
            expansion = BLOCKS[self.block].expansion
            chans = [self.stem_width or self.widths[0]] + [w * expansion for w in self.widths]
            if any(b < a for a, b in zip(chans, chans[1:])):
                raise bad("shortcut", "identity", "zero-padding cannot reduce channels; use projection")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelConfigError(f"model.{unknown[0]}: unknown key; known keys: {', '.join(sorted(known))}")
        spec = cls(**dict(data))
        spec.layers = [int(v) for v in spec.layers]  # also turns OmegaConf ListConfig into a list
        spec.widths = [int(v) for v in spec.widths]
        return spec


def make_stage(block: type[nn.Module], cin: int, planes: int, blocks: int, stride: int,
               **block_kwargs: Any) -> tuple[nn.Sequential, int]:
    """One stage: the first block changes stride/width, the rest keep them."""
    out = planes * block.expansion
    mods = [block(cin, planes, stride, **block_kwargs)]
    mods += [block(out, planes, 1, **block_kwargs) for _ in range(blocks - 1)]
    return nn.Sequential(*mods), out


class ResNet(nn.Module):
    def __init__(self, spec: ModelSpec, in_channels: int, num_classes: int,
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        spec.validate()
        self.spec = spec
        preact = spec.block in PREACT_BLOCKS
        block = BLOCKS[spec.block]
        stem_width = spec.stem_width or spec.widths[0]
        stem, cin, _ = STEMS[spec.stem](in_channels, stem_width, norm_layer, norm=not preact,
                                        bias=spec.conv_bias)
        for name, module in stem.items():
            self.add_module(name, module)
        self.stem_names = tuple(stem)

        kwargs = dict(norm=norm_layer, shortcut=spec.shortcut, residual=spec.residual,
                      groups=spec.groups, width_per_group=spec.width_per_group, bias=spec.conv_bias)
        self.stage_names = []
        for i, (n, width) in enumerate(zip(spec.layers, spec.widths)):
            stage, cin = make_stage(block, cin, width, n, 1 if i == 0 else 2, **kwargs)
            self.add_module(f"layer{i + 1}", stage)
            self.stage_names.append(f"layer{i + 1}")

        # Pre-activation nets end on un-normalized features: one final BN-ReLU (He et al. 2016).
        self.post_norm = norm_layer(cin) if preact else None
        self.post_relu = nn.ReLU(inplace=True) if preact else None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, num_classes)
        self.num_features = cin
        self._init_weights(spec.init, spec.zero_init_residual)

    def _init_weights(self, init: str, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if init == "xavier":
                    nn.init.xavier_uniform_(m.weight)
                else:  # torchvision's choice, He et al. (2015) "Delving deep into rectifiers"
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear) and init == "xavier":
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each block starts as the identity (Goyal et al. 2017, "Accurate, Large Minibatch SGD").
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.stem_names:
            x = getattr(self, name)(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        if self.post_norm is not None:
            x = self.post_relu(self.post_norm(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.avgpool(self.forward_features(x))))


def stage_sizes(spec: ModelSpec, in_channels: int, size: int) -> list[tuple[str, tuple[int, ...]]]:
    """Output shape (1 x C x H x W) of the stem and of every stage, by convolution arithmetic.

    Every conv and pool here pads so that a stride-s layer maps n pixels to ceil(n / s):
    an image of any size >= 1 keeps at least 1x1 through every stage (a 1x1 map is still
    computed correctly, just with little to see). Raises ModelConfigError for sizes below 1."""
    spec.validate()
    if size < 1:
        raise ModelConfigError(f"input size {size}: the stem's output would be empty; use a size >= 1")
    _, cin, stride = STEMS[spec.stem](in_channels, spec.stem_width or spec.widths[0], lambda c: nn.Identity(),
                                     norm=False)
    side = size
    while stride > 1:  # the stems downsample in steps of 2
        side, stride = -(-side // 2), stride // 2
    shapes = [("stem", (1, cin, side, side))]
    expansion = BLOCKS[spec.block].expansion
    for i, width in enumerate(spec.widths):
        if i > 0:
            side = -(-side // 2)
        shapes.append((f"layer{i + 1}", (1, width * expansion, side, side)))
    return shapes
