"""`resnet-train`: build the network from config, train it, write a self-describing run folder.

`main()` is the thin Hydra entry point; `train(cfg, run_dir)` does the work with a plain dict.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shlex
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from hydra.utils import instantiate
from torch import nn

from . import cuda_graphs, distributed, finetune, resume
from .checkpoint import (CheckpointWriter, atomic_write_json, load_checkpoint, remove_stale_temp_files,
                         resolve_resume)
from .config import ConfigError, check_values, tta_hflip_on
from .data import Data, DataError, load_data, resolve_pipeline
from .data.prefetch import prefetched
from .distributed import DistInfo
from .ema import build_ema
from .engine import (HOST_READ_EVERY, NonFiniteLoss, Running, StepContext, configure_cuda, evaluate,
                     global_epoch_stats, global_running, rank_share, resolve_device, resolve_precision,
                     train_one_epoch)
from .errors import ModelConfigError
from .models import build_model, stage_sizes
from .models.blocks import PREACT_BLOCKS
from .models.resnet import ModelSpec
from .reporting import MetricsFile, epoch_line, epoch_progress, plot_curves, progress_mode
from .trackers import Trackers, with_run_names

log = logging.getLogger("resnet_cli")

class StopSignals:
    """First Ctrl-C / SIGTERM: ask the loop to stop at the next step boundary and save.
    Second Ctrl-C: the default behaviour (KeyboardInterrupt at once); every file is written
    atomically, so that cannot corrupt anything."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: stopping after this step and saving (Ctrl-C again to quit at once)",
                    signal.Signals(signum).name)

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """All global RNG states as tensors and plain data (weights_only-loadable): Python's,
    numpy's, torch's CPU one and, for a CUDA run, its own GPU's (not every visible GPU's: a
    resume may see fewer GPUs, or another one)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *[float(v) if isinstance(v, float) else int(v)
                                                                             for v in np_state[2:]]]}
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy(), *rest))
    if device is not None and device.type == "cuda":
        saved = state.get("cuda_device")
        older = state.get("cuda") or []  # checkpoints before this one: a state per visible GPU
        if saved is None and (device.index or 0) < len(older):
            saved = older[device.index or 0]
        if saved is not None:
            torch.cuda.set_rng_state(saved.cpu(), device)


def param_groups(model: nn.Module, weight_decay: float, decay_norm_bias: bool) -> list[dict[str, Any]]:
    """No weight decay on norm weights and biases unless asked: decaying them only fights
    BatchNorm's scale invariance (Goyal et al. 2017; He et al. 2019, "Bag of Tricks")."""
    if decay_norm_bias or not weight_decay:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, opt_cfg: dict[str, Any], backbone_lr_scale: float | None = None
                    ) -> torch.optim.Optimizer:
    opt_cfg = dict(opt_cfg)
    decay_norm_bias = bool(opt_cfg.pop("decay_norm_bias", False))
    groups = param_groups(model, float(opt_cfg.get("weight_decay", 0.0)), decay_norm_bias)
    if backbone_lr_scale is not None:
        groups = finetune.lr_groups(groups, model, float(opt_cfg["lr"]) * backbone_lr_scale)
    return instantiate(opt_cfg)(groups)


def build_scheduler(optimizer: torch.optim.Optimizer, sched_cfg: dict[str, Any], steps_per_epoch: int,
                    epochs: int):
    if not sched_cfg or sched_cfg.get("_target_") is None:
        return None
    factory = instantiate(sched_cfg)
    return factory(optimizer, total_steps=steps_per_epoch * epochs, steps_per_epoch=steps_per_epoch)


def rebuild_schedule(optimizer: torch.optim.Optimizer, sched_cfg: dict[str, Any], base_lrs: list[float],
                     steps_done: int, steps_per_epoch: int, epochs: int):
    """The schedule of a run whose length changed on resume: the new schedule from its start,
    advanced to where the run is. torch's warmup, step and cosine schedulers compute each lr
    from the current one, so the optimizer must first get its base lrs back: replaying them on
    top of the lr that the loaded optimizer state carries compounds the old schedule into the
    new one (issue 11: 0.01 instead of 0.1 with scheduler=step)."""
    for group, lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = lr
        group.pop("initial_lr", None)
    sched = build_scheduler(optimizer, sched_cfg, steps_per_epoch, epochs)
    if sched is not None:
        with warnings.catch_warnings():  # "step() before optimizer.step()": intended here
            warnings.simplefilter("ignore")
            for _ in range(steps_done):
                sched.step()
    return sched


def resume_command(run_dir: Path) -> str:
    return f"resnet-train resume={shlex.quote(str(run_dir))}"


