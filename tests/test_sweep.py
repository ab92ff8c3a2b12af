"""Sweeps: the multirun summary (resnet_cli/sweep/), the sweep presets, and the configs of the
optional launchers/sweepers (skipped when their Hydra plugin is not installed)."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import pytest
from conftest import run_cli
from omegaconf import OmegaConf

from resnet_cli.sweep.folder import LIVE_FILE

# A job of a few seconds on 2 CPU cores.
SMALL = ("data=synthetic", "data.train_size=64", "data.test_size=32", "data.image_size=12", "batch_size=32",
         "epochs=1", "trainer.progress=plain", "trainer.precision=fp32", "trainer.channels_last=false")
PNG = b"\x89PNG\r\n\x1a\n"


def _only_sweep_dir(cwd: Path) -> Path:
    dirs = [p for p in (cwd / "multirun").glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def compose_train(overrides: list[str]):
    """The primary config with its hydra node, as Hydra composes it for the app."""
    from hydra import compose, initialize_config_dir

    from resnet_cli.config import register_schemas
    from resnet_cli.paths import config_dir

    register_schemas()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _expand(params: dict, arguments: list[str]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of hydra.sweeper.params plus command-line arguments."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + arguments)
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


# ---------------------------------------------------------------- the summary, on a made-up sweep folder

def _job(sweep: Path, num: int, overrides: list[str], *, model: str, lr: float, residual: bool = True,
         accs: list[float] | None = None, error: str | None = None, log: str = "", **results) -> Path:
    """A job folder as resnet-train writes it; `results` adds (or replaces) keys of results.json."""
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), d / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"num": num}}}), d / ".hydra" / "hydra.yaml")
    OmegaConf.save(OmegaConf.create({"lr": lr, "model": {"name": model, "residual": residual}}),
                   d / ".hydra" / "config.yaml")
    rows = [{"epoch": i + 1, "train_loss": 2.0 - a, "train_acc": a, "test_loss": 2.1 - a, "test_acc": a - 0.05,
             "lr": lr, "epoch_time_s": 1.5} for i, a in enumerate(accs or [])]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if log:
        (d / "train.log").write_text(log)
    if error is not None:
        (d / "error.txt").write_text(error + "\n\nTraceback ...\n")
    elif accs:
        best = max(rows, key=lambda r: r["test_acc"])
        (d / "results.json").write_text(json.dumps({
            "model": model, "dataset": "synthetic", "epochs": len(rows), "final": rows[-1], "best": best,
            "best_test_acc": best["test_acc"], "best_epoch": best["epoch"], "parameters": 1000 + num,
            "device": "cpu", "device_name": "x86_64, 2 threads", "world_size": 1, "precision": "fp32",
            "wall_time_s": 4.0, "mean_train_images_per_s": 100.0, **results}))
    return d


@pytest.fixture
def fake_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    fixed = ["data=synthetic", "epochs=3"]
    _job(sweep, 0, fixed + ["model=resnet20", "lr=0.05"], model="resnet20", lr=0.05, accs=[0.3, 0.5, 0.6])
    _job(sweep, 1, fixed + ["model=resnet20", "lr=0.5"], model="resnet20", lr=0.5, accs=[0.4, 0.7, 0.8])
    _job(sweep, 2, fixed + ["model=plain20", "lr=0.05"], model="plain20", lr=0.05, residual=False,
         accs=[0.2, 0.3, 0.35])
    _job(sweep, 3, fixed + ["model=plain20", "lr=0.5"], model="plain20", lr=0.5, residual=False, accs=[0.1],
         error="loss became nan at epoch 2, step 5; the last good checkpoint is kept")
    _job(sweep, 4, fixed + ["model=plain20", "lr=5"], model="plain20", lr=5.0, residual=False,  # killed
         log="[2026-01-01 12:00:01,000][INFO] model plain20: 1,234 parameters, input 1x28x28\n"
             "[2026-01-01 12:00:02,000][WARNING] SIGTERM received: stopping after this step\n")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_summary_rows_files_and_table(fake_sweep: Path, capsys, monkeypatch):
    from resnet_cli import sweep

    monkeypatch.chdir(fake_sweep.parents[2])
    doc = sweep.summarize(fake_sweep)
    out = capsys.readouterr().out

    rows = _csv(fake_sweep / "summary.csv")
    assert [r["job"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert list(rows[0])[:5] == ["job", "status", "overrides", "model", "lr"]  # swept keys as columns
    assert rows[1]["overrides"] == "model=resnet20 lr=0.5" and rows[1]["lr"] == "0.5"
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed", "failed"]
    assert rows[1]["best_test_acc"] == "0.75" and rows[1]["final_train_loss"] == "1.2" and rows[1]["epochs_done"] == "3"
    assert rows[1]["parameters"] == "1001" and rows[1]["wall_time_s"] == "4.0"
    # a failed job: the error.txt's first line, and what its metrics.jsonl got to
    assert rows[3]["error"].startswith("loss became nan at epoch 2") and rows[3]["epochs_done"] == "1"
    # no results.json and no error.txt: interrupted; the log tells the rest
    assert "interrupted or killed" in rows[4]["error"] and "SIGTERM" in rows[4]["error"]
    assert rows[4]["parameters"] == "1234"

    assert doc == json.loads((fake_sweep / "summary.json").read_text())
    assert (doc["n_jobs"], doc["n_ok"], doc["n_failed"], doc["n_not_run"], doc["best_job"]) == (5, 3, 2, 0, 1)
    assert doc["swept_keys"] == ["model", "lr"] and doc["fixed_overrides"] == ["data=synthetic", "epochs=3"]
    assert doc["jobs"][1]["lr"] == 0.5  # numbers stay numbers in the json
    assert rows[1]["time_to_0.93"] == "" and rows[1]["best_val_acc"] == ""  # runs that did not record them
    assert not (fake_sweep / "summary_by_config.csv").exists()  # no configuration ran twice

    for name in ("summary.png", "training_error.png"):  # several models: the training-error figure too
        assert (fake_sweep / name).read_bytes().startswith(PNG)

    # plain-text table (not a terminal): best first and marked, failures last, a closing line
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if set(ln.replace(" ", "")) == {"-"}) + 1
    end = next(i for i, ln in enumerate(lines) if ln.startswith("best: "))
    body = lines[start:end]
    assert [ln[1:].split()[0] for ln in body] == ["1", "0", "2", "3", "4"]
    assert body[0].startswith("*") and not any(ln.startswith("*") for ln in body[1:])
    assert "best: job 1  model=resnet20 lr=0.5  best_test_acc 0.7500 (epoch 3)" in out
    assert "5 jobs, 3 ok, 2 failed" in out
    assert "to 0.9" not in out and "best val" not in out and "by configuration" not in out  # empty: not printed
    # what the entry point reads after Hydra returns, to exit 1
    assert sweep.failed_jobs_message(fake_sweep) == (
        "2 of 5 sweep jobs failed; see multirun/2026-01-01/12-00-00/summary.csv")


def test_dir_column_is_relative_to_the_sweep_folder(fake_sweep: Path, tmp_path: Path, monkeypatch):
    """Written by the callback (an absolute sweep folder) or rebuilt from anywhere with a
    relative one, `dir` is the same: the job folder within the sweep folder, which stays right
    when the folder is moved."""
    from resnet_cli import sweep

    sweep.summarize(fake_sweep, print_table=False)  # as the callback does
    first = _csv(fake_sweep / "summary.csv")
    monkeypatch.chdir(fake_sweep.parents[1])
    sweep.summarize(Path(fake_sweep.name), print_table=False)  # python -m resnet_cli.sweep 12-00-00
    assert _csv(fake_sweep / "summary.csv") == first
    assert [r["dir"] for r in first] == ["0", "1", "2", "3", "4"]
    assert json.loads((fake_sweep / "summary.json").read_text())["sweep_dir"] == str(fake_sweep.resolve())


BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
TASK = ["data=synthetic", "model=resnet20,plain20", "lr=0.05,0.5", "model.freeze=[stem]", "trainer.channels_last=false"]


def _record(sweep: Path, task: list[str], *, sweeper: str = BASIC, params: dict | None = None,
            hydra: tuple[str, ...] = (), config_dir: Path | None = None) -> None:
    """The multirun.yaml Hydra writes into the sweep folder before the first job (the parts read)."""
    sources = [{"path": "hydra.conf", "schema": "pkg", "provider": "hydra"}]
    if config_dir is not None:
        sources.append({"path": str(config_dir), "schema": "file", "provider": "command-line"})
    record = {"hydra": {"sweep": {"dir": str(sweep), "subdir": "${hydra.job.num}"},
                        "sweeper": {"_target_": sweeper, "max_batch_size": None, "params": params},
                        "overrides": {"hydra": [f"hydra.sweep.dir={sweep}", "hydra.mode=MULTIRUN", *hydra],
                                      "task": task},
                        "job": {"name": "train", "config_name": "train", "num": "???"},
                        "runtime": {"cwd": str(sweep.parents[2]), "config_sources": sources}}}
    sweep.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(record), sweep / "multirun.yaml")


@pytest.mark.parametrize("sweep_running", [False, True])
def test_jobs_that_never_started_are_listed_as_not_run(tmp_path: Path, sweep_running: bool, monkeypatch, capsys):
    """A sweep stopped after 2 of its 4 jobs: the jobs it never started are rows (`not run`),
    counted in the title and summary.json, and the summary prints the command that runs each
    into its slot with the overrides Hydra would have given it (and the sweep's --config-dir
    and per-job hydra.* settings). Once the sweep has ended the command exits 1; while it runs
    they are simply still to come."""
    import os
    import shlex
    import socket

    from resnet_cli.sweep import main

    s = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    _record(s, TASK, hydra=("hydra.job.chdir=True", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"),
            config_dir=tmp_path / "conf")
    jobs = _expand({}, TASK)  # what the sweeper made of them, in job order
    assert [j[1:3] for j in jobs] == [["model=resnet20", "lr=0.05"], ["model=resnet20", "lr=0.5"],
                                      ["model=plain20", "lr=0.05"], ["model=plain20", "lr=0.5"]]
    for num in (0, 1):
        _job(s, num, jobs[num], model="resnet20", lr=float(jobs[num][2][3:]), accs=[0.4, 0.5 + num / 10])
    if sweep_running:
        (s / LIVE_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["multirun/2026-01-01/12-00-00"])
    out = capsys.readouterr().out

    rows = _csv(s / "summary.csv")
    assert [(r["job"], r["status"], r["model"], r["lr"], r["dir"]) for r in rows] == [
        ("0", "ok", "resnet20", "0.05", "0"), ("1", "ok", "resnet20", "0.5", "1"),
        ("2", "not run", "plain20", "0.05", "2"), ("3", "not run", "plain20", "0.5", "3")]
    assert rows[2]["overrides"] == "model=plain20 lr=0.05" and rows[2]["best_test_acc"] == ""
    doc = json.loads((s / "summary.json").read_text())
    assert (doc["n_jobs"], doc["n_ok"], doc["n_failed"], doc["n_not_run"]) == (4, 2, 0, 2)
    assert doc["fixed_overrides"] == ["data=synthetic", "model.freeze=[stem]", "trainer.channels_last=False"]
    assert "4 jobs, 2 ok, 0 failed, 2 not run" in out
    body = [ln.split() for ln in out.splitlines() if ln[:1] in ("*", " ") and ln.split()[0].isdigit()]
    assert [ln[:2] for ln in body[-2:]] == [["2", "plain20"], ["3", "plain20"]]  # after the jobs that ran
    if sweep_running:
        assert exit_.value.code == 0 and "never started" not in out and "rebuild" not in out
        return
    assert exit_.value.code == 1
    lines = out.splitlines()
    start = lines.index("2 job(s) of this sweep never started; run each into its slot:")
    commands = [shlex.split(ln) for ln in lines[start + 1:start + 3]]
    for num, command in zip((2, 3), commands):
        assert command == ["resnet-train", "--config-dir", str(tmp_path / "conf"), *jobs[num], "hydra.job.chdir=True",
                           f"hydra.run.dir=multirun/2026-01-01/12-00-00/{num}"]
    assert "model.freeze=[stem]" in commands[0] and "trainer.channels_last=False" in commands[0]
    assert lines[start + 3] == "then rebuild this summary: python -m resnet_cli.sweep multirun/2026-01-01/12-00-00"


@pytest.mark.parametrize("case", ["optuna", "folders disagree", "glob", "no record"])
def test_jobs_not_run_are_not_guessed(tmp_path: Path, case: str, capsys):
    """Where the sweep's jobs cannot be known for sure (Optuna draws each trial as it goes; a
    job folder is not the planned job of its number; a glob() sweep, which needs the configs
    to expand; no multirun.yaml), only the jobs that have folders are listed."""
    from resnet_cli import sweep

    s = tmp_path / "sweep"
    task = ["model=glob(resnet*)", "lr=0.1"] if case == "glob" else ["lr=0.1,0.2,0.3"]
    if case != "no record":
        _record(s, task, sweeper="hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
                if case == "optuna" else BASIC)
    _job(s, 0, ["lr=0.1"], model="resnet20", lr=0.1, accs=[0.5])
    _job(s, 1, ["lr=0.25" if case == "folders disagree" else "lr=0.2"], model="resnet20", lr=0.2, accs=[0.6])
    doc = sweep.summarize(s)
    out = capsys.readouterr().out
    assert [j["status"] for j in doc["jobs"]] == ["ok", "ok"] and doc["n_not_run"] == 0
    assert "not run" not in out and "never started" not in out


def test_an_unreadable_plan_is_no_plan(tmp_path: Path):
    from resnet_cli.sweep import read_plan

    s = tmp_path / "sweep"
    s.mkdir()
    (s / "multirun.yaml").write_text("hydra: [unclosed\n")
    assert read_plan(s) is None
    _record(s, ["lr=0.1,0.2"], params={"model": "resnet20,${oc.env:MODELS}"})  # resolved by Hydra, not recorded
    assert read_plan(s) is None
    _record(s, ["lr=0.1,0.2", "seed=0"], params={"model": "resnet20,plain20"})  # a preset's lists come first
    assert read_plan(s).jobs == [["model=resnet20", "lr=0.1", "seed=0"], ["model=resnet20", "lr=0.2", "seed=0"],
                                 ["model=plain20", "lr=0.1", "seed=0"], ["model=plain20", "lr=0.2", "seed=0"]]


def test_summary_command_help_and_bad_input(tmp_path: Path, fake_sweep: Path, monkeypatch, capsys):
    """--help explains the command and exits 0; bad input is one line naming what is wrong and
    what is allowed, exit 2, and nothing is written."""
    from conftest import assert_one_error_line, call_main

    from resnet_cli.sweep import main

    code, out, err = call_main(main, "python -m resnet_cli.sweep", ["--help"], monkeypatch, capsys)
    assert code == 0 and err == ""
    assert out.startswith("usage: python -m resnet_cli.sweep SWEEP_DIR [--training-error]")
    assert "summary.csv" in out and "SWEEP_DIR " in out and "--training-error " in out and "Exit status" in out
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    before = sorted(tmp_path.rglob("*"))
    for argv, needles in (([], ["no sweep folder given", "SWEEP_DIR"]),
                          (["nonexist"], ["nonexist: no such folder"]),
                          (["file.txt"], ["file.txt: not a folder"]),
                          (["empty"], ["empty: not a sweep folder", "multirun.yaml"]),
                          ([str(fake_sweep), "--bogus"], ["--bogus: unknown option", "--training-error"]),
                          ([str(fake_sweep), "empty"], ["one sweep folder at a time"])):
        code, out, err = call_main(main, "python -m resnet_cli.sweep", argv, monkeypatch, capsys)
        assert_one_error_line(code, err, *needles)
        assert out == ""
    assert sorted(tmp_path.rglob("*")) == before


def test_summary_while_running_and_without_lr_sweep(tmp_path: Path):
    from resnet_cli import sweep

    s = tmp_path / "sweep"
    _job(s, 0, ["model=resnet20"], model="resnet20", lr=0.1, accs=[0.5])
    _job(s, 1, ["model=resnet56"], model="resnet56", lr=0.1)  # started, nothing written yet
    rows, swept, fixed = sweep.collect(s, final=False)
    assert [r["status"] for r in rows] == ["ok", "running"] and swept == ["model"]
    sweep.summarize(s, training_error=False, print_table=False)
    assert (s / "summary.png").is_file()  # lr not swept: one bar per job
    assert not (s / "training_error.png").exists()
    assert json.loads((s / "summary.json").read_text())["jobs"][1]["status"] == "failed"


@pytest.mark.parametrize("process", ["alive", "ended", "pid reused", "other container"])
def test_summary_rebuilt_beside_a_running_sweep(fake_sweep: Path, process: str, monkeypatch, capsys):
    """`python -m resnet_cli.sweep DIR` while the sweep's process still runs: a job with no
    results.json and no error.txt is running, not failed, and only real failures set the exit
    code. Once that process is gone (killed outright: its marker is left), the job was
    interrupted: failed, and the stale marker is removed. A pid now held by another process
    (same pid, another start time) is a process that has gone. A marker from another pid
    namespace (a container with the same host name) cannot be checked: believed."""
    import os
    import socket
    import subprocess
    import sys

    from resnet_cli.sweep import main
    from resnet_cli.sweep.folder import LIVE_FILE

    alive = process in ("alive", "other container")
    mark = {"pid": os.getpid(), "host": socket.gethostname()}
    if process in ("ended", "other container"):
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        mark["pid"] = gone.pid
        if process == "other container":
            mark["pid_namespace"] = "pid:[1]"  # not ours: its pids are not ours to look up
    elif process == "pid reused":
        if not Path("/proc/self/stat").is_file():
            pytest.skip("no /proc: process start times are not known here")
        started = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22
        mark["started"] = str(int(started) - 1)
    pid = mark["pid"]
    (fake_sweep / LIVE_FILE).write_text(json.dumps(mark))
    monkeypatch.chdir(fake_sweep.parents[2])
    with pytest.raises(SystemExit) as exit_:
        main([str(fake_sweep)])
    out = capsys.readouterr().out
    statuses = [r["status"] for r in _csv(fake_sweep / "summary.csv")]
    assert exit_.value.code == 1  # job 3 failed (error.txt) either way
    if alive:
        assert statuses == ["ok", "ok", "ok", "failed", "running"]
        assert "5 jobs, 3 ok, 1 failed, 1 running" in out
        assert f"1 job(s) still running: the sweep (pid {pid} on {socket.gethostname()}) has not ended" in out
        assert json.loads((fake_sweep / "summary.json").read_text())["n_failed"] == 1
    else:
        assert statuses == ["ok", "ok", "ok", "failed", "failed"]
        assert "5 jobs, 3 ok, 2 failed" in out and "still running" not in out
    assert (fake_sweep / LIVE_FILE).exists() == alive


def test_the_callback_marks_a_sweep_running_from_start_to_end(tmp_path: Path):
    import os
    import socket

    from resnet_cli.sweep import SweepSummary
    from resnet_cli.sweep.folder import running_sweep

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}, "runtime": {"cwd": str(tmp_path)}}})
    callback = SweepSummary(print_table=False)
    callback.on_multirun_start(config)
    assert running_sweep(tmp_path / "sweep") == f"pid {os.getpid()} on {socket.gethostname()}"
    if Path("/proc/self/stat").is_file():  # the start time makes the pid name this one process
        assert json.loads((tmp_path / "sweep" / LIVE_FILE).read_text())["started"].isdigit()
    callback.on_multirun_end(config)
    assert running_sweep(tmp_path / "sweep") is None and not (tmp_path / "sweep" / LIVE_FILE).exists()


def test_training_error_plot_setting(tmp_path: Path):
    from resnet_cli import sweep

    s = tmp_path / "sweep"
    _job(s, 0, ["lr=0.1"], model="resnet20", lr=0.1, accs=[0.5])
    _job(s, 1, ["lr=0.2"], model="resnet20", lr=0.2, accs=[0.6])
    sweep.summarize(s, print_table=False)  # auto: one model only
    assert not (s / "training_error.png").exists()
    sweep.summarize(s, training_error=True, print_table=False)
    assert (s / "training_error.png").is_file()


def test_time_to_accuracy_and_validation_columns(tmp_path: Path, capsys, monkeypatch):
    """results.json's time_to_acc becomes time_to_0.93 style columns (blank: not reached or not
    recorded); with a validation split the best job is chosen on it, not on the test set."""
    from resnet_cli import sweep

    s = tmp_path / "sweep"
    reached = {"0.90": {"epoch": 2, "wall_s": 20.5}, "0.92": {"epoch": 3, "wall_s": 30.25}, "0.93": None,
               "0.94": None, "0.95": None}
    _job(s, 0, ["lr=0.1"], model="resnet20", lr=0.1, accs=[0.9, 0.95, 0.975], time_to_acc=reached,
         best_val_acc=0.91, final_val_acc=0.905, selection="val")
    _job(s, 1, ["lr=0.2"], model="resnet20", lr=0.2, accs=[0.9, 0.96, 0.99],  # best on test, not on val
         time_to_acc={"0.9": {"epoch": 1, "wall_s": 9.0}}, best_val_acc=0.90, final_val_acc=0.89, selection="val")
    monkeypatch.chdir(tmp_path)
    doc = sweep.summarize(s)
    out = capsys.readouterr().out
    rows = _csv(s / "summary.csv")
    columns = list(rows[0])
    assert [c for c in columns if c.startswith("time_to_")] == [f"time_to_{t}" for t in sweep.THRESHOLDS]
    assert [rows[0][f"time_to_{t}"] for t in sweep.THRESHOLDS] == ["20.5", "30.25", "", "", ""]
    assert [rows[1][f"time_to_{t}"] for t in sweep.THRESHOLDS] == ["9.0", "", "", "", ""]  # "0.9" is 0.90
    assert (rows[0]["best_val_acc"], rows[0]["final_val_acc"], rows[0]["selection"]) == ("0.91", "0.905", "val")
    assert doc["best_job"] == 0 and "best: job 0  lr=0.1  best_val_acc 0.9100 (epoch 3)" in out
    header = next(ln for ln in out.splitlines() if ln.lstrip().startswith("job"))
    assert "best val" in header and "to 0.90 s" in header and "to 0.92 s" in header
    assert "to 0.93 s" not in header  # no job reached it: not printed


def test_objective_prefers_the_validation_split(tmp_path: Path, hydra_job):
    from resnet_cli import sweep

    hydra_job(sweep.BASIC_SWEEPER)
    assert sweep.sweep_job(lambda cfg: {"best_test_acc": 0.9, "best_val_acc": 0.8}, None) == 0.8
    assert sweep.sweep_job(lambda cfg: {"best_test_acc": 0.9, "best_val_acc": None}, None) == 0.9


def test_jobs_that_differ_only_in_seed_form_one_configuration(tmp_path: Path, capsys, monkeypatch):
    from resnet_cli import sweep

    s = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    final = {(0.05, 0): [0.5, 0.61], (0.05, 1): [0.55, 0.6], (0.05, 2): [0.5, 0.66],
             (0.1, 0): [0.7, 0.72], (0.1, 1): [0.7, 0.7]}
    for num, ((lr, seed), accs) in enumerate(final.items()):
        _job(s, num, ["data=synthetic", f"lr={lr}", f"seed={seed}"], model="resnet20", lr=lr, accs=accs)
    _job(s, 5, ["data=synthetic", "lr=0.1", "seed=2"], model="resnet20", lr=0.1, accs=[0.2],
         error="loss became nan at epoch 2, step 1")
    monkeypatch.chdir(tmp_path)
    sweep.summarize(s)
    out = capsys.readouterr().out

    groups = _csv(s / "summary_by_config.csv")
    assert [(g["config"], g["lr"], g["n"], g["n_failed"], g["jobs"], g["seeds"]) for g in groups] == [
        ("lr=0.05", "0.05", "3", "0", "0 1 2", "0 1 2"), ("lr=0.1", "0.1", "2", "1", "3 4 5", "0 1 2")]
    for g, lr in zip(groups, (0.05, 0.1)):
        for metric, pick in (("best_test_acc", max), ("final_test_acc", lambda a: a[-1])):
            values = [pick(accs) - 0.05 for (l, _), accs in final.items() if l == lr]  # test_acc = acc - 0.05
            assert float(g[f"{metric}_mean"]) == pytest.approx(statistics.mean(values))
            assert float(g[f"{metric}_std"]) == pytest.approx(statistics.stdev(values))  # n - 1
            assert (float(g[f"{metric}_min"]), float(g[f"{metric}_max"])) == pytest.approx((min(values), max(values)))
        assert g["best_val_acc_mean"] == ""  # no validation split in these runs
    doc = json.loads((s / "summary_by_config.json").read_text())
    assert doc["grouped_over"] == "seed" and doc["config_keys"] == ["lr"] and doc["n_configs"] == 2
    assert doc["configs"][1]["best_test_acc_mean"] == pytest.approx(0.66)

    section = out[out.index("by configuration"):].splitlines()
    assert section[0].startswith("by configuration: 2 configurations")
    assert [ln.split()[:3] for ln in section[3:5]] == [["0.1", "resnet20", "2"], ["0.05", "resnet20", "3"]]
    assert "0.6600 ± 0.0141" in section[3] and "0.5733 ± 0.0321" in section[4]  # best acc, by mean
    assert "summary_by_config.csv, summary_by_config.json" in out


def test_multirun_pins_the_sweep_folder(tmp_path: Path, monkeypatch):
    """The entry point knows the sweep folder before Hydra runs (its default name holds the
    time), so it can read the summary.json that the callback writes there."""
    import re

    from resnet_cli.cli import prepare_train_argv
    from resnet_cli.distributed import DistInfo

    monkeypatch.chdir(tmp_path)
    argv, sweep_dir = prepare_train_argv(["-m", *SMALL, "lr=0.1,0.2"], DistInfo())
    pinned = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.sweep.dir=")]
    assert len(pinned) == 1 and re.fullmatch(r"multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", pinned[0])
    assert sweep_dir == tmp_path / pinned[0]
    argv, sweep_dir = prepare_train_argv(["-m", *SMALL, "lr=0.1,0.2", "hydra.sweep.dir=my sweep"], DistInfo())
    assert [a for a in argv if "sweep.dir" in a] == ["hydra.sweep.dir='my sweep'"] and sweep_dir == tmp_path / "my sweep"
    argv, sweep_dir = prepare_train_argv(list(SMALL), DistInfo())  # a single run: nothing to pin
    assert sweep_dir is None and argv == list(SMALL)


def test_callback_leaves_single_runs_alone(tmp_path: Path):
    from hydra.types import RunMode

    from resnet_cli.sweep import SweepSummary

    cfg = OmegaConf.create({"hydra": {"mode": RunMode.RUN, "runtime": {"output_dir": str(tmp_path)},
                                      "sweep": {"dir": str(tmp_path)}}})
    SweepSummary().on_job_end(cfg, job_return=None)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def hydra_job(tmp_path: Path):
    """Sets HydraConfig as run_job does for job 3 of a sweep; yields a setter for the sweeper."""
    from hydra.conf import HydraConf
    from hydra.core.hydra_config import HydraConfig

    saved = HydraConfig.instance().cfg

    def set_sweeper(target: str) -> None:
        cfg = OmegaConf.create({"hydra": OmegaConf.structured(HydraConf)})
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.job.num = 3
        cfg.hydra.sweeper = {"_target_": target}
        HydraConfig.instance().set_config(cfg)

    yield set_sweeper
    HydraConfig.instance().cfg = saved


def test_sweep_job_returns_or_records_failures(tmp_path: Path, hydra_job, monkeypatch):
    from resnet_cli import sweep
    from resnet_cli.engine import NonFiniteLoss

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    hydra_job(sweep.BASIC_SWEEPER)
    assert sweep.sweep_job(lambda cfg: {"best_test_acc": 0.5, "model": "x"}, None) == 0.5  # Optuna's objective

    def diverge(cfg):
        raise NonFiniteLoss(1, 2, float("nan"))

    failure = sweep.sweep_job(diverge, None)  # the basic sweeper gets a value and goes on
    assert isinstance(failure, sweep.JobFailure) and failure.error.startswith("loss became nan at epoch 1")
    assert (tmp_path / "error.txt").read_text().startswith("loss became nan")

    def bug(cfg):
        raise KeyError("oops")

    hydra_job("hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper")
    with pytest.raises(sweep.SweepJobError, match="KeyError: 'oops'"):  # other sweepers count failures
        sweep.sweep_job(bug, None)
    assert "Traceback" in (tmp_path / "error.txt").read_text()  # a real bug keeps its traceback
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(KeyError):
        sweep.sweep_job(bug, None)


# ---------------------------------------------------------------- presets and extras compose

def test_depth_lr_sweep_preset():
    from resnet_cli.cli import validate

    cfg = compose_train(["experiment=depth_lr_sweep"])
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params == {"model": "resnet18,resnet34,resnet50", "lr": "0.01,0.05,0.1"}
    jobs = _expand(params, ["experiment=depth_lr_sweep", "data=synthetic"])
    assert len(jobs) == 9 and ["model=resnet50", "lr=0.1", "experiment=depth_lr_sweep", "data=synthetic"] in jobs
    for job in jobs[::4]:
        cfg = validate("train", [*job, "data.val_size=64"], multirun=True)  # 5000 of 512 synthetic won't do
        assert cfg.data.val_size == 64 and cfg.model.name == job[0].split("=")[1] and cfg.lr == float(job[1].split("=")[1])
    # a command-line sweep of the same key replaces the preset's list
    assert len(_expand(params, ["experiment=depth_lr_sweep", "lr=0.2"])) == 3


def test_degradation_preset():
    from resnet_cli.cli import validate

    cfg = compose_train(["experiment=degradation", "data=synthetic"])
    assert cfg.hydra.sweeper.params.model == "plain20,plain56,resnet20,resnet56"
    assert cfg.hydra.callbacks.sweep_summary.training_error is True
    jobs = _expand(OmegaConf.to_container(cfg.hydra.sweeper.params), ["experiment=degradation", "data=synthetic"])
    assert cfg.data.val_size == 5000  # sweeps choose on held-out training images, not on the test set
    jobs = [[*job, "data.val_size=64"] for job in jobs]  # 5000 of 512 synthetic images won't do
    assert [validate("train", job, multirun=True).model.residual for job in jobs] == [False, False, True, True]


def test_callback_is_registered():
    cfg = compose_train([])
    assert cfg.hydra.callbacks.sweep_summary._target_ == "resnet_cli.sweep.SweepSummary"
    assert cfg.hydra.sweeper._target_.endswith("BasicSweeper")  # hparams_search: null changes nothing


def test_lr_optuna_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_train(["hparams_search=lr_optuna"])
    sw = cfg.hydra.sweeper
    assert sw._target_.endswith("OptunaSweeper") and sw.direction == "maximize" and sw.n_trials >= 8
    assert sw.params.lr.replace(" ", "").startswith("tag(log,interval(")
    assert sw.max_failure_rate == 1.0
    assert cfg.data.val_size == 5000  # trials are compared on held-out training images


def test_a_search_checks_its_fixed_overrides_up_front():
    # A sweep that is not a comma list (Optuna's interval()) is checked on its fixed
    # overrides; a list value such as model.layers=[2,2] is one of them, not a sweep.
    from resnet_cli.cli import _sweep_jobs, validate
    from resnet_cli.errors import ModelConfigError

    jobs = _sweep_jobs(["lr=tag(log,interval(0.01,1))", "model.layers=[2,2]", "seed=0", "epochs=range(1,300)"])
    assert jobs == [["model.layers=[2,2]", "seed=0"]]
    with pytest.raises(ModelConfigError, match=r"model.layers has 2 stages"):
        validate("train", ["model=resnet20", "model.layers=[2,2]", "lr=tag(log,interval(0.01,1))"], multirun=True)


def test_slurm_gpu_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    launcher = compose_train(["hydra/launcher=slurm_gpu"]).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (1, 1, 1)
    assert launcher.timeout_min > 0 and launcher.cpus_per_task >= 1


# ---------------------------------------------------------------- real sweeps

@pytest.mark.slow
def test_multirun_with_a_failing_job(tmp_path: Path):
    """4 jobs; the two at lr=1e30 diverge at run time (NonFiniteLoss). The sweep goes on, the
    summary has every job, and the command exits 1 naming the failures. One model comes from
    the user's own config folder (--config-dir): such a sweep is checked and reported the same."""
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "tiny.yaml").write_text(
        "name: tiny\nblock: basic\nlayers: [1, 1, 1]\nwidths: [8, 16, 32]\nstem: cifar\nshortcut: identity\n")
    proc = run_cli("resnet-train", "-m", "--config-dir", "conf", *SMALL, "model=resnet20,tiny", "lr=0.1,1e30",
                   cwd=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "2 of 4 sweep jobs failed" in proc.stderr.splitlines()[-1]
    sweep_dir = _only_sweep_dir(tmp_path)
    rows = _csv(sweep_dir / "summary.csv")
    assert [(r["job"], r["model"], r["lr"]) for r in rows] == [
        ("0", "resnet20", "0.1"), ("1", "resnet20", "1e+30"), ("2", "tiny", "0.1"), ("3", "tiny", "1e+30")]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "failed"]
    # relative to the sweep folder (still right once it is moved), and the same in a rebuilt summary
    assert [r["dir"] for r in rows] == ["0", "1", "2", "3"]
    rebuilt = run_cli("python", "-m", "resnet_cli.sweep", str(sweep_dir.relative_to(tmp_path)), cwd=tmp_path)
    assert rebuilt.returncode == 1 and _csv(sweep_dir / "summary.csv") == rows, rebuilt.stdout + rebuilt.stderr
    for r in rows:
        if r["status"] == "failed":
            assert r["error"].startswith("loss became") and r["best_test_acc"] == ""
            assert (sweep_dir / r["dir"] / "error.txt").is_file()
        else:
            assert float(r["best_test_acc"]) >= 0 and r["epochs_done"] == "1" and int(r["parameters"]) > 0
    doc = json.loads((sweep_dir / "summary.json").read_text())
    best = max((j for j in doc["jobs"] if j["status"] == "ok"), key=lambda j: (j["best_test_acc"], -j["job"]))
    assert doc["best_job"] == best["job"] and (doc["n_jobs"], doc["n_failed"]) == (4, 2)
    assert f"best: job {best['job']}  model={best['model']} lr=0.1" in proc.stdout
    assert "4 jobs, 2 ok, 2 failed" in proc.stdout
    for name in ("summary.png", "training_error.png"):
        assert (sweep_dir / name).read_bytes().startswith(PNG)
    assert not (sweep_dir / LIVE_FILE).exists()  # the sweep has ended: nothing says it runs
    # One process ran the jobs in turn: the first job's clock counts the process's start-up
    # (the imports), a later job's only its own time, not the jobs before it.
    first, third = (json.loads((sweep_dir / rows[i]["dir"] / "results.json").read_text()) for i in (0, 2))
    assert first["time_s"]["startup"] > third["time_s"]["startup"] + 0.5
    for results, i in ((first, 0), (third, 2)):
        assert results["wall_time_s"] == pytest.approx(results["time_s"]["total"], abs=0.5)
        (row,) = [json.loads(x) for x in (sweep_dir / rows[i]["dir"] / "metrics.jsonl").read_text().splitlines()]
        assert row["elapsed_s"] <= results["wall_time_s"]  # one clock: time_to_acc, the summary, results
    # A new sweep into this folder is refused, also where only failed jobs are left (they would
    # be summarized as the new sweep's): nothing there changes.
    for ok in ("0", "2"):
        shutil.rmtree(sweep_dir / ok)
    before = sorted(p for p in sweep_dir.rglob("*"))
    proc = run_cli("resnet-train", "-m", *SMALL, "lr=0.1,0.2", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith(
        f"error: hydra.sweep.dir={sweep_dir}: holds a sweep's jobs already (1/.hydra/overrides.yaml); "
        "choose another folder"), proc.stderr
    assert sorted(p for p in sweep_dir.rglob("*")) == before


@pytest.mark.slow
def test_a_sweep_stopped_by_sigterm_can_be_finished(tmp_path: Path, monkeypatch, capsys):
    """The user's way through a stopped sweep: SIGTERM during job 0 of 2 stops the sweep (job 1
    never starts). The summary command removes the stale marker, lists job 1 as `not run` and
    prints the commands that finish the sweep; run as printed, they make it whole: both jobs
    ok, in their own slots, exit 0."""
    import os
    import shlex
    import signal
    import subprocess
    import time

    from conftest import command

    from resnet_cli.sweep import main

    def summary() -> tuple[int, str]:  # `python -m resnet_cli.sweep sw`, in this process
        try:
            main(["sw"])
            code = 0
        except SystemExit as e:
            code = e.code or 0
        return code, capsys.readouterr().out

    monkeypatch.chdir(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    # 3 epochs of 8 steps, a checkpoint after each: stopped at its first, job 0 is cut short
    job = [*(o for o in SMALL if not o.startswith(("epochs=", "batch_size="))), "epochs=3", "batch_size=8",
           "trainer.checkpoint_every_steps=1"]
    sweep = subprocess.Popen([command("resnet-train"), "-m", *job, "lr=0.05,0.1", "hydra.sweep.dir=sw"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last, deadline = tmp_path / "sw" / "0" / "checkpoints" / "last.pt", time.monotonic() + 120
    while not last.is_file() and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    sweep.send_signal(signal.SIGTERM)
    sweep.wait(timeout=120)
    assert not (tmp_path / "sw" / "1").exists() and (tmp_path / "sw" / LIVE_FILE).exists()

    code, out = summary()
    assert code == 1, out
    assert "2 jobs, 0 ok, 1 failed, 1 not run" in out
    assert not (tmp_path / "sw" / LIVE_FILE).exists()  # its process is gone: the marker with it
    assert [(r["job"], r["status"], r["lr"]) for r in _csv(tmp_path / "sw" / "summary.csv")] == [
        ("0", "failed", "0.05"), ("1", "not run", "0.1")]
    steps = [shlex.split(ln) for ln in out.splitlines() if ln.startswith("  resnet-train ")]
    assert steps[0] == ["resnet-train", "resume=sw/0"] and steps[1][-2:] == ["lr=0.1", "hydra.run.dir=sw/1"]
    for step in steps:
        run_cli(*step, cwd=tmp_path, check=True)

    code, out = summary()
    assert code == 0, out
    assert "2 jobs, 2 ok, 0 failed" in out and "resnet-train" not in out
    rows = _csv(tmp_path / "sw" / "summary.csv")
    assert [(r["job"], r["status"], r["lr"], r["epochs_done"], r["dir"]) for r in rows] == [
        ("0", "ok", "0.05", "3", "0"), ("1", "ok", "0.1", "3", "1")]


@pytest.mark.slow
def test_joblib_launcher_runs_a_sweep(tmp_path: Path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = run_cli("resnet-train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SMALL,
                   "model=resnet20,plain20", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout
    sweep_dir = _only_sweep_dir(tmp_path)
    rows = _csv(sweep_dir / "summary.csv")
    assert [(r["job"], r["model"], r["status"]) for r in rows] == [("0", "resnet20", "ok"), ("1", "plain20", "ok")]
    assert all((sweep_dir / r["job"] / "results.json").is_file() for r in rows)
    assert "best: job " in proc.stdout and (sweep_dir / "summary.png").is_file()


@pytest.mark.slow
def test_optuna_lr_search_runs(tmp_path: Path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = run_cli("resnet-train", "-m", "hparams_search=lr_optuna", "hydra.sweeper.n_trials=2", *SMALL,
                   "model=resnet20", "data.val_size=16", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sweep_dir = _only_sweep_dir(tmp_path)
    result = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    rows = _csv(sweep_dir / "summary.csv")
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    # with a validation split the trials are compared on it, never on the test set
    assert result.best_value == max(float(r["best_val_acc"]) for r in rows)
    assert 0.001 <= result.best_params.lr <= 1.0


def test_summary_command_into_a_closed_pipe_is_quiet(fake_sweep: Path):
    """`python -m resnet_cli.sweep DIR | head -1`: the reader goes away; no traceback."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # a reader that has already gone
    proc = subprocess.run([sys.executable, "-m", "resnet_cli.sweep", str(fake_sweep)], stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_terminal_table_shows_bracketed_values_as_typed(tmp_path: Path, monkeypatch):
    """On a terminal the table is drawn by rich; a cell such as [stem,layer1] or one with
    [/...] in it is text, not markup (rich dropped the first and refused the second)."""
    from resnet_cli.sweep import collect
    from resnet_cli.sweep.table import render_table

    monkeypatch.setenv("COLUMNS", "200")  # no folded cells
    s = tmp_path / "sweep"
    _job(s, 0, ["model.freeze=[stem,layer1]", "tag=[/a]"], model="resnet20", lr=0.1, accs=[0.5])
    _job(s, 1, ["model.freeze=[stem]", "tag=[/b]"], model="resnet20", lr=0.1, accs=[0.6])
    rows, swept, _ = collect(s, final=True)
    out = render_table(rows, swept, s, tty=True)
    assert "[stem,layer1]" in out and "[/a]" in out
    assert "best: job 1  model.freeze=[stem] tag=[/b]  best_test_acc 0.5500" in out
