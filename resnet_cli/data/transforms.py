"""Preprocessing, twice: per batch on the device (the fast path) and per sample with
torchvision transforms (the DataLoader path). Both apply the same steps in the same order:
random crop with zero padding -> horizontal flip -> resize (bilinear) -> [0, 1] floats ->
normalize -> random erasing. Tests check that the two agree, and that each random step
gives the same output from the same random draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
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
    # Random erasing (Zhong et al. 2020), torchvision's defaults; 0 turns it off.
    erase_prob: float = 0.0
    erase_scale: tuple[float, float] = (0.02, 0.33)
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    erase_value: float = 0.0

    def as_dict(self) -> dict:
        return {"channels": self.channels, "size": self.size,
                "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None,
                "augment": self.augment, "hflip": self.hflip, "crop_padding": self.crop_padding,
                "erase_prob": self.erase_prob, "erase_scale": list(self.erase_scale),
                "erase_ratio": list(self.erase_ratio), "erase_value": self.erase_value}


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


# torchvision's RandomErasing tries this many boxes and erases nothing if none fits.
ERASE_ATTEMPTS = 10


def erase_draws(n: int, gen: torch.Generator | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """The uniform numbers that decide n erasures: one for whether, four per attempt.
    One draw of n rows equals n draws of one row from the same generator, which is what
    lets the per-sample path be checked against the batched one."""
    return torch.rand(n, 1 + 4 * ERASE_ATTEMPTS, device=device, generator=gen)


def erase_boxes(u: torch.Tensor, h: int, w: int, prob: float, scale: Sequence[float],
                ratio: Sequence[float]) -> torch.Tensor:
    """n x 4 (top, left, height, width) boxes from erase_draws; height 0 erases nothing.
    torchvision's RandomErasing, vectorized: the first of the attempts whose box fits,
    area a uniform fraction in `scale` of the image's, aspect ratio log-uniform in `ratio`."""
    # float64 so that the batch and per-sample paths draw the same boxes; MPS has no float64
    u = u.cpu().double() if u.device.type == "mps" else u.double()
    attempts = u[:, 1:].view(-1, ERASE_ATTEMPTS, 4)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * attempts[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * attempts[..., 1])
    bh = torch.sqrt(area * aspect).round().long()
    bw = torch.sqrt(area / aspect).round().long()
    fits = (bh < h) & (bw < w)
    top = (attempts[..., 2] * (h - bh + 1)).floor().long()
    left = (attempts[..., 3] * (w - bw + 1)).floor().long()
    first = fits.long().argmax(dim=1, keepdim=True)  # the first fitting attempt (0 if none fits)
    on = (u[:, 0] < prob) & fits.any(dim=1)
    box = torch.stack([top, left, bh, bw], dim=2).gather(1, first[..., None].expand(-1, 1, 4)).squeeze(1)
    box[:, 2:] *= on[:, None]
    return box


def erase(x: torch.Tensor, boxes: torch.Tensor, value: float) -> torch.Tensor:
    """Set each image's box (rows top..top+height, cols left..left+width) to value."""
    rows = torch.arange(x.shape[-2], device=x.device)
    cols = torch.arange(x.shape[-1], device=x.device)
    top, left, bh, bw = boxes.to(x.device).unbind(1)
    in_rows = (rows >= top[:, None]) & (rows < (top + bh)[:, None])  # n x h
    in_cols = (cols >= left[:, None]) & (cols < (left + bw)[:, None])  # n x w
    mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return x.masked_fill(mask, value)


def random_erase(x: torch.Tensor, prep: Preprocess, gen: torch.Generator | None) -> torch.Tensor:
    boxes = erase_boxes(erase_draws(x.shape[0], gen, x.device), x.shape[-2], x.shape[-1], prep.erase_prob,
                        prep.erase_scale, prep.erase_ratio)
    return erase(x, boxes, prep.erase_value)


class SampleErase:
    """random_erase for one C x H x W image (the DataLoader path), with torchvision's erase.
    Draws from `gen`, or from the global RNG that DataLoader seeds in each worker."""

    def __init__(self, prep: Preprocess, gen: torch.Generator | None = None):
        self.prep, self.gen = prep, gen

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        p = self.prep
        top, left, bh, bw = erase_boxes(erase_draws(1, self.gen), img.shape[-2], img.shape[-1], p.erase_prob,
                                        p.erase_scale, p.erase_ratio)[0].tolist()
        if bh == 0:
            return img
        return TF.erase(img, top, left, bh, bw, torch.tensor(p.erase_value, dtype=img.dtype))


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    # antialias matters only when shrinking; it then matches PIL's (torchvision's) resize.
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < min(x.shape[-2:]))


def _channel_tensor(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return _on_device(tuple(values), like.dtype, like.device)


@lru_cache(maxsize=32)
def _on_device(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Made once per device: torch.tensor(list, device=cuda) is a blocking copy that waits for
    # the GPU's whole queue, which would stall every training batch and every prefetch.
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


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
    # Last, on normalized input, as torchvision documents it: value 0 is the mean image.
    if train and prep.augment and prep.erase_prob > 0:
        x = random_erase(x, prep, gen)
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
    if train and prep.augment and prep.erase_prob > 0:
        steps.append(SampleErase(prep))
    return v2.Compose(steps)
