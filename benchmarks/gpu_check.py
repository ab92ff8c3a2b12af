"""The GPU checks of issue 12 in one process tree, with one JSON summary. Start it through
benchmarks/gpu_check.sh, which first installs what the machine lacks.

Parts, most important first, each with its own timeout inside an overall budget:
  default_run    resnet-train model=resnet18 lr=0.05 epochs=10 on Fashion-MNIST: whole-process
                 wall time, test accuracy, images/s per epoch, results.json's time_s breakdown
  pytest_gpu     pytest -m gpu (tests/test_gpu.py): correctness before the speed figures
  throughput     benchmarks/throughput.py: reference loop vs resnet-cli, d2l_resnet18 and resnet18
  step_variants  benchmarks/step_variants.py --profile: why d2l_resnet18 is slower

Issue 13's accuracy over seeds on the GPU, only when asked for (--parts all, or by name; the
screen only by name, in a call of its own),
since the four parts above must finish in under 7 minutes on an H100:
  default_seeds  seeds 1 and 2 of the default run; with default_run's seed 0: mean, std, min, max
  d2l_seeds      resnet-train experiment=d2l, seeds 0-2: the reference recipe on the same card
  screen         toward issue 13's 0.940: the default recipe's peak lr x batch size, ResNet-18 with a
                 CIFAR stem on the native 28x28 images, 4 px shifts, label smoothing 0.2; 10 epochs
                 each, compared on 5,000 held-out training images (data.val_size), never on the test
                 split

The summary is rewritten after every part, so a run cut short still leaves what it measured.

--cpu-smoke runs every part with tiny settings on the CPU, to check this script anywhere.
Exit code: 0 when every part passed, 1 when one failed or timed out, 2 for no CUDA device.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TAIL = 2000  # characters of a failed part's output kept in the summary
# Issue 12's targets on an H100/H200.
TARGETS = {"default_run_wall_s_max": 20.0, "default_run_test_acc_min": 0.935, "throughput_speedup_min": 3.0,
           "default_3_seed_mean_min": 0.940}  # the last is issue 13's


@dataclass
class Part:
    name: str
    timeout_s: float
    command: Callable[[argparse.Namespace, Path], list[str]]
    numbers: Callable[[argparse.Namespace, Path], dict[str, Any]]
    needs_data: bool = False
    extra: bool = False  # run only when named in --parts (or --parts all)
    by_name: bool = False  # run only when named in --parts (not with all: it needs a call of its own)


# ---------------------------------------------------------------- the parts' commands and numbers

def _run_cmd(a: argparse.Namespace, work: Path) -> list[str]:
    base = [PY, "-m", "resnet_cli.train", "trainer.progress=plain", f"hydra.run.dir={work / 'default-run'}"]
    if a.cpu_smoke:
        return base + ["model=resnet20", "epochs=1", "data=synthetic", "data.train_size=64", "data.test_size=32",
                       "batch_size=32", "trainer.device=cpu", "trainer.precision=fp32"]
    return base + ["model=resnet18", "lr=0.05", "epochs=10", f"data.root={a.data_root}"]


def _run_numbers(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    run = work / "default-run"
    results = json.loads((run / "results.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    log = (run / "train.log").read_text() if (run / "train.log").exists() else ""
    lines = [line.split("] ", 1)[-1] for line in log.splitlines()]
    speeds = [r["train_images_per_s"] for r in rows]
    return {
        "best_test_acc": results.get("best_test_acc"), "final_test_acc": results.get("final", {}).get("test_acc"),
        "epochs": results.get("epochs"), "results_wall_time_s": results.get("wall_time_s"),
        "time_s": results.get("time_s"), "precision": results.get("precision"),
        "device_name": results.get("device_name"), "train_images_per_s_by_epoch": speeds,
        "median_train_images_per_s_from_epoch_2": sorted(speeds[1:])[len(speeds[1:]) // 2] if len(speeds) > 1 else None,
        # whether graphs were used, and the run's closing lines (its time summary)
        "log_lines": [x for x in lines if "cuda graphs" in x] + lines[-2:],
    }


def _sweep_cmd(name: str, overrides: list[str], seeds: str) -> Callable[[argparse.Namespace, Path], list[str]]:
    """A -m sweep over seeds (Hydra's basic launcher: one job after the other, in one process)."""
    def cmd(a: argparse.Namespace, work: Path) -> list[str]:
        base = [PY, "-m", "resnet_cli.train", "-m", f"seed={seeds}", "trainer.progress=plain",
                f"hydra.sweep.dir={work / name}"]
        if a.cpu_smoke:
            return base + ["model=resnet20", "epochs=1", "data=synthetic", "data.train_size=64", "data.test_size=32",
                           "batch_size=32", "trainer.device=cpu", "trainer.precision=fp32"]
        return base + overrides + [f"data.root={a.data_root}"]
    return cmd


def _seed_stats(runs: list[Path]) -> dict[str, Any]:
    """Final test accuracy over seeds (mean, sample std, min, max), wall time and time to 0.93 per seed."""
    import statistics

    per_seed: dict[str, Any] = {}
    for run in runs:
        r = json.loads((run / "results.json").read_text())
        seed = _seed_of(run)
        per_seed[str(seed)] = {"final_test_acc": r["final_test_acc"], "wall_time_s": r.get("wall_time_s"),
                               "time_to_0.93": (r.get("time_to_acc") or {}).get("0.93"),
                               "precision": r.get("precision"), "device_name": r.get("device_name")}
    accs = [x["final_test_acc"] for x in per_seed.values()]
    return {"seeds": per_seed, "final_test_acc_mean": statistics.fmean(accs),
            "final_test_acc_std": statistics.stdev(accs) if len(accs) > 1 else None,
            "final_test_acc_min": min(accs), "final_test_acc_max": max(accs)}


def _overrides(run: Path) -> list[str]:
    """The overrides a run was started with, as Hydra saved them (one `- key=value` a line)."""
    return [line.strip("- ") for line in (run / ".hydra" / "overrides.yaml").read_text().splitlines()]


def _seed_of(run: Path) -> int:
    """The seed a run was started with (0: the config's default)."""
    return next((int(x.split("=", 1)[1]) for x in _overrides(run) if x.startswith("seed=")), 0)


def _jobs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if (p / "results.json").is_file()), key=lambda p: int(p.name))


