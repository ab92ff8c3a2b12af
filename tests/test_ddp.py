"""Distributed data parallel on CPU: torchrun, 2 processes, Gloo — as a user launches it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

TINY = ["data=synthetic", "data.train_size=256", "data.test_size=100", "batch_size=32", "model=resnet20",
        "trainer.progress=plain", "trainer.device=cpu"]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "torchrun"
    cmd = [str(exe), "--standalone", "--nproc_per_node=2", "-m", "resnet_cli.train", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("ddp")
    proc = torchrun(*TINY, "epochs=2", cwd=cwd)
    runs = [p for p in cwd.glob("outputs/*/*") if p.is_dir()]
    assert len(runs) == 1, runs  # all ranks wrote into rank 0's run folder
    return runs[0], proc


def test_one_run_dir_and_identical_parameters(ddp_run):
    run, proc = ddp_run
    log = (run / "train.log").read_text()
    assert "parameters identical on all 2 ranks" in log
    assert "2 processes" in log and "batch 32 per process (64 in all)" in log
    assert log.count("epoch 2/2") == 1  # only rank 0 logs
    assert [r["epoch"] for r in rows(run)] == [1, 2]
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2


def test_global_accuracy_equals_a_single_process_evaluation(ddp_run, tmp_path):
    run, _ = ddp_run
    run_cli("resnet-eval", f"checkpoint={run / 'checkpoints' / 'last.pt'}", "device=cpu",
            f"output_dir={tmp_path}", cwd=tmp_path, check=True)
    single = json.loads((tmp_path / "eval.json").read_text())
    assert single["top1"] == rows(run)[-1]["test_acc"]


def test_resume_under_ddp_continues_the_same_run(ddp_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ddp_run[0], run)
    torchrun(f"resume={run}", "epochs=3", cwd=tmp_path)
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3]
    key = lambda r: (r["epoch"], r["train_loss"], r["test_acc"])  # noqa: E731 (timings differ)
    assert [key(r) for r in rows(run)[:2]] == [key(r) for r in rows(ddp_run[0])]
    assert not list(tmp_path.glob("outputs/*/*"))  # no new run folder


def test_dataloader_path_is_sharded_too(tmp_path):
    torchrun(*TINY, "epochs=1", "data.pipeline=loader", "data.num_workers=0", cwd=tmp_path)
    (run,) = [p for p in tmp_path.glob("outputs/*/*") if p.is_dir()]
    (row,) = rows(run)
    assert "parameters identical on all 2 ranks" in (run / "train.log").read_text()
    assert 0 <= row["test_acc"] <= 1
