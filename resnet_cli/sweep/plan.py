"""Which jobs a sweep was to run, read back from the record Hydra leaves in the sweep folder.

Hydra's BasicSweeper saves its whole config as multirun.yaml before the first job starts:
`hydra.sweeper.params` (a preset's lists) and `hydra.overrides.task` (the command line). Its jobs
are the cartesian product of those lists, numbered in that order; `planned_jobs` runs the same
code (`BasicSweeper.split_arguments`) on the same record. A job that has no folder never started
(the sweep was stopped first): the summary lists it as `not run` and prints the command that
runs it into its slot, SWEEP/N, where the summary finds it as job N.

Other sweepers (Optuna draws each trial from the ones before) leave no plan to read: there,
and wherever the record and the job folders disagree, nothing is said rather than guessed.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..overrides import override_key, recorded_config
from .jobs import BASIC_SWEEPER

NOT_RUN = "not run"
RECORD = "multirun.yaml"
# hydra.* overrides that make or place the sweep; the rest (hydra.job.chdir, logging ...) shape
# each job, so a job run on its own keeps them
_SWEEP_ONLY = ("hydra.sweep", "hydra.sweeper", "hydra/sweeper", "hydra.launcher", "hydra/launcher", "hydra.mode",
               "hydra.run", "hydra.callbacks.sweep_summary")


@dataclass(frozen=True)
class Plan:
    """A basic sweep's jobs (their overrides, by job number) and what else its command line held."""

    jobs: list[list[str]]
    flags: list[str]  # --config-dir / --config-name, as the sweep was started with them
    hydra: list[str]  # hydra.* overrides that each job keeps
    cwd: str | None  # where the sweep was started: relative paths in the overrides start there


def planned_jobs(sweeper: dict[str, Any], task: list[str]) -> list[list[str]]:
    """The BasicSweeper's jobs for its `hydra.sweeper` node and the command line's overrides."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + [str(o) for o in task])
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _config_flags(hydra: dict[str, Any]) -> list[str]:
    folder, name = recorded_config(hydra)
    return (["--config-dir", folder] if folder else []) + (["--config-name", name] if name else [])


def _record(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    try:
        doc = OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else None
    except Exception:  # half-written or foreign: as if absent
        doc = None
    return doc if isinstance(doc, dict) else {}


def read_plan(sweep_dir: Path) -> Plan | None:
    """The plan of the basic sweep recorded in SWEEP_DIR/multirun.yaml; None for another
    sweeper, or a record this code cannot expand alone (a glob() sweep needs the configs)."""
    hydra = _record(sweep_dir / RECORD).get("hydra")
    if not isinstance(hydra, dict):
        return None
    sweeper = hydra.get("sweeper") or {}
    overrides = hydra.get("overrides") or {}
    if not isinstance(sweeper, dict) or sweeper.get("_target_") != BASIC_SWEEPER or not isinstance(overrides, dict):
        return None
    if "${" in str(sweeper.get("params")):  # interpolated lists: what Hydra resolved is not recorded
        return None
    try:
        jobs = planned_jobs(sweeper, overrides.get("task") or [])
    except Exception:  # any parse error: no plan we can vouch for
        return None
    kept = [str(o) for o in overrides.get("hydra") or [] if not override_key(str(o)).startswith(_SWEEP_ONLY)]
    cwd = (hydra.get("runtime") or {}).get("cwd")
    return Plan(jobs, _config_flags(hydra), kept, str(cwd) if cwd else None)


def missing_jobs(plan: Plan, present: dict[int, list[str]]) -> list[int]:
    """Numbers of the planned jobs that have no folder. `present`: job number -> the overrides
    its folder recorded. [] when some folder is not the planned job of its number: the plan
    is then not this folder's (say, jobs run into it by hand with other values)."""
    for num, overrides in present.items():
        if not 0 <= num < len(plan.jobs) or plan.jobs[num] != overrides:
            return []
    return [n for n in range(len(plan.jobs)) if n not in present]


def _hydra_quote(value: str) -> str:
    # Hydra's override grammar reads spaces, quotes and brackets in a value as its own syntax
    return value if all(c.isalnum() or c in "/._-:" for c in value) else "'" + value.replace("'", "\\'") + "'"


def slot_command(plan: Plan, num: int, slot: Path) -> str:
    """A shell command that runs job `num` alone into `slot`, with the overrides it would have had."""
    words = ["resnet-train", *plan.flags, *plan.jobs[num], *plan.hydra, f"hydra.run.dir={_hydra_quote(str(slot))}"]
    return " ".join(shlex.quote(w) for w in words)
