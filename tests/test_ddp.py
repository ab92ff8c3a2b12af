"""Distributed data parallel on CPU: torchrun, 2 processes, Gloo — as a user launches it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

# 8 steps per epoch (2 processes x 32): long enough for a signal to land inside a run.
TINY = ["data=synthetic", "data.train_size=512", "data.test_size=100", "batch_size=32", "model=resnet20",
        "model.layers=[1,1,1]", "trainer.progress=plain", "trainer.device=cpu", "data.augment=standard",
        "trainer.ema_decay=0.9"]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "torchrun"
    cmd = [str(exe), "--standalone", "--nproc_per_node=2", "-m", "resnet_cli.train", *args]
    # A rank that dies of a signal (once: SIGABRT at exit after a finished run) prints the Python
    # stack of each of its threads, so a rare failure says where that rank was.
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("ddp")
    proc = torchrun(*TINY, "epochs=3", cwd=cwd)
    runs = [p for p in cwd.glob("outputs/*/*") if p.is_dir()]
    assert len(runs) == 1, runs  # all ranks wrote into rank 0's run folder
    return runs[0], proc


def test_one_run_dir_and_identical_parameters(ddp_run):
    run, proc = ddp_run
    log = (run / "train.log").read_text()
    assert "parameters identical on all 2 ranks" in log
    assert "2 processes" in log and "batch 32 per process (64 in all)" in log
    assert log.count("epoch 3/3") == 1  # only rank 0 logs
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3]
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2


def test_all_ranks_share_the_folder_a_users_primary_config_names(tmp_path):
    # A time stamp down to microseconds: each rank would resolve its own without rank 0's.
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.yaml").write_text(
        "defaults:\n  - train\n  - _self_\nhydra:\n  run:\n    dir: runs/${now:%H-%M-%S-%f}\n")
    torchrun("--config-dir", "conf", "--config-name", "mine", *TINY, "epochs=1", cwd=tmp_path)
    (run,) = [p for p in (tmp_path / "runs").iterdir()]
    assert [r["epoch"] for r in rows(run)] == [1]
    assert not (tmp_path / "outputs").exists()


def test_global_accuracy_equals_a_single_process_evaluation(ddp_run, tmp_path):
    run, _ = ddp_run
    for weights, prefix in (("raw", ""), ("ema", "ema_")):  # each rank scored the average as rank 0 saved it
        out = tmp_path / weights
        run_cli("resnet-eval", f"checkpoint={run / 'checkpoints' / 'last.pt'}", "device=cpu", f"weights={weights}",
                f"output_dir={out}", cwd=tmp_path, check=True)
        single = json.loads((out / "eval.json").read_text())
        assert single["top1"] == rows(run)[-1][f"{prefix}test_acc"]
        assert single["loss"] == pytest.approx(rows(run)[-1][f"{prefix}test_loss"], rel=1e-5)


def test_interrupted_ddp_run_resumes_to_the_uninterrupted_result(ddp_run, tmp_path):
    """SIGTERM to torchrun and its workers mid-run: all ranks stop at the same step and save;
    torchrun resume= then ends where the uninterrupted DDP run ended, metrics and weights."""
    import os
    import signal
    import time

    import torch

    from resnet_cli.checkpoint import load_checkpoint

    exe = Path(sys.executable).parent / "torchrun"
    proc = subprocess.Popen([str(exe), "--standalone", "--nproc_per_node=2", "-m", "resnet_cli.train", *TINY,
                             "epochs=3", "trainer.checkpoint_every_steps=2"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    # Signal inside epoch 2, after one of its step checkpoints: a mid-epoch stop is the case
    # where each rank's partial sums (train loss and accuracy) must survive the resume.
    deadline, seen = time.time() + 300, set()
    while time.time() < deadline and proc.poll() is None and len(seen) < 2:
        if list(tmp_path.glob("outputs/*/*/metrics.jsonl")):
            for p in tmp_path.glob("outputs/*/*/checkpoints/last.pt"):
                try:
                    seen.add((p.stat().st_ino, p.stat().st_mtime_ns))
                except FileNotFoundError:  # replaced between glob and stat
                    pass
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)  # the agent and both workers, as a terminal or a scheduler would
    out, err = proc.communicate(timeout=300)
    (run,) = [p for p in tmp_path.glob("outputs/*/*") if p.is_dir()]
    assert proc.returncode != 0, "the run ended before the signal landed"
    assert (run / "checkpoints" / "last.pt").is_file() and len(rows(run)) < 3, err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] > 0, "the signal did not land mid-epoch"

    torchrun(f"resume={run}", cwd=tmp_path)
    key = lambda r: {k: v for k, v in r.items() if not k.endswith("_s")}  # noqa: E731 (timings differ)
    assert [key(r) for r in rows(run)] == [key(r) for r in rows(ddp_run[0])]
    a = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(ddp_run[0] / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_checkpoint(r / "checkpoints" / "last.pt")["ema"] for r in (run, ddp_run[0]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len([p for p in tmp_path.glob("outputs/*/*") if p.is_dir()]) == 1  # no new run folder


def test_each_rank_gets_a_disjoint_share_covering_the_data():
    """The DataLoader path under DDP: per epoch, the ranks' samples are disjoint, of equal size,
    and together cover the training set except the (epoch-dependent) dropped remainder."""
    import torch
    from torch.utils.data import TensorDataset

    from resnet_cli.data.batches import EpochOrder, LoaderBatches

    n, batch = 103, 10
    ids = TensorDataset(torch.arange(n), torch.arange(n))  # (image, label): here both the index
    for epoch in (0, 1):
        shares = []
        for rank in range(2):
            order = EpochOrder(n, batch, True, 0, rank, 2, drop_last=True)
            loader = LoaderBatches(ids, order, torch.device("cpu"), num_workers=0)
            shares.append([int(i) for x, _ in loader.batches(epoch) for i in x])
        a, b = set(shares[0]), set(shares[1])
        assert len(shares[0]) == len(shares[1]) == 50 and not a & b  # 2 x 5 full batches of 10
        assert len(a | b) == 100 and (a | b) <= set(range(n))
    test = [set(int(i) for x, _ in LoaderBatches(ids, EpochOrder(n, batch, False, 0, r, 2), torch.device("cpu"),
                                                  0).batches() for i in x) for r in range(2)]
    assert test[0] | test[1] == set(range(n)) and not test[0] & test[1]  # evaluation: every sample once


def test_dataloader_path_is_sharded_too(tmp_path):
    torchrun(*TINY, "epochs=1", "data.pipeline=loader", "data.num_workers=0", cwd=tmp_path)
    (run,) = [p for p in tmp_path.glob("outputs/*/*") if p.is_dir()]
    (row,) = rows(run)
    assert "parameters identical on all 2 ranks" in (run / "train.log").read_text()
    # the global test score equals one process scoring the whole test set
    run_cli("resnet-eval", f"checkpoint={run / 'checkpoints' / 'last.pt'}", "device=cpu",
            f"output_dir={tmp_path / 'eval'}", cwd=tmp_path, check=True)
    single = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert single["top1"] == pytest.approx(row["test_acc"], abs=0.011)  # per-sample vs device resize: 1 image
    assert single["loss"] == pytest.approx(row["test_loss"], rel=1e-3)


def test_ranks_agree_on_stopping_at_the_same_polled_steps():
    from resnet_cli.distributed import StopPoll

    asked = []
    signalled = {"now": False}

    def agree(flag: bool) -> bool:  # stands in for the all-reduce: records when ranks are asked
        asked.append(flag)
        return flag

    poll = StopPoll(lambda: signalled["now"], agree, every=20)
    assert not any(poll() for _ in range(45)) and len(asked) == 3  # calls 1, 21, 41: one all-reduce per 20 steps
    signalled["now"] = True
    answers = [poll() for _ in range(16)]  # calls 46..61: the next poll is call 61
    assert answers == [False] * 15 + [True] and asked == [False, False, False, True]
    assert poll(force=True) and len(asked) == 5  # the end of an epoch always asks
    alone = StopPoll(lambda: signalled["now"], None, every=20)  # one process: no agreement, every step
    assert alone() and alone()
