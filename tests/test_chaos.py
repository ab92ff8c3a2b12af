"""Crash test (issue 11): SIGKILL a training run at random moments, again and again, including
while checkpoints are written (one after every step); resume after every kill. The run folder
never holds a checkpoint that does not load, and the end result equals an uninterrupted run's."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from resnet_cli.checkpoint import load_checkpoint

from conftest import command, run_cli

# 8 steps per epoch, 6 epochs, a checkpoint after every step; 0.02-0.1 s per step on 2 cores.
CHAOS = ["data=synthetic", "data.train_size=128", "data.test_size=32", "batch_size=16", "model=resnet20",
         "model.layers=[1,1,1]", "epochs=6", "trainer.progress=none", "trainer.checkpoint_every_steps=1",
         "data.augment=standard", "trainer.eval_batch_size=32", "trainer.precision=fp32"]
KILLS = 7  # each life costs a Python and torch start-up: the suite's slowest test


def _rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not k.endswith("_s") and k != "train_images_per_s"}
            for x in lines]


def _checkpoints_load(run: Path) -> None:
    for ckpt in (run / "checkpoints").glob("*.pt"):
        load_checkpoint(ckpt)  # raises on a torn or damaged file


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    run_cli("resnet-train", *CHAOS, f"hydra.run.dir={straight}", cwd=tmp_path, check=True)

    # Kill windows in steps, not seconds: on a fast machine a fixed 0.3 s is many steps and the
    # run could end before its tenth kill. Every life makes at most ~3 of the 48 steps.
    epoch_s = [json.loads(x)["epoch_time_s"] for x in (straight / "metrics.jsonl").read_text().splitlines()]
    step_s = sorted(epoch_s)[len(epoch_s) // 2] / 8
    run = tmp_path / "chaos"
    rng = random.Random(11)
    kills, args = 0, [*CHAOS, f"hydra.run.dir={run}"]
    while kills < KILLS:
        last = run / "checkpoints" / "last.pt"
        before = _mtime(last)
        proc = subprocess.Popen([command("resnet-train"), *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        startup = rng.random() < 0.2  # now and then during start-up or the resume itself
        deadline = time.time() + (rng.uniform(0.5, 4.0) if startup else 120)
        while _mtime(last) == before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if not startup:  # mostly once this life has written a checkpoint: anywhere in the steps and writes
            time.sleep(rng.uniform(0.0, 2 * step_s))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()
            pytest.fail(f"the run finished after {kills} kills; make it longer")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
        kills += 1
        if last.exists():
            _checkpoints_load(run)
            args = [f"resume={run}"]

    run_cli("resnet-train", *args, cwd=tmp_path, check=True)
    _checkpoints_load(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]  # no temp files
    assert _rows(run) == _rows(straight)
    for name in ("last.pt", "best.pt"):
        a = load_checkpoint(run / "checkpoints" / name)["model"]
        b = load_checkpoint(straight / "checkpoints" / name)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
