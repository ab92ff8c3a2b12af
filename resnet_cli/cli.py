"""Shared command-line plumbing: compose configs, check them before anything runs, and hand
over to Hydra. Known errors become one line on stderr (resnet_cli/errors.py).

Hydra prints multi-line reports for config errors and exits 1; we compose the same configs
first (each job of a sweep too) so that bad input is refused before a run folder exists.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

# Re-exported: the commands took these from here before resnet_cli/errors.py existed.
from .errors import (EXIT_FAILURE, EXIT_USAGE, ConfigError, error_line, fail, first_line, known_error_types,
                     quiet_broken_pipe, user_errors)
from .overrides import override_key, recorded_config, split_override

__all__ = ["EXIT_USAGE", "check_output_folder", "compose", "fail", "hydra_error_line", "known_error_types",
           "prepare_train_argv", "run_hydra_app", "split_argv", "user_errors", "validate"]

# Hydra flags that only print something: nothing to validate then.
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc"}
_VALUE_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c", "--package",
                "-p", "--info", "-i", "--experimental-rerun"}


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
        return first_line(e, 500)
    cause = e.__cause__ or e.__context__ or e
    key = getattr(cause, "full_key", None)
    msg = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()
    first = msg[0] if msg else type(cause).__name__
    if key:
        given = next((o.split("=", 1)[1] for o in reversed(overrides) if "=" in o and override_key(o) == key), None)
        typed = any(override_key(o) == key for o in overrides)
        if "not in struct" in first or "Could not override" in str(e) or (first.startswith("Key '") and " not in '" in first):
            hint = _close_key(key, overrides)
            # not on the command line: a config file of the user's (--config-dir) has it
            where = "" if typed else " (in a config file, not on the command line)"
            return f"{key}: unknown key{where}{hint}"
        if "is not a ListConfig" in first and given is not None:  # model.freeze=stem
            return f"{key}={given}: give a list, e.g. {key}=[{given}]"
        return f"{key}={given}: {first}" if given is not None else f"{key}: {first}"
    return first_line(e, 500) or type(e).__name__


def _close_key(key: str, overrides: list[str] = ()) -> str:
    from .config import TrainConfig

    node: Any = OmegaConf.structured(TrainConfig)
    *parents, leaf = key.split(".")
    for p in parents:
        if p not in node:
            return ""
        node = node[p]
    if not isinstance(node, DictConfig):
        return ""
    where = ".".join(parents)
    if not node.keys() and len(parents) == 1:
        # An open group (optimizer, scheduler): its keys are whatever the chosen config's
        # _target_ takes, so suggest from the shipped options' keys.
        from .paths import config_dir

        options = {f.stem: [str(k) for k in (OmegaConf.load(f) or {}) if not str(k).startswith("_")]
                   for f in sorted((config_dir() / where).glob("*.yaml"))}
        chosen = _choice(where, overrides)
        if chosen in options:
            having = [o for o, keys in options.items() if leaf in keys]
            if having:  # a key of another option: naming it again would not help
                own = f"its keys: {', '.join(options[chosen])}" if options[chosen] else "it takes no keys"
                return (f" of {where}={chosen} ({own}); "
                        f"{where}={', '.join(having)} {'has' if len(having) == 1 else 'have'} it")
        keys = sorted({k for ks in options.values() for k in ks})
        close = difflib.get_close_matches(leaf, keys, n=1)
        hint = f"; did you mean {where}.{close[0]}?" if close else ""
        return hint + f" (a new argument for {where}'s _target_ is given as +{key}=VALUE)"
    close = difflib.get_close_matches(leaf, list(node.keys()), n=1)
    hint = f"; did you mean {'.'.join(parents + close)}?" if close else ""
    return hint + f" (keys{' of ' + where if where else ''}: {', '.join(node.keys())})"


def _choice(group: str, overrides: list[str]) -> str | None:
    """The option of `group` a command line picks: typed (`scheduler=none`), else set by a
    typed experiment (`override /scheduler: none`), else train.yaml's default. None if that
    cannot be read from the files (a user's own configs)."""
    from .paths import config_dir

    typed = dict(split_override(o) for o in overrides if "=" in o and not o.startswith("~"))
    if group in typed:
        return typed[group]
    sources = [config_dir() / "experiment" / f"{typed['experiment']}.yaml"] if "experiment" in typed else []
    for path in [*sources, config_dir() / "train.yaml"]:
        try:
            defaults = OmegaConf.load(path).get("defaults") or []
        except OSError:
            return None
        for item in defaults:
            if isinstance(item, DictConfig):
                for k, v in item.items():
                    if str(k).replace("override ", "").strip("/ ") == group:
                        return str(v)
    return None


def compose(config_name: str, overrides: list[str], with_hydra: bool = False,
            primary_dir: str | None = None) -> DictConfig:
    """The config Hydra would give the app, composed without running it (no run folder).
    primary_dir: the folder of a primary config of the user's (--config-dir); the package's
    configs are then on the search path, as `resnet-train --config-dir` has them."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from .config import register_schemas
    from .paths import config_dir

    register_schemas()
    if primary_dir:
        overrides = [f"hydra.searchpath=[{_quote('file://' + str(config_dir()))}]", *overrides]
    with initialize_config_dir(config_dir=primary_dir or str(config_dir()), version_base="1.3", job_name=config_name):
        try:
            return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=with_hydra)
        except Exception as e:  # Hydra and OmegaConf raise many types; all are bad input here
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            raise ConfigError(hydra_error_line(e, overrides)) from None


def _sweep_jobs(overrides: list[str], limit: int = 256) -> list[list[str]]:
    """Every job of a basic sweep (comma lists), or just the fixed overrides when the sweep is
    something else (ranges for Optuna, say) or too large to check one by one."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
        batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
        jobs = [list(job) for batch in batches for job in batch]
        if 0 < len(jobs) <= limit:
            return jobs
    except Exception:  # not a basic sweep
        pass
    fixed = []
    for o in overrides:  # the parser tells a sweep (a,b / interval() / range()) from a list like [2,2]
        try:
            if not parser.parse_override(o).is_sweep_override():
                fixed.append(o)
        except Exception:  # malformed: composing the job names it
            fixed.append(o)
    return [fixed]


def validate(config_name: str, overrides: list[str], multirun: bool, primary_dir: str | None = None) -> DictConfig:
    """Compose and check every job's config (a sweep's too); returns the last one. The run
    folder is checked separately (`check_output_folder`)."""
    from .config import check_values
    from .data import check_available

    jobs = _sweep_jobs(overrides) if multirun else [overrides]
    cfg = None
    for job in jobs:
        cfg = compose(config_name, job, primary_dir=primary_dir)
        try:  # interpolations and required (???) values
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except Exception as e:
            raise ConfigError(hydra_error_line(e, job)) from None
        check_values(cfg)
        if "model" in cfg:
            from .models import ModelSpec

            ModelSpec.from_mapping(OmegaConf.to_container(cfg.model, resolve=True)).validate()
        if "trainer" in cfg:  # train.yaml, or a primary config of the user's built on it
            check_available(cfg.data.name, cfg.data.root, cfg.data.download)
            from .cuda_graphs import decide
            from .engine import resolve_device

            decide(cfg.trainer.cuda_graphs, resolve_device(cfg.trainer.device), False, cfg.trainer.compile)
            from .trackers import check as check_trackers

            check_trackers(cfg.logger)
            from .finetune import check as check_finetune

            check_finetune(cfg.model, resuming=bool(cfg.resume))
    return cfg


def _check_launcher(hcfg: DictConfig) -> None:
    """What makes a launcher fail when the sweep starts, in one line before anything is written
    (the launchers raise inside Hydra: a traceback, and a sweep folder left half made)."""
    import shutil

    choice = OmegaConf.select(hcfg, "runtime.choices", default={}).get("hydra/launcher")
    target = str(OmegaConf.select(hcfg, "launcher._target_", default="") or "")
    if target.endswith("SlurmLauncher") and shutil.which("srun") is None:
        raise ConfigError(f"hydra/launcher={choice}: no Slurm on this machine (srun is not on PATH); start the "
                          "sweep on the cluster's login node, or leave hydra/launcher out to run the jobs here")
    if target.endswith("JoblibLauncher"):
        n_jobs = OmegaConf.select(hcfg, "launcher.n_jobs", default=-1)
        if not isinstance(n_jobs, int) or n_jobs == 0:
            raise ConfigError(f"hydra.launcher.n_jobs={n_jobs}: give the number of jobs at once "
                              "(-1: one per CPU core, -2: all but one)")


def check_output_folder(overrides: list[str], multirun: bool, config_name: str = "train",
                        primary_dir: str | None = None, new_run: bool = True) -> str:
    """The run folder (the sweep folder with -m) that Hydra will create, refused in one line
    when it cannot be created, or when a new run would go into a folder that holds runs.
    Time stamps in its name are resolved now. config_name and primary_dir: the primary config
    as `compose` takes it (a user's may set hydra.run.dir)."""
    from .checkpoint import writable_folder_error

    # one whole job: launcher/sweeper groups (hydra/launcher=joblib, hparams_search=...) decide
    # which hydra.* keys exist, so composing the hydra.* overrides alone rejects valid ones
    job = _sweep_jobs(overrides)[0] if multirun else overrides
    hcfg = compose(config_name, job, with_hydra=True, primary_dir=primary_dir).hydra
    if multirun:
        _check_launcher(hcfg)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    folder = hcfg.sweep.dir if multirun else hcfg.run.dir
    why = writable_folder_error(folder)
    if why:
        raise ConfigError(f"{key}={folder}: cannot create the run folder ({why}); "
                          "run from a writable folder or set hydra.run.dir=")
    # A second run started into a run's folder would append to its metrics and replace its
    # checkpoints: only resume= may continue a run. A sweep's jobs are its subfolders.
    names = ("checkpoints/last.pt", "metrics.jsonl")
    if new_run and not multirun:
        held = [n for n in names if (Path(folder) / n).exists()]
        if held:
            raise ConfigError(f"{key}={folder}: holds a run already ({held[0]}); continue it with "
                              f"resume={folder}, or choose another folder")
        if (Path(folder) / "multirun.yaml").exists():  # its files would sit beside the sweep's summary
            raise ConfigError(f"{key}={folder}: is a sweep's folder (multirun.yaml); choose another folder "
                              f"(a job of the sweep goes on with resume={Path(folder) / '0'}, say)")
    numbered = OmegaConf.to_container(hcfg.sweep, resolve=False).get("subdir") == "${hydra.job.num}"
    if multirun and numbered:  # jobs numbered from 0 again would land in the earlier sweep's folders
        # Also a job that failed before writing anything else (its error.txt, its .hydra record):
        # the new sweep's summary would count it as one of its own.
        held = sorted(str(p.relative_to(folder)) for n in (*names, "error.txt", ".hydra/overrides.yaml")
                      for p in Path(folder).glob(f"*/{n}") if p.relative_to(folder).parts[0].isdigit())
        if held:
            runs = [h for h in held if h.endswith(names)]
            hint = f" (each job can be continued with resume={Path(folder) / Path(runs[0]).parts[0]})" if runs else ""
            raise ConfigError(f"{key}={folder}: holds a sweep's jobs already ({(runs or held)[0]}); "
                              f"choose another folder{hint}")
    return str(folder)


def _quote(value: str) -> str:
    return value if all(c.isalnum() or c in "/._-:" for c in value) else "'" + value.replace("'", "\\'") + "'"


def config_source(flags: list[str]) -> tuple[str, str | None, list[str]]:
    """(primary config name, the user's folder if that config is theirs, extra overrides) for
    --config-dir/--config-name. --config-dir DIR adds DIR to Hydra's search path: compose with
    the same search path (Hydra gets the flag itself), so its groups are checked and a sweep's
    exit code kept. A primary config of the user's is composed from their folder, with ours on
    the search path."""
    config_dir = _config_dir(flags)
    name, primary_dir = _primary_config(flags, config_dir)
    search = [f"hydra.searchpath=[{_quote('file://' + config_dir)}]"] if config_dir and not primary_dir else []
    return name, primary_dir, search


def _check_info_request(info: list[str], flags: list[str], overrides: list[str], multirun: bool) -> None:
    """--help, --cfg, --info with overrides: Hydra composes them and answers a bad one with a
    traceback (or several lines), and --cfg with -m with a ValueError. Compose them first, as a
    run would (its data and devices are not checked: nothing runs)."""
    shown = [f for f in info if f in ("--cfg", "-c", "--info", "-i")]
    if shown and multirun:  # Hydra refuses these with -m (a ValueError traceback)
        raise ConfigError(f"{shown[0]}: shows one run's config, not a sweep's; drop -m and give one value per key")
    helps = [f for f in info if f in ("--help", "-h", "--hydra-help")]
    if helps and multirun and len(_sweep_jobs(overrides)) > 1:  # Hydra composes one config for the help
        raise ConfigError(f"{helps[0]}: composes one config, not a sweep's; give one value per key")
    if not overrides or any(f in ("--shell-completion", "-sc") for f in info):
        return
    name, primary_dir, search = config_source(flags)
    for job in _sweep_jobs(overrides) if multirun else [overrides]:
        compose(name, job + search, primary_dir=primary_dir)


def prepare_train_argv(argv: list[str], dinfo) -> tuple[list[str], Path | None]:
    """Validate, then rewrite argv for the cases Hydra alone gets wrong:

    - resume=<run>: compose with the run's original overrides first (so `resnet-train
      resume=DIR` continues the same experiment), write into that run folder, and keep its
      .hydra/ record as it was;
    - torchrun: every rank writes into rank 0's run folder; only rank 0 logs to it;
    - -m: the sweep folder is pinned, so this process knows where the sweep's summary.json
      will be once Hydra returns.

    Returns (argv for Hydra, the sweep folder of a multirun or None)."""
    from .resume import kept_line, override_text

    flags, overrides = split_argv(argv)
    multirun = "-m" in flags or "--multirun" in flags
    info = [f.split("=")[0] for f in flags if f.split("=")[0] in _INFO_FLAGS]
    if info:
        _check_info_request(info, flags, overrides, multirun)
        return argv, None
    resume = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("resume=")), None)
    extra: list[str] = []
    own_folder: list[str] = []
    resuming = resume is not None and resume.lower() not in ("null", "none", "")
    if resuming:
        if multirun:
            raise ConfigError("resume: cannot be combined with --multirun; resume one run at a time")
        run, flags, overrides = _resumed_run(resume, flags, overrides)
        own_folder = [f"hydra.run.dir={_quote(str(run.folder))}"]
        extra = own_folder + ["hydra.output_subdir=null"]
    name, primary_dir, search = config_source(flags)
    cfg = validate(name, overrides + search, multirun, primary_dir)
    if resuming:
        kept = run.kept(cfg)
        if kept:
            overrides += [override_text(key, old) for key, old, _ in kept]
            cfg = validate(name, overrides + search, multirun, primary_dir)
        run.check(cfg)
        notes = [kept_line(key, old, new) for key, old, new in kept] + ([run.rewind] if run.rewind else [])
        for line in notes if dinfo.is_main else []:
            print(line, file=sys.stderr)
    # a resumed run goes on in its own folder, which holds it
    folder = check_output_folder(overrides + search + own_folder, multirun, name, primary_dir,
                                 new_run=not resuming)
    sweep_dir = None
    if multirun:
        # Its default name holds ${now:...}: resolved once here, so Hydra writes where we read.
        overrides = [o for o in overrides if override_key(o) != "hydra.sweep.dir"]
        extra.append(f"hydra.sweep.dir={_quote(folder)}")
        sweep_dir = Path(folder).absolute()
    if dinfo.enabled:
        if multirun:
            raise ConfigError("--multirun: not supported under torchrun; launch one torchrun per job")
        from . import distributed

        distributed.init(dinfo, str(cfg.trainer.device))
        if not any(override_key(o) == "hydra.run.dir" for o in extra):  # resume= has set it
            # rank 0's folder as checked above (the user's primary config may name it)
            extra.append(f"hydra.run.dir={_quote(distributed.from_rank0(os.path.abspath(folder)))}")
        if not dinfo.is_main:
            extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    return flags + overrides + extra, sweep_dir