def seconds_since_process_start() -> float:
    """How long this process has existed (Linux: from /proc), so that the time breakdown also
    counts the imports before `train` was called; 0 where that cannot be known."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time since boot
        return max(0.0, float(Path("/proc/uptime").read_text().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return 0.0


TIME_PARTS = ("startup", "data", "train", "eval", "checkpoint", "plot", "other")
_process_start_counted: list[bool] = [False]


def run_origin() -> float:
    """Where a run's clock starts (perf_counter units). The first run of a process counts from
    the process's start, since its imports are part of what the user waits for; later runs in
    the same process (the jobs of a sweep) from their own start, or each would be charged for
    the jobs before it."""
    now = time.perf_counter()
    if _process_start_counted[0]:
        return now
    _process_start_counted[0] = True
    return now - seconds_since_process_start()


@dataclass
class Clock:
    """Where a run's time goes (results.json `time_s`, issue 12): startup until the first step
    (imports, config, model, device; data loading not included), data loading and decoding,
    training steps, evaluation, the training thread's share of checkpoint writing, plotting,
    and the rest. The parts add up to the process's wall time."""

    origin: float = field(default_factory=run_origin)
    parts: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in TIME_PARTS})
    first_step_at: float | None = None

    def now(self) -> float:
        return time.perf_counter() - self.origin

    def add(self, part: str, seconds: float) -> None:
        self.parts[part] += seconds

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.parts[part] += time.perf_counter() - t0

    def training_starts(self) -> None:
        if self.first_step_at is None:
            self.first_step_at = self.now()
            self.parts["startup"] = self.first_step_at - self.parts["data"]

    def breakdown(self) -> dict[str, float]:
        total = self.now()
        parts = dict(self.parts)
        parts["other"] = max(0.0, total - sum(v for k, v in parts.items() if k != "other"))
        return {"total": round(total, 3), **{k: round(v, 3) for k, v in parts.items()}}


def time_line(t: dict[str, float]) -> str:
    return f"time {t['total']:.1f}s = " + " + ".join(f"{k} {t[k]:.1f}" for k in TIME_PARTS)


@dataclass
class Trainer:
    """Everything a run carries between epochs."""

    model: nn.Module
    core: nn.Module  # the un-wrapped model (what checkpoints hold)
    ctx: StepContext
    data: Data
    cfg: dict[str, Any]
    run_dir: Path
    dist: DistInfo
    writer: CheckpointWriter = field(default_factory=CheckpointWriter)
    epoch: int = 0  # completed epochs
    step: int = 0  # steps done in epoch `epoch + 1`
    running: Running | None = None
    best_acc: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics.jsonl rows so far
    clock: Clock = field(default_factory=Clock)
    elapsed_before: float = 0.0  # wall seconds of the run's earlier processes (a resumed run)
    eta_hint_given: bool = False

    def elapsed(self) -> float:
        """Wall seconds of the whole run so far, across resumes."""
        return self.elapsed_before + self.clock.now()

    def state(self, running: Running | None = None) -> dict[str, Any]:
        sched = self.ctx.scheduler
        return {
            "model": self.core.state_dict(),
            "optimizer": self.ctx.optimizer.state_dict(),
            "lr_scheduler": sched.state_dict() if sched is not None else None,
            "scaler": self.ctx.scaler.state_dict() if self.ctx.scaler is not None else None,
            "epoch": self.epoch, "step": self.step,
            "running": running.as_dict() if running else None,
            "best_acc": self.best_acc, "best_epoch": self.best_epoch,
            "ema": self.ctx.ema.state_dict() if self.ctx.ema is not None else None,
            "elapsed_s": self.elapsed(),
            # The finished epochs' rows: a resume rewrites metrics.jsonl from them, so the table
            # matches the checkpoint whatever moment a crash hit.
            "history": list(self.history),
            "config": self.cfg, "rng": rng_state(self.ctx.device),
            "preprocess": self.data.prep.as_dict(), "class_names": self.data.class_names,
            "num_classes": self.data.num_classes,
        }

    def save(self, *names: str) -> None:
        """Snapshot now, write in the background (one serialization for several names)."""
        running = self.running
        if running is not None and self.dist.enabled:  # mid-epoch: every rank's sums, not rank 0's
            running = global_running(running, self.ctx.device)
        if not self.dist.is_main:
            return
        state = self.state(running)
        # Never replace a good checkpoint with diverged weights (the loss shows a blow-up
        # one step after the update that caused it).
        floats = {k: v for k, v in state["model"].items() if v.is_floating_point()}
        if not bool(torch.stack([torch.isfinite(v).all() for v in floats.values()]).all()):
            key = next(k for k, v in floats.items() if not torch.isfinite(v).all())
            raise NonFiniteLoss(self.epoch + (1 if self.step else 0), self.step, float("nan"), what=f"weight {key}")
        self.writer.submit([self.run_dir / "checkpoints" / n for n in names], state)


