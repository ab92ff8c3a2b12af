"""Experiment trackers (`logger=tensorboard`, `logger=mlflow`, or both): the same numbers as
metrics.jsonl, sent through each tool's own library.

TensorBoard writes into RUN/tb/; MLflow into `logger.mlflow.tracking_uri`. Only rank 0 logs.
RUN/trackers.json keeps what a resumed run needs to go on where it stopped: the MLflow run
id (the same run continues) and TensorBoard's step axis (steps past the checkpoint, logged
before a crash, are purged rather than repeated). Issue 14.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import time
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from .checkpoint import atomic_write_json, writable_folder_error
from .config import ConfigError
from .errors import first_line

if TYPE_CHECKING:
    from .engine import Running

log = logging.getLogger("resnet_cli")

STATE_FILE = "trackers.json"
TB_DIR = "tb"
DEFAULT_EXPERIMENT = "resnet-cli"
# tracker -> (the module it needs, the extra that installs it)
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
# MLflow 3 refuses file stores ("maintenance mode") unless this is set; a file store is what
# the user asked for here, and it needs no database server.
ALLOW_FILE_STORE = "MLFLOW_ALLOW_FILE_STORE"
MLFLOW_BATCH = 100  # params per log_batch call (the REST API's limit)
MLFLOW_VALUE_CHARS = 500  # params longer than this are cut (MLflow 2's limit)


# ---------------------------------------------------------------- checks before anything runs

def enabled(logger_cfg: Mapping[str, Any] | None) -> list[str]:
    return [name for name in NEEDS if logger_cfg and logger_cfg.get(name) is not None]


def local_store(uri: str) -> Path | None:
    """The folder of a file-store URI (a plain path or file:), else None."""
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path))
    if "://" in uri or uri.split(":", 1)[0] in ("databricks", "sqlite", "postgresql", "mysql", "uc"):
        return None
    return Path(uri).expanduser()


def tracking_uri(uri: str) -> str:
    """Absolute, so a resumed run or resnet-eval started elsewhere finds the same store."""
    folder = local_store(uri)
    if folder is not None:
        return folder.absolute().as_uri()
    if uri.startswith("sqlite:///"):  # sqlite:///rel.db is relative to the folder a process starts in
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().absolute())
    return uri


def check(logger_cfg: Mapping[str, Any] | None) -> None:
    """Refuse a tracker that cannot work here, naming the extra that installs it."""
    for name in enabled(logger_cfg):
        module, extra = NEEDS[name]
        if find_spec(module) is None:
            raise ConfigError(f"logger={name}: the {module} package is not installed; "
                              f"pip install 'resnet-cli[{extra}]'")
    tb = (logger_cfg or {}).get("tensorboard")
    if tb is not None:
        for key in ("log_every_n_steps", "flush_secs"):
            if tb[key] < 1:
                raise ConfigError(f"logger.tensorboard.{key}={tb[key]}: must be >= 1")
    ml = (logger_cfg or {}).get("mlflow")
    if ml is not None:
        uri = str(ml["tracking_uri"])
        folder = local_store(uri)
        if uri.startswith("sqlite:///"):
            folder = Path(uri[len("sqlite:///"):]).expanduser().parent
            if find_spec("sqlalchemy") is None:
                raise ConfigError(f"logger.mlflow.tracking_uri={uri}: a database store needs sqlalchemy; "
                                  "pip install mlflow (or use a folder: a file store)")
        why = writable_folder_error(folder) if folder is not None else None
        if why:
            raise ConfigError(f"logger.mlflow.tracking_uri={uri}: cannot write there ({why}); "
                              "choose a writable folder")
        if uri.startswith(("http://", "https://")):
            why = _unreachable(uri)
            if why:
                raise ConfigError(f"logger.mlflow.tracking_uri={uri}: no server answers there ({why}); start it "
                                  "(mlflow server), or log to a folder (a file store)")


def _unreachable(uri: str, timeout: float = 5.0) -> str | None:
    """Why a tracking server cannot be reached, from one TCP connection: MLflow's client would
    retry for minutes (and not stop for Ctrl-C) before the run's first step. Whether it is an
    MLflow server, and its answers, MLflow itself checks when the run starts."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:  # a port that is not a number
        return str(e)
    if not parts.hostname:
        return "no host in the address"
    if os.environ.get("HTTPS_PROXY" if parts.scheme == "https" else "HTTP_PROXY") or \
            os.environ.get("https_proxy" if parts.scheme == "https" else "http_proxy"):
        return None  # the proxy decides; a direct connection says nothing
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"no answer in {timeout:.0f} s" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
    return None


