"""Multirun summaries: one table, two files and a plot or two for a whole sweep.

`SweepSummary` is a Hydra callback (configs/train.yaml, `hydra.callbacks.sweep_summary`). After
`resnet-train -m ...` it reads every job folder of the sweep and writes into the sweep folder

- summary.csv / summary.json: one row per job (its overrides, as one string and one column per
  swept key; best and final test accuracy, final train loss, epochs done, wall time, parameter
  count; status ok or failed, with the error);
- summary.png: best test accuracy against learning rate (log x), one line per model, failed
  jobs marked with an x (a bar chart per job when lr was not swept);
- training_error.png: train and test error per epoch, one curve per model, like He et al. 2016
  Fig. 1/6, when the sweep has several models (`training_error: auto`, the default; `true`
  draws it for any sweep, `false` never);

and prints a table sorted by best test accuracy with the best job marked (rich on a terminal,
plain text otherwise). Single runs are left alone.

Failed jobs. Hydra 1.3's `run_job` catches an `Exception` from the task and returns it as a
FAILED `JobReturn`; the BasicLauncher then goes on with the next job, but the BasicSweeper reads
every `return_value` after the batch, which re-raises the first failure: the sweep stops there
and `on_multirun_end` never runs. A `SystemExit` (what `cli.user_errors` turns known errors
into) is not caught at all and stops the sweep at once. So `sweep_job` runs each job of a
multirun: a failure is written to the job's `error.txt` and its train.log, then *returned*
(`JobFailure`) to the basic sweeper, which goes on, or raised to sweepers that handle failed
jobs themselves (Optuna marks the trial FAILED, up to `hydra.sweeper.max_failure_rate`).
`on_job_end` refreshes summary.csv/json after every job, so even a sweep that is stopped early
leaves a summary of the jobs that ended.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .checkpoint import atomic_write_bytes, atomic_write_json

log = logging.getLogger("resnet_cli")

ERROR_FILE = "error.txt"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# Columns of summary.csv/json, around the swept keys (inserted after "overrides").
HEAD = ("job", "status", "overrides")
TAIL = ("model", "best_test_acc", "best_epoch", "final_test_acc", "final_train_loss", "epochs_done",
        "wall_time_s", "parameters", "error", "dir")

_last: dict[str, Any] | None = None  # the latest summary written in this process (for the exit code)


# ---------------------------------------------------------------- running one job of a sweep

@dataclass(frozen=True)
class JobFailure:
    """What a failed job returns to Hydra's BasicSweeper: a value, so the sweep goes on."""

    error: str

    def __str__(self) -> str:
        return f"job failed: {self.error}"


class SweepJobError(RuntimeError):
    """A failed job, raised to sweepers that count failures themselves (Optuna)."""


def _known_errors() -> tuple[type[BaseException], ...]:
    from .cli import known_error_types

    return known_error_types()


def error_line(e: BaseException) -> str:
    """One line: a known error's own message, else `Type: message`."""
    text = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, _known_errors()):
        text = f"{type(e).__name__}: {text}"
    return text[:500]


def record_failure(job_dir: str | os.PathLike, message: str, exc: BaseException | None = None) -> None:
    """error.txt in the job folder: the one-line message, then the traceback of a real bug."""
    text = message + "\n"
    if exc is not None and not isinstance(exc, (*_known_errors(), SweepJobError)):
        text += "\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    atomic_write_bytes(Path(job_dir) / ERROR_FILE, text.encode())


def objective(result: Any) -> Any:
    """What a job returns to the sweeper: its best test accuracy (a float, what Optuna maximizes)."""
    if isinstance(result, dict) and "best_test_acc" in result:
        return float(result["best_test_acc"])
    return result


