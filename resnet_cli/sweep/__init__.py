"""Multirun summaries: one table, a few files and a plot or two for a whole sweep.

After `resnet-train -m ...` the `SweepSummary` callback reads every job folder of the sweep and
writes into the sweep folder summary.csv/json (one row per job), summary_by_config.csv/json
(jobs that differ only in `seed`, as mean ± std; for seed sweeps), summary.png (best accuracy
against learning rate) and training_error.png (train and test error per epoch, one curve per
model, like He et al. 2016 Fig. 1/6), and prints the table. A failing job becomes a row instead
of stopping the sweep. One module per question:

- jobs.py: running one job; a failure becomes error.txt and a value the sweep goes on with;
- folder.py: reading job folders into rows;
- plan.py: which jobs the sweep was to run (Hydra's multirun.yaml), so those that never
  started are rows too, with the command that runs each;
- table.py: the columns, summary*.csv/json and the printed tables;
- plots.py: the figures;
- callback.py: the Hydra callback, `summarize`, and the exit code read from summary.json.
"""

from ..errors import error_line
from .callback import SweepSummary, failed_jobs_message, main, summarize
from .folder import collect, job_dirs, read_job
from .jobs import BASIC_SWEEPER, ERROR_FILE, JobFailure, SweepJobError, objective, record_failure, sweep_job
from .plan import NOT_RUN, Plan, read_plan, slot_command
from .plots import plot_summary, plot_training_error
from .table import (JOB_COLUMNS, THRESHOLDS, Column, best_job, group_by_config, render_config_table, render_table,
                    write_config_tables, write_tables)

__all__ = ["BASIC_SWEEPER", "ERROR_FILE", "JOB_COLUMNS", "NOT_RUN", "THRESHOLDS", "Column", "JobFailure", "Plan",
           "SweepJobError", "SweepSummary", "best_job", "collect", "error_line", "failed_jobs_message",
           "group_by_config", "job_dirs", "main", "objective", "plot_summary", "plot_training_error", "read_job",
           "read_plan", "record_failure", "render_config_table", "render_table", "slot_command", "summarize",
           "sweep_job", "write_config_tables", "write_tables"]
