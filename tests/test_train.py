"""resnet-train end to end: artifacts, recipes, data configs, determinism, real learning."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from resnet_cli.checkpoint import load_checkpoint
from resnet_cli.cli import compose
from resnet_cli.config import ConfigError
from resnet_cli.reporting import TIMING_FIELDS

from conftest import call_main, run_cli

TINY = ["data=synthetic", "data.train_size=192", "data.test_size=96", "batch_size=64", "model=resnet20",
        "trainer.progress=plain"]
EPOCH_KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s",
              "train_images_per_s"}


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("outputs/*/*/metrics.jsonl"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS and k != "eval_time_s"} for r in rows]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, object]:
    cwd = tmp_path_factory.mktemp("run")
    proc = run_cli("resnet-train", *TINY, "epochs=2", cwd=cwd, check=True)
    (run,) = run_dirs(cwd)
    return run, proc


def test_run_writes_every_artifact(tiny_run):
    run, proc = tiny_run
    assert (run / ".hydra" / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
    assert (run / "train.log").read_text().count("epoch 2/2") == 1
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(EPOCH_KEYS <= set(r) for r in rows)
    assert all(0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1 and r["train_images_per_s"] > 0 for r in rows)
    results = json.loads((run / "results.json").read_text())
    from resnet_cli import build_model

    expected = sum(p.numel() for p in build_model("resnet20", in_channels=1, num_classes=10).parameters())
    assert results["parameters"] == expected == 269_434  # the paper's 0.27M, with a 1-channel stem
    assert results["best_test_acc"] == max(r["test_acc"] for r in rows)
    assert results["final"]["test_acc"] == rows[-1]["test_acc"]
    assert {"device", "precision", "wall_time_s"} <= set(results)
    png = (run / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]  # no temp files


def test_results_say_where_the_time_went(tiny_run):
    run, proc = tiny_run
    t = json.loads((run / "results.json").read_text())["time_s"]
    parts = ("startup", "data", "train", "eval", "checkpoint", "plot", "other")
    assert set(t) == {"total", *parts} and all(t[p] >= 0 for p in parts)
    assert sum(t[p] for p in parts) == pytest.approx(t["total"], abs=0.01)
    # the process's own age: imports before train() count as start-up
    assert t["startup"] > 0.5 and t["train"] > 0 and t["eval"] > 0 and t["plot"] > 0
    last = (run / "train.log").read_text().strip().splitlines()[-1]
    assert f"time {t['total']:.1f}s = startup {t['startup']:.1f} + data" in last


def test_best_and_last_of_one_epoch_are_one_serialization(tmp_path):
    from resnet_cli.checkpoint import CheckpointWriter

    writer = CheckpointWriter()
    weights = torch.arange(6.0)
    state = {"model": {"w": weights}, "config": {"model": {}, "data": {}}, "epoch": 1}
    writer.submit([tmp_path / "last.pt", tmp_path / "best.pt"], state)
    weights.add_(100)  # training goes on while the writer works on its snapshot
    writer.wait()
    assert (tmp_path / "last.pt").read_bytes() == (tmp_path / "best.pt").read_bytes()
    assert torch.equal(load_checkpoint(tmp_path / "best.pt")["model"]["w"], torch.arange(6.0))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    writer.submit([blocker / "last.pt"], state)  # the error comes back to the training thread
    with pytest.raises(Exception, match="cannot write checkpoint"):
        writer.wait()


def test_first_lines_say_what_runs(tiny_run):
    run, proc = tiny_run
    head = proc.stdout.splitlines()[:4]
    assert head[0].startswith("device cpu") and "precision" in head[0]
    assert "269,434 parameters" in head[1]
    assert "192 train / 96 test" in head[2]
    assert str(run) in head[3]
    assert "\x1b[" not in proc.stdout  # no progress bar when not on a terminal


def test_checkpoints_rebuild_their_model_alone(tiny_run):
    run, _ = tiny_run
    for name in ("last.pt", "best.pt"):
        raw = torch.load(run / "checkpoints" / name, weights_only=True)  # plain containers only
        ckpt = load_checkpoint(run / "checkpoints" / name)
        assert raw.keys() == ckpt.keys()
        assert {"model", "optimizer", "lr_scheduler", "epoch", "config", "best_acc"} <= set(ckpt)
        from resnet_cli import build_model

        model = build_model(ckpt["config"]["model"], in_channels=1, num_classes=ckpt["num_classes"])
        model.load_state_dict(ckpt["model"])
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    rows = metrics(run)
    assert best["best_acc"] == max(r["test_acc"] for r in rows)


def test_same_seed_same_metrics(tiny_run, tmp_path):
    run, _ = tiny_run
    run_cli("resnet-train", *TINY, "epochs=2", cwd=tmp_path, check=True)
    (again,) = run_dirs(tmp_path)
    assert untimed(metrics(again)) == untimed(metrics(run))
    a = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(again / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_d2l_experiment_composes_to_the_reference():
    cfg = compose("train", ["experiment=d2l"])
    assert cfg.model.name == "d2l_resnet18" and cfg.model.init == "xavier" and cfg.model.conv_bias
    assert (cfg.lr, cfg.epochs, cfg.batch_size) == (0.05, 10, 256)
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.optimizer.momentum == 0 and cfg.optimizer.weight_decay == 0 and not cfg.optimizer.nesterov
    assert cfg.scheduler._target_ is None
    assert cfg.data.name == "fashion_mnist" and cfg.data.resize == 96
    assert cfg.data.augment == "none" and not cfg.data.normalize
    assert cfg.trainer.precision == "fp32" and cfg.trainer.label_smoothing == 0


def test_default_recipe_improves_on_the_reference():
    cfg = compose("train", [])
    assert cfg.model.name == "resnet18" and cfg.data.name == "fashion_mnist" and cfg.data.resize == 96
    assert (cfg.lr, cfg.epochs, cfg.batch_size) == (0.05, 10, 256)
    assert cfg.optimizer.momentum == 0.9 and cfg.optimizer.weight_decay > 0
    assert cfg.scheduler.warmup_epochs > 0 and "cosine" in cfg.scheduler._target_
    assert cfg.trainer.label_smoothing > 0 and cfg.data.augment == "standard" and cfg.data.normalize
    assert cfg.trainer.precision == "auto" and cfg.trainer.device == "auto"


@pytest.mark.parametrize("data", ["fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic"])
def test_each_dataset_config_composes(data):
    over = [f"data={data}"] + (["data.root=/somewhere"] if data == "imagefolder" else [])
    cfg = compose("train", over)
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert plain["data"]["name"] == data


def test_data_root_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("RESNET_CLI_DATA", "/datasets/here")
    assert compose("train", []).data.root == "/datasets/here"
    monkeypatch.delenv("RESNET_CLI_DATA")
    assert compose("train", []).data.root == "data"


def test_optimizer_and_scheduler_come_from_config():
    from resnet_cli.train import build_optimizer, build_scheduler

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.zeros(2, 1, 5, 5))
    for opt_name, sched in [("sgd", "cosine"), ("adamw", "onecycle"), ("sgd", "step"), ("sgd", "none")]:
        cfg = OmegaConf.to_container(compose("train", [f"optimizer={opt_name}", f"scheduler={sched}"]), resolve=True)
        opt = build_optimizer(model, cfg["optimizer"])
        assert type(opt).__name__ == {"sgd": "SGD", "adamw": "AdamW"}[opt_name]
        # no weight decay on BN weights and biases
        assert [g["weight_decay"] for g in opt.param_groups] == [cfg["optimizer"]["weight_decay"], 0.0]
        no_decay = {id(p) for p in opt.param_groups[1]["params"]}
        assert id(model[1].weight) in no_decay and id(model[0].bias) in no_decay and id(model[0].weight) not in no_decay
        s = build_scheduler(opt, cfg["scheduler"], steps_per_epoch=10, epochs=3)
        lrs = []
        for _ in range(30):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if s:
                s.step()
        if sched == "cosine":  # warmup then decay to ~0
            assert lrs[0] < lrs[9] and lrs[-1] < 0.05 * max(lrs)
        if sched == "none":
            assert len(set(lrs)) == 1


def test_read_only_gz_root_is_extracted_into_a_cache(real_data, tmp_path):
    # A copy of the shared layout, made read-only: only the official .gz files.
    root = tmp_path / "ro"
    shutil.copytree(real_data / "FashionMNIST", root / "FashionMNIST")
    for p in sorted(root.rglob("*"), reverse=True):
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    root.chmod(0o555)
    before = sorted(str(p) for p in root.rglob("*"))
    cache = tmp_path / "cache"
    from resnet_cli.data import load_data

    overrides = [f"data.root={root}", f"data.cache_dir={cache}", "data.limit_train=64", "data.limit_test=32"]
    cfg = OmegaConf.to_container(compose("train", overrides), resolve=True)
    data = load_data(cfg["data"], 32, 32, 0, torch.device("cpu"))
    assert data.class_names[0] == "T-shirt/top" and data.num_train == 64
    assert sorted(str(p) for p in root.rglob("*")) == before  # nothing written into the root
    assert (cache / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def test_missing_data_offline_fails_in_one_line(tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    proc = run_cli("resnet-train", f"data.root={empty}", "data.download=false", "epochs=1", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert str(empty) in proc.stderr and "train-images-idx3-ubyte.gz" in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_failed_download_fails_in_one_line(tmp_path):
    # No network here: torchvision's download fails; the message says where and how.
    empty = tmp_path / "nothing"
    env = {"RESNET_CLI_DATA": str(empty), "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = run_cli("resnet-train", "epochs=1", "data.limit_train=8", cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: data.root=") and proc.stderr.count("\n") == 1
    assert "download failed" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()  # no run folder with only a log is left behind


@pytest.mark.data
def test_resnet18_learns_fashion_mnist_in_bf16_and_fp32(real_data, tmp_path):
    """The issue's bar: ResNet-18, 4,000 training images at 28x28, 1 epoch, >= 0.70 on 1,000
    test images; and bf16 reaches what fp32 does (measured seed-to-seed spread here: ~0.01-0.02)."""
    from resnet_cli.engine import cpu_has_native_bf16

    accs = {}
    # Where the CPU has no native bf16, auto never picks it, and emulated bf16 would take most
    # of the suite's time on such a machine: there fp32 alone must clear the bar.
    for precision in ("bf16", "fp32") if cpu_has_native_bf16() else ("fp32",):
        cwd = tmp_path / precision
        cwd.mkdir()
        # One epoch is 63 steps: no augmentation, a short warmup and AdamW learn fastest.
        proc = run_cli("resnet-train", f"data.root={real_data}", "data.resize=null", "data.limit_train=4000",
                       "data.limit_test=1000", "epochs=1", "batch_size=64", "data.augment=none", "optimizer=adamw",
                       "lr=0.002", "scheduler.warmup_epochs=0.2", f"trainer.precision={precision}",
                       "trainer.progress=plain", cwd=cwd, check=True)
        (run,) = run_dirs(cwd)
        (row,) = metrics(run)
        assert row["test_acc"] >= 0.70, proc.stdout
        accs[precision] = row["test_acc"]
    if "bf16" in accs:
        assert abs(accs["bf16"] - accs["fp32"]) <= 0.04, accs


def test_progress_bar_on_a_terminal(tmp_path):
    """On a terminal: a rich progress bar per epoch (loss, accuracy, images/s, ETA)."""
    import pty
    import subprocess

    from conftest import command

    main, child = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(COLUMNS="160", TERM="xterm-256color")
    args = [a for a in TINY if not a.startswith("trainer.progress")]  # auto: a bar on a terminal
    proc = subprocess.Popen([command("resnet-train"), *args, "epochs=1", "batch_size=16"], cwd=tmp_path,
                            stdin=child, stdout=child, stderr=child, env=env, close_fds=True)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=300)
    os.close(main)
    screen = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, screen
    assert "\x1b[" in screen  # drawn with terminal control codes
    assert "img/s" in screen and "loss" in screen and "acc" in screen and "eta" in screen
    assert "epoch 1/1  train_loss" in screen  # and the summary line stays


def test_the_epoch_line_shows_validation_and_ema_scores_where_the_run_has_them():
    from resnet_cli.reporting import epoch_line

    row = {"epoch": 2, "train_loss": 0.5, "train_acc": 0.8, "test_loss": 0.4, "test_acc": 0.85, "lr": 0.1,
           "train_images_per_s": 1000.0, "epoch_time_s": 3.0}
    plain = epoch_line(row, 5)
    assert plain.startswith("epoch 2/5  train_loss 0.5000") and "val_acc" not in plain and "ema" not in plain
    line = epoch_line({**row, "val_acc": 0.86, "val_loss": 0.3, "ema_test_acc": 0.84, "ema_val_acc": 0.83}, 5)
    assert "test_acc 0.8500  val_acc 0.8600  ema_val_acc 0.8300  ema_test_acc 0.8400  lr 0.1" in line


def test_the_curves_title_claims_the_final_test_acc_and_the_validation_choice():
    """Never the best of the test epochs (issue 13: that selects on the test set)."""
    from resnet_cli.reporting import curves_title

    rows = [{"epoch": 1, "test_acc": 0.91}, {"epoch": 2, "test_acc": 0.95}, {"epoch": 3, "test_acc": 0.93}]
    assert curves_title(rows, "resnet20") == "resnet20  (final test acc 0.9300)"
    with_val = [{**r, "val_acc": v} for r, v in zip(rows, (0.92, 0.90, 0.92))]
    assert curves_title(with_val, "m") == "m  (final test acc 0.9300; best val acc 0.9200 @ epoch 1)"


def test_on_step_falls_on_the_host_read_cadence_and_on_checkpoint_and_tracker_steps():
    """On CUDA each on_step call waits for the GPU: it runs every HOST_READ_EVERY steps (when the
    engine checks its losses anyway) and exactly at the steps a checkpoint or tracker point needs,
    not at a cadence of its own."""
    from torch import nn

    from resnet_cli.engine import HOST_READ_EVERY, StepContext, train_one_epoch
    from resnet_cli.train import report_steps

    cuda = torch.device("cuda", 0)  # a device object; nothing runs on it
    assert report_steps(torch.device("cpu"), 40, {"tensorboard": {"log_every_n_steps": 50}}) == ((1,), ())
    assert report_steps(cuda, None, None) == ((HOST_READ_EVERY,), ()) == ((20,), ())
    # checkpoints count the epoch's steps, tracker points the run's
    assert report_steps(cuda, 64, {"tensorboard": {"log_every_n_steps": 50}}) == ((20, 64), (50,))

    model = nn.Linear(4, 3)
    batches = [(torch.randn(2, 4), torch.randint(0, 3, (2,))) for _ in range(130)]
    ctx = StepContext(torch.optim.SGD(model.parameters(), lr=0.01), None, nn.CrossEntropyLoss(),
                      torch.device("cpu"), "fp32", channels_last=False, report_at=(20, 64), report_global=(50,))
    calls = []
    train_one_epoch(model, batches, ctx, epoch=1, on_step=lambda run: calls.append(run.steps))
    assert calls == [20, 40, 50, 60, 64, 80, 100, 120, 128]
    # epoch 2 of a run with 130 steps an epoch: tracker points at run steps 150, 200, 250
    calls.clear()
    ctx.step_offset = 130
    train_one_epoch(model, batches, ctx, epoch=2, on_step=lambda run: calls.append(run.steps))
    assert calls == [20, 40, 60, 64, 70, 80, 100, 120, 128]


def test_loss_sums_avoid_float64_on_apple_gpus():
    from resnet_cli.engine import sum_dtype

    assert sum_dtype(torch.device("cpu")) == sum_dtype(torch.device("cuda", 0)) == torch.float64
    assert sum_dtype(torch.device("mps")) == torch.float32  # MPS has no float64


def test_cfg_job_prints_the_composed_config_and_runs_nothing(tmp_path, monkeypatch, capfd):
    from resnet_cli.train import main

    monkeypatch.chdir(tmp_path)
    code, out, err = call_main(main, "resnet-train", ["--cfg", "job", "lr=0.2", "model=resnet20"], monkeypatch, capfd)
    assert code == 0, err
    assert "lr: 0.2" in out and "name: resnet20" in out
    assert not (tmp_path / "outputs").exists()


def test_batches_of_one_image_are_refused_only_where_batchnorm_sees_a_1x1_map():
    from resnet_cli.models import ModelSpec, stage_sizes
    from resnet_cli.train import _check_single_image_batches as check

    spec18 = ModelSpec(name="resnet18")
    spec20 = ModelSpec(name="resnet20", layers=[3, 3, 3], widths=[16, 32, 64], stem="cifar", shortcut="identity")
    resnet18, resnet20 = stage_sizes(spec18, 1, 28), stage_sizes(spec20, 1, 28)  # 1x1 and 7x7 at the end
    check(resnet20, 1, None, spec20, 28)
    check(resnet18, 2, None, spec18, 28)
    check(resnet18, 1, ["layer4"], spec18, 28)  # a frozen stage's BatchNorm is in eval mode
    with pytest.raises(ConfigError, match=r"^batch_size=1: at input size 28 resnet18's layer4 output is 1x1"):
        check(resnet18, 1, ["stem"], spec18, 28)
    # a pre-activation net ends on a BatchNorm outside every stage: frozen stages do not help
    preact = ModelSpec(name="preact_resnet18", block="preact_basic")
    with pytest.raises(ConfigError, match=r"^batch_size=1: at input size 28 preact_resnet18's final BatchNorm's input "
                                          r"is 1x1"):
        check(stage_sizes(preact, 1, 28), 1, ["stem", "layer1", "layer2", "layer3", "layer4"], preact, 28)
