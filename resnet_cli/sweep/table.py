"""The sweep's tables: one row per job, and one row per configuration over seeds.

- summary.csv / summary.json: one row per job (its overrides, as one string and one column per
  swept key, then JOB_COLUMNS);
- summary_by_config.csv / .json: jobs that differ only in `seed` form one configuration, with
  n and the mean, sample standard deviation (n-1), min and max of each GROUP_METRICS entry.
  Written when some configuration has more than one job (a seed sweep);
- the printed tables: plain aligned text when piped, rich on a terminal.

Columns are data: a `Column` added to JOB_COLUMNS or a metric added to GROUP_METRICS appears in
the files and, when it has a title, in the printed table.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..checkpoint import atomic_write_bytes, atomic_write_json
from ..overrides import split_override
from .jobs import OBJECTIVE_KEYS
from .plan import NOT_RUN

# The accuracies whose time of first reaching is in results.json's "time_to_acc" (issue 13).
THRESHOLDS = ("0.90", "0.92", "0.93", "0.94", "0.95")
SEED_KEY = "seed"  # jobs that differ only in this key are one configuration


def _plain(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _acc(v: Any) -> str:
    if isinstance(v, (int, float)):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.3g}"
    return _plain(v)


def _secs(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, (int, float)) else _plain(v)


def _count(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else _plain(v)


def _clip(v: Any, n: int = 70) -> str:
    text = str(v)
    return text if len(text) <= n else text[:n - 3] + "..."


def _mean_std(v: tuple[Any, Any]) -> str:
    mean, std = v
    if mean is None:
        return "-"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _range(v: tuple[Any, Any]) -> str:
    lo, hi = v
    return "-" if lo is None else f"{lo:.4f}-{hi:.4f}"


@dataclass(frozen=True)
class Column:
    """A field of the files; with a title, also a column of the printed table."""

    key: str
    title: str | None = None
    fmt: Callable[[Any], str] = _plain
    optional: bool = False  # printed only when some row has a value
    right: bool = True  # aligned right (numbers)
    empty: str = "-"  # shown for a missing value
    get: Callable[[dict[str, Any]], Any] | None = None  # the printed value, when not row[key]

    def cell(self, row: dict[str, Any]) -> str:
        v = self.get(row) if self.get else row.get(self.key)
        return self.empty if v is None or v == "" else self.fmt(v)


JOB_HEAD = ("job", "status", "overrides")
JOB_COLUMNS = (
    Column("model"),
    Column("best_test_acc", "best acc", _acc),
    Column("best_epoch"),
    Column("final_test_acc", "final acc", _acc),
    Column("best_val_acc", "best val", _acc, optional=True),
    Column("final_val_acc", "final val", _acc, optional=True),
    Column("selection"),  # "val" | "test": which split chose best_epoch
    Column("final_train_loss", "train loss", _acc),
    Column("epochs_done", "epochs"),
    Column("wall_time_s", "time s", _secs),
    *(Column(f"time_to_{t}", f"to {t} s", _secs, optional=True) for t in THRESHOLDS),
    Column("parameters", "params", _count),
    Column("error", "error", _clip, optional=True, right=False, empty=""),
    Column("dir"),
)
GROUP_METRICS = (("best_test_acc", "best acc"), ("final_test_acc", "final acc"),
                 ("best_val_acc", "best val"), ("final_val_acc", "final val"))
STATS = ("mean", "std", "min", "max")
GROUP_HEAD = ("config", "n", "n_failed", "jobs", "seeds")


# ---------------------------------------------------------------- ranking

def score(row: dict[str, Any]) -> tuple[str, float] | None:
    """(metric, value) a job is ranked by: the sweep's objective (jobs.OBJECTIVE_KEYS)."""
    for key in OBJECTIVE_KEYS:
        if row.get(key) is not None:
            return key, float(row[key])
    return None


def best_job(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in rows if r["status"] == "ok" and score(r) is not None]
    return max(ok, key=lambda r: (score(r)[1], -r["job"])) if ok else None


# ---------------------------------------------------------------- files

def _strict(doc: dict[str, Any]) -> dict[str, Any]:
    # strict JSON: a non-finite number (a loss that blew up) becomes null
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in doc.items()}


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_bytes(path, buf.getvalue().encode())


def job_columns(swept: list[str]) -> list[str]:
    return list(JOB_HEAD) + list(swept) + [c.key for c in JOB_COLUMNS if c.key not in swept]


def job_dir_text(job_dir: Path, sweep_dir: Path) -> str:
    """The job's folder relative to the sweep folder ("3"): the same however the summary was
    made, and still right after the sweep folder is moved or copied elsewhere."""
    try:
        return str(Path(job_dir).relative_to(sweep_dir))
    except ValueError:
        return str(job_dir)