def sweep_job(task: Callable[..., Any], cfg: DictConfig, *args: Any) -> Any:
    """Run one job of a multirun: `task(cfg, *args)`, returning `objective(result)`.

    A failure (any Exception) is logged as one line, written to the job's error.txt, and then
    returned as a `JobFailure` when the sweeper is Hydra's basic one (which would otherwise stop
    the sweep), or raised as `SweepJobError` for other sweepers. HYDRA_FULL_ERROR=1 re-raises
    the original exception. SystemExit and KeyboardInterrupt (Ctrl-C, SIGTERM) still stop the
    whole sweep."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    try:
        return objective(task(cfg, *args))
    except Exception as e:
        message = error_line(e)
        try:
            record_failure(hc.runtime.output_dir, message, e)
        except OSError as write_error:
            log.warning("could not write %s: %s", ERROR_FILE, write_error)
        log.error("error: job %s failed: %s", hc.job.num, message)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if OmegaConf.select(hc, "sweeper._target_") == BASIC_SWEEPER:
            return JobFailure(message)
        raise SweepJobError(message) from None


def failed_jobs_message() -> str | None:
    """After a multirun in this process: 'N of M sweep jobs failed ...' when some did, else None."""
    if not _last or not _last["n_failed"]:
        return None
    return (f"{_last['n_failed']} of {_last['n_jobs']} sweep jobs failed; "
            f"see {_shown_path(Path(_last['sweep_dir'])) / 'summary.csv'}")


# ---------------------------------------------------------------- reading a sweep folder

def _value(text: str) -> Any:
    """An override's value as a number where it is one ('0.05' -> 0.05), else the string."""
    for cast in (int, float):
        try:
            v = cast(text)
            return v if math.isfinite(v) else text
        except ValueError:
            pass
    return text


def _split(override: str) -> tuple[str, str]:
    key, _, value = str(override).partition("=")
    return key.lstrip("+~"), value


def _load_yaml(path: Path) -> Any:
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else None
    except Exception:  # a half-written or foreign file: treat as absent
        return None


def _load_json(path: Path) -> Any:
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


