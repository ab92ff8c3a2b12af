"""Reading a sweep folder: one row per job folder, and which overrides the jobs vary.

A job folder is what `resnet-train` writes (.hydra/overrides.yaml, results.json,
metrics.jsonl, train.log) plus `error.txt` when it failed. Every file is read defensively:
a sweep that is still running, or was killed, has half-written or missing files.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..overrides import split_override
from .jobs import ERROR_FILE
from .plan import NOT_RUN, missing_jobs, read_plan


def _value(text: str) -> Any:
    """An override's value as a number where it is one ('0.05' -> 0.05), else the string."""
    for cast in (int, float):
        try:
            v = cast(text)
            return v if math.isfinite(v) else text
        except ValueError:
            pass
    return text


def load_yaml(path: Path) -> Any:
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else None
    except Exception:  # a half-written or foreign file: treat as absent
        return None


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut short by a crash
                break
    return rows


# Written into the sweep folder when a multirun starts and removed when it ends: a summary
# rebuilt meanwhile shows jobs without results as running, not as failed. A sweep killed
# outright leaves it behind; `running_sweep` removes it once its process is seen to be gone.
LIVE_FILE = ".sweep-running.json"


def _process_start(pid: int) -> str | None:
    """When process `pid` started (Linux: /proc/PID/stat field 22), None where unknown. With
    the pid it names one process: a pid is reused once its process has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the command name in (...) may hold spaces
    return fields[19] if len(fields) > 19 else None


def mark_running(sweep_dir: Path) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    mark = {"pid": pid, "host": socket.gethostname(), "pid_namespace": _pid_namespace(), "started": _process_start(pid)}
    (sweep_dir / LIVE_FILE).write_text(json.dumps(mark) + "\n")


def mark_ended(sweep_dir: Path) -> None:
    (sweep_dir / LIVE_FILE).unlink(missing_ok=True)


def _pid_namespace() -> str | None:
    """Containers may share a host name but not process ids: pids compare within one namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _alive(mark: dict[str, Any]) -> bool:
    """Whether the process a marker names still runs. One on another host, or in another
    container of the same host name, cannot be checked: it is believed."""
    if mark.get("host") != socket.gethostname():
        return True
    if mark.get("pid_namespace") and mark["pid_namespace"] != _pid_namespace():
        return True
    try:
        os.kill(mark["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    started = _process_start(mark["pid"])
    return not (mark.get("started") and started and started != mark["started"])  # else: the pid was reused


def running_sweep(sweep_dir: Path) -> str | None:
    """'pid N on HOST' when the process that runs this sweep has not ended, else None. A marker
    whose process has ended (the sweep was killed) is removed here, so the folder no longer
    claims a running sweep."""
    path = sweep_dir / LIVE_FILE
    mark = load_json(path)
    if not isinstance(mark, dict) or not isinstance(mark.get("pid"), int):
        return None
    if not _alive(mark):
        if load_json(path) == mark:  # not one a new sweep has just written
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a read-only folder: the marker is ignored all the same
                pass
        return None
    return f"pid {mark['pid']} on {mark.get('host')}"


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Folders under the sweep dir holding a job's .hydra/overrides.yaml."""
    if not sweep_dir.is_dir():
        return []
    found = {p.parent.parent for p in sweep_dir.rglob("overrides.yaml") if p.parent.name == ".hydra"}
    found.discard(sweep_dir)
    return sorted(found)


def _log_detail(job_dir: Path) -> tuple[str | None, int | None]:
    """(last error or warning line, parameter count) from the job's log file."""
    last, params = None, None
    for log_file in sorted(job_dir.glob("*.log")):
        try:
            text = log_file.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if "[ERROR]" in line or "[WARNING]" in line:
                last = line.split("] ", 2)[-1].strip()
            m = re.search(r": ([\d,]+) parameters", line)
            if m:
                params = int(m.group(1).replace(",", ""))
    return last, params


def _time_to(results: dict[str, Any]) -> dict[str, Any]:
    """results.json's {"time_to_acc": {"0.93": {"epoch": 3, "wall_s": 123.4} | null}} as
    `time_to_0.93` fields holding the wall seconds (None: never reached)."""
    out = {}
    for threshold, reached in (results.get("time_to_acc") or {}).items():
        try:
            name = f"time_to_{float(threshold):.2f}"
        except (TypeError, ValueError):
            continue
        out[name] = reached.get("wall_s") if isinstance(reached, dict) else None
    return out


def read_job(job_dir: Path, final: bool = True, live: bool = False) -> dict[str, Any]:
    """Everything the summary says about one job folder (plus private `_` keys for the plots).
    A job without results.json or error.txt is running while the sweep is (`not final`, or
    `live`: a summary rebuilt beside a running sweep), else it was interrupted: failed."""
    overrides = [str(o) for o in (load_yaml(job_dir / ".hydra" / "overrides.yaml") or [])]
    if job_dir.name.isdigit():  # hydra.sweep.subdir is the job number unless changed
        num = int(job_dir.name)
    else:
        num = ((load_yaml(job_dir / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}).get("job", {}).get("num")
        num = num if isinstance(num, int) else None
    results = load_json(job_dir / "results.json")
    # the job's config: for the plots, and the model name of a job that wrote no results
    cfg = (load_yaml(job_dir / ".hydra" / "config.yaml") or {}) if final or results is None else {}
    metrics = _metrics(job_dir / "metrics.jsonl")
    model_cfg = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    row: dict[str, Any] = {"job": num, "_overrides": overrides, "_metrics": metrics, "_dir": job_dir,
                           "_residual": bool(model_cfg.get("residual", True)), "_lr": cfg.get("lr"),
                           "model": (results or {}).get("model") or model_cfg.get("name"), "error": None}
    if isinstance(results, dict):
        final_m = results.get("final") or {}
        row.update(status="ok", best_test_acc=results.get("best_test_acc"), best_epoch=results.get("best_epoch"),
                   final_test_acc=final_m.get("test_acc"), final_train_loss=final_m.get("train_loss"),
                   best_val_acc=results.get("best_val_acc"), final_val_acc=results.get("final_val_acc"),
                   selection=results.get("selection"), epochs_done=results.get("epochs"),
                   wall_time_s=results.get("wall_time_s"), parameters=results.get("parameters"),
                   **_time_to(results))
        return row
    # no results.json: failed, or (while the sweep runs) not finished yet
    error_file = job_dir / ERROR_FILE
    log_line, params = _log_detail(job_dir)
    if error_file.is_file():
        status, error = "failed", (error_file.read_text(errors="replace").splitlines() or ["failed"])[0]
    elif final and not live:
        status = "failed"
        error = "no results.json: the job was interrupted or killed" + (f" (last logged: {log_line})"
                                                                          if log_line else "")
        row["_resumable"] = (job_dir / "checkpoints" / "last.pt").is_file()
    else:
        status, error = "running", None
    best = max(metrics, key=lambda r: r["test_acc"]) if metrics else {}
    val = [m["val_acc"] for m in metrics if m.get("val_acc") is not None]
    row.update(status=status, error=error, best_test_acc=best.get("test_acc"), best_epoch=best.get("epoch"),
               final_test_acc=metrics[-1]["test_acc"] if metrics else None,
               final_train_loss=metrics[-1]["train_loss"] if metrics else None,
               best_val_acc=max(val) if val else None, final_val_acc=metrics[-1].get("val_acc") if metrics else None,
               epochs_done=len(metrics),
               wall_time_s=sum(r.get("epoch_time_s", 0.0) for r in metrics) if metrics else None,
               parameters=params)
    return row


def _not_run_row(num: int, overrides: list[str], slot: Path) -> dict[str, Any]:
    """The row of a planned job that has no folder: it never started."""
    model = dict(split_override(o) for o in overrides).get("model")
    return {"job": num, "status": NOT_RUN, "_overrides": overrides, "_metrics": [], "_dir": slot,
            "_residual": True, "_lr": None, "model": model, "error": None}


def not_run_rows(sweep_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for the jobs of the sweep's plan (plan.py) that have no folder, [] if it has none."""
    plan = read_plan(sweep_dir)
    if plan is None or any(r["job"] is None for r in rows):
        return []
    present = {r["job"]: r["_overrides"] for r in rows}
    return [_not_run_row(n, plan.jobs[n], sweep_dir / str(n)) for n in missing_jobs(plan, present)]


def collect(sweep_dir: Path, final: bool = True, live: bool = False
            ) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(rows sorted by job, swept keys, overrides shared by every job). The jobs of the sweep
    that never started are rows too (status NOT_RUN), where the plan is known."""
    rows = [read_job(d, final, live) for d in job_dirs(sweep_dir)]
    rows += not_run_rows(sweep_dir, rows)
    for i, r in enumerate(rows):  # folders not named by number: number them in order
        if r["job"] is None:
            r["job"] = i
    rows.sort(key=lambda r: r["job"])
    keys: list[str] = []
    values: dict[str, set[str]] = {}
    for r in rows:
        for o in r["_overrides"]:
            k, v = split_override(o)
            if k not in values:
                keys.append(k)
                values[k] = set()
            values[k].add(v)
    swept = [k for k in keys if len(values[k]) > 1 or any(k not in {split_override(o)[0] for o in r["_overrides"]}
                                                           for r in rows)]
    fixed = sorted({o for r in rows for o in r["_overrides"] if split_override(o)[0] not in swept},
                   key=lambda o: keys.index(split_override(o)[0]))
    for r in rows:
        given = dict(split_override(o) for o in r["_overrides"])
        r["_swept"] = {k: _value(given[k]) if k in given else None for k in swept}
        shown = [o for o in r["_overrides"] if split_override(o)[0] in swept] if swept else r["_overrides"]
        r["overrides"] = " ".join(shown)
    return rows, swept, fixed