def train(cfg: dict[str, Any], run_dir: Path, dinfo: DistInfo = DistInfo()) -> dict[str, Any]:
    """Train as `cfg` says, writing into `run_dir`. Returns the results dict."""
    # Signals are caught from the start: one that arrives while data loads stops the run
    # at its first step boundary, like one during training.
    with StopSignals() as stop, Trackers(cfg.get("logger"), run_dir, dinfo.is_main) as trackers:
        return _train(cfg, run_dir, dinfo, stop, trackers)


def _train(cfg: dict[str, Any], run_dir: Path, dinfo: DistInfo, stop: StopSignals,
           trackers: Trackers) -> dict[str, Any]:
    clock = Clock()
    check_values(cfg)
    root = cfg["data"].get("root")
    if isinstance(root, str) and root and not Path(root).expanduser().is_absolute():
        # the folder actually read (relative to this process's folder, which hydra.job.chdir may
        # have changed): checkpoints record it, so resume and resnet-eval find it from anywhere
        cfg["data"]["root"] = str(Path(root).expanduser().absolute())
    device = resolve_device(cfg["trainer"]["device"], dinfo.local_rank if dinfo.enabled else None)
    precision = resolve_precision(cfg["trainer"]["precision"], device)
    tcfg = cfg["trainer"]
    graphs, graphs_note = cuda_graphs.decide(tcfg["cuda_graphs"], device, dinfo.enabled, bool(tcfg["compile"]),
                                             loader=resolve_pipeline(cfg["data"]) == "loader")
    resume_ckpt = None
    if cfg.get("resume"):
        _, ckpt_path = resolve_resume(cfg["resume"])
        # to host memory: load_state_dict copies to the parameters' devices, and an optimizer
        # state loaded onto the GPU would keep Adam's step counters there (a host read per step)
        resume_ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        resume.check_compatible(cfg, resume_ckpt["config"], ckpt_path)
        resume.check_length(cfg["epochs"], resume_ckpt)

    seed_everything(cfg["seed"])
    configure_cuda(device, bool(tcfg["cudnn_benchmark"]))
    with clock.timed("data"):
        data = load_data(cfg["data"], cfg["batch_size"], tcfg["eval_batch_size"], cfg["seed"], device,
                         dinfo.rank, dinfo.world)
    if len(data.train) == 0:  # here, not in load_data: evaluation loads no training batches on purpose
        where = f" for {dinfo.world} processes" if dinfo.world > 1 else ""
        raise DataError(f"data: {data.num_train} training image(s){where} make no batch to train on (BatchNorm needs "
                        "2 images or more a batch); use more (data.limit_train, data.val_size, data.train_size)")
    spec = ModelSpec.from_mapping(cfg["model"])
    in_ch, ncls = spec.in_channels or data.prep.channels, spec.num_classes or data.num_classes
    if in_ch != data.prep.channels:
        raise ModelConfigError(f"model.in_channels={in_ch}: the data has {data.prep.channels} channel(s) "
                               f"({cfg['data']['name']}); set {data.prep.channels} or null (from the data)")
    if ncls < data.num_classes:
        raise ModelConfigError(f"model.num_classes={ncls}: the data has {data.num_classes} classes "
                               f"({cfg['data']['name']}); set at least {data.num_classes} or null (from the data)")
    shapes = stage_sizes(spec, in_ch, data.prep.size)  # fails early, naming the stage, if the input is too small
    synced = dinfo.world > 1 and tcfg["sync_batchnorm"] and device.type == "cuda"  # statistics over all ranks' images
    if not synced:
        _check_single_image_batches(shapes, cfg["batch_size"], cfg["model"].get("freeze"), spec, data.prep.size)
    core = build_model(spec, in_channels=in_ch, num_classes=ncls)
    finetune.init_model(core, cfg["model"], resuming=resume_ckpt is not None)  # model.init_from, model.freeze
    core = core.to(device)
    if tcfg["channels_last"]:
        core = core.to(memory_format=torch.channels_last)
    model: nn.Module = core
    if dinfo.enabled:
        if tcfg["sync_batchnorm"]:
            if device.type != "cuda":
                raise ConfigError(f"trainer.sync_batchnorm=true: PyTorch's SyncBatchNorm needs CUDA devices, "
                                  f"this run is on {device.type}; set it to false")
            model = core = finetune.convert_sync_batchnorm(core)
        model = nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None)
    elif tcfg["sync_batchnorm"]:
        # One process has no other batches to sync with: BatchNorm is already exact; say so rather than
        # let the user believe the flag did something.
        log.warning("trainer.sync_batchnorm=true has no effect in a single process (it applies under torchrun)")
    if tcfg["compile"]:
        model = torch.compile(model)

    steps_per_epoch = len(data.train)
    optimizer = build_optimizer(core, cfg["optimizer"], spec.backbone_lr_scale)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    scheduler = build_scheduler(optimizer, cfg["scheduler"], steps_per_epoch, cfg["epochs"])
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=float(tcfg["label_smoothing"]))
    report_at, report_global = report_steps(device, tcfg["checkpoint_every_steps"], cfg.get("logger"))
    ctx = StepContext(optimizer, scheduler, loss_fn, device, precision, scaler, tcfg["grad_clip"],
                      tcfg["skip_nonfinite"], tcfg["channels_last"], report_at=report_at, report_global=report_global,
                      ema=build_ema(core, tcfg["ema_decay"]), ema_source=core,
                      forward=cuda_graphs.GraphedForward(core, cfg["batch_size"]) if graphs else None)
    tr = Trainer(model, core, ctx, data, cfg, run_dir, dinfo, clock=clock)
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    if resume_ckpt is not None:
        _restore(tr, resume_ckpt, metrics if dinfo.is_main else None, steps_per_epoch, base_lrs)

    n_params = sum(p.numel() for p in core.parameters())
    if dinfo.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        log.info("device %s (%s%s), precision %s, channels_last %s", device, _device_name(device),
                 f", {dinfo.world} processes" if dinfo.enabled else "", precision, tcfg["channels_last"])
        log.info("model %s: %s parameters, input %dx%dx%d, %d classes", spec.name, f"{n_params:,}", in_ch,
                 data.prep.size, data.prep.size, ncls)
        per = f" per process ({cfg['batch_size'] * dinfo.world} in all)" if dinfo.enabled else ""
        log.info("data %s: %s train / %s test images, %s pipeline, batch %d%s, %d steps/epoch",
                 cfg["data"]["name"], f"{data.num_train:,}", f"{data.num_test:,}", data.pipeline,
                 cfg["batch_size"], per, steps_per_epoch)
        if graphs_note:
            log.info("cuda graphs %s", graphs_note)
        if tta_hflip_on(tcfg, cfg["data"]):
            log.info("evaluation averages each image with its mirror image (trainer.tta_hflip=%s)",
                     str(tcfg["tta_hflip"]).lower())
        log.info("run dir %s", run_dir)
        if resume_ckpt is not None:
            # as the stop message said it: the epoch it is in (1-based) and the steps done in it
            log.info("resumed at epoch %d, step %d/%d", tr.epoch + 1, tr.step, steps_per_epoch)
    trackers.start(cfg, steps_per_epoch, tr.epoch * steps_per_epoch + tr.step, tr.running, str(device))

    start = (tr.epoch, tr.step)
    try:
        _loop(tr, clock, stop, precision, steps_per_epoch, metrics, spec.name, trackers)
    finally:
        # Whatever ends the loop, the checkpoint being written is finished first: a clean exit
        # never leaves a temp file, and a write error is not lost.
        with clock.timed("checkpoint"):
            if sys.exc_info()[0] is None:
                tr.writer.wait()
            else:
                with contextlib.suppress(Exception):
                    tr.writer.wait()
        clock.add("checkpoint", tr.writer.busy_seconds)

    if dinfo.enabled:
        if not distributed.params_identical(core):
            raise RuntimeError("DDP ranks ended with different parameters; please report this")
        if dinfo.is_main:
            log.info("parameters identical on all %d ranks", dinfo.world)
    kept = _finished_results(run_dir, tr) if resume_ckpt is not None and (tr.epoch, tr.step) == start else None
    if kept is not None:  # a finished run resumed with its own length: nothing ran, nothing to rewrite
        if dinfo.is_main:
            log.info("nothing left to train: the run has done its %d epochs; results.json is kept as it was", tr.epoch)
        return kept
    if dinfo.is_main and tr.history:
        with clock.timed("plot"):
            plot_curves(tr.history, run_dir / "curves.png", f"{spec.name} on {cfg['data']['name']}")
    # the run's clock, as metrics' elapsed_s and time_to_acc: across resumes, from the process's start
    results = _results(tr.history, tr, n_params, device, precision, tr.elapsed())
    results["time_s"] = clock.breakdown()
    if dinfo.is_main:
        atomic_write_json(run_dir / "results.json", results)
        trackers.log_results(cfg, results)
        nan = float("nan")
        if results["selection"] == "val_acc":
            log.info("best val_acc %.4f at epoch %d (test_acc %.4f); final test_acc %.4f; wrote %s",
                     tr.best_acc, tr.best_epoch, results["best_test_acc"] or nan, results["final_test_acc"] or nan,
                     run_dir)
        else:
            log.info("best test_acc %.4f at epoch %d; final %.4f; wrote %s", tr.best_acc, tr.best_epoch,
                     results["final_test_acc"] if tr.history else nan, run_dir)
        log.info(time_line(results["time_s"]))
    return results


