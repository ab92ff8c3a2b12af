"""benchmarks/gpu_check.sh, the one command for a GPU machine, checked where there is none:
it refuses clearly without CUDA, and its CPU smoke mode runs every part and writes the summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the real check")


def gpu_check(*args: str, out: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_without_cuda_it_fails_in_one_line(tmp_path):
    proc = gpu_check(out=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no CUDA device visible to torch") and proc.stderr.count("\n") == 1
    assert "--cpu-smoke" in proc.stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,needle", [
    (["--parts", "default_run,fast"], "--parts fast: choose from default_run, pytest_gpu, throughput, step_variants, "
                                      "default_seeds, d2l_seeds, screen (or all)"),
    (["--data-root", "/no/such/folder"], "--data-root /no/such/folder: no FashionMNIST/raw folder there"),
])
def test_bad_arguments_fail_in_one_line(args, needle):
    proc = gpu_check("--cpu-smoke", *args)
    assert proc.returncode == 2 and proc.stderr == f"error: {needle}\n"


@pytest.mark.slow
def test_cpu_smoke_runs_every_part_and_writes_one_summary(tmp_path):
    results = REPO / "benchmarks" / "results"
    before = sorted(results.iterdir())
    proc = gpu_check("--cpu-smoke", out=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    parts = summary["parts"]
    assert list(parts) == ["default_run", "pytest_gpu", "throughput", "step_variants"]
    assert all(p["status"] == "ok" and p["duration_s"] > 0 for p in parts.values()), parts
    assert summary["cpu_smoke"] and summary["torch"] == torch.__version__ and summary["total_s"] <= summary["budget_s"]
    run = parts["default_run"]["numbers"]
    assert 0 <= run["best_test_acc"] <= 1 and run["epochs"] == 1 and run["log_lines"]
    tp = parts["throughput"]["numbers"]
    assert tp["model"] == "d2l_resnet18" and tp["speedup"] > 0 and tp["speedup_resnet18"] > 0
    variants = parts["step_variants"]["numbers"]["variants"]
    assert variants["resnet18_graphed"]["skipped"] == "CUDA graphs need a CUDA device"
    folded = variants["d2l_bias_as_add"]
    assert folded["equivalent"] and folded["same_state_dict_keys"] and folded["max_abs_diff_fp32"] < 1e-4
    assert variants["d2l_resnet18"]["vs_resnet18"] > 0
    tests = parts["pytest_gpu"]["numbers"]
    assert tests["modules"] == ["tests.test_gpu"] and tests["tests"] == tests["skipped"] > 0  # -m gpu: exactly these
    assert set(summary["targets"]) == {"default_run_wall_s<=20", "default_run_test_acc>=0.935", "throughput_speedup>=3",
                                       "default_3_seed_mean>=0.940"}
    assert summary["targets"]["default_3_seed_mean>=0.940"] is None  # its part was not asked for
    assert "===== step_variants" in (tmp_path / "gpu-check.log").read_text()
    assert sorted(results.iterdir()) == before  # a smoke run is no result


@pytest.mark.slow
def test_seed_parts_run_only_when_named_and_give_the_spread_over_seeds(tmp_path):
    # default_seeds adds seeds 1 and 2 to default_run's seed 0 (issue 13's 3 seeds on a GPU).
    proc = gpu_check("--cpu-smoke", "--parts", "default_run,default_seeds", out=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    parts = summary["parts"]
    assert list(parts) == ["default_run", "default_seeds"]
    numbers = parts["default_seeds"]["numbers"]
    seeds = numbers["seeds"]
    assert sorted(seeds) == ["0", "1", "2"]
    assert seeds["0"]["final_test_acc"] == parts["default_run"]["numbers"]["final_test_acc"]
    accs = [s["final_test_acc"] for s in seeds.values()]
    assert numbers["final_test_acc_min"] == min(accs) and numbers["final_test_acc_max"] == max(accs)
    assert abs(numbers["final_test_acc_mean"] - sum(accs) / 3) < 1e-12 and numbers["final_test_acc_std"] >= 0
    assert all(s["wall_time_s"] > 0 and "time_to_0.93" in s for s in seeds.values())
    assert summary["targets"]["default_3_seed_mean>=0.940"] == (numbers["final_test_acc_mean"] >= 0.940)


@pytest.mark.slow
def test_screen_compares_recipes_on_the_validation_split(tmp_path):
    # Issue 13's 0.940: lr x batch and a CIFAR stem at 28 px, each judged on held-out training images.
    proc = gpu_check("--cpu-smoke", "--parts", "screen", out=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    numbers = json.loads((tmp_path / "gpu-check.json").read_text())["parts"]["screen"]["numbers"]
    jobs = numbers["jobs"]
    assert sorted(tuple(sorted(j["overrides"])) for j in jobs if j["sweep"] == "screen-lr-batch") == sorted(
        (f"batch_size={b}", f"lr={lr}") for lr in ("0.05", "0.1", "0.2") for b in (16, 8))
    assert sorted(j["overrides"][-1] for j in jobs if j["sweep"] == "screen-cifar-stem") == ["lr=0.05", "lr=0.1"]
    assert [j["overrides"] for j in jobs if j["sweep"] in ("screen-crop2", "screen-smooth02")] in (
        [["lr=0.1", "data.crop_padding=2"], ["lr=0.1", "trainer.label_smoothing=0.2"]],
        [["lr=0.1", "trainer.label_smoothing=0.2"], ["lr=0.1", "data.crop_padding=2"]])
    assert all(0 <= j["final_val_acc"] <= 1 and 0 <= j["final_test_acc"] <= 1 for j in jobs)
    vals = [j["final_val_acc"] for j in jobs]
    assert vals == sorted(vals, reverse=True) and numbers["chosen_by_final_val_acc"] == jobs[0]
    assert set(numbers["baseline"]["overrides"]) == {"lr=0.05", "batch_size=16"}
    assert "data=synthetic" in numbers["fixed"]["screen-lr-batch"]  # what ran, not the GPU list
