"""Running one job of a multirun: its result for the sweeper, or its failure as a record.

Hydra 1.3's `run_job` catches an `Exception` from the task and returns it as a FAILED
`JobReturn`; the BasicLauncher then goes on with the next job, but the BasicSweeper reads every
`return_value` after the batch, which re-raises the first failure: the sweep stops there and
`on_multirun_end` never runs. A `SystemExit` (what `errors.user_errors` turns known errors into)
is not caught at all and stops the sweep at once. So `sweep_job` runs each job of a multirun: a
failure is written to the job's `error.txt` and its train.log, then *returned* (`JobFailure`) to
the basic sweeper, which goes on, or raised to sweepers that handle failed jobs themselves
(Optuna marks the trial FAILED, up to `hydra.sweeper.max_failure_rate`).
"""

from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from ..checkpoint import atomic_write_bytes
from ..errors import KNOWN_ERRORS, error_line

log = logging.getLogger("resnet_cli")

ERROR_FILE = "error.txt"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# What a sweep optimizes, first present wins: the validation split when the run held one out
# (issue 13: select on validation, report test), else the test accuracy.
OBJECTIVE_KEYS = ("best_val_acc", "best_test_acc")


@dataclass(frozen=True)
class JobFailure:
    """What a failed job returns to Hydra's BasicSweeper: a value, so the sweep goes on."""

    error: str

    def __str__(self) -> str:
        return f"job failed: {self.error}"


class SweepJobError(RuntimeError):
    """A failed job, raised to sweepers that count failures themselves (Optuna)."""


def record_failure(job_dir: str | os.PathLike, message: str, exc: BaseException | None = None) -> None:
    """error.txt in the job folder: the one-line message, then the traceback of a real bug."""
    text = message + "\n"
    if exc is not None and not isinstance(exc, (*KNOWN_ERRORS, SweepJobError)):
        text += "\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    atomic_write_bytes(Path(job_dir) / ERROR_FILE, text.encode())


def objective(result: Any) -> Any:
    """What a job returns to the sweeper (a float, what Optuna maximizes): see OBJECTIVE_KEYS."""
    if isinstance(result, dict):
        for key in OBJECTIVE_KEYS:
            if result.get(key) is not None:
                return float(result[key])
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
