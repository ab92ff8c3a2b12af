"""On a CUDA device: CUDA graphs follow the eager loss curve and keep every guarantee of the
step, an interrupted run resumes exactly, resnet-eval agrees with training, and torchrun works
with NCCL and with Gloo on the CPU. Skipped without CUDA; `pytest -m gpu` selects exactly
these (benchmarks/gpu_check.sh runs them)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from resnet_cli import build_model
from resnet_cli.checkpoint import load_checkpoint
from resnet_cli.config import ConfigError
from resnet_cli.cuda_graphs import GraphedForward, recovers_from_failed_capture
from resnet_cli.data import load_data
from resnet_cli.data.prefetch import prefetched
from resnet_cli.engine import NonFiniteLoss, StepContext, train_one_epoch

from conftest import command, run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda", 0)
BATCH = 64
# 5 full batches and a ragged one of 24, which the graph cannot take: it must run eagerly.
SYNTHETIC = {"name": "synthetic", "image_size": 28, "channels": 1, "num_classes": 10, "train_size": 5 * BATCH + 24,
             "test_size": 64, "resize": None, "augment": "standard", "hflip": True, "crop_padding": 2,
             "normalize": True, "mean": None, "std": None, "pipeline": "memory",
             "drop_last": False}


def _batches(data, epoch: int, nan_at: int | None) -> list:
    out = list(prefetched(data.train.batches(epoch), CUDA))
    if nan_at is not None:  # a full batch, so that it goes through the graph
        x, y = out[nan_at - 1]
        out[nan_at - 1] = (torch.full_like(x, float("nan")), y)
    return out


def _train(graphs: bool, precision: str, epochs: int = 2, nan_at: int | None = None, **step):
    """Per-step losses (None for a skipped step), the model and the context."""
    torch.manual_seed(0)
    data = load_data(SYNTHETIC, BATCH, 256, 0, CUDA)
    model = build_model("resnet18", in_channels=1, num_classes=10).to(CUDA).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=epochs * len(data.train))
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    ctx = StepContext(opt, sched, nn.CrossEntropyLoss(label_smoothing=0.1), CUDA, precision, scaler, report_at=(1,),
                      forward=GraphedForward(model, BATCH) if graphs else None, **step)
    losses: list[float | None] = []
    for epoch in range(1, epochs + 1):
        last = {"loss": 0.0, "n": 0}

        def on_step(run, last=last):
            n = run.counted - last["n"]
            losses.append((run.loss_sum - last["loss"]) / n if n else None)
            last.update(loss=run.loss_sum, n=run.counted)

        train_one_epoch(model, _batches(data, epoch, nan_at if epoch == 1 else None), ctx, epoch, on_step=on_step)
    torch.cuda.synchronize()
    return losses, model, ctx


TOLERANCE = {"bf16": 2e-2, "fp16": 2e-2, "fp32": 1e-3}


@pytest.mark.parametrize("precision,step", [
    ("bf16", {}), ("fp16", {}), ("fp32", {"grad_clip": 1.0}), ("bf16", {"skip_nonfinite": True}),
], ids=["bf16", "fp16-gradscaler", "fp32-grad_clip", "bf16-skip_nonfinite"])
def test_graphs_follow_the_eager_loss_curve(precision, step):
    nan_at = 3 if step.get("skip_nonfinite") else None
    eager, eager_model, _ = _train(False, precision, nan_at=nan_at, **step)
    graphed, model, ctx = _train(True, precision, nan_at=nan_at, **step)
    assert ctx.forward.graphed is not None, ctx.forward.failure  # the graph really ran
    assert [v is None for v in graphed] == [v is None for v in eager] == [i + 1 == nan_at for i in range(12)]
    tol = TOLERANCE[precision]
    torch.testing.assert_close([v for v in graphed if v is not None], [v for v in eager if v is not None],
                               rtol=tol, atol=tol)
    # capture's warm-up passes were undone: the counters agree exactly, the statistics closely
    for (name, a), b in zip(model.state_dict().items(), eager_model.state_dict().values()):
        if name.endswith("num_batches_tracked"):
            assert int(a) == int(b), name
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=10 * tol, atol=10 * tol, msg=name)


def test_a_non_finite_loss_stops_at_its_own_step_with_graphs():
    # The engine checks CUDA losses in groups of 20; each must be its own value, not the
    # graph's output buffer that the next replay overwrites.
    with pytest.raises(NonFiniteLoss, match="epoch 1, step 3"):
        _train(True, "bf16", epochs=1, nan_at=3)


class _HostSync(nn.Module):
    def forward(self, x):
        if float(x.abs().amax()) < 0:  # a host sync: not allowed while a graph is captured
            raise AssertionError
        return x


def test_a_failed_capture_trains_eagerly_with_one_log_line(caplog):
    """On torch >= 2.12. Older torch cannot go on after a failed capture: one line says to turn
    graphs off; there the test runs in a process of its own, since the allocator stays broken."""
    if not recovers_from_failed_capture() and os.environ.get("RESNET_CLI_TEST_ISOLATED") != "1":
        # addopts from pyproject name xdist's --dist, which a GPU image may lack (as gpu_check.py does)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra",
                               f"{__file__}::test_a_failed_capture_trains_eagerly_with_one_log_line"],
                              env={**os.environ, "RESNET_CLI_TEST_ISOLATED": "1"}, cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
        return

    def tiny():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), _HostSync(), nn.Flatten(),
                             nn.Linear(8 * 26 * 26, 10)).to(CUDA)

    g = torch.Generator(device=CUDA).manual_seed(0)
    batches = [(torch.randn(16, 1, 28, 28, device=CUDA, generator=g),
                torch.randint(0, 10, (16,), device=CUDA, generator=g)) for _ in range(4)]
    states = []
    for graphs in (False, True):
        model = tiny()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ctx = StepContext(opt, None, nn.CrossEntropyLoss(), CUDA, "fp32", channels_last=False,
                          forward=GraphedForward(model, 16) if graphs else None)
        if graphs and not recovers_from_failed_capture():
            with pytest.raises(ConfigError, match=r"capture failed .*rerun with trainer.cuda_graphs=false$"):
                train_one_epoch(model, batches, ctx, epoch=1)
            return
        with caplog.at_level(logging.INFO, logger="resnet_cli"):
            train_one_epoch(model, batches, ctx, epoch=1)
        states.append(model.state_dict())
    assert ctx.forward.graphed is None and ctx.forward.failure
    assert sum("capture failed" in r.getMessage() for r in caplog.records) == 1
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # not the failed capture's stream
    # eager both times (cuDNN's weight gradients may sum in any order: close, not equal)
    for (name, a), b in zip(states[1].items(), states[0].values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_training_batches_are_made_without_waiting_for_the_gpu():
    """The memory pipeline's crop, flip, resize, normalization and erasing queue GPU work only:
    a host sync there would stall every step (and the prefetch stream). The first batch may
    sync (normalization constants are copied to the device once)."""
    spec = {**SYNTHETIC, "resize": 32, "erase_prob": 0.5}
    data = load_data(spec, BATCH, 256, 0, CUDA)
    next(iter(data.train.batches(1)))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = list(data.train.batches(2)) + list(data.test.batches(0))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(batches) == len(data.train) + len(data.test)


def test_prefetched_batches_are_bit_identical():
    data = load_data(SYNTHETIC, BATCH, 256, 0, CUDA)
    plain = list(data.train.batches(1))
    ahead = list(prefetched(data.train.batches(1), CUDA))
    torch.cuda.synchronize()
    assert len(plain) == len(ahead) == 6
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(plain, ahead))


# ---------------------------------------------------------------- whole runs, as a user starts them

# 100 steps per epoch, so that a signal lands inside the run; deterministic algorithms (with
# cuBLAS's fixed workspace) make two processes compute bit-identical results.
RUN = ["model=resnet18", "data=synthetic", "data.train_size=12800", "data.test_size=1000", "batch_size=128",
       "epochs=3", "trainer.progress=plain", "trainer.cudnn_benchmark=false", "trainer.checkpoint_every_steps=40"]
DETERMINISTIC = [sys.executable, "-c", "import torch; torch.use_deterministic_algorithms(True, warn_only=True); "
                 "from resnet_cli.train import main; main()"]
DET_ENV = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
DET_ENV.pop("HYDRA_FULL_ERROR", None)


def _only_run(root: Path) -> Path:
    (run,) = [p.parent for p in root.glob("outputs/*/*/.hydra")]
    return run


def _rows(run: Path) -> list[dict]:
    timing = {"epoch_time_s", "train_images_per_s", "eval_time_s", "elapsed_s"}  # wall clock differs
    path = run / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def _train_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([*DETERMINISTIC, *args], cwd=cwd, env=DET_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("straight")
    _train_cli(*RUN, cwd=cwd)
    return _only_run(cwd)


def test_graphs_are_on_by_default_on_cuda(straight_run):
    log = (straight_run / "train.log").read_text()
    assert "cuda graphs on" in log and "captured for batches of 128x1x28x28" in log, log
    assert "capture failed" not in log


def test_resume_after_an_interrupt_equals_an_uninterrupted_run(straight_run, tmp_path):
    proc = subprocess.Popen([*DETERMINISTIC, *RUN], cwd=tmp_path, env=DET_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # Stop in epoch 2: at the first checkpoint written after epoch 1's row (epoch 1's own
    # last.pt or epoch 2's mid-epoch one), not after a fixed time, which a fast GPU may need
    # less than to finish the run.
    deadline, seen = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        rows = list(tmp_path.glob("outputs/*/*/metrics.jsonl"))
        last = list(tmp_path.glob("outputs/*/*/checkpoints/last.pt"))
        stamp = last[0].stat().st_mtime_ns if last else 0
        if seen is None and rows and rows[0].read_text().strip():
            seen = stamp
        elif seen is not None and stamp != seen:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]  # stopped, not finished
    run = _only_run(tmp_path)
    assert len(_rows(run)) < 3
    _train_cli(f"resume={run}", cwd=tmp_path)
    assert _rows(run) == _rows(straight_run)
    ours, theirs = (load_checkpoint(r / "checkpoints" / "last.pt")["model"] for r in (run, straight_run))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_resnet_eval_reproduces_the_best_test_accuracy(straight_run, tmp_path):
    # Under the same deterministic settings as training: cuDNN may otherwise pick another
    # algorithm, and in bf16 one near-tied image could flip.
    det_eval = [sys.executable, "-c", "import torch; torch.use_deterministic_algorithms(True, warn_only=True); "
                "from resnet_cli.evaluate import main; main()"]
    proc = subprocess.run([*det_eval, f"checkpoint={straight_run / 'checkpoints' / 'best.pt'}",
                           f"output_dir={tmp_path}"], cwd=tmp_path, env=DET_ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((straight_run / "results.json").read_text())
    assert json.loads((tmp_path / "eval.json").read_text())["top1"] == results["best_test_acc"]


def _torchrun(nproc: int, *args: str, cwd: Path) -> Path:
    cmd = [command("torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "resnet_cli.train", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return _only_run(cwd)


SMALL = ["data=synthetic", "data.train_size=256", "data.test_size=100", "batch_size=32", "model=resnet20",
         "trainer.progress=plain", "epochs=2"]


def test_torchrun_one_process_on_cuda(tmp_path):
    # One process is a plain run (no process group, so no NCCL): DDP needs two ranks.
    run = _torchrun(1, *SMALL, "trainer.device=cuda", cwd=tmp_path)
    results = json.loads((run / "results.json").read_text())
    assert results["device"].startswith("cuda") and results["epochs"] == 2 and results["world_size"] == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between two ranks needs two GPUs")
def test_torchrun_with_nccl_two_processes(tmp_path):
    run = _torchrun(2, *SMALL, "trainer.device=cuda", cwd=tmp_path)
    assert "parameters identical on all 2 ranks" in (run / "train.log").read_text()
    results = json.loads((run / "results.json").read_text())
    assert results["device"].startswith("cuda") and results["world_size"] == 2


def test_torchrun_with_gloo_on_the_cpu_of_a_gpu_machine(tmp_path):
    # Two CPU ranks on a machine with one GPU: rank 1 must not ask for a second GPU.
    run = _torchrun(2, *SMALL, "trainer.device=cpu", cwd=tmp_path)
    assert "parameters identical on all 2 ranks" in (run / "train.log").read_text()
    assert json.loads((run / "results.json").read_text())["device"] == "cpu"


def test_resnet_eval_with_cudnn_benchmark_agrees_with_training(tmp_path):
    # The default trainer.cudnn_benchmark=true, which resnet-eval takes from the checkpoint, lets
    # cuDNN pick its algorithms per shape: scores may move by an image, never more than two.
    run_cli("resnet-train", *SMALL, "trainer.device=cuda", cwd=tmp_path, check=True)
    run = _only_run(tmp_path)
    run_cli("resnet-eval", f"checkpoint={run / 'checkpoints' / 'last.pt'}", f"output_dir={tmp_path / 'eval'}",
            cwd=tmp_path, check=True)
    results = json.loads((run / "results.json").read_text())
    scored = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert results["device"].startswith("cuda") and scored["device"].startswith("cuda")
    assert abs(scored["top1"] - results["final_test_acc"]) <= 2 / 100  # SMALL's 100 test images
