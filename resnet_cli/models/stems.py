"""Stems: what runs before the first stage.

Each builder returns named modules plus its output channels and total stride; the ResNet
registers them at top level so that names match torchvision (conv1, bn1, relu, maxpool).
`norm=False` is for pre-activation nets, whose first block normalizes its own input.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .blocks import NormLayer


def _post(width: int, norm_layer: NormLayer, norm: bool) -> list[tuple[str, nn.Module]]:
    return [("bn1", norm_layer(width)), ("relu", nn.ReLU(inplace=True))] if norm else []


def imagenet_stem(cin: int, width: int, norm_layer: NormLayer, norm: bool = True, bias: bool = False):
    layers = [("conv1", nn.Conv2d(cin, width, 7, stride=2, padding=3, bias=bias))]
    layers += _post(width, norm_layer, norm)
    layers += [("maxpool", nn.MaxPool2d(3, stride=2, padding=1))]
    return OrderedDict(layers), width, 4


def d2l_stem(cin: int, width: int, norm_layer: NormLayer, norm: bool = True, bias: bool = True):
    # The reference's b1: the ImageNet stem, but its conv keeps PyTorch's default bias.
    return imagenet_stem(cin, width, norm_layer, norm, bias=True)


def cifar_stem(cin: int, width: int, norm_layer: NormLayer, norm: bool = True, bias: bool = False):
    # Small images (32x32 and below) cannot afford the 4x early downsampling.
    layers = [("conv1", nn.Conv2d(cin, width, 3, stride=1, padding=1, bias=bias))]
    layers += _post(width, norm_layer, norm)
    return OrderedDict(layers), width, 1


def deep_stem(cin: int, width: int, norm_layer: NormLayer, norm: bool = True, bias: bool = False):
    # Three 3x3 convs in place of the 7x7 ("ResNet-C" of Bag of Tricks, He et al. 2019).
    mid = width // 2
    conv1 = nn.Sequential(
        nn.Conv2d(cin, mid, 3, stride=2, padding=1, bias=bias), norm_layer(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, 3, stride=1, padding=1, bias=bias), norm_layer(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, width, 3, stride=1, padding=1, bias=bias),
    )
    layers = [("conv1", conv1)] + _post(width, norm_layer, norm)
    layers += [("maxpool", nn.MaxPool2d(3, stride=2, padding=1))]
    return OrderedDict(layers), width, 4


STEMS = {"imagenet": imagenet_stem, "cifar": cifar_stem, "deep": deep_stem, "d2l": d2l_stem}
