"""Fine-tuning: torchvision weights load exactly, the stem and the classifier adapt, anything
else that does not fit is refused in one line, frozen parts stay put, the backbone's lr is lower.

The official weight files cannot be downloaded here: the tests save a torchvision model's
randomly initialized state_dict, which has the same keys and shapes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import assert_one_error_line, run_cli

from resnet_cli import build_model
from resnet_cli.checkpoint import load_checkpoint, save_checkpoint
from resnet_cli.finetune import EvalBatchNorm2d, check, convert_sync_batchnorm, freeze, init_model, read_state_dict
from resnet_cli.models import ModelConfigError
from resnet_cli.train import build_optimizer, build_scheduler

SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory) -> tuple[Path, torchvision.models.ResNet]:
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=1000).eval()
    path = tmp_path_factory.mktemp("weights") / "resnet18-random.pth"
    torch.save(tv.state_dict(), path)  # what torch.hub keeps: a bare state_dict
    return path, tv


def cfg(path: Path | None = None, **keys) -> dict:
    return {"init_from": str(path) if path else None, "freeze": None, "backbone_lr_scale": None,
            "layers": [2, 2, 2, 2], **keys}


def test_torchvision_weights_load_exactly(tv_file):
    path, tv = tv_file
    model = build_model("resnet18", in_channels=3, num_classes=1000)
    init_model(model, cfg(path))
    mine, theirs = model.state_dict(), tv.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.allclose(model.eval()(x), tv(x), atol=1e-5)


def test_gray_stem_sums_the_rgb_filters_and_the_classifier_is_replaced(tv_file, caplog):
    path, tv = tv_file
    torch.manual_seed(5)
    model = build_model("resnet18", in_channels=1, num_classes=10)
    fresh_fc = {k: v.clone() for k, v in model.fc.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="resnet_cli"):
        init_model(model, cfg(path))
    w = tv.conv1.weight
    assert torch.equal(model.conv1.weight, w.sum(dim=1, keepdim=True))
    # what that means: a gray image gets the response the RGB filters give to the same gray in R, G and B
    gray = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(F.conv2d(gray, model.conv1.weight, stride=2, padding=3),
                          F.conv2d(gray.repeat(1, 3, 1, 1), w, stride=2, padding=3), atol=1e-5)
    assert torch.equal(model.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)
    assert torch.equal(model.bn1.running_var, tv.bn1.running_var)
    assert model.fc.weight.shape == (10, 512)
    assert all(torch.equal(model.fc.state_dict()[k], v) for k, v in fresh_fc.items())  # the new head, untouched
    text = caplog.text
    assert "conv1.weight adapted from 3 to 1 input channel(s) by summing the RGB filters" in text
    assert "classifier fc replaced: 1000 -> 10 classes" in text and "120 tensors loaded" in text


def test_other_channel_counts_repeat_and_scale_as_timm_does(tv_file):
    path, tv = tv_file
    model = build_model("resnet18", in_channels=4, num_classes=1000)
    init_model(model, cfg(path))
    w = tv.conv1.weight
    assert torch.allclose(model.conv1.weight, torch.cat([w, w[:, :1]], 1) * (3 / 4))


@pytest.mark.parametrize("preset,overrides,needle", [
    ("resnet18", {"widths": [64, 128, 256, 256]},
     "layer4.0.conv1.weight has shape (512, 256, 3, 3) there but (256, 256, 3, 3) in this model"),
    ("resnet34", {}, "has no layer1.2.conv1.weight"),
    ("resnet18", {"layers": [2, 2, 2], "widths": [64, 128, 256]},
     "layer4.0.conv1.weight (512, 256, 3, 3) is not in this model (30 such keys)"),
])
def test_any_other_mismatch_names_the_first_key_and_both_shapes(tv_file, preset, overrides, needle):
    path, _ = tv_file
    layers = overrides.get("layers", [2, 2, 2, 2])
    model = build_model(preset, in_channels=1, num_classes=10, **overrides)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelConfigError) as e:
        init_model(model, cfg(path, layers=layers))
    assert needle in str(e.value) and str(e.value).startswith(f"model.init_from={path}:")
    assert "\n" not in str(e.value)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing half-loaded


def test_a_resnet_cli_checkpoint_and_wrapped_state_dicts(tmp_path):
    src = build_model("resnet20", in_channels=1, num_classes=10)
    ckpt = tmp_path / "best.pt"
    save_checkpoint(ckpt, {"model": src.state_dict(), "config": {"model": {}, "data": {}}, "epoch": 3})
    state, kind = read_state_dict(ckpt)
    assert kind == "resnet-cli checkpoint, epoch 3"
    # a DDP-wrapped state_dict under "model", as torchvision's reference scripts save it
    wrapped = tmp_path / "ref.pth"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 7}, wrapped)
    for path in (ckpt, wrapped):
        model = build_model("resnet20", in_channels=1, num_classes=10)
        init_model(model, cfg(path, layers=[3, 3, 3]))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in src.state_dict().items())
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a weights file")
    with pytest.raises(ModelConfigError, match="junk.pth: not a PyTorch weights file, or damaged"):
        read_state_dict(junk)


def test_sync_batchnorm_leaves_frozen_batchnorm_frozen():
    """Under torchrun with trainer.sync_batchnorm=true, torch's converter would turn a frozen
    part's EvalBatchNorm2d into a SyncBatchNorm that trains; ours keeps it."""
    model = build_model("resnet18", in_channels=1, num_classes=10)
    freeze(model, ["stem", "layer1"])
    keys = list(model.state_dict())
    model = convert_sync_batchnorm(model)
    assert isinstance(model.bn1, EvalBatchNorm2d) and isinstance(model.layer1[1].bn2, EvalBatchNorm2d)
    assert isinstance(model.layer2[0].bn1, torch.nn.SyncBatchNorm)
    assert isinstance(model.layer2[0].downsample[1], torch.nn.SyncBatchNorm)  # inside a Sequential too
    model.train()
    assert not model.bn1.training and model.layer2[0].bn1.training
    assert list(model.state_dict()) == keys  # checkpoints load either way


