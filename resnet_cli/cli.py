"""Shared command-line plumbing: compose configs, check them before anything runs, and turn
known errors into one line on stderr with exit code 2 (HYDRA_FULL_ERROR=1 shows tracebacks).

Hydra prints multi-line reports for config errors and exits 1; we compose the same configs
first (each job of a sweep too) so that bad input is refused before a run folder exists.
"""

from __future__ import annotations

import difflib
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf

EXIT_USAGE = 2
# Hydra flags that only print something: nothing to validate then.
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc"}
_VALUE_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c", "--package",
                "-p", "--info", "-i", "--experimental-rerun"}


def known_error_types() -> tuple[type[BaseException], ...]:
    """Errors whose message is already the one line a user should see."""
    from .checkpoint import CheckpointError, OutputError
    from .config import ConfigError
    from .data import DataError
    from .engine import NonFiniteLoss
    from .models import ModelConfigError

    return ConfigError, ModelConfigError, DataError, CheckpointError, OutputError, NonFiniteLoss


def _exit_code(e: BaseException) -> int:
    from .checkpoint import OutputError
    from .engine import NonFiniteLoss

    # bad input is a usage error (2); a run that failed while running is a plain failure (1)
    return 1 if isinstance(e, (OutputError, NonFiniteLoss)) else EXIT_USAGE


def fail(message: str, code: int = EXIT_USAGE) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Known errors -> one line and exit code. Anything else propagates (a real bug)."""
    try:
        yield
    except known_error_types() as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(str(e), code=_exit_code(e))


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags with their values, overrides)."""
    flags, overrides = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-"):
            flags.append(a)
            takes_value = a in _VALUE_FLAGS and "=" not in a
            if takes_value and i + 1 < len(argv) and "=" not in argv[i + 1] and not argv[i + 1].startswith("-"):
                flags.append(argv[i + 1])
                i += 1
        else:
            overrides.append(a)
        i += 1
    return flags, overrides


def hydra_error_line(e: BaseException, overrides: list[str]) -> str:
    """One line from Hydra's/OmegaConf's exceptions: the key, the value, what is allowed."""
    from hydra.errors import MissingConfigException

    if isinstance(e, MissingConfigException):
        missing = (e.missing_cfg_file or "").strip("/")
        group, _, option = missing.rpartition("/")
        options = ", ".join(sorted(e.options or []))
        if group:
            return f"{group}={option}: unknown option for {group}; choose from {options}"
        return str(e).splitlines()[0]
    cause = e.__cause__ or e.__context__ or e
    key = getattr(cause, "full_key", None)
    msg = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()
    first = msg[0] if msg else type(cause).__name__
    if key:
        given = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), None)
        if "not in struct" in first or "Could not override" in str(e):
            hint = _close_key(key)
            return f"{key}: unknown key{hint}"
        return f"{key}={given}: {first}" if given is not None else f"{key}: {first}"
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _close_key(key: str) -> str:
    from .config import TrainConfig

    node: Any = OmegaConf.structured(TrainConfig)
    *parents, leaf = key.split(".")
    for p in parents:
        if p not in node:
            return ""
        node = node[p]
    if not isinstance(node, DictConfig):
        return ""
    close = difflib.get_close_matches(leaf, list(node.keys()), n=1)
    where = ".".join(parents)
    hint = f"; did you mean {'.'.join(parents + close)}?" if close else ""
    return hint + f" (keys{' of ' + where if where else ''}: {', '.join(node.keys())})"


