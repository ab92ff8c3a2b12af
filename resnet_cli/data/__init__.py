"""Data: `load_data(data_cfg, ...)` returns train/test batch sources and dataset facts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import Subset

from .batches import DeviceBatches, EpochOrder, LoaderBatches, default_workers
from .sources import DATASETS, DataError, as_uint8_nchw, check_available, open_torchvision, synthetic
from .transforms import Preprocess, device_batch, sample_transform

__all__ = ["Data", "DataError", "Preprocess", "check_available", "device_batch", "load_data", "sample_transform"]

IN_MEMORY = ("fashion_mnist", "mnist", "cifar10", "cifar100", "synthetic")


@dataclass
class Data:
    train: DeviceBatches | LoaderBatches
    test: DeviceBatches | LoaderBatches
    prep: Preprocess  # training preprocessing; evaluation is the same without augmentation
    num_classes: int
    class_names: list[str]
    num_train: int  # over all ranks
    num_test: int
    pipeline: str  # "memory" or "loader"


def _limit(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float().div_(255)
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).tolist())


def load_data(cfg: Mapping[str, Any], batch_size: int, eval_batch_size: int, seed: int,
              device: torch.device, rank: int = 0, world: int = 1) -> Data:
    name = cfg["name"]
    pipeline = cfg.get("pipeline", "auto")
    if pipeline == "auto":
        pipeline = "memory" if name in IN_MEMORY else "loader"
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

    if name != "imagefolder":
        n_train, n_test = _limit(len(tr_x), cfg.get("limit_train")), _limit(len(te_x), cfg.get("limit_test"))
        tr_x, tr_y, te_x, te_y = tr_x[:n_train], tr_y[:n_train], te_x[:n_test], te_y[:n_test]
    else:
        n_train, n_test = _limit(len(tv_train), cfg.get("limit_train")), _limit(len(tv_test), cfg.get("limit_test"))

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
                      hflip=bool(cfg.get("hflip", False)), crop_padding=int(cfg.get("crop_padding", 4)))
    eval_prep = Preprocess(**{**prep.as_dict(), "augment": False, "mean": mean, "std": std})

    train_order = EpochOrder(n_train, batch_size, True, seed, rank, world, drop_last=bool(cfg.get("drop_last", True)))
    test_order = EpochOrder(n_test, eval_batch_size, False, seed, rank, world)
    if pipeline == "memory":
        train = DeviceBatches(tr_x, tr_y, prep, train_order, True, device)
        test = DeviceBatches(te_x, te_y, eval_prep, test_order, False, device)
    else:
        if tv_train is None:  # synthetic through the loader path: a tensor dataset
            tv_train, tv_test = _TensorImages(tr_x, tr_y), _TensorImages(te_x, te_y)
        tv_train.transform = sample_transform(prep, True, native)
        tv_test.transform = sample_transform(eval_prep, False, native)
        train = LoaderBatches(Subset(tv_train, range(n_train)), train_order, device, workers)
        test = LoaderBatches(Subset(tv_test, range(n_test)), test_order, device, workers)
    return Data(train, test, prep, ncls, class_names, n_train, n_test, pipeline)


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
    train, test = ImageFolder(str(root / "train")), ImageFolder(str(root / "val"))
    if train.classes != test.classes:
        raise DataError(f"data.root={root}: train/ and val/ have different class folders")
    return train, test, list(train.classes), int(cfg.get("channels") or 3)