def public_row(row: dict[str, Any], swept: list[str], sweep_dir: Path) -> dict[str, Any]:
    out = {k: row.get(k) for k in JOB_HEAD}
    out.update(row["_swept"])
    for c in JOB_COLUMNS:
        out.setdefault(c.key, row.get(c.key))
    out["dir"] = job_dir_text(row["_dir"], sweep_dir)
    return _strict(out)


def count(rows: list[dict[str, Any]], status: str) -> int:
    return sum(r["status"] == status for r in rows)


def write_tables(sweep_dir: Path, rows: list[dict[str, Any]], swept: list[str], fixed: list[str]) -> dict:
    """summary.csv and summary.json (atomically). Returns the json document."""
    public = [public_row(r, swept, sweep_dir) for r in rows]
    _write_csv(sweep_dir / "summary.csv", job_columns(swept), public)
    best = best_job(rows)
    doc = {"sweep_dir": str(Path(sweep_dir).resolve()), "n_jobs": len(rows), "n_ok": count(rows, "ok"),
           "n_failed": count(rows, "failed"), "n_not_run": count(rows, NOT_RUN), "swept_keys": swept,
           "fixed_overrides": fixed, "best_job": best["job"] if best else None, "jobs": public}
    atomic_write_json(sweep_dir / "summary.json", doc)
    return doc


# ---------------------------------------------------------------- configurations over seeds

def config_keys(swept: list[str]) -> list[str]:
    return [k for k in swept if k != SEED_KEY]


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return dict.fromkeys(STATS)
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def group_by_config(rows: list[dict[str, Any]], swept: list[str]) -> list[dict[str, Any]]:
    """One row per configuration (the swept values but `seed`), in order of its first job;
    jobs that never started are left out."""
    keys = config_keys(swept)
    members: dict[tuple, list[dict[str, Any]]] = {}
    for r in (r for r in rows if r["status"] != NOT_RUN):
        members.setdefault(tuple(r["_swept"][k] for k in keys), []).append(r)
    groups = []
    for jobs in members.values():
        first, ok = jobs[0], [r for r in jobs if r["status"] == "ok"]
        g: dict[str, Any] = {"config": " ".join(o for o in first["_overrides"] if split_override(o)[0] in keys)}
        g.update({k: first["_swept"][k] for k in keys})
        g.setdefault("model", first.get("model"))
        g.update(n=len(ok), n_failed=sum(r["status"] == "failed" for r in jobs),
                 jobs=" ".join(str(r["job"]) for r in jobs),
                 seeds=" ".join(str(r["_swept"][SEED_KEY]) for r in jobs) if SEED_KEY in swept else None)
        for metric, _ in GROUP_METRICS:
            values = [float(r[metric]) for r in ok if isinstance(r.get(metric), (int, float))
                      and math.isfinite(r[metric])]
            g.update({f"{metric}_{s}": v for s, v in _stats(values).items()})
        g["_size"] = len(jobs)
        groups.append(g)
    return groups


def has_repeats(groups: list[dict[str, Any]]) -> bool:
    """Whether some configuration ran more than once: only then is a by-config table useful."""
    return any(g["_size"] > 1 for g in groups)


def group_columns(swept: list[str]) -> list[str]:
    keys = config_keys(swept)
    return (["config"] + keys + (["model"] if "model" not in keys else []) + list(GROUP_HEAD[1:])
            + [f"{m}_{s}" for m, _ in GROUP_METRICS for s in STATS])


def write_config_tables(sweep_dir: Path, groups: list[dict[str, Any]], swept: list[str]) -> dict:
    """summary_by_config.csv and summary_by_config.json. Returns the json document."""
    columns = group_columns(swept)
    public = [_strict({k: g.get(k) for k in columns}) for g in groups]
    _write_csv(sweep_dir / "summary_by_config.csv", columns, public)
    doc = {"sweep_dir": str(Path(sweep_dir).resolve()), "grouped_over": SEED_KEY, "config_keys": config_keys(swept),
           "std": "sample standard deviation (n-1)", "n_configs": len(groups), "configs": public}
    atomic_write_json(sweep_dir / "summary_by_config.json", doc)
    return doc


# ---------------------------------------------------------------- printed tables

def shown_path(p: Path) -> Path:
    """Relative to the working directory when under it (shorter to read and to copy)."""
    try:
        return Path(p).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return Path(p)