def test_frozen_parts_do_not_change_in_training(tv_file):
    model = build_model("resnet18", in_channels=1, num_classes=10)
    freeze(model, ["stem", "layer1"])
    assert isinstance(model.bn1, EvalBatchNorm2d) and isinstance(model.layer1[0].bn1, EvalBatchNorm2d)
    assert type(model.layer2[0].bn1) is torch.nn.BatchNorm2d
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, SGD)
    model.train()
    assert not model.bn1.training and model.layer2[0].bn1.training
    for _ in range(2):
        x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    after = model.state_dict()
    frozen = [k for k in after if k.startswith(("conv1", "bn1", "layer1."))]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)  # BN statistics included
    assert not torch.equal(after["layer2.0.conv1.weight"], before["layer2.0.conv1.weight"])
    assert not torch.equal(after["layer2.0.bn1.running_mean"], before["layer2.0.bn1.running_mean"])
    # same keys as a plain model: a fine-tuned checkpoint loads into resnet-eval's model strictly
    build_model("resnet18", in_channels=1, num_classes=10).load_state_dict(after)
    with pytest.raises(ModelConfigError, match="unknown part layer5; choose from stem, layer1, layer2, layer3, layer4, fc"):
        freeze(model, ["layer5"])


def test_backbone_lr_scale_holds_through_the_schedule():
    model = build_model("resnet20", in_channels=1, num_classes=10)
    opt = build_optimizer(model, SGD, backbone_lr_scale=0.1)
    head = {id(p) for p in model.fc.parameters()}
    lrs = [(g["lr"], all(id(p) in head for p in g["params"])) for g in opt.param_groups]
    assert lrs[0] == (0.05, True)  # the first group is the classifier's: metrics.jsonl's lr
    assert [lr for lr, is_head in lrs if not is_head] == pytest.approx([0.005, 0.005], rel=1e-12)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    sched = build_scheduler(opt, {"_target_": "resnet_cli.schedules.onecycle", "_partial_": True,
                                  "pct_start": 0.5}, steps_per_epoch=10, epochs=1)
    for step in range(1, 10):
        opt.step()
        sched.step()
        head_lr, backbone_lr = opt.param_groups[0]["lr"], opt.param_groups[-1]["lr"]
        assert backbone_lr == pytest.approx(0.1 * head_lr, rel=1e-9), step
        if step == 4:  # one-cycle's peak (pct_start 0.5 of 10 steps): each group at its own lr
            peaks = [g["lr"] for g in opt.param_groups]
    assert peaks == pytest.approx([0.05, 0.05, 0.005, 0.005], rel=1e-9)


@pytest.mark.parametrize("keys,needle", [
    ({"freeze": ["stem", "layer9"]}, "model.freeze=[stem, layer9]: unknown part layer9; choose from stem, layer1"),
    ({"freeze": ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]},
     "model.freeze=[stem, layer1, layer2, layer3, layer4, fc]: that is every part, nothing is left to train"),
    ({"backbone_lr_scale": 0.0}, "model.backbone_lr_scale=0.0: must be > 0"),
    ({"init_from": "/nonexistent/resnet18.pth"}, "model.init_from=/nonexistent/resnet18.pth: no such file"),
])
def test_bad_keys_are_refused_before_anything_runs(keys, needle, tmp_path):
    with pytest.raises(ModelConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        check(cfg(**keys), resuming=False)
    override = {"freeze": f"model.freeze=[{','.join(keys.get('freeze') or [])}]",
                "backbone_lr_scale": "model.backbone_lr_scale=0",
                "init_from": "model.init_from=/nonexistent/resnet18.pth"}[next(iter(keys))]
    proc = run_cli("resnet-train", "data=synthetic", override, cwd=tmp_path)
    assert_one_error_line(proc.returncode, proc.stderr, needle)
    assert not (tmp_path / "outputs").exists()


def _torchscript_file(path: Path) -> Path:
    """What resnet-export writes by default: a traced module saved with torch.jit.save."""
    import warnings

    with warnings.catch_warnings():  # torch.jit is deprecated upstream
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(torch.nn.Linear(4, 2), torch.randn(1, 4)), str(path))
    return path


