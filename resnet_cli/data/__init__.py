"""Data: `load_data(data_cfg, ...)` returns train/validation/test batch sources and dataset facts."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import Subset

from ..errors import first_line
from .batches import DeviceBatches, EpochOrder, LoaderBatches, default_workers
from .images import image_loader
from .sources import DATASETS, DataError, as_uint8_nchw, check_available, open_torchvision, synthetic
from .transforms import Preprocess, device_batch, sample_transform

__all__ = ["Data", "DataError", "Preprocess", "check_available", "device_batch", "holdout", "load_data",
           "sample_transform"]

IN_MEMORY = ("fashion_mnist", "mnist", "cifar10", "cifar100", "synthetic")

# The validation split's own seed, not the run's: every seed of a sweep must be scored on the
# same held-out images, or seed-to-seed spread would mix model and split variance (issue 13).
VAL_SPLIT_SEED = 13


@dataclass
class Data:
    train: DeviceBatches | LoaderBatches
    test: DeviceBatches | LoaderBatches
    prep: Preprocess  # training preprocessing; evaluation is the same without augmentation
    num_classes: int
    class_names: list[str]
    num_train: int  # over all ranks, without the validation images
    num_test: int
    pipeline: str  # "memory" or "loader"
    val: DeviceBatches | LoaderBatches | None = None  # data.val_size images held out of train
    num_val: int = 0


def holdout(n: int, val_size: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(train, validation) indices into n training images; the split depends only on n and
    val_size. Training indices keep their order, so without a split nothing changes."""
    if not val_size:
        return torch.arange(n), None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    return order[val_size:].sort().values, order[:val_size].sort().values


def _limit(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


def _spread(n: int, k: int) -> torch.Tensor:
    """k of n image-folder indices, spread over the whole folder with a fixed seed: ImageFolder
    lists images class by class, so the first k would be one class."""
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))[:k].sort().values


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float().div_(255)
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).tolist())


def resolve_pipeline(cfg: Mapping[str, Any]) -> str:
    """data.pipeline with auto decided: "memory" for the datasets held in memory, else "loader"."""
    pipeline = cfg.get("pipeline", "auto")
    if pipeline == "auto":
        pipeline = "memory" if cfg["name"] in IN_MEMORY else "loader"
    return pipeline