def _draw(title: str, header: list[str], right: set[int], body: list[list[str]], styles: list[str | None],
          closing: str, closing_style: str | None, tty: bool | None) -> str:
    if tty is None:
        tty = sys.stdout.isatty()
    if tty:
        import shutil

        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        # Text, not markup: cells hold user values such as model.freeze=[stem,layer1] or a path
        # with [/...] in it, which rich would otherwise drop or refuse as tags.
        table = Table(title=Text(title), title_justify="left")
        for i, h in enumerate(header):
            table.add_column(Text(h), justify="right" if i in right else "left", overflow="fold")
        for cells, style in zip(body, styles):
            table.add_row(*(Text(c) for c in cells), style=style)
        buf = io.StringIO()
        console = Console(file=buf, force_terminal=True, width=shutil.get_terminal_size().columns)
        console.print(table)
        if closing:
            console.print(Text(closing), style=closing_style, highlight=False, soft_wrap=True)
        return buf.getvalue()
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
                         ).rstrip()

    out = [title, line(header), line(["-" * w for w in widths])] + [line(c) for c in body]
    return "\n".join(out + ([closing] if closing else [])) + "\n"


def _shown(columns: list[Column], rows: list[dict[str, Any]]) -> list[Column]:
    """The titled columns, without optional ones that no row has a value for."""
    return [c for c in columns if c.title and not (c.optional and all(c.cell(r) == c.empty for r in rows))]


def render_table(rows: list[dict[str, Any]], swept: list[str], sweep_dir: Path, tty: bool | None = None) -> str:
    """The table (sorted by the objective, best job first and marked) and a closing line."""
    best = best_job(rows)
    ordered = sorted(rows, key=lambda r: (r["status"] != "ok", r["status"] == NOT_RUN, -(score(r) or ("", 0.0))[1],
                                          r["job"]))
    keys = list(swept) + (["model"] if "model" not in swept else [])
    columns = _shown([c for c in JOB_COLUMNS if c.key not in keys], rows)
    header = ["", "job"] + keys + ["status"] + [c.title for c in columns]
    right = {1} | {i for i, c in enumerate(columns, start=3 + len(keys)) if c.right}
    body = [["*" if r is best else "", str(r["job"])]
            + [Column(k).cell({k: r["_swept"].get(k) if k in swept else r.get(k)}) for k in keys]
            + [r["status"]] + [c.cell(r) for c in columns] for r in ordered]
    styles = ["bold green" if r is best else {"failed": "red", NOT_RUN: "yellow"}.get(r["status"]) for r in ordered]
    title = (f"sweep {shown_path(sweep_dir)}: {len(rows)} jobs, {count(rows, 'ok')} ok, {count(rows, 'failed')} failed"
             + "".join(f", {n} {s}" for s in ("running", NOT_RUN) if (n := count(rows, s))))
    if best is not None:
        metric, value = score(best)
        closing = (f"best: job {best['job']}  {best['overrides']}  {metric} {value:.4f} "
                   f"(epoch {best.get('best_epoch')})  {shown_path(best['_dir'])}")
    else:
        closing = "best: none (no job finished)"
    return _draw(title, header, right, body, styles, closing, "bold green" if best is not None else None, tty)


def _group_print_columns() -> list[Column]:
    columns = []
    for metric, title in GROUP_METRICS:
        optional = "val" in metric  # only runs that held out a validation split have these

        def mean_std(g: dict[str, Any], m: str = metric) -> tuple[Any, Any]:
            return g.get(f"{m}_mean"), g.get(f"{m}_std")

        def low_high(g: dict[str, Any], m: str = metric) -> tuple[Any, Any]:
            return g.get(f"{m}_min"), g.get(f"{m}_max")

        columns += [Column(f"{metric}_mean", f"{title} mean ± std", _mean_std, optional, get=mean_std),
                    Column(f"{metric}_min", f"{title} min-max", _range, optional, get=low_high)]
    return columns


def render_config_table(groups: list[dict[str, Any]], swept: list[str], tty: bool | None = None) -> str:
    """Configurations over seeds, best mean first (by the objective's metric)."""
    keys = config_keys(swept)
    keys += ["model"] if "model" not in keys else []
    columns = _shown(_group_print_columns(), groups)
    metric = next((m for m in OBJECTIVE_KEYS if any(g.get(f"{m}_mean") is not None for g in groups)), None)
    ordered = sorted(groups, key=lambda g: -(g.get(f"{metric}_mean") or 0.0) if metric else 0.0)
    header = keys + ["n", "failed"] + [c.title for c in columns]
    right = set(range(len(keys), len(header)))
    body = [[Column(k).cell(g) for k in keys] + [str(g["n"]), str(g["n_failed"])] + [c.cell(g) for c in columns]
            for g in ordered]
    title = (f"by configuration: {len(groups)} configurations; jobs that differ only in {SEED_KEY} are one "
             f"configuration (mean ± sample std over its ok jobs)")
    return _draw(title, header, right, body, [None] * len(body), "", None, tty)