@pytest.mark.parametrize("what,needle", [
    ("run_folder", "is a folder, not a file; give the checkpoint in it, run/checkpoints/best.pt"),
    ("folder", "is a folder, not a file; give a resnet-cli checkpoint (RUN/checkpoints/best.pt) or a state_dict file"),
    ("text", "not a PyTorch weights file, or damaged (UnpicklingError: "),
    ("torchscript", "is a TorchScript file (an exported model, as resnet-export writes): a compiled program, not "
                    "weights to start from; give the checkpoint it was exported from (RUN/checkpoints/best.pt) "
                    "or a state_dict file"),
    ("whole_model", "holds pickled objects other than tensors and plain data"),
    ("empty", "is an empty file; give a resnet-cli checkpoint"),
])
def test_what_is_not_a_weights_file_is_named_in_one_line(what, needle, tmp_path):
    target = {"run_folder": "run", "folder": "weights", "text": "notes.txt", "torchscript": "model.pt",
              "whole_model": "whole.pt", "empty": "empty.pt"}[what]
    if what == "run_folder":
        save_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt",
                        {"model": {}, "config": {"model": {}, "data": {}}, "epoch": 1})
    elif what == "folder":
        (tmp_path / target).mkdir()
    elif what == "text":
        (tmp_path / target).write_text("lr 0.1 was too high; try 0.05 next\n")
    elif what == "torchscript":
        _torchscript_file(tmp_path / target)
    elif what == "whole_model":
        torch.save(torch.nn.Linear(4, 2), tmp_path / target)
    else:
        (tmp_path / target).touch()
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_cli("resnet-train", "data=synthetic", "model=resnet20", "data.train_size=64", "data.test_size=32",
                   "epochs=1", f"model.init_from={target}", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr  # no torch warning lines
    assert proc.stderr.startswith(f"error: model.init_from={target}: ") and needle in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder left behind


def test_exported_files_are_refused_before_anything_runs(tmp_path):
    path = _torchscript_file(tmp_path / "model.torchscript.pt")
    with pytest.raises(ModelConfigError, match="is a TorchScript file"):
        check(cfg(path), resuming=False)
    program = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),)), program)
    with pytest.raises(ModelConfigError, match=r"is a torch.export \(.pt2\) file"):
        read_state_dict(program)
    check(cfg(path), resuming=True)  # a resumed run takes its weights from its checkpoint


@pytest.mark.slow
def test_fine_tune_through_the_command(tv_file, tmp_path):
    path, tv = tv_file
    run = tmp_path / "run"
    proc = run_cli("resnet-train", "data=synthetic", "model=resnet18", "data.image_size=32", "data.train_size=64",
                   "data.test_size=32", "batch_size=32", "epochs=1", "trainer.precision=fp32",
                   "trainer.progress=plain", f"model.init_from={path}", "model.freeze=[stem,layer1,layer2]",
                   "model.backbone_lr_scale=0.1", f"hydra.run.dir={run}", cwd=tmp_path, check=True)
    assert "conv1.weight adapted from 3 to 1 input channel(s)" in proc.stdout
    assert "classifier fc replaced: 1000 -> 10 classes" in proc.stdout
    assert "frozen: stem, layer1, layer2" in (run / "train.log").read_text()
    state = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    theirs = tv.state_dict()
    assert torch.equal(state["conv1.weight"], theirs["conv1.weight"].sum(1, keepdim=True))
    for key in ("layer1.0.conv1.weight", "layer2.1.bn2.running_mean", "bn1.running_var"):
        assert torch.equal(state[key], theirs[key]), key  # frozen: exactly the file's
    assert not torch.equal(state["layer3.0.conv1.weight"], theirs["layer3.0.conv1.weight"])  # trained

    bad = run_cli("resnet-train", "data=synthetic", "model=resnet18", "model.widths=[64,128,256,256]",
                  "data.image_size=32", "data.train_size=64", "data.test_size=32", f"model.init_from={path}",
                  cwd=tmp_path)
    assert_one_error_line(bad.returncode, bad.stderr, "layer4.0.conv1.weight has shape (512, 256, 3, 3) there")


@pytest.mark.parametrize("with_file,freeze_parts,warned", [
    (False, ["stem"], "model.freeze=[stem] without model.init_from: the frozen parts keep their random"),
    (True, ["fc"], "model.freeze: fc was newly initialized"),  # 1000 classes there, 10 here
    (True, ["stem", "layer1"], None),  # the usual: loaded parts, frozen
])
def test_freezing_what_was_not_loaded_is_warned(tv_file, caplog, with_file, freeze_parts, warned):
    path, _ = tv_file
    model = build_model("resnet18", in_channels=3, num_classes=10)
    with caplog.at_level(logging.INFO, logger="resnet_cli"):
        init_model(model, cfg(path if with_file else None, freeze=freeze_parts))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if w.startswith(warned)] if warned else not warnings, warnings