def _check_single_image_batches(shapes: list, batch_size: int, frozen: list | None, spec: ModelSpec,
                                size: int) -> None:
    """BatchNorm in training needs more than one value per channel: a batch of one image is
    fine while every trained stage's map is larger than 1x1, and a traceback from the first
    step otherwise. batch_size is per process, under torchrun too. Frozen stages keep their
    BatchNorm in eval mode, which needs nothing; a pre-activation net's final BatchNorm (after
    the last stage) belongs to no freezable part and always trains."""
    if batch_size != 1:
        return
    flat = [f"{name} output" for name, (_, _, h, w) in shapes if h * w == 1 and name not in (frozen or [])]
    if spec.block in PREACT_BLOCKS and shapes[-1][1][2:] == (1, 1):
        flat.append("final BatchNorm's input")
    if flat:
        raise ConfigError(f"batch_size=1: at input size {size} {spec.name}'s {flat[0]} is 1x1, and BatchNorm "
                          "needs more than one value per channel to train; use batch_size=2 or more, or a larger "
                          "input (data.resize)")


def _loop(tr: Trainer, clock: Clock, stop: StopSignals, precision: str, steps_per_epoch: int,
          metrics: MetricsFile, model_name: str, trackers: Trackers) -> None:
    cfg, tcfg, dinfo, device = tr.cfg, tr.cfg["trainer"], tr.dist, tr.ctx.device
    mode = progress_mode(tcfg["progress"]) if dinfo.is_main else "none"
    every = tcfg["checkpoint_every_steps"]
    eval_views = eval_views_per_epoch(tr)
    while tr.epoch < cfg["epochs"]:
        epoch = tr.epoch + 1
        tr.running = tr.running or Running()
        tr.ctx.step_offset = (epoch - 1) * steps_per_epoch  # tracker points count the run's steps
        t_epoch = time.perf_counter() - tr.running.train_seconds
        with epoch_progress(mode, epoch, cfg["epochs"], steps_per_epoch, tr.step) as update:
            def on_step(run: Running) -> None:
                tr.step = run.steps
                trackers.log_step(epoch, run, tr.ctx.optimizer.param_groups[0]["lr"])
                if run.steps and run.train_seconds:
                    update(run.steps, run.loss_sum / max(run.counted, 1), run.correct / max(run.counted, 1),
                           run.seen / run.train_seconds)
                if every and run.steps % every == 0 and run.steps < steps_per_epoch:
                    tr.save("last.pt")
                if device.type == "cpu" and dinfo.is_main:
                    _eta_hint(tr, run, epoch, steps_per_epoch, eval_views)

            # Under DDP every rank must stop at the same step; on CUDA they agree every
            # HOST_READ_EVERY steps (as the engine checks losses), not every step, which would
            # stall the GPU's queue.
            should_stop = distributed.StopPoll(
                lambda: stop.signum is not None,
                (lambda flag: distributed.any_rank(flag, device)) if dinfo.enabled else None,
                every=HOST_READ_EVERY if device.type == "cuda" else 1)

            clock.training_starts()
            busy = tr.writer.busy_seconds
            t_train = time.perf_counter()
            batches = prefetched(tr.data.train.batches(epoch, tr.step), device, bool(tcfg["prefetch"]))
            run = train_one_epoch(tr.model, batches, tr.ctx, epoch, tr.running, on_step, should_stop)
            # mid-epoch checkpoints are counted as checkpoint time, not as training
            clock.add("train", time.perf_counter() - t_train - (tr.writer.busy_seconds - busy))
        tr.running, tr.step = run, run.steps
        if run.steps < steps_per_epoch:  # stopped by a signal mid-epoch
            tr.save("last.pt")
            if dinfo.is_main:
                log.warning("stopped at epoch %d, step %d/%d; saved %s", epoch, run.steps, steps_per_epoch,
                            tr.run_dir / "checkpoints" / "last.pt")
            _exit_resumable(tr, clock, model_name, stop.exit_code)
        row = _finish_epoch(tr, clock, epoch, t_epoch, precision, metrics)
        if dinfo.is_main:
            log.info(epoch_line(row, cfg["epochs"]))
            trackers.log_epoch(row)
        if should_stop(force=True) and tr.epoch < cfg["epochs"]:  # last.pt of this epoch is saved
            _exit_resumable(tr, clock, model_name, stop.exit_code)


