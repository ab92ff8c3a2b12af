"""Faults found by review (issue 11): the learning rate of an extended run, the precision
policy on GPUs with emulated bf16, non-finite losses under DDP, the process group's device,
and run folders that failed runs leave behind."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from resnet_cli.cli import compose
from resnet_cli.distributed import DistInfo
from resnet_cli.engine import Running, StepContext
from resnet_cli.train import Trainer, _restore, build_optimizer, build_scheduler, rng_state

SCHEDULES = {
    "cosine (1 warmup epoch)": ["scheduler=cosine"],
    "cosine, no warmup": ["scheduler=cosine", "scheduler.warmup_epochs=0"],
    "step": ["scheduler=step"],
    "step with warmup": ["scheduler=step", "scheduler.warmup_epochs=0.5"],
    "onecycle": ["scheduler=onecycle"],
}
STEPS_PER_EPOCH = 16


def _setup(overrides: list[str], epochs: int):
    cfg = OmegaConf.to_container(compose("train", ["data=synthetic", f"epochs={epochs}", "lr=0.1", *overrides]),
                                 resolve=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = build_optimizer(model, cfg["optimizer"])
    base_lrs = [g["lr"] for g in opt.param_groups]
    sched = build_scheduler(opt, cfg["scheduler"], STEPS_PER_EPOCH, epochs)
    return cfg, model, opt, sched, base_lrs


def _lrs(opt, sched, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append([g["lr"] for g in opt.param_groups])
    return out


@pytest.mark.parametrize("resumed_after", [20, 8])  # after the warmup epoch, inside it
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_extending_a_run_follows_a_fresh_schedule_of_the_new_length(name, resumed_after):
    """4 epochs, stopped after some steps, resumed with epochs=8: at every later step the lr
    equals that of a fresh 8-epoch run (the resume goes through train._restore itself)."""
    _, _, fresh_opt, fresh_sched, _ = _setup(SCHEDULES[name], 8)
    expected = _lrs(fresh_opt, fresh_sched, 8 * STEPS_PER_EPOCH)

    cfg4, model, opt, sched, _ = _setup(SCHEDULES[name], 4)
    _lrs(opt, sched, resumed_after)
    epoch, step = divmod(resumed_after, STEPS_PER_EPOCH)
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
            "epoch": epoch, "step": step, "running": Running(steps=step).as_dict() if step else None,
            "best_acc": 0.0, "best_epoch": 0, "config": cfg4, "rng": rng_state(), "history": []}

    cfg8, model8, opt8, sched8, base8 = _setup(SCHEDULES[name], 8)
    ctx = StepContext(opt8, sched8, nn.CrossEntropyLoss(), torch.device("cpu"), "fp32")
    tr = Trainer(model8, model8, ctx, None, cfg8, Path("."), DistInfo())
    _restore(tr, ckpt, None, STEPS_PER_EPOCH, base8)
    got = _lrs(opt8, tr.ctx.scheduler, 8 * STEPS_PER_EPOCH - resumed_after)
    flat = lambda rows: [lr for row in rows for lr in row]  # noqa: E731
    assert flat(got) == pytest.approx(flat(expected[resumed_after:]), rel=1e-9, abs=1e-12)


def test_auto_precision_takes_fp16_where_bf16_is_only_emulated(monkeypatch):
    from resnet_cli import engine

    # torch.cuda.is_bf16_supported() says yes on a V100 (emulated); the capability says no.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = torch.device("cuda", 0)
    for capability, expected in [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert engine.resolve_precision("auto", gpu) == expected, capability


def _torchrun(script: Path, *args: str, timeout: float = 150) -> list[dict]:
    exe = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(exe), "--standalone", "--nproc_per_node=2", str(script), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The two workers share one pipe, so their lines can interleave: find each JSON object.
    results = [json.loads(m) for m in re.findall(r"RESULT (\{[^{}]*\})", proc.stdout)]
    assert len(results) == 2, proc.stdout
    return sorted(results, key=lambda r: r["rank"])


SCRIPT = Path(__file__).parent / "scripts" / "ddp_nonfinite.py"


@pytest.mark.slow
def test_ddp_ranks_skip_a_non_finite_step_together():
    r0, r1 = _torchrun(SCRIPT, "skip")
    # rank 1's bad step 2 and rank 0's bad step 4 are skipped by both ranks
    assert r0["skipped"] == r1["skipped"] == 2 and r0["steps"] == r1["steps"] == 5
    assert r0["identical"] and r1["identical"] and r0["finite"] and r1["finite"]


@pytest.mark.slow
def test_ddp_ranks_stop_together_on_a_non_finite_loss():
    r0, r1 = _torchrun(SCRIPT, "stop")
    assert r0["stopped_at"] == r1["stopped_at"] == 2  # rank 0's own loss was finite there
    assert r0["identical"] and r1["identical"]


def test_process_group_follows_trainer_device():
    from resnet_cli import distributed

    assert distributed.backend_for("cpu") == "gloo" and not distributed.uses_cuda("cpu")
    assert distributed.backend_for("cuda:0") == "cpu:gloo,cuda:nccl" and distributed.uses_cuda("cuda")
    assert distributed.uses_cuda("auto") == torch.cuda.is_available()
