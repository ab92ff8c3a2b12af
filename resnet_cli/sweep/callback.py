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
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..errors import EXIT_FAILURE, error_line, fail, user_errors
from .folder import LIVE_FILE, collect, job_dirs, load_json, mark_ended, mark_running, running_sweep
from .jobs import ERROR_FILE, record_failure
from .plan import NOT_RUN, read_plan, slot_command
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
    ran = [r for r in rows if r["status"] != NOT_RUN]
    if ran:
        import textwrap

        title = "\n".join([f"sweep {sweep_dir.parent.name}/{sweep_dir.name}"] +
                          textwrap.wrap(" ".join(fixed), 100, max_lines=2, placeholder=" ..."))
        try:
            plot_summary(sweep_dir / "summary.png", ran, swept, title)
            if _want_training_error(training_error, ran):
                plot_training_error(sweep_dir / "training_error.png", ran, swept, title)
        except Exception as e:  # a plot must never cost the tables
            log.warning("sweep plots not written: %s", error_line(e))
    if print_table:
        print(render_table(rows, swept, sweep_dir), end="", flush=True)
        if has_repeats(groups):
            print("\n" + render_config_table(groups, swept), end="", flush=True)
        written = [n for n in FILES if (sweep_dir / n).is_file()]
        print(f"wrote {', '.join(written)} in {shown_path(sweep_dir)}", flush=True)
        steps = [] if live else finishing_steps(sweep_dir, rows)
        if steps:
            print("\n".join(steps), flush=True)
    return doc


def _started_elsewhere(cwd: str | None) -> bool:
    return bool(cwd) and Path(cwd).is_dir() and Path(cwd).resolve() != Path.cwd().resolve()


def finishing_steps(sweep_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """The commands that finish a sweep that was stopped: resume each job that was cut short
    (it has a checkpoint), run each job that never started into its slot (SWEEP/N, where the
    summary finds it as job N), then rebuild the summary. [] for a sweep that ran to its end."""
    cut_short = [r for r in rows if r.get("_resumable")]
    missing = [r for r in rows if r["status"] == NOT_RUN]
    plan = read_plan(sweep_dir) if missing else None
    lines = []
    if cut_short:
        lines.append(f"{len(cut_short)} job(s) stopped before the end; continue each from its last checkpoint:")
        lines += [f"  resnet-train resume={shlex.quote(str(shown_path(r['_dir'])))}" for r in cut_short]
    if plan is not None:
        # relative paths in the overrides are read from where the sweep was started
        cd = f"cd {shlex.quote(plan.cwd)} && " if _started_elsewhere(plan.cwd) else ""
        lines.append(f"{len(missing)} job(s) of this sweep never started; run each into its slot:")
        lines += [f"  {cd}{slot_command(plan, r['job'], r['_dir'].resolve() if cd else shown_path(r['_dir']))}"
                  for r in missing]
    if lines:
        lines.append(f"then rebuild this summary: python -m resnet_cli.sweep {shlex.quote(str(shown_path(sweep_dir)))}")
    return lines


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


USAGE = "usage: python -m resnet_cli.sweep SWEEP_DIR [--training-error]"
HELP = f"""{USAGE}

(Re)write the summary of a sweep (a resnet-train -m run) from its job folders and print its
table: summary.csv/json, summary_by_config.csv/json (seed sweeps), summary.png and, for
several models, training_error.png, all in SWEEP_DIR. Safe while the sweep still runs.
Jobs of the sweep that never started are listed as `not run`, with the commands that run them.

  SWEEP_DIR          the sweep folder (hydra.sweep.dir; by default multirun/DATE/TIME)
  --training-error   draw training_error.png even for a sweep of one model
  -h, --help         show this help

Exit status: 0 when every job is ok (or still running), 1 when a job failed or, once the
sweep has ended, a job never ran; 2 for bad input."""
OPTIONS = ("--training-error",)


def parse_args(args: list[str]) -> tuple[Path, bool]:
    """(SWEEP_DIR, --training-error) from the command line; bad input exits in one line."""
    unknown = [a for a in args if a.startswith("-") and a not in OPTIONS]
    if unknown:
        fail(f"{unknown[0]}: unknown option; allowed: {', '.join(OPTIONS)}, --help ({USAGE})")
    given = [a for a in args if not a.startswith("-")]
    if len(given) != 1:
        fail(f"{'no sweep folder given' if not given else 'one sweep folder at a time'} ({USAGE})")
    return Path(given[0]), "--training-error" in args


def check_sweep_folder(path: Path) -> None:
    if not path.exists():
        fail(f"{path}: no such folder; give a sweep folder (hydra.sweep.dir, by default multirun/DATE/TIME)")
    if not path.is_dir():
        fail(f"{path}: not a folder; give a sweep folder (hydra.sweep.dir, by default multirun/DATE/TIME)")
    if not job_dirs(path) and read_plan(path) is None:
        fail(f"{path}: not a sweep folder (no job folders with .hydra/overrides.yaml, no multirun.yaml "
             "of a basic sweep)")


def main(argv: list[str] | None = None) -> None:
    """`python -m resnet_cli.sweep SWEEP_DIR [--training-error]`: (re)write a sweep's summary."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(HELP)
        sys.exit(0)
    path, training_error = parse_args(args)
    check_sweep_folder(path)
    live = running_sweep(path)  # also removes the marker of a sweep that was killed
    with user_errors():
        doc = summarize(path, "true" if training_error else "auto", live=live is not None)
    running = sum(j["status"] == "running" for j in doc["jobs"])
    if running:
        # a sweep on another host cannot be checked: say how to stop believing it
        unchecked = "" if live.endswith(f" on {socket.gethostname()}") else \
            f"; if it was stopped, delete {shown_path(path) / LIVE_FILE}"
        print(f"{running} job(s) still running: the sweep ({live}) has not ended{unchecked}", flush=True)
    sys.exit(EXIT_FAILURE if doc["n_failed"] or (doc["n_not_run"] and live is None) else 0)