def _exit_resumable(tr: Trainer, clock: Clock, model_name: str, code: int) -> None:
    tr.writer.wait()
    if tr.dist.is_main:
        if tr.history:  # the curves so far: drawn on an interrupt, not after every epoch
            plot_curves(tr.history, tr.run_dir / "curves.png", f"{model_name} on {tr.cfg['data']['name']}")
        print(f"resume with: {resume_command(tr.run_dir)}", file=sys.stderr)
    distributed.shutdown()
    sys.exit(code)


ACC_MARKS = (0.90, 0.92, 0.93, 0.94, 0.95)  # time-to-accuracy thresholds (issue 13)
CPU_ETA_HINT_S = 30 * 60


def report_steps(device: torch.device, checkpoint_every: int | None,
                 logger: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """StepContext's (report_at, report_global): the steps after which train_one_epoch calls
    on_step (progress, checkpoints, tracker points). CUDA reads the step's numbers on the host
    every HOST_READ_EVERY steps, when the engine checks its batched losses, not every step (each
    read waits for the GPU); mid-epoch checkpoints (counted in the epoch) and TensorBoard points
    (counted in the run) add their own steps, hit exactly."""
    if device.type != "cuda":
        return (1,), ()
    tb = (logger or {}).get("tensorboard") or {}
    return ((HOST_READ_EVERY, *([int(checkpoint_every)] if checkpoint_every else [])),
            tuple([int(tb["log_every_n_steps"])] if tb.get("log_every_n_steps") else []))


# A forward pass of one image costs about a third of a training step's per image (backward is
# about twice the forward): measured 0.34 on the default recipe on a 2-core CPU (2.2 ms per view
# in evaluation against 6.4 ms per training image).
EVAL_COST_OF_TRAIN_IMAGE = 1 / 3


def eval_views_per_epoch(tr: Trainer) -> int:
    """Images this process scores after each epoch: its share of the test and validation split
    (sharded over ranks), twice with flip TTA, and again for the EMA of the weights."""
    views = 2 if tta_hflip_on(tr.cfg["trainer"], tr.cfg["data"]) else 1
    models = 2 if tr.ctx.ema is not None else 1
    return (tr.data.num_test + tr.data.num_val) * views * models // tr.dist.world


def _eta_hint(tr: Trainer, run: Running, epoch: int, steps_per_epoch: int, eval_views: int) -> None:
    """One line, once, when a CPU run's first steps project more than 30 minutes: name the ETA
    and the recipe made for CPUs. The run goes on as asked. The projection adds the epochs'
    evaluations (eval_views images each), not timed yet, from the training steps' speed: on the
    default recipe they are a tenth of the run."""
    if tr.eta_hint_given or run.steps < 5 or run.train_seconds < 3:
        return
    tr.eta_hint_given = True
    epochs_left = tr.cfg["epochs"] - epoch + 1  # this one included
    steps_left = epochs_left * steps_per_epoch - run.steps
    eval_steps = epochs_left * eval_views * EVAL_COST_OF_TRAIN_IMAGE / tr.cfg["batch_size"]
    eta = (steps_left + eval_steps) * run.train_seconds / run.steps
    if eta > CPU_ETA_HINT_S and tr.cfg["data"]["name"] in ("fashion_mnist", "mnist"):
        log.warning("this run needs about %s more on this CPU; for a recipe made for CPUs (minutes) "
                    "try: resnet-train experiment=cpu", _duration(eta))
    elif eta > CPU_ETA_HINT_S:
        log.warning("this run needs about %s more on this CPU; a GPU, a smaller model or data.resize "
                    "would shorten it", _duration(eta))


def _duration(seconds: float) -> str:
    h, m = divmod(int(seconds // 60), 60)
    return f"{h} h {m:02d} min" if h else f"{m} min"


def _scores(tr: Trainer, model: nn.Module, prefix: str, precision: str, fixed: int | None) -> dict[str, float]:
    """Test (and validation) loss and accuracy of `model`, as row fields."""
    tcfg, device = tr.cfg["trainer"], tr.ctx.device
    out = {}
    for split, batches in (("val", getattr(tr.data, "val", None)), ("test", tr.data.test)):
        if batches is None:
            continue
        ev = evaluate(model, batches.batches(), device, precision, tr.ctx.channels_last, fixed_batch=fixed,
                      tta_hflip=tta_hflip_on(tcfg, tr.cfg["data"]))
        out[f"{prefix}{split}_loss"], out[f"{prefix}{split}_acc"] = ev["loss"], ev["top1"]
    return out


def _finish_epoch(tr: Trainer, clock: Clock, epoch: int, t_epoch: float, precision: str,
                  metrics: MetricsFile) -> dict[str, Any]:
    run, device = tr.running, tr.ctx.device
    stats = global_epoch_stats(run, device)
    train_time = run.train_seconds
    t_eval = time.perf_counter()
    fixed = tr.cfg["trainer"]["eval_batch_size"] if device.type == "cuda" else None
    scores = _scores(tr, tr.model, "", precision, fixed)
    if tr.ctx.ema is not None:
        # Under DDP each rank's average took in its own BatchNorm statistics (DDP broadcasts
        # rank 0's to the model only at the next forward): score, on every rank, rank 0's
        # average, the one its checkpoint holds.
        distributed.broadcast_buffers(tr.ctx.ema.module)
        scores.update(_scores(tr, tr.ctx.ema.module, "ema_", precision, fixed))
    eval_time = time.perf_counter() - t_eval
    clock.add("eval", eval_time)
    row = {"epoch": epoch, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"], **scores,
           "lr": run.last_lr, "epoch_time_s": time.perf_counter() - t_epoch,
           "train_images_per_s": stats["train_images"] / train_time, "eval_time_s": eval_time,
           "elapsed_s": tr.elapsed()}
    if tr.ctx.skip_nonfinite:
        row["skipped_steps"] = stats["skipped_steps"]
    tr.epoch, tr.step, tr.running = epoch, 0, None
    tr.history.append(row)
    # best.pt is chosen on the validation split when there is one: selecting on the test set
    # would make its score an optimistic estimate (issue 13).
    key = selection_key(tr.data)
    improved = row[key] > tr.best_acc
    if improved:
        tr.best_acc, tr.best_epoch = row[key], epoch
    if tr.dist.is_main:
        metrics.append(row)
    # best.pt first: a crash between the two renames then leaves the older last.pt, whose resume
    # redoes this epoch and writes the same best.pt again (the other order would leave a
    # last.pt that calls an epoch best whose weights best.pt does not hold).
    tr.save("best.pt", "last.pt") if improved else tr.save("last.pt")
    return row


def selection_key(data: Data) -> str:
    return "val_acc" if getattr(data, "val", None) is not None else "test_acc"


def _restore(tr: Trainer, ckpt: dict[str, Any], metrics: MetricsFile | None, steps_per_epoch: int,
             base_lrs: list[float]) -> None:
    tr.core.load_state_dict(ckpt["model"])
    tr.ctx.optimizer.load_state_dict(ckpt["optimizer"])
    if tr.ctx.scaler is not None and ckpt.get("scaler"):
        tr.ctx.scaler.load_state_dict(ckpt["scaler"])
    tr.epoch, tr.step = int(ckpt["epoch"]), int(ckpt.get("step", 0))
    tr.running = rank_share(Running(**ckpt["running"]), tr.dist.is_main) if ckpt.get("running") else None
    tr.best_acc, tr.best_epoch = float(ckpt["best_acc"]), int(ckpt["best_epoch"])
    tr.elapsed_before = float(ckpt.get("elapsed_s", 0.0)) - tr.clock.now()
    if tr.ctx.ema is not None and ckpt.get("ema") is not None:
        tr.ctx.ema.load_state_dict(ckpt["ema"])
    if tr.ctx.scheduler is not None and ckpt.get("lr_scheduler"):
        if ckpt["config"]["epochs"] == tr.cfg["epochs"]:
            tr.ctx.scheduler.load_state_dict(ckpt["lr_scheduler"])
        else:
            tr.ctx.scheduler = rebuild_schedule(tr.ctx.optimizer, tr.cfg["scheduler"], base_lrs,
                                                tr.epoch * steps_per_epoch + tr.step, steps_per_epoch,
                                                tr.cfg["epochs"])
            log.info("epochs changed %s -> %s: the schedule follows the new length",
                     ckpt["config"]["epochs"], tr.cfg["epochs"])
    set_rng_state(ckpt["rng"], tr.ctx.device)
    if "history" in ckpt:
        tr.history = [r for r in ckpt["history"] if r["epoch"] <= tr.epoch]
        if metrics is not None:
            metrics.rewrite(tr.history)
    elif metrics is not None:  # checkpoints written before the history was kept in them
        tr.history = metrics.keep_until(tr.epoch)
    if metrics is not None:
        remove_stale_temp_files(tr.run_dir / "checkpoints")


def time_to_acc(rows: list[dict[str, Any]]) -> dict[str, dict[str, float] | None]:
    """The epoch and the run's wall time at which test_acc first reached each mark."""
    out: dict[str, dict[str, float] | None] = {}
    for mark in ACC_MARKS:
        hit = next((r for r in rows if r["test_acc"] >= mark), None)
        out[f"{mark:.2f}"] = {"epoch": hit["epoch"], "wall_s": round(hit["elapsed_s"], 2)} \
            if hit and "elapsed_s" in hit else None
    return out


def _finished_results(run_dir: Path, tr: Trainer) -> dict | None:
    """The run's results.json when it already describes the run as it stands (same epochs,
    same final epoch): its time record belongs to the process that trained."""
    import json

    try:
        old = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    final = tr.history[-1]["epoch"] if tr.history else None
    if isinstance(old, dict) and old.get("epochs") == tr.epoch and (old.get("final") or {}).get("epoch") == final:
        return old
    return None


def _results(rows, tr: Trainer, n_params: int, device: torch.device, precision: str, wall: float) -> dict:
    final = rows[-1] if rows else {}
    key = selection_key(tr.data)
    best = next((r for r in rows if r["epoch"] == tr.best_epoch), {})
    fields = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
              "ema_val_acc", "ema_test_acc")
    out = {
        "model": tr.cfg["model"]["name"], "dataset": tr.cfg["data"]["name"], "epochs": tr.epoch,
        "selection": key,
        "final": {k: final.get(k) for k in fields if k in final or k in ("epoch", "test_acc")},
        "best": {k: best.get(k) for k in fields if k in best or k in ("epoch", "test_acc")},
        # the test accuracy of the selected epoch: with a validation split an honest estimate;
        # without one it is the maximum over test epochs (selected on the test set itself)
        "best_test_acc": best.get("test_acc", tr.best_acc if key == "test_acc" else None),
        "best_epoch": tr.best_epoch,
        "final_test_acc": final.get("test_acc"),
        "tta_hflip": tta_hflip_on(tr.cfg["trainer"], tr.cfg["data"]),  # how every *_acc above was scored
        "time_to_acc": time_to_acc(rows),
        "parameters": n_params, "device": str(device), "device_name": _device_name(device),
        "world_size": tr.dist.world, "precision": precision, "wall_time_s": wall,
        "mean_train_images_per_s": (sum(r["train_images_per_s"] for r in rows) / len(rows)) if rows else None,
    }
    if key == "val_acc":
        out["best_val_acc"], out["final_val_acc"] = tr.best_acc, final.get("val_acc")
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        import platform

        return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return device.type


def main() -> None:
    from .cli import run_hydra_app

    run_hydra_app("train", _task)


def _task(cfg, dinfo: DistInfo) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .checkpoint import OutputError
    from .config import to_container

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    single = HydraConfig.get().mode == RunMode.RUN
    try:
        return train(with_run_names(to_container(cfg), HydraConfig.get()), run_dir, dinfo)
    except OSError as e:
        if e.filename is None or not str(e.filename).startswith(str(run_dir)):
            _drop_if_empty_run(run_dir, single and dinfo.is_main and not cfg.get("resume"))
            raise
        raise OutputError(f"cannot write {e.filename}: {e.strerror}; files written before are intact") from None
    except Exception:
        _drop_if_empty_run(run_dir, single and dinfo.is_main and not cfg.get("resume"))
        raise


def _drop_if_empty_run(run_dir: Path, ours: bool) -> None:
    """A run refused before it wrote anything (offline with no dataset, say) leaves no folder
    behind that holds only Hydra's record and its log (issue 11). Anything else in the folder
    (a checkpoint, metrics, a user's file) keeps it all. Sweep jobs keep theirs: the sweep's
    summary points at them."""
    if not ours or not run_dir.is_dir():
        return
    ours_only = {"train.log", ".hydra"}
    if any(p.name not in ours_only for p in run_dir.iterdir()):
        return
    if (run_dir / ".hydra").is_dir() and any(p.name not in ("config.yaml", "hydra.yaml", "overrides.yaml")
                                             for p in (run_dir / ".hydra").iterdir()):
        return
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # outputs/DATE/ and outputs/ when this run was their only one
        run_dir.parent.rmdir()
        run_dir.parent.parent.rmdir()


if __name__ == "__main__":
    main()