def _default_seeds_numbers(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    runs = _jobs(work / "default-seeds")
    if (work / "default-run" / "results.json").is_file():  # seed 0 is default_run
        runs = [work / "default-run"] + runs
    return _seed_stats(runs)


def _d2l_numbers(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    return _seed_stats(_jobs(work / "d2l-seeds"))


# The screen's sweeps (one -m each, run one after the other): name -> the swept overrides. Every
# job trains 10 epochs on 55,000 images and is judged by its final validation accuracy.
SCREEN = {
    "screen-lr-batch": ["lr=0.05,0.1,0.2", "batch_size=128,256"],
    "screen-cifar-stem": ["model.stem=cifar", "data.resize=null", "lr=0.05,0.1"],
    # one change each against lr=0.1 batch 256 of the first sweep: 2-px shifts (off by default:
    # they cost 0.005 in 10 epochs on the CPU at lr 0.05) and airbench's label smoothing 0.2
    "screen-crop2": ["lr=0.1", "data.crop_padding=2"],
    "screen-smooth02": ["lr=0.1", "trainer.label_smoothing=0.2"],
}
SCREEN_FIXED = ["model=resnet18", "epochs=10", "data.val_size=5000"]
# --cpu-smoke: the same sweeps, tiny (batches that fit 64 synthetic images).
SCREEN_SMOKE_FIXED = ["model=resnet18", "model.widths=[8,16,32,64]", "epochs=1", "data=synthetic",
                      "data.train_size=64", "data.test_size=32", "data.val_size=16", "trainer.device=cpu",
                      "trainer.precision=fp32"]
SCREEN_SMOKE_SWAP = {"batch_size=128,256": "batch_size=8,16"}
SCREEN_BASELINE = {False: {"lr=0.05", "batch_size=256"}, True: {"lr=0.05", "batch_size=16"}}  # today's recipe


def _screen_cmd(a: argparse.Namespace, work: Path) -> list[str]:
    import shlex

    steps = ["rc=0"]
    for name in SCREEN:
        fixed, swept = _screen_overrides(a, name)
        cmd = [PY, "-m", "resnet_cli.train", "-m", *fixed, *swept, "trainer.progress=plain",
               f"hydra.sweep.dir={work / name}"]
        steps.append(f"{shlex.join(cmd)} || rc=1")  # a failed sweep does not stop the next one
    return ["sh", "-c", "; ".join(steps + ["exit $rc"])]


def _screen_overrides(a: argparse.Namespace, name: str) -> tuple[list[str], list[str]]:
    """(fixed, swept) overrides of one screening sweep, as run (tiny with --cpu-smoke)."""
    swept = SCREEN[name]
    if not a.cpu_smoke:
        return SCREEN_FIXED + [f"data.root={a.data_root}"], swept
    swept = [SCREEN_SMOKE_SWAP.get(x, x) for x in swept]
    return SCREEN_SMOKE_FIXED + ([] if any(x.startswith("batch_size=") for x in swept) else ["batch_size=16"]), swept


def _screen_numbers(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    jobs = []
    for name in SCREEN:
        swept = {x.split("=")[0] for x in SCREEN[name]}
        for run in _jobs(work / name) if (work / name).is_dir() else []:
            r = json.loads((run / "results.json").read_text())
            jobs.append({"sweep": name, "overrides": [x for x in _overrides(run) if x.split("=")[0] in swept],
                         "final_val_acc": r.get("final_val_acc"), "best_val_acc": r.get("best_val_acc"),
                         "final_test_acc": r.get("final_test_acc"), "wall_time_s": r.get("wall_time_s"),
                         "time_to_0.93": (r.get("time_to_acc") or {}).get("0.93")})
    if not jobs:
        raise ValueError("no screening job finished")
    ranked = sorted(jobs, key=lambda j: -(j["final_val_acc"] or 0.0))
    baseline = next((j for j in jobs if j["sweep"] == "screen-lr-batch"
                     and SCREEN_BASELINE[a.cpu_smoke] <= set(j["overrides"])), None)
    return {"fixed": {name: _screen_overrides(a, name)[0] for name in SCREEN}, "jobs": ranked,
            "chosen_by_final_val_acc": ranked[0], "baseline": baseline}


def _throughput_cmd(a: argparse.Namespace, work: Path) -> list[str]:
    cmd = [PY, str(REPO / "benchmarks" / "throughput.py"), "--json", str(work / "throughput.json")]
    if a.cpu_smoke:
        return cmd + ["--device", "cpu", "--precision", "fp32", "--size", "32", "--batch", "8", "--steps", "1",
                      "--warmup", "0", "--workers", "0"]
    return cmd + ["--steps", "60", "--warmup", "10"] + (["--data-root", str(a.data_root)] if a.data_root else [])


def _json_numbers(name: str) -> Callable[[argparse.Namespace, Path], dict[str, Any]]:
    return lambda a, work: json.loads((work / name).read_text())


def _variants_cmd(a: argparse.Namespace, work: Path) -> list[str]:
    cmd = [PY, str(REPO / "benchmarks" / "step_variants.py"), "--json", str(work / "step_variants.json")]
    if a.cpu_smoke:
        return cmd + ["--device", "cpu", "--precision", "fp32", "--size", "32", "--batch", "4", "--steps", "1",
                      "--warmup", "0", "--variants", "resnet18,resnet18_graphed,d2l_resnet18,d2l_bias_as_add"]
    return cmd + ["--profile"]


def _pytest_cmd(a: argparse.Namespace, work: Path) -> list[str]:
    # Only the GPU module is collected (a GPU image may lack what other test modules import),
    # and the project's addopts are dropped: they name pytest-xdist's options.
    return [PY, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra",
            f"--junitxml={work / 'pytest.xml'}", str(REPO / "tests" / "test_gpu.py")]


def _pytest_numbers(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    root = ET.parse(work / "pytest.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = suite.findall("testcase")
    failed = [f"{c.get('classname')}.{c.get('name')}" for c in cases
              if c.find("failure") is not None or c.find("error") is not None]
    return {"tests": int(suite.get("tests", 0)), "failures": int(suite.get("failures", 0)),
            "errors": int(suite.get("errors", 0)), "skipped": int(suite.get("skipped", 0)), "failed": failed,
            "modules": sorted({c.get("classname") for c in cases})}


PARTS = [
    Part("default_run", 150, _run_cmd, _run_numbers, needs_data=True),
    Part("pytest_gpu", 200, _pytest_cmd, _pytest_numbers),
    Part("throughput", 100, _throughput_cmd, _json_numbers("throughput.json")),
    Part("step_variants", 100, _variants_cmd, _json_numbers("step_variants.json")),
    # Issue 13's, when asked for: about 2 x 20-55 s and 3 x 50-60 s on an H100.
    Part("default_seeds", 150, _sweep_cmd("default-seeds", ["model=resnet18", "lr=0.05", "epochs=10"], "1,2"),
         _default_seeds_numbers, needs_data=True, extra=True),
    Part("d2l_seeds", 240, _sweep_cmd("d2l-seeds", ["experiment=d2l"], "0,1,2"), _d2l_numbers, needs_data=True,
         extra=True),
    # About 10 x 20-60 s on an H100 (batch 128 takes longer per epoch than 256).
    Part("screen", 540, _screen_cmd, _screen_numbers, needs_data=True, extra=True, by_name=True),
]


# ---------------------------------------------------------------- running them

def run_part(part: Part, a: argparse.Namespace, work: Path, timeout: float, log) -> dict[str, Any]:
    cmd = part.command(a, work)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(":"),
           "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    if a.data_root:
        env["RESNET_CLI_TEST_DATA"] = str(a.data_root)
    log.write(f"\n===== {part.name}: {' '.join(cmd)} (timeout {timeout:.0f} s)\n")
    log.flush()
    t0 = time.perf_counter()
    # A session of its own: on timeout the whole tree goes (torchrun's workers, DataLoader's).
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = "timeout"
    seconds = time.perf_counter() - t0
    log.write(output)
    log.flush()
    out: dict[str, Any] = {"status": status, "duration_s": round(seconds, 2), "returncode": proc.returncode,
                           "command": " ".join(cmd)}
    try:
        out["numbers"] = part.numbers(a, work)
    except (OSError, ValueError, KeyError, ET.ParseError) as e:
        out["numbers"] = None
        if status == "ok":
            status = out["status"] = "failed"
            out["error"] = f"no numbers: {type(e).__name__}: {e}"
    if status != "ok":
        out["output_tail"] = output[-TAIL:]
    print(f"{part.name:<14} {status:<8} {seconds:7.1f} s", flush=True)
    return out


def environment() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device_name": torch.cuda.get_device_name(0) if cuda else None,
        "host": platform.node(), "cpu_count": os.cpu_count(),
    }
    env["nvidia_smi"] = _output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                 "--format=csv,noheader"])
    env["git_commit"] = _output(["git", "rev-parse", "HEAD"])
    return env


def _output(cmd: list[str]) -> str | None:
    """A command's stdout, or None where it is missing, fails or hangs: facts, not a reason to stop."""
    if not shutil.which(cmd[0]):
        return None
    try:
        q = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (q.stdout.strip() or None) if q.returncode == 0 else None


def targets(parts: dict[str, Any]) -> dict[str, bool | None]:
    run = (parts.get("default_run") or {}).get("numbers") or {}
    tp = (parts.get("throughput") or {}).get("numbers") or {}
    wall = (parts.get("default_run") or {}).get("duration_s") if run else None
    acc = run.get("final_test_acc")  # the final epoch's, never the best over test epochs (issue 13)
    speedup = tp.get("speedup_resnet18", tp.get("speedup"))
    seeds = (parts.get("default_seeds") or {}).get("numbers") or {}
    mean = seeds.get("final_test_acc_mean") if len(seeds.get("seeds", {})) == 3 else None
    return {
        "default_run_wall_s<=20": None if wall is None else wall <= TARGETS["default_run_wall_s_max"],
        "default_run_test_acc>=0.935": None if acc is None else acc >= TARGETS["default_run_test_acc_min"],
        "throughput_speedup>=3": None if speedup is None else speedup >= TARGETS["throughput_speedup_min"],
        "default_3_seed_mean>=0.940": None if mean is None else mean >= TARGETS["default_3_seed_mean_min"],
    }


def find_data_root(given: str | None) -> Path | None:
    for candidate in (given, os.environ.get("RESNET_CLI_DATA"), str(REPO / "data")):
        if candidate and (Path(candidate) / "FashionMNIST" / "raw").is_dir():
            return Path(candidate).resolve()
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="every part with tiny settings on the CPU")
    p.add_argument("--data-root", help="folder with FashionMNIST/raw (default: $RESNET_CLI_DATA, then ./data)")
    p.add_argument("--budget", type=float, default=380, help="seconds for all parts together")
    p.add_argument("--parts", default=",".join(x.name for x in PARTS if not x.extra),
                   help="comma-separated, run in this script's order; 'all' adds the seed parts (the screen "
                        "runs only by name)")
    p.add_argument("--summary", help="also write the summary here")
    a = p.parse_args()

    import torch

    if not a.cpu_smoke and not torch.cuda.is_available():
        print(f"error: no CUDA device visible to torch {torch.__version__}; run this on a GPU machine, "
              "or pass --cpu-smoke", file=sys.stderr)
        return 2
    root = find_data_root(a.data_root)
    if a.data_root and root is None:
        print(f"error: --data-root {a.data_root}: no FashionMNIST/raw folder there", file=sys.stderr)
        return 2
    a.data_root = root
    chosen = [x.name for x in PARTS if not x.by_name] if a.parts == "all" else [x for x in a.parts.split(",") if x]
    unknown = [x for x in chosen if x not in {part.name for part in PARTS}]
    if unknown:
        print(f"error: --parts {unknown[0]}: choose from {', '.join(x.name for x in PARTS)} (or all)", file=sys.stderr)
        return 2

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    log_path = (out_dir or work) / "gpu-check.log"
    started = time.perf_counter()
    summary: dict[str, Any] = {"date": dt.datetime.now().isoformat(timespec="seconds"), "cpu_smoke": a.cpu_smoke,
                               **environment(), "data_root": str(root) if root else None, "budget_s": a.budget,
                               "parts": {}}
    paths = [Path(a.summary)] if a.summary else []
    if out_dir:
        paths.append(out_dir / "gpu-check.json")
    if not a.cpu_smoke:
        paths.append(REPO / "benchmarks" / "results" / f"gpu-check-{dt.date.today().isoformat()}.json")

    def write_summary() -> None:
        from resnet_cli.checkpoint import atomic_write_json  # temp file, fsync, rename

        summary["total_s"] = round(time.perf_counter() - started, 2)
        summary["targets"] = targets(summary["parts"])
        summary["log"] = str(log_path)
        for path in paths:
            atomic_write_json(path, summary)

    with open(log_path, "w") as log:
        for part in PARTS:
            if part.name not in chosen:
                continue
            if part.needs_data and root is None and not a.cpu_smoke:
                summary["parts"][part.name] = {"status": "skipped", "reason": "no FashionMNIST/raw under --data-root, "
                                               "$RESNET_CLI_DATA or ./data"}
                continue
            left = a.budget - (time.perf_counter() - started)
            if left < 10:
                summary["parts"][part.name] = {"status": "skipped", "reason": "the time budget was spent"}
                continue
            summary["parts"][part.name] = run_part(part, a, work, min(part.timeout_s, left), log)
            write_summary()  # what is measured survives an outer timeout
    write_summary()
    print(f"summary: {', '.join(map(str, paths)) or '(no file: pass --summary or set OUT)'}; log: {log_path}")
    statuses = [x["status"] for x in summary["parts"].values()]
    return 0 if statuses and all(s == "ok" for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