@dataclass
class _Resumed:
    """The run a resume= command line continues: its folder, its checkpoint and what the user
    typed now (the keys that may not silently take the checkpoint's values)."""
    folder: Path
    ckpt: Path
    state: dict[str, Any]
    typed: list[str]
    recorded: bool  # its .hydra/overrides.yaml was found: the config is recomposed as it was
    rewind: str | None  # what resuming an earlier checkpoint (best.pt) will replace

    def kept(self, cfg: DictConfig) -> list[tuple[str, Any, Any]]:
        from .resume import kept_from_checkpoint

        if not self.recorded:  # every difference would look like a changed default: the strict check decides
            return []
        return kept_from_checkpoint(OmegaConf.to_container(cfg, resolve=True), self.state["config"], self.typed)

    def check(self, cfg: DictConfig) -> None:
        from .resume import check_compatible, check_length

        check_compatible(OmegaConf.to_container(cfg, resolve=True), self.state["config"], self.ckpt)
        check_length(cfg.epochs, self.state)


def _resumed_run(resume: str, flags: list[str], overrides: list[str]) -> tuple[_Resumed, list[str], list[str]]:
    """resume=<run>: the run, with the flags and overrides to compose it with: its
    --config-dir/--config-name unless typed now, its original overrides before those typed now
    (so `resnet-train resume=DIR` continues the same experiment)."""
    from .checkpoint import CheckpointError, load_checkpoint, resolve_resume

    folder, ckpt = resolve_resume(resume)
    state = load_checkpoint(ckpt)  # a damaged or foreign file is refused before anything is written
    rewind = None
    last = folder / "checkpoints" / "last.pt"
    if last.is_file() and last.resolve() != ckpt.resolve():  # best.pt, say: the run goes on from there
        try:
            ahead = load_checkpoint(last)
        except CheckpointError:  # a damaged last.pt is nothing to keep
            ahead = state
        at = lambda st: (int(st["epoch"]), int(st.get("step", 0)))  # noqa: E731
        if at(ahead) > at(state):  # a rewind (docs/integrations.md): say what it replaces
            rewind = (f"resume={resume}: rewinds the run from epoch {at(ahead)[0]} step {at(ahead)[1]} (last.pt) to "
                      f"epoch {at(state)[0]} step {at(state)[1]}; last.pt and the later rows of metrics.jsonl will be "
                      f"replaced (copy the run folder first to keep them)")
    record = _hydra_record(folder)
    # A group typed again with the option the run had (scheduler=cosine) changes nothing.
    choices = OmegaConf.select(record, "runtime.choices", default=None) or {}
    typed = [k for k, v in map(split_override, overrides) if not (k in choices and v == choices[k])]
    previous = folder / ".hydra" / "overrides.yaml"
    run = _Resumed(folder, ckpt, state, typed, previous.is_file(), rewind)
    flags = flags + _run_config_flags(folder, record, flags)
    if previous.is_file():
        old = [str(o) for o in OmegaConf.load(previous) if not str(o).startswith(("resume=", "hydra"))]
        # The run's length is the checkpoint's: a run extended by an earlier `resume=... epochs=N`
        # (which does not rewrite overrides.yaml) must not fall back to its first length.
        length = [] if "epochs" in typed else [f"epochs={int(state['config']['epochs'])}"]
        overrides = old + length + overrides
    root = _checkpoint_data_root(state["config"], record)
    if root is not None and not {"data", "data.root"} & set(typed):
        from .resume import override_text

        overrides = overrides + [override_text("data.root", root)]
    return run, flags, overrides


