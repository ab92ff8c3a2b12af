"""The device-side pipeline against the standard per-sample path, augmentation, order,
sharding, the validation split, and every precision setting."""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf

from resnet_cli.cli import compose
from resnet_cli.config import ConfigError, check_values
from resnet_cli.data import DataError, holdout, load_data
from resnet_cli.data.batches import EpochOrder
from resnet_cli.data.transforms import (Preprocess, SampleErase, erase, erase_boxes, erase_draws, random_crop,
                                        random_erase, random_hflip)

from conftest import run_cli

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


def per_sample(transform, images: torch.Tensor, seed: int) -> torch.Tensor:
    """A torchvision-style transform applied image by image, drawing from the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.stack([transform(img) for img in images])


def test_crop_equals_torchvision_random_crop_from_the_same_draws():
    from torchvision.transforms import v2

    x = torch.rand(40, 2, 11, 11)
    batched = random_crop(x, 3, torch.Generator().manual_seed(4))
    assert torch.equal(batched, per_sample(v2.RandomCrop(11, padding=3), x, seed=4))


def test_flip_equals_torchvision_random_flip_from_the_same_draws():
    from torchvision.transforms import v2

    x = torch.rand(40, 1, 6, 6)
    batched = random_hflip(x, torch.Generator().manual_seed(9))
    assert torch.equal(batched, per_sample(v2.RandomHorizontalFlip(), x, seed=9))
    assert not torch.equal(batched, x) and not torch.equal(batched, x.flip(-1))  # some of each


ERASE = Preprocess(channels=3, size=20, mean=None, std=None, augment=True, erase_prob=0.7, erase_value=-2.0)


def test_batched_erasing_equals_the_per_sample_twin_from_the_same_draws():
    x = torch.rand(64, 3, 20, 20)
    batched = random_erase(x, ERASE, torch.Generator().manual_seed(3))
    twin = SampleErase(ERASE, torch.Generator().manual_seed(3))
    assert torch.equal(batched, torch.stack([twin(img) for img in x]))
    erased = (batched == -2.0).all(dim=1)  # every channel of an erased pixel
    assert 25 < int(erased.any(dim=(1, 2)).sum()) < 60  # erase_prob 0.7 of 64 images
    assert torch.equal(batched[~(batched == -2.0)], x[~(batched == -2.0)])  # nothing else changes


def test_erasing_is_torchvision_random_erasing():
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    # Application: each box is what torchvision's own erase() writes.
    x = torch.rand(32, 1, 28, 28)
    boxes = erase_boxes(erase_draws(32, torch.Generator().manual_seed(0)), 28, 28, 1.0, (0.02, 0.33), (0.3, 3.3))
    expected = torch.stack([TF.erase(img, *b.tolist(), v=torch.tensor(0.5)) for img, b in zip(x, boxes)])
    assert torch.equal(erase(x, boxes, 0.5), expected)
    # Boxes: the same distribution as v2.RandomErasing's (4,000 draws each, fixed seeds).
    ours = erase_boxes(erase_draws(4000, torch.Generator().manual_seed(1)), 28, 28, 0.5, (0.02, 0.33), (0.3, 3.3))
    ours_area = (ours[:, 2] * ours[:, 3]).float() / 784
    theirs_area = per_sample(v2.RandomErasing(p=0.5, value=-1.0), torch.zeros(4000, 1, 28, 28), seed=1)
    theirs_area = (theirs_area == -1.0).float().mean(dim=(1, 2, 3))
    assert abs(float((ours_area > 0).float().mean()) - float((theirs_area > 0).float().mean())) < 0.04
    assert abs(float(ours_area[ours_area > 0].mean()) - float(theirs_area[theirs_area > 0].mean())) < 0.015
    assert float(ours_area.max()) <= 0.33 * 1.1 and (ours[:, 0] + ours[:, 2]).max() <= 28


def test_both_paths_erase_training_batches_alike_and_never_evaluation():
    cfg = data_cfg("data=synthetic", "data.train_size=256", "data.test_size=64", "data.augment=standard",
                   "data.crop_padding=0", "data.hflip=false", "data.normalize=false", "data.erase_prob=1.0",
                   "data.erase_value=-1.0")
    mem, std = both_paths(cfg)

    def erased_share(batches):
        return torch.cat([(x == -1.0).float().mean(dim=(1, 2, 3)) for x, _ in batches])

    a, b = erased_share(mem.train.batches(0)), erased_share(std.train.batches(0))
    assert len(a) == len(b) == 256 and (a > 0).float().mean() > 0.95 and (b > 0).float().mean() > 0.95
    assert abs(float(a.mean()) - float(b.mean())) < 0.04  # same distribution of box sizes
    assert erased_share(mem.test.batches()).sum() == erased_share(std.test.batches()).sum() == 0
    plain = load_data({**cfg, "erase_prob": 0.0}, 64, 128, 0, CPU)
    # Erasing draws after crop and flip: turning it on changes nothing else.
    for (xe, _), (xp, _) in zip(mem.train.batches(0), plain.train.batches(0)):
        assert torch.equal(xe[xe != -1.0], xp[xe != -1.0])


def test_validation_split_is_fixed_disjoint_and_sized():
    train, val = holdout(1000, 150)
    assert len(val) == 150 and len(train) == 850
    assert not set(train.tolist()) & set(val.tolist()) and set(train.tolist()) | set(val.tolist()) == set(range(1000))
    cfg = data_cfg("data=synthetic", "data.train_size=300", "data.test_size=40", "data.val_size=60")
    runs = [load_data(cfg, 32, 64, seed, CPU) for seed in (0, 1, 2)]
    vals = [torch.cat([x for x, _ in d.val.batches()]) for d in runs]
    assert all(torch.equal(vals[0], v) for v in vals[1:])  # every seed scores the same images
    d = runs[0]
    assert (d.num_train, d.num_val, d.num_test) == (240, 60, 40)
    train_x = torch.cat([x for x, _ in d.train.batches(0)])
    assert not (train_x[:, None] == vals[0][None]).flatten(2).all(2).any()  # no validation image is trained on
    assert holdout(1000, None)[1] is None and load_data({**cfg, "val_size": None}, 32, 64, 0, CPU).val is None


def test_validation_split_is_the_same_on_both_paths_and_under_ddp():
    cfg = data_cfg("data=synthetic", "data.train_size=300", "data.test_size=40", "data.val_size=61")
    mem, std = both_paths(cfg, batch=32)
    for (xa, ya), (xb, yb) in zip(mem.val.batches(), std.val.batches()):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb, atol=1e-4, rtol=0)
    assert len(mem.train) == len(std.train) == 7  # 239 training images, batch 32: the short 8th is dropped
    shards = [load_data(cfg, 32, 16, 0, CPU, rank, 2).val for rank in range(2)]
    labels = [torch.cat([y for _, y in s.batches()]) for s in shards]
    assert [len(y) for y in labels] == [31, 30]  # sharded like the test set: every image once
    whole = torch.cat([y for _, y in mem.val.batches()])
    assert sorted(torch.cat(labels).tolist()) == sorted(whole.tolist())


def test_validation_split_on_fashion_mnist_is_preprocessed_like_the_test_set(real_data):
    cfg = data_cfg(f"data.root={real_data}", "data.limit_train=600", "data.limit_test=100", "data.val_size=100",
                   "data.resize=null")
    d = load_data(cfg, 64, 128, 0, CPU)
    assert (d.num_train, d.num_val) == (500, 100)
    x, y = next(iter(d.val.batches()))
    assert x.shape == (100, 1, 28, 28) and len(set(y.tolist())) > 5
    again = torch.cat([x for x, _ in d.val.batches()])
    assert torch.equal(x, again)  # no augmentation: evaluation preprocessing


@pytest.mark.parametrize("override,needle", [
    ("data.val_size=0", "data.val_size=0: must be >= 1"),
    ("data.val_size=59800", "must leave at least one batch"),
    ("data.erase_prob=1.5", "data.erase_prob=1.5: must be in [0, 1]"),
    ("data.erase_scale=[0.4,0.1]", "data.erase_scale=[0.4, 0.1]: must be [lo, hi]"),
    ("data.erase_ratio=[0,2]", "data.erase_ratio=[0.0, 2.0]: must be [lo, hi]"),
])
def test_bad_erasing_and_validation_values_are_refused(override, needle):
    cfg = OmegaConf.to_container(compose("train", [override]), resolve=True)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        check_values(cfg)


def test_too_large_a_validation_split_fails_in_one_line(tmp_path):
    proc = run_cli("resnet-train", "data=synthetic", "data.val_size=400", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: data.val_size=400: ")
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "outputs").exists()
    # An image folder is only counted when read: load_data refuses it then, naming the key.
    cfg = data_cfg("data=synthetic", "data.train_size=100", "data.val_size=50")
    with pytest.raises(DataError, match="data.val_size=50: leaves 50 of 100"):
        load_data(cfg, 64, 64, 0, CPU)


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


def test_bf16_counts_as_native_only_with_avx512_kernels(monkeypatch):
    """A CPU with AMX but torch told to use AVX2 kernels (ATEN_CPU_CAPABILITY=avx2) emulates
    bf16: precision=auto must then take fp32."""
    from resnet_cli import engine

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not engine.cpu_has_native_bf16() and engine.resolve_precision("auto", CPU) == "fp32"


# ---------------------------------------------------------------- your own images: data=imagefolder

def _image_folder(root, train: dict[str, int], val: dict[str, int]):
    """root/train/<class>/*.png and root/val/<class>/*.png: grayscale and RGB files of odd sizes."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, counts in (("train", train), ("val", val)):
        for cls, n in counts.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (9 + i % 3, 11, 3), generator=g, dtype=torch.uint8).numpy()
                image = Image.fromarray(pixels)
                (image.convert("L") if i % 2 else image).save(folder / f"{i}.png")
    return root


def _folder_cfg(root, *overrides: str) -> dict:
    return {**data_cfg("data=imagefolder", f"data.root={root}", "data.resize=8", *overrides), "num_workers": 0}


def test_an_image_folder_trains_end_to_end(tmp_path):
    root = _image_folder(tmp_path / "images", {"cat": 6, "dog": 6}, {"cat": 3, "dog": 3})
    run = tmp_path / "run"
    run_cli("resnet-train", "data=imagefolder", f"data.root={root}", "data.resize=16", "data.num_workers=0",
            "model=resnet20", "model.layers=[1,1,1]", "batch_size=4", "epochs=1", "trainer.progress=none",
            f"hydra.run.dir={run}", cwd=tmp_path, check=True)
    import json

    results = json.loads((run / "results.json").read_text())
    assert results["dataset"] == "imagefolder" and 0.0 <= results["final_test_acc"] <= 1.0


def test_an_image_folders_limits_and_validation_split_take_every_class(tmp_path):
    """ImageFolder lists images class by class: the first N would all be cats."""
    root = _image_folder(tmp_path / "images", {"cat": 8, "dog": 8}, {"cat": 4, "dog": 4})
    d = load_data(_folder_cfg(root, "data.limit_train=8", "data.limit_test=4", "data.val_size=4"), 2, 4, 0, CPU)
    assert (d.num_train, d.num_val, d.num_test) == (4, 4, 4)
    labels = {split: torch.cat([y for _, y in getattr(d, split).batches()]).tolist() for split in ("val", "test")}
    train = torch.cat([y for _, y in d.train.batches(0)]).tolist()
    assert all(set(ys) == {0, 1} for ys in (labels["val"], labels["test"])), labels
    assert len(train) == 4 and set(train) == {0, 1}
    again = load_data(_folder_cfg(root, "data.limit_train=8", "data.limit_test=4", "data.val_size=4"), 2, 4, 5, CPU)
    assert torch.cat([y for _, y in again.val.batches()]).tolist() == labels["val"]  # fixed, whatever the seed


def test_bad_image_folders_are_one_line_errors(tmp_path):
    root = _image_folder(tmp_path / "empty_class", {"cat": 2, "dog": 2}, {"cat": 2, "dog": 2})
    (root / "train" / "emu").mkdir()
    (root / "val" / "emu").mkdir()
    with pytest.raises(DataError, match=r"^data.root=.*empty_class: train/: Found no valid file for the classes emu"):
        load_data(_folder_cfg(root), 2, 4, 0, CPU)
    root = _image_folder(tmp_path / "different", {"cat": 2, "dog": 2}, {"cat": 2, "emu": 2})
    with pytest.raises(DataError, match=re.escape("different class folders (only in train/: dog; only in val/: emu)")):
        load_data(_folder_cfg(root), 2, 4, 0, CPU)


def test_sixteen_bit_images_read_as_their_8_bit_twins_not_clipped(tmp_path):
    """PIL's convert("L") clips a 16-bit PNG to almost all white; the folder reader scales it."""
    import numpy as np
    from PIL import Image

    roots = {}
    for bits in (8, 16):
        root = roots[bits] = _image_folder(tmp_path / f"b{bits}", {"cat": 1, "dog": 1}, {"cat": 2, "dog": 2})
        for i, f in enumerate(sorted((root / "val").rglob("*.png"))):
            ramp = (np.arange(8 * 8).reshape(8, 8) * 4 + i) % 256
            Image.fromarray(ramp.astype(np.uint8) if bits == 8 else (ramp * 257).astype(np.uint16)).save(f)
    with Image.open(next((roots[16] / "val").rglob("*.png"))) as deep:
        assert deep.mode in ("I;16", "I")  # I before Pillow 10.3
    batches = {bits: [x for x, _ in load_data(_folder_cfg(root, "data.channels=1", "data.normalize=false"), 2, 4, 0, CPU).test.batches()]
               for bits, root in roots.items()}
    assert all(torch.equal(a, b) for a, b in zip(*batches.values(), strict=True))
    assert batches[8][0].std() > 0.2  # a ramp, not a flat white image


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_palette_image_with_transparency_reads_without_warnings(tmp_path, mode):
    """PIL warns (two lines per file, in every DataLoader worker) when a palette image with
    transparency is converted directly; read through RGBA it gives the same pixels, quietly."""
    import warnings

    import numpy as np
    from PIL import Image

    from resnet_cli.data.images import read_image

    img = Image.new("P", (8, 8))
    img.putpalette([(i * 37) % 256 for i in range(768)])
    img.putdata([i % 7 for i in range(64)])
    img.info["transparency"] = b"\x00" * 3 + b"\xff" * 253
    img.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as direct, warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        expected = np.asarray(direct.convert(mode))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = np.asarray(read_image(tmp_path / "p.png", mode))
    assert np.array_equal(got, expected) and got.std() > 0


def test_an_unreadable_image_stops_the_run_naming_the_file(tmp_path, monkeypatch, capfd):
    """Found mid-epoch (reading every file first would cost a pass over the folder): one line
    naming the file, also from a DataLoader worker, and a run failure (1), not a traceback."""
    from conftest import call_main

    from resnet_cli.train import main

    root = _image_folder(tmp_path / "images", {"cat": 4, "dog": 4}, {"cat": 2, "dog": 2})
    (root / "train" / "dog" / "2.png").write_bytes(b"not a png")
    monkeypatch.chdir(tmp_path)
    for workers in (0, 1):
        code, _, err = call_main(main, "resnet-train", [
            "data=imagefolder", f"data.root={root}", "data.resize=8", f"data.num_workers={workers}", "model=resnet20",
            "model.layers=[1,1,1]", "batch_size=4", "epochs=1", "trainer.progress=none",
            f"hydra.run.dir={tmp_path / f'run{workers}'}"], monkeypatch, capfd)
        assert code == 1 and err.count("\n") == 1, err
        assert err.startswith(f"error: {root / 'train' / 'dog' / '2.png'}: cannot be read as an image ("), err


def test_too_few_training_images_for_a_batch_are_refused(tmp_path, monkeypatch, capfd):
    """One image makes no batch (BatchNorm needs two); before, the run 'trained' 0 steps and exited 0."""
    from conftest import call_main

    from resnet_cli.train import main

    monkeypatch.chdir(tmp_path)
    code, _, err = call_main(main, "resnet-train", ["data=synthetic", "data.train_size=1"], monkeypatch, capfd)
    assert code == 2 and err.startswith("error: data: 1 training image(s) make no batch to train on") and \
        err.count("\n") == 1, err


def test_normalization_constants_are_made_once_per_device_and_dtype():
    """torch.tensor(list, device=cuda) waits for the GPU's queue: made once, not per batch."""
    from resnet_cli.data.transforms import _channel_tensor

    x = torch.zeros(2, 3, 4, 4)
    mean = _channel_tensor([0.5, 0.4, 0.3], x)
    assert mean is _channel_tensor((0.5, 0.4, 0.3), x)
    assert mean.shape == (1, 3, 1, 1) and mean.dtype == x.dtype
    assert _channel_tensor([0.5, 0.4, 0.3], x.double()).dtype == torch.float64


# ---------------------------------------------------------------- a failed download

def _refuse_connections(monkeypatch):
    """Every URL torchvision opens fails as it does offline behind a closed port."""
    import urllib.error
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def _tree(root) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_a_failed_download_keeps_the_reason_and_removes_only_what_it_made(tmp_path, monkeypatch):
    from resnet_cli.data.sources import open_torchvision

    _refuse_connections(monkeypatch)
    # A root that does not exist yet: it goes again, parents included, up to what existed.
    with pytest.raises(DataError) as e:
        open_torchvision("mnist", tmp_path / "new" / "root", True, tmp_path / "cache")
    line = str(e.value)
    assert "(https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz: Connection refused; " \
           "the other mirror failed too)" in line and "\n" not in line
    assert "data.download=true" not in line  # it is on already: the advice is the files
    assert list(tmp_path.iterdir()) == []
    # A root with some of the user's things in it: they stay as they were, nothing is added.
    root = tmp_path / "root"
    (root / "MNIST" / "raw").mkdir(parents=True)
    (root / "MNIST" / "notes.txt").write_text("mine")
    (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"a damaged copy")
    before = _tree(root)
    with pytest.raises(DataError, match="Connection refused"):
        open_torchvision("mnist", root, True, tmp_path / "cache")
    assert _tree(root) == before
    # CIFAR's download raises the URLError itself (one URL, no mirrors).
    with pytest.raises(DataError, match=re.escape(
            "download failed (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz: Connection refused)")):
        open_torchvision("cifar10", tmp_path / "cifar", True, tmp_path / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_the_download_cause_is_the_most_telling_mirrors():
    from torchvision import datasets

    from resnet_cli.data.sources import download_failure

    # torchvision's text for a file that no mirror gave (the MNIST family)
    text = ("Error downloading train-images-idx3-ubyte.gz:\n"
            "Tried https://a.example/mnist/, got:\nHTTP Error 403: Forbidden\n"
            "Tried http://b.example/mnist/, got:\n<urlopen error [Errno -3] Temporary failure in name resolution>\n")
    assert download_failure(RuntimeError(text), datasets.MNIST) == (
        "http://b.example/mnist/train-images-idx3-ubyte.gz: Temporary failure in name resolution; "
        "the other mirror failed too")
    damaged = text.replace("HTTP Error 403: Forbidden", "File not found or corrupted.")
    assert download_failure(RuntimeError(damaged), datasets.MNIST) == (
        "https://a.example/mnist/train-images-idx3-ubyte.gz: the downloaded file failed its MD5 check; "
        "the other mirror failed too")
    assert download_failure(RuntimeError("Error downloading x.gz:\nTried https://a.example/, got:\n"
                                         "<urlopen error timed out>\n"), datasets.MNIST) == \
        "https://a.example/x.gz: timed out"


def test_a_failed_download_through_the_command_is_one_line_and_leaves_nothing(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on: the proxy refuses at once, internet or not
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = f"http://127.0.0.1:{port}"
    env = {"http_proxy": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy,
           "no_proxy": "", "NO_PROXY": ""}
    root = tmp_path / "empty"
    root.mkdir()
    for data_root in (root, tmp_path / "missing" / "deeper"):
        proc = run_cli("resnet-train", "data=mnist", f"data.root={data_root}", "epochs=1", cwd=tmp_path, env=env,
                       timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: data.root={data_root}: mnist files not found"), \
            proc.stderr
        assert "download failed (https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz: " \
               "Connection refused; the other mirror failed too)" in lines[0]
        assert "data.download=true" not in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and list(root.iterdir()) == []


def test_missing_files_with_download_off_advise_turning_it_on(tmp_path):
    from resnet_cli.data import check_available

    with pytest.raises(DataError, match=r"and data.download=false; .* or allow data.download=true on a machine"):
        check_available("mnist", str(tmp_path), False)
    assert list(tmp_path.iterdir()) == []


def _open_beside_a_writer(root, tmp_path, monkeypatch, while_waiting) -> str:
    """Open ROOT's Fashion-MNIST in a child process while this process holds ROOT's lock as a
    writer would: the child must say that it waits; then `while_waiting()` runs, the lock is
    released, and the child's stdout (`len(train) len(test) sum of test labels`) is returned."""
    import os
    import subprocess
    import sys
    import tempfile
    import time

    pytest.importorskip("fcntl", reason="the lock is flock's (POSIX)")
    from resnet_cli.data.sources import _one_writer

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the lock files: here, for both processes
    code = ("from resnet_cli.data.sources import open_torchvision; "
            f"train, test = open_torchvision('fashion_mnist', {str(root)!r}, False, {str(tmp_path / 'cache')!r}); "
            "print(len(train), len(test), int(test.targets.sum()))")
    err = tmp_path / "stderr.txt"
    proc = None
    try:
        with _one_writer(root.resolve()):
            with open(err, "w") as stderr:
                proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=stderr, text=True,
                                        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
            deadline = time.monotonic() + 120
            while "waiting for it" not in err.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert f"another process is writing dataset files into {root}; waiting" in err.read_text(), err.read_text()
            assert proc.poll() is None
            while_waiting()
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.read_text()
    return out


def test_processes_opening_one_root_extract_it_one_at_a_time(real_data, tmp_path, monkeypatch):
    """torchrun's ranks and a parallel sweep's jobs open the data at once: while one process
    holds the root, another waits for it (saying so) and then reads what the first wrote."""
    import shutil

    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (real_data / "FashionMNIST" / "raw").glob("*.gz"):  # archives only: they get extracted
        shutil.copy(gz, raw / gz.name)

    def nothing_extracted_yet():
        assert not (raw / "train-images-idx3-ubyte").exists()

    out = _open_beside_a_writer(tmp_path / "root", tmp_path, monkeypatch, nothing_extracted_yet)
    assert out.split() == ["60000", "10000", "45000"]  # 1,000 test images per class: labels 0..9 sum to 45,000


def test_a_file_read_while_another_process_writes_it_is_read_again_after(real_data, tmp_path, monkeypatch):
    """Files already there are read without the lock; one cut short (another process still
    extracting it) is read again once that process is done, not called unreadable."""
    import gzip

    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (real_data / "FashionMNIST" / "raw").glob("*.gz"):
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    whole = (raw / "t10k-labels-idx1-ubyte").read_bytes()
    (raw / "t10k-labels-idx1-ubyte").write_bytes(whole[:5000])  # the writer, halfway through the last file
    out = _open_beside_a_writer(tmp_path / "root", tmp_path, monkeypatch,
                                lambda: (raw / "t10k-labels-idx1-ubyte").write_bytes(whole))
    assert out.split() == ["60000", "10000", "45000"]


def test_unreadable_extracted_files_are_one_line(tmp_path):
    from resnet_cli.data.sources import open_torchvision

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 60)  # an IDX header, cut short
    with pytest.raises(DataError) as e:
        open_torchvision("fashion_mnist", tmp_path, False, tmp_path / "cache")
    assert str(e.value).startswith(f"data.root={tmp_path}: the fashion_mnist files in {raw}/ cannot be read (") \
        and "remove them" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in raw.iterdir()) == sorted(["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
