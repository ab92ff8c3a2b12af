"""The Hydra callback that summarizes a multirun, and the same summary on demand.

`SweepSummary` is named in configs/train.yaml (`hydra.callbacks.sweep_summary`). `on_job_end`
refreshes summary.csv/json after every job, so even a sweep that is stopped early leaves a
summary of the jobs that ended; `on_multirun_end` writes the final tables and figures and
prints the table. The entry point (`cli.run_hydra_app`) then reads summary.json to decide the
exit code: `failed_jobs_message`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..errors import EXIT_FAILURE, EXIT_USAGE, error_line, fail, user_errors
from .folder import collect, job_dirs, load_json, mark_ended, mark_running, running_sweep
from .jobs import ERROR_FILE, record_failure
from .plots import plot_summary, plot_training_error
from .table import (group_by_config, has_repeats, render_config_table, render_table, shown_path,
                    write_config_tables, write_tables)

log = logging.getLogger("resnet_cli")

FILES = ("summary.csv", "summary.json", "summary_by_config.csv", "summary_by_config.json", "summary.png",
         "training_error.png")


def _want_training_error(setting: Any, rows: list[dict[str, Any]]) -> bool:
    s = str(setting).lower()
    with_metrics = [r for r in rows if r["_metrics"]]
    if s in ("false", "no", "off", "0", "none"):
        return False
    if s in ("true", "yes", "on", "1", "always"):
        return bool(with_metrics)
    return len({r.get("model") for r in with_metrics}) > 1  # auto


def summarize(sweep_dir: str | os.PathLike, training_error: Any = "auto", print_table: bool = True,
              final: bool = True, live: bool = False) -> dict[str, Any]:
    """Write summary.csv/json (+ the by-config tables and the plots when `final`) for a sweep
    folder; print the tables. Also usable on its own: `python -m resnet_cli.sweep DIR`
    (`live`: the sweep is still running, its unfinished jobs are not failures)."""
    sweep_dir = Path(sweep_dir)
    rows, swept, fixed = collect(sweep_dir, final=final, live=live)
    doc = write_tables(sweep_dir, rows, swept, fixed)
    if not final:
        return doc
    groups = group_by_config(rows, swept)
    if has_repeats(groups):
        write_config_tables(sweep_dir, groups, swept)
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
        if has_repeats(groups):
            print("\n" + render_config_table(groups, swept), end="", flush=True)
        written = [n for n in FILES if (sweep_dir / n).is_file()]
        print(f"wrote {', '.join(written)} in {shown_path(sweep_dir)}", flush=True)
    return doc


def failed_jobs_message(sweep_dir: str | os.PathLike) -> str | None:
    """'N of M sweep jobs failed; see .../summary.csv' from the sweep's summary.json, or None."""
    doc = load_json(Path(sweep_dir) / "summary.json")
    if not isinstance(doc, dict) or not doc.get("n_failed"):
        return None
    return f"{doc['n_failed']} of {doc['n_jobs']} sweep jobs failed; see {shown_path(Path(sweep_dir)) / 'summary.csv'}"


def _sweep_dir(config: DictConfig) -> Path:
    d = Path(str(config.hydra.sweep.dir))
    if not d.is_absolute():  # relative to where resnet-train was started (jobs may chdir)
        d = Path(str(OmegaConf.select(config, "hydra.runtime.cwd") or os.getcwd())) / d
    return d


def _is_multirun(config: DictConfig) -> bool:
    from hydra.types import RunMode

    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


class SweepSummary(Callback):
    """Hydra callback: a summary of every multirun (see resnet_cli/sweep/). Harmless for single runs.

    training_error: auto (draw training_error.png when the sweep has several models) | true | false.
    print_table: print the table at the end of the sweep."""

    def __init__(self, training_error: Any = "auto", print_table: bool = True) -> None:
        self.training_error = training_error
        self.print_table = print_table

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        mark_running(_sweep_dir(config))

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
        mark_ended(_sweep_dir(config))
        summarize(_sweep_dir(config), self.training_error, self.print_table, final=True)


def main(argv: list[str] | None = None) -> None:
    """`python -m resnet_cli.sweep SWEEP_DIR [--training-error]`: (re)write a sweep's summary."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m resnet_cli.sweep SWEEP_DIR [--training-error]")
        sys.exit(0 if args else EXIT_USAGE)
    path = Path(args[0])
    if not path.is_dir() or not job_dirs(path):
        fail(f"{path}: not a sweep folder (no job folders with .hydra/overrides.yaml)")
    live = running_sweep(path)
    with user_errors():
        doc = summarize(path, "true" if "--training-error" in args else "auto", live=live is not None)
    running = sum(j["status"] == "running" for j in doc["jobs"])
    if running:
        print(f"{running} job(s) still running: the sweep ({live}) has not ended", flush=True)
    sys.exit(EXIT_FAILURE if doc["n_failed"] else 0)