def with_run_names(cfg: dict[str, Any], hydra_cfg: Any) -> dict[str, Any]:
    """Fill MLflow's null experiment and run names from Hydra's runtime: a multirun is one
    experiment (its sweep folder) with one run per job (named by the job's overrides)."""
    ml = (cfg.get("logger") or {}).get("mlflow")
    if ml is None:
        return cfg
    from hydra.types import RunMode

    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if ml.get("experiment_name") is None:
        ml["experiment_name"] = str(hydra_cfg.sweep.dir) if multirun else DEFAULT_EXPERIMENT
    if ml.get("run_name") is None:
        if multirun:
            ml["run_name"] = hydra_cfg.job.override_dirname or f"job {hydra_cfg.job.num}"
        else:
            out, cwd = Path(hydra_cfg.runtime.output_dir), Path(hydra_cfg.runtime.cwd)
            ml["run_name"] = str(out.relative_to(cwd)) if out.is_relative_to(cwd) else out.name
    return cfg


# ---------------------------------------------------------------- what gets logged

def flat_params(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config as `a.b.c -> value`, values as TensorBoard's hparams and MLflow's params
    take them (numbers, strings, booleans; lists as JSON text)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = prefix + str(key)
        if isinstance(value, Mapping):
            out.update(flat_params(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = "null" if value is None else value
    return out


def numeric(row: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def git_commit(folder: Path) -> str | None:
    """The commit of the code that runs, when it is a git checkout (an editable install)."""
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def png_array(data: bytes):
    """A PNG as an H x W x 3 uint8 array (what SummaryWriter.add_image takes with HWC)."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


@contextlib.contextmanager
def file_store_allowed(uri: str) -> Iterator[None]:
    """MLFLOW_ALLOW_FILE_STORE=true while we use a file store (unless the user set it)."""
    if local_store(uri) is None or ALLOW_FILE_STORE in os.environ:
        yield
        return
    os.environ[ALLOW_FILE_STORE] = "true"
    try:
        yield
    finally:
        os.environ.pop(ALLOW_FILE_STORE, None)


def read_state(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- TensorBoard

class TensorBoard:
    def __init__(self, log_dir: Path, flush_secs: int, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: readers drop what an earlier life of this run logged after its
        # checkpoint, so a resumed run never shows a step twice.
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(str(log_dir), purge_step=purge, flush_secs=flush_secs)

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def image(self, tag: str, png: bytes, step: int) -> None:
        self.writer.add_image(tag, png_array(png), step, dataformats="HWC")

    def hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> None:
        """The HParams dashboard's record, with `metrics` as hparams/<name> scalars."""
        from torch.utils.tensorboard.summary import hparams

        # What SummaryWriter.add_hparams does, but into this run rather than a new subfolder.
        for summary in hparams(dict(params), {f"hparams/{k}": v for k, v in metrics.items()}):
            self.writer.file_writer.add_summary(summary, step)
        self.scalars("hparams", metrics, step)

    def close(self) -> None:
        self.writer.close()


# ---------------------------------------------------------------- MLflow

class Mlflow:
    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.uri, self.run_id = uri, run_id
        with file_store_allowed(uri):
            self.client = MlflowClient(uri)

    @classmethod
    def start(cls, ml_cfg: Mapping[str, Any], previous: Mapping[str, Any] | None, params: Mapping[str, Any],
              tags: Mapping[str, str], epoch: int) -> "Mlflow":
        """The run this training continues (same store and a run id in RUN/trackers.json),
        else a new run in the experiment, created if need be."""
        from mlflow.tracking import MlflowClient

        given = str(ml_cfg["tracking_uri"])
        uri = tracking_uri(given)
        if previous and previous.get("tracking_uri") and previous.get("tracking_uri_given") == given:
            # The same (maybe relative) setting as when the run began means the store it meant
            # then, not one beside the folder this resume was started from.
            uri = previous["tracking_uri"]
        with file_store_allowed(uri):
            client = MlflowClient(uri)
            if previous and previous.get("tracking_uri") == uri and _run_exists(client, previous.get("run_id")) \
                    and not _logged_past(client, previous["run_id"], epoch):
                run_id = previous["run_id"]
                client.update_run(run_id, status="RUNNING")
                logged = client.get_run(run_id).data.params
                new = {k: v for k, v in params.items() if k not in logged}
                # `resume` and the logger's own names differ in every resume: not a change the user made
                changed = {f"resumed.{k}": v for k, v in params.items()
                           if k in logged and str(v)[:MLFLOW_VALUE_CHARS] != logged[k]
                           and k != "resume" and not k.startswith("logger.")}
                tracker = cls(uri, run_id)
                tracker._params(new)
                tracker.tags(changed)  # params cannot change in MLflow; tags record what did
                log.info("mlflow: continuing run %s in %s", run_id, uri)
                return tracker
            experiment = str(ml_cfg["experiment_name"] or DEFAULT_EXPERIMENT)
            tags = dict(tags)
            if previous and _run_exists(client, previous.get("run_id")):
                # Resumed from an older checkpoint than the run had reached: MLflow's metric
                # history cannot be rewritten, so this branch is a new run nested under it, in
                # its experiment (a sweep job's is the sweep's, which a lone resume cannot name).
                tags["mlflow.parentRunId"] = previous["run_id"]
                experiment_id = client.get_run(previous["run_id"]).info.experiment_id
                experiment = client.get_experiment(experiment_id).name
                log.info("mlflow: resumed from epoch %d, before the end of run %s: logging to a new run under it",
                         epoch, previous["run_id"])
            else:
                experiment_id = _experiment(client, experiment, uri)
            run = client.create_run(experiment_id, run_name=ml_cfg.get("run_name"), tags=tags)
        tracker = cls(uri, run.info.run_id)
        tracker._params(params)
        log.info("mlflow: run %s in experiment %s (%s)", run.info.run_id, experiment, uri)
        return tracker

    def _params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MLFLOW_VALUE_CHARS]) for k, v in params.items()]
        with file_store_allowed(self.uri):
            for i in range(0, len(items), MLFLOW_BATCH):
                self.client.log_batch(self.run_id, params=items[i:i + MLFLOW_BATCH])

    def tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        if tags:
            with file_store_allowed(self.uri):
                self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with file_store_allowed(self.uri):
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def artifacts(self, paths: list[Path], folder: str | None = None) -> None:
        with file_store_allowed(self.uri):
            for p in paths:
                if p.is_file():
                    self.client.log_artifact(self.run_id, str(p), folder)

    def end(self, status: str) -> None:
        with file_store_allowed(self.uri):
            self.client.set_terminated(self.run_id, status)


def _run_exists(client, run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # MlflowException (deleted or unknown), or a store that lost it
        return False


def _logged_past(client, run_id: str, epoch: int) -> bool:
    return any(m.step > epoch for m in client.get_metric_history(run_id, "test_acc"))


def _experiment(client, name: str, uri: str) -> str:
    """The experiment's id, creating it once even when the jobs of a parallel sweep ask at
    the same moment (a file store does not check names atomically)."""
    with _store_lock(uri):
        found = client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage != "active":
                client.restore_experiment(found.experiment_id)
            return found.experiment_id
        return client.create_experiment(name)


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    folder = local_store(uri)
    try:
        import fcntl
    except ImportError:  # not POSIX: no parallel launcher to race with here
        fcntl = None
    if folder is None or fcntl is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".resnet-cli.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- what resnet-train holds

class Trackers:
    """The run's trackers. `with Trackers(...)` checks them; `start()` opens them once the
    run knows its step count; leaving the block closes them with the run's outcome."""

    def __init__(self, logger_cfg: Mapping[str, Any] | None, run_dir: Path, enabled: bool = True):
        self.cfg = dict(logger_cfg or {}) if enabled else {}
        self.run_dir = run_dir
        self.tb: TensorBoard | None = None
        self.mlflow: Mlflow | None = None
        self.steps_per_epoch = 1
        self._last_step, self._epoch, self._epochs_logged = 0, 1, 0
        self._base = (0.0, 0, 0, 0, 0.0)  # running sums at the last logged step

    def __enter__(self) -> "Trackers":
        check(self.cfg)
        return self

    def start(self, cfg: Mapping[str, Any], steps_per_epoch: int, global_step: int, running: "Running | None",
              device: str) -> None:
        if not enabled(self.cfg):
            return
        self.steps_per_epoch, self._last_step = steps_per_epoch, global_step
        self._base = _sums(running) if running is not None else self._base
        self._epoch = global_step // steps_per_epoch + 1  # the epoch in progress
        previous = read_state(self.run_dir) if cfg.get("resume") else {}
        state: dict[str, Any] = {}
        if self.cfg.get("tensorboard") is not None:
            tb = self.cfg["tensorboard"]
            with _cannot_log("tensorboard", self.run_dir / TB_DIR):
                self.tb = TensorBoard(self.run_dir / TB_DIR, tb["flush_secs"],
                                      global_step if cfg.get("resume") else None)
            state["tensorboard"] = {"log_dir": TB_DIR, "steps_per_epoch": steps_per_epoch}
        if self.cfg.get("mlflow") is not None:
            tags = {"model": cfg["model"]["name"], "dataset": cfg["data"]["name"], "device": device,
                    "run_dir": str(self.run_dir.resolve())}
            commit = git_commit(Path(__file__).resolve().parent)
            if commit:
                tags.update({"git_commit": commit, "mlflow.source.git.commit": commit})
            with _cannot_log("mlflow", self.cfg["mlflow"]["tracking_uri"]):
                self.mlflow = Mlflow.start(self.cfg["mlflow"], previous.get("mlflow"), flat_params(cfg), tags,
                                           global_step // steps_per_epoch)
            state["mlflow"] = {"tracking_uri": self.mlflow.uri, "run_id": self.mlflow.run_id,
                               "tracking_uri_given": str(self.cfg["mlflow"]["tracking_uri"])}
        atomic_write_json(self.run_dir / STATE_FILE, state)

    def log_step(self, epoch: int, running: "Running", lr: float) -> None:
        """Every logger.tensorboard.log_every_n_steps: the averages over the steps since the
        last point (this rank's batches; the epoch rows are over all ranks)."""
        if self.tb is None:
            return
        step = (epoch - 1) * self.steps_per_epoch + running.steps
        every = self.cfg["tensorboard"]["log_every_n_steps"]
        sums = _sums(running)
        if epoch != self._epoch:  # a new epoch: its sums start from zero
            self._epoch, self._base = epoch, (0.0, 0, 0, 0, 0.0)
        if step // every == self._last_step // every:
            return
        loss, correct, counted, steps, seconds = (a - b for a, b in zip(sums, self._base))
        self._base, self._last_step = sums, step
        if counted:
            self.tb.scalars("step", {"train_loss": loss / counted, "train_acc": correct / counted, "lr": lr}, step)

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        self._epochs_logged += 1
        values = numeric(row)
        if self.tb is not None:
            self.tb.scalars("epoch", values, row["epoch"] * self.steps_per_epoch)
        if self.mlflow is not None:
            self.mlflow.metrics({k: v for k, v in values.items() if k != "epoch"}, row["epoch"])

    def log_results(self, cfg: Mapping[str, Any], results: Mapping[str, Any]) -> None:
        """At the end: hparams with the final metrics, curves.png, and the MLflow artifacts.
        Not again for a resume that had nothing left to train: its earlier life logged them.
        A failure here (a store that went away, an upload refused) is a warning: the run has
        finished and written results.json, so its outcome must not turn into a failure."""
        if not self._epochs_logged:
            return
        try:
            self._log_results(cfg, results)
        except Exception as e:  # the trackers' own error types; all mean "could not log there"
            first = first_line(e)
            log.warning("could not log the final results to the trackers (%s: %s); the run's own files are "
                        "complete in %s", type(e).__name__, first, self.run_dir)

    def _log_results(self, cfg: Mapping[str, Any], results: Mapping[str, Any]) -> None:
        final = {"best_test_acc": results.get("best_test_acc"), "final_test_acc": results["final"].get("test_acc"),
                 "final_train_loss": results["final"].get("train_loss")}
        final = {k: float(v) for k, v in final.items() if v is not None}
        curves = self.run_dir / "curves.png"
        step = int(results["epochs"]) * self.steps_per_epoch
        if self.tb is not None:
            self.tb.hparams(flat_params(cfg), final, step)
            if curves.is_file():
                self.tb.image("curves", curves.read_bytes(), step)
        if self.mlflow is not None:
            self.mlflow.metrics(final, int(results["epochs"]))
            files = [self.run_dir / "results.json", curves]
            if self.cfg["mlflow"].get("log_checkpoint"):
                files.append(self.run_dir / "checkpoints" / "best.pt")
            self.mlflow.artifacts(files)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            status = "FINISHED"
            if exc_type is not None:
                stopped = issubclass(exc_type, KeyboardInterrupt) or (
                    issubclass(exc_type, SystemExit) and exc is not None and exc.code not in (0, None))
                status = "KILLED" if stopped else "FAILED"
            try:
                self.mlflow.end(status)
            except Exception as e:  # never hide the run's own outcome behind a tracker's
                log.warning("mlflow: could not mark run %s %s: %s", self.mlflow.run_id, status, e)
        return False


@contextlib.contextmanager
def _cannot_log(name: str, where: Any) -> Iterator[None]:
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:  # the library's own error types; all mean "cannot log there"
        first = first_line(e)
        raise ConfigError(f"logger={name}: cannot log to {where} ({type(e).__name__}: {first})") from None


def _sums(running: "Running") -> tuple[float, int, int, int, float]:
    return running.loss_sum, running.correct, running.counted, running.steps, running.train_seconds


# ---------------------------------------------------------------- after resnet-eval

def log_evaluation(run_dir: Path, result: Mapping[str, Any], report: list[Path], epoch: int,
                   step: int = 0) -> list[str]:
    """Add an evaluation to the trackers its training run used (RUN/trackers.json): the
    scores, and the confusion matrix as an image (TensorBoard) or with eval.json as artifacts
    (MLflow). `report` is [eval.json, confusion.png]. Returns what was done, for the user."""
    state = read_state(run_dir)
    done: list[str] = []
    scores = {k: float(result[k]) for k in ("top1", "top5", "loss") if result.get(k) is not None}
    tb = state.get("tensorboard")
    if tb and find_spec("tensorboard") is not None:
        at = epoch * int(tb["steps_per_epoch"]) + step  # the checkpoint's place on training's step axis
        writer = TensorBoard(run_dir / tb["log_dir"], flush_secs=30, resume_step=None)
        try:
            writer.image("eval/confusion_matrix", report[1].read_bytes(), at)
            writer.scalars("eval", scores, at)
        finally:
            writer.close()
        done.append(f"TensorBoard ({run_dir / tb['log_dir']}, step {at})")
    elif tb:
        done.append("not TensorBoard: pip install 'resnet-cli[tensorboard]'")
    ml = state.get("mlflow")
    if ml and find_spec("mlflow") is not None:
        tracker = Mlflow(ml["tracking_uri"], ml["run_id"])
        tracker.metrics({f"eval_{k}": v for k, v in scores.items()}, epoch)
        tracker.artifacts(report, folder="eval")
        done.append(f"MLflow run {ml['run_id']}")
    elif ml:
        done.append("not MLflow: pip install 'resnet-cli[mlflow]'")
    return done