def compose(config_name: str, overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """The config Hydra would give the app, composed without running it (no run folder)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from .config import register_schemas
    from .paths import config_dir

    register_schemas()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=config_name):
        try:
            return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=with_hydra)
        except Exception as e:  # Hydra and OmegaConf raise many types; all are bad input here
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            raise _config_error(hydra_error_line(e, overrides)) from None


def _config_error(msg: str) -> Exception:
    from .config import ConfigError

    return ConfigError(msg)


def _sweep_jobs(overrides: list[str], limit: int = 256) -> list[list[str]]:
    """Every job of a basic sweep (comma lists), or just the fixed overrides when the sweep is
    something else (ranges for Optuna, say) or too large to check one by one."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
        jobs = [list(job) for batch in batches for job in batch]
        if 0 < len(jobs) <= limit:
            return jobs
    except Exception:  # not a basic sweep
        pass
    return [[o for o in overrides if "," not in o.split("=", 1)[-1] and "(" not in o.split("=", 1)[-1]]]


def validate(config_name: str, overrides: list[str], multirun: bool) -> DictConfig:
    from .config import check_values
    from .data import check_available

    jobs = _sweep_jobs(overrides) if multirun else [overrides]
    cfg = None
    for job in jobs:
        cfg = compose(config_name, job)
        try:  # interpolations and required (???) values
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except Exception as e:
            raise _config_error(hydra_error_line(e, job)) from None
        check_values(cfg)
        if "model" in cfg:
            from .models import ModelSpec

            ModelSpec.from_mapping(OmegaConf.to_container(cfg.model, resolve=True)).validate()
        if config_name == "train":
            check_available(cfg.data.name, cfg.data.root, cfg.data.download)
            from .engine import resolve_device

            resolve_device(cfg.trainer.device)
            from .trackers import check as check_trackers

            check_trackers(cfg.logger)
            from .finetune import check as check_finetune

            check_finetune(cfg.model, cfg.scheduler, resuming=bool(cfg.resume))
    if config_name == "train":
        _check_output_folder(overrides, multirun)
    return cfg


def _check_output_folder(overrides: list[str], multirun: bool) -> None:
    from .checkpoint import writable_folder_error

    # one whole job: launcher/sweeper groups (hydra/launcher=joblib, hparams_search=...) decide
    # which hydra.* keys exist, so composing the hydra.* overrides alone rejects valid ones
    job = _sweep_jobs(overrides)[0] if multirun else overrides
    hcfg = compose("train", job, with_hydra=True).hydra
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    folder = hcfg.sweep.dir if multirun else hcfg.run.dir
    why = writable_folder_error(folder)
    if why:
        raise _config_error(f"{key}={folder}: cannot create the run folder ({why}); "
                          "run from a writable folder or set hydra.run.dir=")


def _quote(value: str) -> str:
    return value if all(c.isalnum() or c in "/._-:" for c in value) else "'" + value.replace("'", "\\'") + "'"


def prepare_train_argv(argv: list[str], dinfo) -> list[str]:
    """Validate, then rewrite argv for the cases Hydra alone gets wrong:

    - resume=<run>: compose with the run's original overrides first (so `resnet-train
      resume=DIR` continues the same experiment), write into that run folder, and keep its
      .hydra/ record as it was;
    - torchrun: every rank writes into rank 0's run folder; only rank 0 logs to it."""
    from .checkpoint import load_checkpoint, resolve_resume

    flags, overrides = split_argv(argv)
    multirun = "-m" in flags or "--multirun" in flags
    if any(f.split("=")[0] in _INFO_FLAGS for f in flags) or any(f.startswith(("--config-dir", "-cd")) for f in flags):
        return argv
    resume = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("resume=")), None)
    extra: list[str] = []
    if resume and resume.lower() not in ("null", "none", ""):
        if multirun:
            raise _config_error("resume: cannot be combined with --multirun; resume one run at a time")
        run_dir, ckpt = resolve_resume(resume)
        load_checkpoint(ckpt)  # refuse a damaged or foreign file before anything is written
        previous = run_dir / ".hydra" / "overrides.yaml"
        if previous.is_file():
            old = [o for o in OmegaConf.load(previous) if not str(o).startswith(("resume=", "hydra"))]
            overrides = [str(o) for o in old] + overrides
        extra = [f"hydra.run.dir={_quote(str(run_dir))}", "hydra.output_subdir=null"]
    validate("train", overrides, multirun)
    if dinfo.enabled:
        if multirun:
            raise _config_error("--multirun: not supported under torchrun; launch one torchrun per job")
        from . import distributed

        distributed.init(dinfo)
        if not any(o.startswith("hydra.run.dir=") for o in overrides + extra):
            extra.append(f"hydra.run.dir={_quote(distributed.shared_run_dir(dinfo))}")
        if not dinfo.is_main:
            extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    return flags + overrides + extra


def run_hydra_app(config_name: str, task: Callable[[DictConfig, Any], Any]) -> None:
    """The console entry point: validate, then hand over to @hydra.main (launchers,
    sweeps and callbacks all work as Hydra documents them)."""
    import hydra

    from . import distributed
    from .config import register_schemas
    from .paths import config_dir

    dinfo = distributed.from_env()
    with user_errors():
        sys.argv = [sys.argv[0]] + prepare_train_argv(sys.argv[1:], dinfo)
    register_schemas()

    def _job(cfg: DictConfig) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # A failing job becomes a failed row of the sweep's summary and the other jobs
            # still run (a SystemExit here would stop the whole sweep): see resnet_cli/sweep.py.
            from .sweep import sweep_job

            return sweep_job(task, cfg, dinfo)
        with user_errors():
            return task(cfg, dinfo)

    try:
        hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(_job)()
    finally:
        distributed.shutdown()
    from .sweep import failed_jobs_message

    failed = failed_jobs_message()  # set by the SweepSummary callback at the end of a multirun
    if failed:
        fail(failed, code=1)