def _checkpoint_data_root(config: dict[str, Any], record: DictConfig) -> str | None:
    """The data folder the run trained on, if it is still there. The recorded overrides say
    `${oc.env:RESNET_CLI_DATA,data}`, which a resume from another shell or folder would
    resolve elsewhere (and download again, or fail offline); the checkpoint holds the value the
    run used, relative to the folder training ran in. As resnet-eval does."""
    root = (config.get("data") or {}).get("root")
    if not isinstance(root, str) or not root:
        return None
    path = Path(root).expanduser()
    if not path.is_absolute():
        cwd = OmegaConf.select(record, "runtime.cwd", default=None)
        path = Path(cwd) / path if cwd else path.resolve()
    return str(path) if path.exists() else None


def _hydra_record(run_dir: Path) -> DictConfig:
    """The `hydra` node of a run's .hydra/hydra.yaml (empty if it has none)."""
    path = run_dir / ".hydra" / "hydra.yaml"
    return OmegaConf.create(OmegaConf.load(path).get("hydra", {}) if path.is_file() else {})


def _flag_value(flags: list[str], names: tuple[str, ...], missing: str = "a value",
                placeholder: str = "VALUE") -> tuple[str, str] | None:
    """(the flag as typed, its value) for a Hydra flag given as `--flag VALUE` or `--flag=VALUE`;
    a flag without a value is refused: "{flag}: give {missing} ({flag} {placeholder})"."""
    for i, f in enumerate(flags):
        name, eq, value = f.partition("=")
        if name in names:
            if not eq:
                value = flags[i + 1] if i + 1 < len(flags) and not flags[i + 1].startswith("-") else ""
            if not value:
                raise ConfigError(f"{name}: give {missing} ({name} {placeholder})")
            return name, value
    return None