def read_job(job_dir: Path, final: bool = True) -> dict[str, Any]:
    """Everything the summary says about one job folder (plus private `_` keys for the plots)."""
    overrides = [str(o) for o in (_load_yaml(job_dir / ".hydra" / "overrides.yaml") or [])]
    if job_dir.name.isdigit():  # hydra.sweep.subdir is the job number unless changed
        num = int(job_dir.name)
    else:
        num = ((_load_yaml(job_dir / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}).get("job", {}).get("num")
        num = num if isinstance(num, int) else None
    results = _load_json(job_dir / "results.json")
    # the job's config: for the plots, and the model name of a job that wrote no results
    cfg = (_load_yaml(job_dir / ".hydra" / "config.yaml") or {}) if final or results is None else {}
    metrics = _metrics(job_dir / "metrics.jsonl")
    model_cfg = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    row: dict[str, Any] = {"job": num, "_overrides": overrides, "_metrics": metrics, "_dir": job_dir,
                           "_residual": bool(model_cfg.get("residual", True)), "_lr": cfg.get("lr"),
                           "model": (results or {}).get("model") or model_cfg.get("name"), "error": None}
    if isinstance(results, dict):
        final_m = results.get("final") or {}
        row.update(status="ok", best_test_acc=results.get("best_test_acc"), best_epoch=results.get("best_epoch"),
                   final_test_acc=final_m.get("test_acc"), final_train_loss=final_m.get("train_loss"),
                   epochs_done=results.get("epochs"), wall_time_s=results.get("wall_time_s"),
                   parameters=results.get("parameters"))
        return row
    # no results.json: failed, or (while the sweep runs) not finished yet
    error_file = job_dir / ERROR_FILE
    log_line, params = _log_detail(job_dir)
    if error_file.is_file():
        status, error = "failed", (error_file.read_text(errors="replace").splitlines() or ["failed"])[0]
    elif final:
        status = "failed"
        error = "no results.json: the job was interrupted or killed" + (f" (last logged: {log_line})"
                                                                          if log_line else "")
    else:
        status, error = "running", None
    best = max(metrics, key=lambda r: r["test_acc"]) if metrics else {}
    row.update(status=status, error=error, best_test_acc=best.get("test_acc"), best_epoch=best.get("epoch"),
               final_test_acc=metrics[-1]["test_acc"] if metrics else None,
               final_train_loss=metrics[-1]["train_loss"] if metrics else None, epochs_done=len(metrics),
               wall_time_s=sum(r.get("epoch_time_s", 0.0) for r in metrics) if metrics else None,
               parameters=params)
    return row


def collect(sweep_dir: Path, final: bool = True) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(rows sorted by job, swept keys, overrides shared by every job)."""
    rows = [read_job(d, final) for d in job_dirs(sweep_dir)]
    for i, r in enumerate(rows):  # folders not named by number: number them in order
        if r["job"] is None:
            r["job"] = i
    rows.sort(key=lambda r: r["job"])
    keys: list[str] = []
    values: dict[str, set[str]] = {}
    for r in rows:
        for o in r["_overrides"]:
            k, v = _split(o)
            if k not in values:
                keys.append(k)
                values[k] = set()
            values[k].add(v)
    swept = [k for k in keys if len(values[k]) > 1 or any(k not in {_split(o)[0] for o in r["_overrides"]}
                                                           for r in rows)]
    fixed = sorted({o for r in rows for o in r["_overrides"] if _split(o)[0] not in swept},
                   key=lambda o: keys.index(_split(o)[0]))
    for r in rows:
        given = dict(_split(o) for o in r["_overrides"])
        r["_swept"] = {k: _value(given[k]) if k in given else None for k in swept}
        shown = [o for o in r["_overrides"] if _split(o)[0] in swept] if swept else r["_overrides"]
        r["overrides"] = " ".join(shown)
    return rows, swept, fixed


def best_job(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in rows if r["status"] == "ok" and r.get("best_test_acc") is not None]
    return max(ok, key=lambda r: (r["best_test_acc"], -r["job"])) if ok else None


def _public(row: dict[str, Any], swept: list[str]) -> dict[str, Any]:
    out = {k: row.get(k) for k in HEAD}
    out.update(row["_swept"])
    for k in TAIL:
        out.setdefault(k, row.get(k))
    out["dir"] = str(row["_dir"])
    # strict JSON: a non-finite number (a loss that blew up) becomes null
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()}


def _columns(swept: list[str]) -> list[str]:
    return list(HEAD) + list(swept) + [k for k in TAIL if k not in swept]


def write_tables(sweep_dir: Path, rows: list[dict[str, Any]], swept: list[str], fixed: list[str]) -> dict:
    """summary.csv and summary.json (atomically). Returns the json document."""
    public = [_public(r, swept) for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(swept), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for p in public:
        writer.writerow({k: ("" if v is None else v) for k, v in p.items()})
    atomic_write_bytes(sweep_dir / "summary.csv", buf.getvalue().encode())
    best = best_job(rows)
    doc = {"sweep_dir": str(sweep_dir), "n_jobs": len(rows),
           "n_ok": sum(r["status"] == "ok" for r in rows), "n_failed": sum(r["status"] == "failed" for r in rows),
           "swept_keys": swept, "fixed_overrides": fixed, "best_job": best["job"] if best else None,
           "jobs": public}
    atomic_write_json(sweep_dir / "summary.json", doc)
    return doc


# ---------------------------------------------------------------- plots

def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _group_label(row: dict[str, Any], swept: list[str], skip: tuple[str, ...]) -> str:
    other = [f"{k}={row['_swept'][k]}" for k in swept if k not in skip]
    return " ".join([str(row.get("model"))] + other)


def _lr(row: dict[str, Any]) -> float | None:
    v = row["_swept"].get("lr", row.get("_lr"))
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if v > 0 and math.isfinite(v) else None


def plot_summary(path: Path, rows: list[dict[str, Any]], swept: list[str], title: str) -> None:
    """Best test accuracy against lr (log x), one line per model; per-job bars if lr is fixed."""
    plt = _pyplot()
    done = [r for r in rows if r["status"] == "ok" and r.get("best_test_acc") is not None]
    failed = [r for r in rows if r["status"] != "ok"]
    best = best_job(rows)
    lrs = {_lr(r) for r in rows} - {None}
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    if len(lrs) > 1:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if _lr(r) is not None:
                groups.setdefault(_group_label(r, swept, ("lr", "model")), []).append(r)
        ok_lrs = [_lr(r) for r in done if _lr(r) is not None] or sorted(lrs)
        lo, hi = min(ok_lrs), max(ok_lrs)
        span = max(hi / lo, 10.0)
        edge_lo, edge_hi = lo / span ** 0.3, hi * span ** 0.3  # failed lrs far outside: drawn at the edge

        def x_of(r: dict[str, Any]) -> float:
            return min(max(_lr(r), edge_lo), edge_hi)

        for i, (label, members) in enumerate(sorted(groups.items())):
            color = f"C{i % 10}"
            ok = sorted((r for r in members if r in done), key=_lr)
            if ok:
                ax.plot([_lr(r) for r in ok], [r["best_test_acc"] for r in ok], "-o", ms=4, color=color, label=label)
            bad = [r for r in members if r in failed]
            if bad:
                ax.plot([x_of(r) for r in bad], [0.0] * len(bad), "x", ms=8, mew=2, color=color,
                        label=f"{label} (failed)")
                for r in bad:
                    if x_of(r) != _lr(r):
                        ax.annotate(f"lr={_lr(r):g}", (x_of(r), 0.0), textcoords="offset points", xytext=(0, 8),
                                    ha="center", fontsize=7, color=color)
        if best is not None and _lr(best) is not None:
            ax.plot([_lr(best)], [best["best_test_acc"]], "*", ms=14, color="gold", mec="black", zorder=5,
                    label=f"best: job {best['job']}")
        ax.set_xscale("log")
        shown = [x_of(r) for r in rows if _lr(r) is not None]
        ax.set_xlim(min(shown) / 1.4, max(shown) * 1.4)
        if len(set(ok_lrs)) <= 8:  # a grid: ticks at the swept values, written plainly
            from matplotlib.ticker import NullFormatter

            ax.set_xticks(sorted(set(ok_lrs)), [f"{v:g}" for v in sorted(set(ok_lrs))])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("learning rate")
        ax.set_ylim(-0.03, 1.0)
    else:  # lr was not swept: one bar per job
        ordered = sorted(rows, key=lambda r: r["job"])
        labels = [f"#{r['job']} {r['overrides']}"[:40] for r in ordered]
        values = [r.get("best_test_acc") or 0.0 if r["status"] == "ok" else 0.0 for r in ordered]
        colors = ["gold" if best is not None and r is best else ("C3" if r["status"] != "ok" else "C0")
                  for r in ordered]
        ax.barh(range(len(ordered)), values, color=colors)
        ax.set_yticks(range(len(ordered)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.0)
        for i, r in enumerate(ordered):
            if r["status"] != "ok":
                ax.text(0.01, i, "failed", va="center", fontsize=7, color="C3")
        ax.set_xlabel("best test accuracy (lr not swept)")
    if len(lrs) > 1:
        ax.set_ylabel("best test accuracy")
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_training_error(path: Path, rows: list[dict[str, Any]], swept: list[str], title: str) -> None:
    """Train (left) and test (right) error per epoch, one curve per model (its best job), plain
    nets dashed and residual nets solid: the shape of He et al. 2016, Fig. 1 and 6."""
    plt = _pyplot()
    per_model: dict[str, dict[str, Any]] = {}
    for r in rows:
        if not r["_metrics"]:
            continue
        key = str(r.get("model"))
        score = (r["status"] == "ok", r.get("best_test_acc") or 0.0)
        if key not in per_model or score > per_model[key]["_score"]:
            per_model[key] = {**r, "_score": score}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=120, sharey=True)
    for i, (name, r) in enumerate(sorted(per_model.items(), key=lambda kv: (kv[1]["_residual"], kv[0]))):
        epochs = [m["epoch"] for m in r["_metrics"]]
        style = "-" if r["_residual"] else "--"
        label = _group_label(r, [k for k in swept if k != "model"], ("lr",) if "lr" not in swept else ())
        if r["status"] != "ok":
            label += " (failed)"
        for ax, field in zip(axes, ("train_acc", "test_acc")):
            ax.plot(epochs, [100 * (1 - m[field]) for m in r["_metrics"]], style, marker="o", ms=2,
                    color=f"C{i % 10}", label=label)
    from matplotlib.ticker import MaxNLocator

    for ax, name in zip(axes, ("training error (%)", "test error (%)")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}\ndashed: plain nets, solid: residual nets", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


# ---------------------------------------------------------------- the table

def _fmt(key: str, v: Any) -> str:
    if v is None or v == "":
        return "-"
    if key in ("best_test_acc", "final_test_acc", "final_train_loss") and isinstance(v, (int, float)):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.3g}"
    if key == "wall_time_s" and isinstance(v, (int, float)):
        return f"{v:.1f}"
    if key == "parameters" and isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


_SHOWN = {"best_test_acc": "best acc", "final_test_acc": "final acc", "final_train_loss": "train loss",
          "epochs_done": "epochs", "wall_time_s": "time s", "parameters": "params"}


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def _shown_path(p: Path) -> Path:
    """Relative to the working directory when under it (shorter to read and to copy)."""
    try:
        return Path(p).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return Path(p)


def render_table(rows: list[dict[str, Any]], swept: list[str], sweep_dir: Path, tty: bool | None = None) -> str:
    """The table (sorted by best test accuracy, best job first and marked) and a closing line."""
    best = best_job(rows)
    ordered = sorted(rows, key=lambda r: (r["status"] != "ok", -(r.get("best_test_acc") or 0.0), r["job"]))
    keys = [k for k in swept] + (["model"] if "model" not in swept else [])
    header = ["", "job"] + keys + ["status"] + list(_SHOWN.values()) + ["error"]
    body = []
    for r in ordered:
        cells = ["*" if r is best else "", str(r["job"])]
        cells += [_fmt(k, r["_swept"].get(k) if k in swept else r.get(k)) for k in keys]
        cells += [r["status"]] + [_fmt(k, r.get(k)) for k in _SHOWN] + [_clip(r.get("error") or "", 70)]
        body.append(cells)
    n_failed = sum(r["status"] != "ok" for r in rows)
    sweep_dir = _shown_path(sweep_dir)
    title = f"sweep {sweep_dir}: {len(rows)} jobs, {len(rows) - n_failed} ok, {n_failed} failed"
    if best is not None:
        closing = (f"best: job {best['job']}  {best['overrides']}  best_test_acc {best['best_test_acc']:.4f} "
                   f"(epoch {best.get('best_epoch')})  {_shown_path(best['_dir'])}")
    else:
        closing = "best: none (no job finished)"
    if not any(cells[-1] for cells in body):  # no errors: drop the empty column
        header, body = header[:-1], [cells[:-1] for cells in body]
    if tty is None:
        tty = sys.stdout.isatty()
    if tty:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for h in header:
            table.add_column(h, justify="right" if h in _SHOWN.values() or h == "job" else "left",
                             overflow="fold")
        for r, cells in zip(ordered, body):
            style = "bold green" if r is best else ("red" if r["status"] != "ok" else None)
            table.add_row(*cells, style=style)
        import shutil

        buf = io.StringIO()
        console = Console(file=buf, force_terminal=True, width=shutil.get_terminal_size().columns)
        console.print(table)
        console.print(closing, style="bold green" if best is not None else None, highlight=False, soft_wrap=True)
        return buf.getvalue()
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(header)]
    right = {i for i, h in enumerate(header) if h in _SHOWN.values() or h == "job"}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
                         ).rstrip()

    out = [title, line(header), line(["-" * w for w in widths])] + [line(c) for c in body] + [closing]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- the callback

def _sweep_dir(config: DictConfig) -> Path:
    d = Path(str(config.hydra.sweep.dir))
    if not d.is_absolute():  # relative to where resnet-train was started (jobs may chdir)
        d = Path(str(OmegaConf.select(config, "hydra.runtime.cwd") or os.getcwd())) / d
    return d


def _is_multirun(config: DictConfig) -> bool:
    from hydra.types import RunMode

    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


def _want_training_error(setting: Any, rows: list[dict[str, Any]]) -> bool:
    s = str(setting).lower()
    with_metrics = [r for r in rows if r["_metrics"]]
    if s in ("false", "no", "off", "0", "none"):
        return False
    if s in ("true", "yes", "on", "1", "always"):
        return bool(with_metrics)
    return len({r.get("model") for r in with_metrics}) > 1  # auto


def summarize(sweep_dir: str | os.PathLike, training_error: Any = "auto", print_table: bool = True,
              final: bool = True) -> dict[str, Any]:
    """Write summary.csv/json (+ the plots when `final`) for a sweep folder; print the table.
    Also usable on its own: `python -m resnet_cli.sweep multirun/DATE/TIME`."""
    global _last
    sweep_dir = Path(sweep_dir)
    rows, swept, fixed = collect(sweep_dir, final=final)
    doc = write_tables(sweep_dir, rows, swept, fixed)
    if not final:
        return doc
    if rows:
        import textwrap

        title = "\n".join([f"sweep {sweep_dir.parent.name}/{sweep_dir.name}"] +
                          textwrap.wrap(" ".join(fixed), 100, max_lines=2, placeholder=" ..."))
        try:
            plot_summary(sweep_dir / "summary.png", rows, swept, title)
            if _want_training_error(training_error, rows):
                plot_training_error(sweep_dir / "training_error.png", rows, swept, title)
        except Exception as e:  # a plot must never cost the tables
            log.warning("sweep plots not written: %s", error_line(e))
    if print_table:
        print(render_table(rows, swept, sweep_dir), end="", flush=True)
        written = [n for n in ("summary.csv", "summary.json", "summary.png", "training_error.png")
                   if (sweep_dir / n).is_file()]
        print(f"wrote {', '.join(written)} in {_shown_path(sweep_dir)}", flush=True)
    _last = {"sweep_dir": str(sweep_dir), "n_jobs": doc["n_jobs"], "n_failed": doc["n_failed"]}
    return doc


class SweepSummary(Callback):
    """Hydra callback: a summary of every multirun (see the module doc). Harmless for single runs.

    training_error: auto (draw training_error.png when the sweep has several models) | true | false.
    print_table: print the table at the end of the sweep."""

    def __init__(self, training_error: Any = "auto", print_table: bool = True) -> None:
        self.training_error = training_error
        self.print_table = print_table

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if not _is_multirun(config):
            return
        from hydra.core.utils import JobStatus

        job_dir = Path(str(config.hydra.runtime.output_dir))
        if job_return is not None and job_return.status == JobStatus.FAILED and not (job_dir / ERROR_FILE).is_file():
            exc = job_return._return_value
            if isinstance(exc, BaseException):
                record_failure(job_dir, error_line(exc), exc)
        # keep summary.csv/json current, so a sweep stopped early still has one
        summarize(_sweep_dir(config), print_table=False, final=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summarize(_sweep_dir(config), self.training_error, self.print_table, final=True)


def main(argv: list[str] | None = None) -> None:
    """`python -m resnet_cli.sweep SWEEP_DIR [--training-error]`: (re)write a sweep's summary."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m resnet_cli.sweep SWEEP_DIR [--training-error]")
        sys.exit(0 if args else 2)
    path = Path(args[0])
    if not path.is_dir() or not job_dirs(path):
        print(f"error: {path}: not a sweep folder (no job folders with .hydra/overrides.yaml)", file=sys.stderr)
        sys.exit(2)
    doc = summarize(path, "true" if "--training-error" in args else "auto")
    sys.exit(1 if doc["n_failed"] else 0)


if __name__ == "__main__":
    main()