def load_data(cfg: Mapping[str, Any], batch_size: int, eval_batch_size: int, seed: int,
              device: torch.device, rank: int = 0, world: int = 1) -> Data:
    name = cfg["name"]
    pipeline = resolve_pipeline(cfg)
    if name == "imagefolder" and pipeline == "memory":
        raise DataError("data.pipeline=memory: not available for imagefolder (images of any size); use loader")
    workers = cfg.get("num_workers")
    workers = default_workers() if workers is None else int(workers)

    tv_train = tv_test = None
    if name == "synthetic":
        size, ch, ncls = int(cfg["image_size"]), int(cfg["channels"]), int(cfg["num_classes"])
        n_tr = int(cfg["train_size"])
        # One draw for both splits, so that they share the class patterns.
        all_x, all_y = synthetic(n_tr + int(cfg["test_size"]), ch, size, ncls, seed=1)
        tr_x, tr_y, te_x, te_y = all_x[:n_tr], all_y[:n_tr], all_x[n_tr:], all_y[n_tr:]
        class_names = [f"class_{i}" for i in range(ncls)]
        native: int | None = size
    elif name == "imagefolder":
        tv_train, tv_test, class_names, ch = _image_folders(cfg)
        native, ncls = None, len(class_names)
    else:
        tv_train, tv_test = open_torchvision(name, cfg["root"], bool(cfg.get("download", True)), cfg.get("cache_dir"))
        tr_x, tr_y = as_uint8_nchw(tv_train)
        te_x, te_y = as_uint8_nchw(tv_test)
        class_names = list(tv_train.classes)
        ch, ncls, native = DATASETS[name].channels, len(class_names), tr_x.shape[-1]

    n_pool = _limit(len(tv_train) if name == "imagefolder" else len(tr_x), cfg.get("limit_train"))
    n_test = _limit(len(tv_test) if name == "imagefolder" else len(te_x), cfg.get("limit_test"))
    val_size = cfg.get("val_size")
    if val_size and n_pool - val_size < batch_size:
        raise DataError(f"data.val_size={val_size}: leaves {n_pool - val_size} of {n_pool} training images, "
                        f"less than one batch (batch_size={batch_size}); hold out fewer")
    train_idx, val_idx = holdout(n_pool, val_size)
    n_train, n_val = len(train_idx), 0 if val_idx is None else len(val_idx)
    if name == "imagefolder":  # positions in the limited pool -> indices into the folder
        pool = _spread(len(tv_train), n_pool)
        train_idx, val_idx = pool[train_idx], None if val_idx is None else pool[val_idx]
        test_idx = _spread(len(tv_test), n_test)
    else:
        test_idx = torch.arange(n_test)
        pool_x, pool_y = tr_x[:n_pool], tr_y[:n_pool]
        tr_x, tr_y = (pool_x, pool_y) if val_idx is None else (pool_x[train_idx], pool_y[train_idx])
        te_x, te_y = te_x[:n_test], te_y[:n_test]

    mean, std = cfg.get("mean"), cfg.get("std")
    if cfg.get("normalize", True):
        if mean is None or std is None:
            if name == "imagefolder":
                raise DataError("data.mean/data.std: set them for imagefolder (e.g. ImageNet's) or data.normalize=false")
            mean, std = _stats(tr_x)
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != ch or len(std) != ch:
            raise DataError(f"data.mean/data.std: need {ch} values (one per channel), got {len(mean)}/{len(std)}")
    else:
        mean = std = None
    resize = cfg.get("resize")
    size = int(resize) if resize else native
    if size is None:
        raise DataError("data.resize: imagefolder needs a size (e.g. data.resize=224)")
    prep = Preprocess(channels=ch, size=size, mean=mean, std=std, augment=cfg.get("augment", "none") != "none",
                      hflip=bool(cfg.get("hflip", False)), crop_padding=int(cfg.get("crop_padding", 4)),
                      erase_prob=float(cfg.get("erase_prob", 0.0)),
                      erase_scale=tuple(float(v) for v in cfg.get("erase_scale", (0.02, 0.33))),
                      erase_ratio=tuple(float(v) for v in cfg.get("erase_ratio", (0.3, 3.3))),
                      erase_value=float(cfg.get("erase_value", 0.0)))
    eval_prep = replace(prep, augment=False)

    train_order = EpochOrder(n_train, batch_size, True, seed, rank, world, drop_last=bool(cfg.get("drop_last", True)))
    # Validation is sharded like the test set: each rank scores its share, every image once.
    eval_order = partial(EpochOrder, batch_size=eval_batch_size, shuffle=False, seed=seed, rank=rank, world=world)
    val = None
    if pipeline == "memory":
        train = DeviceBatches(tr_x, tr_y, prep, train_order, True, device)
        test = DeviceBatches(te_x, te_y, eval_prep, eval_order(n_test), False, device)
        if val_idx is not None:
            val = DeviceBatches(pool_x[val_idx], pool_y[val_idx], eval_prep, eval_order(n_val), False, device)
    else:
        if tv_train is None:  # synthetic through the loader path: a tensor dataset
            tv_train, tv_test = _TensorImages(pool_x, pool_y), _TensorImages(te_x, te_y)
        tv_val = copy.copy(tv_train)  # the same images, with evaluation's transform
        tv_train.transform = sample_transform(prep, True, native)
        tv_val.transform = tv_test.transform = sample_transform(eval_prep, False, native)
        train = LoaderBatches(Subset(tv_train, train_idx.tolist()), train_order, device, workers)
        # Evaluation batches are 4x training's (trainer.eval_batch_size): 2 in flight per worker,
        # not 4, halves what evaluation holds in pinned host memory (large images: GBs).
        test = LoaderBatches(Subset(tv_test, test_idx.tolist()), eval_order(n_test), device, workers, prefetch=2)
        if val_idx is not None:
            val = LoaderBatches(Subset(tv_val, val_idx.tolist()), eval_order(n_val), device, workers, prefetch=2)
    return Data(train, test, prep, ncls, class_names, n_train, n_test, pipeline, val, n_val)


class _TensorImages(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels, self.transform = images, labels, None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.images[i]
        return (self.transform(x) if self.transform else x), int(self.labels[i])


def _image_folders(cfg: Mapping[str, Any]):
    from torchvision.datasets import ImageFolder

    check_available("imagefolder", cfg["root"], False)
    root = Path(cfg["root"]).expanduser().resolve()
    channels = int(cfg.get("channels") or 3)
    folders = []
    for split in ("train", "val"):
        try:
            folders.append(ImageFolder(str(root / split), loader=image_loader(channels)))
        except (FileNotFoundError, RuntimeError) as e:  # a class folder without images, or no class folders
            first = first_line(e)
            raise DataError(f"data.root={root}: {split}/: {first}") from None
    train, test = folders
    if train.classes != test.classes:
        only_train, only_val = sorted(set(train.classes) - set(test.classes)), sorted(set(test.classes) - set(train.classes))
        raise DataError(f"data.root={root}: train/ and val/ have different class folders (only in train/: "
                        f"{', '.join(only_train) or '-'}; only in val/: {', '.join(only_val) or '-'})")
    return train, test, list(train.classes), channels