def _primary_config(flags: list[str], user_dir: str | None) -> tuple[str, str | None]:
    """--config-name's value (default train) and the user's folder if the config is theirs;
    refused in one line where it names no file, or another command's config (Hydra's own
    message is several lines, or names a schema)."""
    from .paths import config_dir

    flag, name = _flag_value(flags, ("--config-name", "-cn")) or ("--config-name", "train")
    stem = name.removesuffix(".yaml")
    if stem in ("eval", "predict", "export"):
        raise ConfigError(f"{flag} {name}: that is resnet-{stem}'s config; "
                          "resnet-train's is train, or one of yours built on it (--config-dir DIR)")
    file = f"{stem}.yaml"
    if user_dir and (Path(user_dir) / file).is_file():
        return name, user_dir
    if not (config_dir() / file).is_file():
        where = f"{user_dir} or {config_dir()}" if user_dir else str(config_dir())
        raise ConfigError(f"{flag} {name}: no {file} in {where}; "
                          "resnet-train's is train, or one of yours with --config-dir DIR")
    return name, None


def _run_config_flags(run_dir: Path, hydra: DictConfig, typed: list[str]) -> list[str]:
    """The --config-dir and --config-name a run was started with, from Hydra's record of it,
    each unless typed now, so that `resume=DIR` alone continues a run made from configs of
    the user's (and `--config-dir NEW` alone one whose folder moved); [] for a run from
    resnet-cli's own configs."""
    given = {f.split("=")[0] for f in typed}
    folder, name = recorded_config(OmegaConf.to_container(hydra, resolve=False))
    flags = []
    if folder and not given & {"--config-dir", "-cd"}:
        if not Path(folder).is_dir():
            raise ConfigError(f"resume={run_dir}: the run read configs from {folder} (--config-dir), which is not "
                              "a folder any more; restore it, or pass --config-dir with where it is now")
        flags += ["--config-dir", folder]
    if name and not given & {"--config-name", "-cn"}:
        flags += ["--config-name", name]
    return flags


