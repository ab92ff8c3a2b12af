"""Residual blocks: H(x) = F(x) + shortcut(x).

Names of submodules follow torchvision (conv1/bn1/.../downsample) so that presets load
torchvision's state_dicts unchanged. Every block takes `residual`: with False it computes
only F(x), which gives the *plain* network of He et al. (2015) with the same layers.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

NormLayer = Callable[[int], nn.Module]


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=bias)


def conv1x1(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=bias)


class PadShortcut(nn.Module):
    """Option A of He et al. (2015): subsample by striding and zero-pad the new channels.

    Parameter-free, which is how the CIFAR ResNets reach the paper's counts (0.27M for
    ResNet-20)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


def make_shortcut(kind: str, cin: int, cout: int, stride: int, norm: NormLayer, bias: bool) -> nn.Module | None:
    """None where shapes already match: the identity needs no module."""
    if cin == cout and stride == 1:
        return None
    if kind == "projection":
        return nn.Sequential(conv1x1(cin, cout, stride, bias=bias), norm(cout))
    if kind == "conv":  # the d2l reference: a bare 1x1 conv, no norm after it
        return nn.Sequential(conv1x1(cin, cout, stride, bias=bias))
    if kind == "identity":
        if cout < cin:
            raise ValueError(f"shortcut=identity cannot reduce channels ({cin} -> {cout}); use projection")
        return PadShortcut(cin, cout, stride)
    raise ValueError(f"unknown shortcut {kind!r}")


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, *, norm: NormLayer = nn.BatchNorm2d,
                 shortcut: str = "projection", residual: bool = True, groups: int = 1,
                 width_per_group: int = 64, bias: bool = False):
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError("block=basic supports only groups=1 and width_per_group=64")
        cout = planes * self.expansion
        self.conv1 = conv3x3(cin, planes, stride, bias=bias)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, cout, bias=bias)
        self.bn2 = norm(cout)
        self.downsample = make_shortcut(shortcut, cin, cout, stride, norm, bias) if residual else None
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (ResNet-50+). Stride sits on the 3x3 conv
    ("ResNet v1.5", as torchvision), which is what its ImageNet weights expect."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, *, norm: NormLayer = nn.BatchNorm2d,
                 shortcut: str = "projection", residual: bool = True, groups: int = 1,
                 width_per_group: int = 64, bias: bool = False):
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        cout = planes * self.expansion
        self.conv1 = conv1x1(cin, width, bias=bias)
        self.bn1 = norm(width)
        self.conv2 = conv3x3(width, width, stride, groups, bias=bias)
        self.bn2 = norm(width)
        self.conv3 = conv1x1(width, cout, bias=bias)
        self.bn3 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(shortcut, cin, cout, stride, norm, bias) if residual else None
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)


class PreActBasicBlock(nn.Module):
    """BN -> ReLU -> conv, twice; the skip adds the raw input (He et al. 2016, "Identity
    Mappings in Deep Residual Networks"), so nothing sits on the identity path."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, *, norm: NormLayer = nn.BatchNorm2d,
                 shortcut: str = "projection", residual: bool = True, groups: int = 1,
                 width_per_group: int = 64, bias: bool = False):
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError("block=preact_basic supports only groups=1 and width_per_group=64")
        cout = planes * self.expansion
        self.bn1 = norm(cin)
        self.relu = nn.ReLU(inplace=False)  # the pre-activation must not overwrite x
        self.conv1 = conv3x3(cin, planes, stride, bias=bias)
        self.bn2 = norm(planes)
        self.conv2 = conv3x3(planes, cout, bias=bias)
        # Pre-activation shortcuts are bare convs: the norm comes before, on the shared path.
        kind = "conv" if shortcut == "projection" else shortcut
        self.downsample = make_shortcut(kind, cin, cout, stride, norm, bias) if residual else None
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(pre))
        return out

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, *, norm: NormLayer = nn.BatchNorm2d,
                 shortcut: str = "projection", residual: bool = True, groups: int = 1,
                 width_per_group: int = 64, bias: bool = False):
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        cout = planes * self.expansion
        self.bn1 = norm(cin)
        self.relu = nn.ReLU(inplace=False)
        self.conv1 = conv1x1(cin, width, bias=bias)
        self.bn2 = norm(width)
        self.conv2 = conv3x3(width, width, stride, groups, bias=bias)
        self.bn3 = norm(width)
        self.conv3 = conv1x1(width, cout, bias=bias)
        kind = "conv" if shortcut == "projection" else shortcut
        self.downsample = make_shortcut(kind, cin, cout, stride, norm, bias) if residual else None
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(pre))
        return out

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)


BLOCKS: dict[str, type[nn.Module]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
    "preact_basic": PreActBasicBlock,
    "preact_bottleneck": PreActBottleneck,
}
PREACT_BLOCKS = ("preact_basic", "preact_bottleneck")
