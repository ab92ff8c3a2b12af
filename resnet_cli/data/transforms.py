"""Preprocessing, twice: per batch on the device (the fast path) and per sample with
torchvision transforms (the DataLoader path). Both apply the same steps in the same order:
random crop with zero padding -> horizontal flip -> resize (bilinear) -> [0, 1] floats ->
normalize. Tests check that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Preprocess:
    """Everything needed to turn stored images into network input (kept in checkpoints so
    that evaluation, prediction and export preprocess exactly like training)."""

    channels: int
    size: int  # output side length (after resize)
    mean: tuple[float, ...] | None  # None: no normalization
    std: tuple[float, ...] | None
    augment: bool = False
    hflip: bool = False
    crop_padding: int = 4

    def as_dict(self) -> dict:
        return {"channels": self.channels, "size": self.size,
                "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None,
                "augment": self.augment, "hflip": self.hflip, "crop_padding": self.crop_padding}


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator | None) -> torch.Tensor:
    """Per-image random crop of a zero-padded batch back to its own size, as one gather."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), device=x.device, generator=gen)
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # n x h
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # n x w
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # n x h x w x c
    return out.permute(0, 3, 1, 2)


def random_hflip(x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    # antialias matters only when shrinking; it then matches PIL's (torchvision's) resize.
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < min(x.shape[-2:]))


def _channel_tensor(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(values), dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def device_batch(images_u8: torch.Tensor, prep: Preprocess, train: bool,
                 gen: torch.Generator | None = None) -> torch.Tensor:
    """uint8 N x C x H x W (on any device) -> float32 network input on the same device."""
    x = images_u8.float().div_(255)
    if train and prep.augment:
        if prep.crop_padding:
            x = random_crop(x, prep.crop_padding, gen)
        if prep.hflip:
            x = random_hflip(x, gen)
    x = resize(x, prep.size)
    if prep.mean is not None:
        x = (x - _channel_tensor(prep.mean, x)) / _channel_tensor(prep.std, x)
    return x


def sample_transform(prep: Preprocess, train: bool, native_size: int | None):
    """The same steps with torchvision.transforms.v2 on one PIL image or uint8 tensor."""
    from torchvision.transforms import v2

    steps: list = [v2.ToImage()]
    if prep.channels == 1:
        steps.append(v2.Grayscale(1))
    elif prep.channels == 3:
        steps.append(v2.RGB())
    if native_size is None:  # images of any size (an image folder): bring them to the size first
        steps.append(v2.Resize((prep.size, prep.size), antialias=True))
    if train and prep.augment:
        side = native_size or prep.size
        if prep.crop_padding:
            steps.append(v2.RandomCrop(side, padding=prep.crop_padding))
        if prep.hflip:
            steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Resize((prep.size, prep.size), antialias=True)]
    if prep.mean is not None:
        steps.append(v2.Normalize(list(prep.mean), list(prep.std)))
    return v2.Compose(steps)