def _config_dir(flags: list[str]) -> str | None:
    """The absolute path given with --config-dir/-cd (as `--config-dir DIR` or `--config-dir=DIR`)."""
    given = _flag_value(flags, ("--config-dir", "-cd"), "the folder of your configs", "DIR")
    if given is None:
        return None
    name, value = given
    if not Path(value).expanduser().is_dir():
        raise ConfigError(f"{name} {value}: not a folder")
    return str(Path(value).expanduser().resolve())


def _to_log_file(message: str) -> None:
    """A failed run's reason in its train.log too (stderr alone is gone once the terminal is),
    as a sweep job's is: to the file only, since the console gets the one error line anyway."""
    import logging

    record = logging.LogRecord("resnet_cli", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def run_hydra_app(config_name: str, task: Callable[[DictConfig, Any], Any]) -> None:
    """The console entry point: validate, then hand over to @hydra.main (launchers,
    sweeps and callbacks all work as Hydra documents them)."""
    import hydra

    from . import distributed
    from .config import register_schemas
    from .paths import config_dir

    dinfo = distributed.from_env()
    with user_errors():
        argv, sweep_dir = prepare_train_argv(sys.argv[1:], dinfo)
    sys.argv = [sys.argv[0]] + argv
    register_schemas()

    def _job(cfg: DictConfig) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # A failing job becomes a failed row of the sweep's summary and the other jobs
            # still run (a SystemExit here would stop the whole sweep): see resnet_cli/sweep/jobs.py.
            from .sweep import sweep_job

            return sweep_job(task, cfg, dinfo)
        with user_errors():
            try:
                return task(cfg, dinfo)
            except Exception as e:
                _to_log_file(f"error: {error_line(e)}")
                raise

    try:
        hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(_job)()
    except BrokenPipeError:  # `resnet-train --help | head`
        quiet_broken_pipe()
    except KeyboardInterrupt:  # Ctrl-C twice: quit at once, as asked, in one line
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print("interrupted at once: checkpoints written before are kept "
              "(resnet-train resume=RUN goes on from the last)", file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.shutdown()
    if sweep_dir is not None:
        from .sweep import failed_jobs_message

        failed = failed_jobs_message(sweep_dir)  # from the summary.json that SweepSummary wrote
        if failed:
            fail(failed, code=EXIT_FAILURE)
