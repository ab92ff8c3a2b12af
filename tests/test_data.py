"""The device-side pipeline against the standard per-sample path, augmentation, order,
sharding, and every precision setting."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from resnet_cli.cli import compose
from resnet_cli.data import load_data
from resnet_cli.data.batches import EpochOrder
from resnet_cli.data.transforms import Preprocess, random_crop, random_hflip

CPU = torch.device("cpu")


def data_cfg(*overrides: str) -> dict:
    return OmegaConf.to_container(compose("train", list(overrides)), resolve=True)["data"]


def both_paths(cfg: dict, batch: int = 64):
    mem = load_data({**cfg, "pipeline": "memory"}, batch, 128, 0, CPU)
    std = load_data({**cfg, "pipeline": "loader", "num_workers": 0}, batch, 128, 0, CPU)
    return mem, std


def assert_equivalent(mem, std, train: bool):
    a = list(mem.train.batches(0)) if train else list(mem.test.batches())
    b = list(std.train.batches(0)) if train else list(std.test.batches())
    assert len(a) == len(b) == (len(mem.train) if train else len(mem.test))
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.shape == xb.shape and xa.dtype == xb.dtype == torch.float32
        assert torch.equal(ya, yb)  # same order: both follow EpochOrder
        torch.testing.assert_close(xa, xb, atol=1e-4, rtol=0)


@pytest.mark.parametrize("resize", [None, 96])
def test_memory_path_equals_standard_path_synthetic(resize):
    cfg = data_cfg("data=synthetic", "data.train_size=150", "data.test_size=70", f"data.resize={resize or 'null'}",
                   "data.augment=none")
    mem, std = both_paths(cfg)
    assert_equivalent(mem, std, train=True)
    assert_equivalent(mem, std, train=False)
    x, _ = next(iter(mem.test.batches()))
    assert x.shape[-1] == (resize or 28)


def test_memory_path_equals_standard_path_on_fashion_mnist(real_data):
    cfg = data_cfg(f"data.root={real_data}", "data.limit_train=200", "data.limit_test=100", "data.augment=none")
    mem, std = both_paths(cfg)
    assert_equivalent(mem, std, train=True)
    assert_equivalent(mem, std, train=False)
    x, _ = next(iter(mem.test.batches()))
    assert x.shape[1:] == (1, 96, 96)
    # normalized with the training set's statistics: roughly zero mean, unit spread
    assert abs(float(x.mean())) < 0.3 and 0.7 < float(x.std()) < 1.3


def test_augmented_batches_match_in_shape_dtype_and_range():
    cfg = data_cfg("data=synthetic", "data.train_size=128", "data.test_size=16", "data.resize=40", "data.hflip=true",
                   "data.augment=standard",
                   "data.normalize=false")
    mem, std = both_paths(cfg)
    for (xa, ya), (xb, yb) in zip(mem.train.batches(0), std.train.batches(0)):
        assert xa.shape == xb.shape == (64, 1, 40, 40) and xa.dtype == xb.dtype
        assert 0 <= float(xa.min()) and float(xa.max()) <= 1 and 0 <= float(xb.min()) and float(xb.max()) <= 1
        assert torch.equal(ya, yb)
    plain = load_data({**cfg, "augment": "none"}, 64, 128, 0, CPU)
    xa, _ = next(iter(mem.train.batches(0)))
    xp, _ = next(iter(plain.train.batches(0)))
    assert not torch.equal(xa, xp)  # augmentation really happens


def test_batches_are_a_function_of_seed_epoch_and_step():
    cfg = data_cfg("data=synthetic", "data.train_size=256", "data.test_size=16")
    d = load_data(cfg, 32, 64, 7, CPU)
    full = list(d.train.batches(3))
    again = list(d.train.batches(3))
    tail = list(d.train.batches(3, start=5))  # a mid-epoch resume
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, again))
    assert len(tail) == len(full) - 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[5:], tail))
    other_epoch = list(d.train.batches(4))
    assert not torch.equal(full[0][1], other_epoch[0][1])  # reshuffled each epoch


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 2, 9, 9)
    out = random_crop(x, 3, g)
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3))
    for i in range(6):
        found = [(dy, dx) for dy in range(7) for dx in range(7)
                 if torch.equal(out[i], padded[i, :, dy:dy + 9, dx:dx + 9])]
        assert found, i


def test_flip_mirrors_some_images_and_keeps_others():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 1, 5, 5)
    out = random_hflip(x, g)
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_epoch_order_shards_disjointly():
    orders = [EpochOrder(103, 10, True, 0, rank, 2) for rank in range(2)]
    a, b = (o.indices(0) for o in orders)
    assert len(a) == len(b) == 51 and not set(a.tolist()) & set(b.tolist())
    ev = [EpochOrder(103, 10, False, 0, rank, 2).indices(0) for rank in range(2)]
    assert sorted(torch.cat(ev).tolist()) == list(range(103))  # evaluation sees every image once


def test_dataset_facts_flow_into_the_model_and_checkpoint():
    cfg = data_cfg("data=synthetic", "data.channels=3", "data.num_classes=4", "data.train_size=64", "data.test_size=8")
    d = load_data(cfg, 32, 32, 0, CPU)
    assert d.prep.channels == 3 and d.num_classes == 4 and len(d.class_names) == 4
    assert isinstance(d.prep, Preprocess) and len(d.prep.mean) == 3


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_precision_trains(precision):
    from torch import nn

    from resnet_cli import build_model
    from resnet_cli.engine import StepContext, train_one_epoch

    torch.manual_seed(0)
    # small enough for fp16 on a CPU, which has no native fp16 kernels (100x slower than bf16)
    cfg = data_cfg("data=synthetic", "data.train_size=192", "data.test_size=16", "data.image_size=12")
    d = load_data(cfg, 32, 32, 0, CPU)
    tiny = {"block": "basic", "layers": [1, 1], "widths": [8, 16], "stem": "cifar"}
    model = build_model(tiny, in_channels=1, num_classes=10).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    ctx = StepContext(opt, None, nn.CrossEntropyLoss(), CPU, precision, scaler)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for epoch in range(4):
        run = train_one_epoch(model, d.train.batches(epoch), ctx, epoch)
        losses.append(run.loss_sum / run.counted)
    assert all(l == l for l in losses) and losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_auto_precision_policy():
    from resnet_cli.engine import cpu_has_native_bf16, resolve_precision

    assert resolve_precision("auto", CPU) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("fp16", CPU) == "fp16" and resolve_precision("fp32", CPU) == "fp32"
