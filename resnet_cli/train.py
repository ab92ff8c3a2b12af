"""`resnet-train`: build the network from config, train it, write a self-describing run folder.

`main()` is the thin Hydra entry point; `train(cfg, run_dir)` does the work with a plain dict.
"""

from __future__ import annotations

import logging
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from torch import nn

from . import distributed, finetune
from .checkpoint import atomic_write_json, load_checkpoint, resolve_resume, save_checkpoint
from .config import ConfigError, check_values
from .data import Data, load_data
from .distributed import DistInfo
from .engine import (NonFiniteLoss, Running, StepContext, evaluate, global_epoch_stats, resolve_device, resolve_precision,
                     train_one_epoch)
from .models import build_model, stage_sizes
from .models.resnet import ModelSpec
from .reporting import MetricsFile, epoch_line, epoch_progress, plot_curves, progress_mode
from .trackers import Trackers, with_run_names

log = logging.getLogger("resnet_cli")

# Keys that may differ between a checkpoint and the run that resumes it: they change how
# (or how long) the run goes on, not what it computes up to the checkpoint.
RESUMABLE = ("epochs", "resume", "trainer.device", "trainer.progress", "trainer.checkpoint_every_steps",
             "trainer.eval_batch_size", "trainer.compile", "data.root", "data.cache_dir", "data.download",
             "data.num_workers", "summary", "logger")


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


def rng_state() -> dict[str, Any]:
    """All global RNG states as tensors and plain data (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *[float(v) if isinstance(v, float) else int(v)
                                                                             for v in np_state[2:]]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


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


def flat_items(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_items(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume_compatible(now: dict[str, Any], then: dict[str, Any], ckpt: Path) -> None:
    a, b = flat_items(then), flat_items(now)
    for key in sorted(set(a) | set(b)):
        if any(key == r or key.startswith(r + ".") for r in RESUMABLE):
            continue
        if a.get(key) != b.get(key):
            raise ConfigError(
                f"{key}={b.get(key)}: differs from the checkpoint being resumed ({ckpt}: {key}={a.get(key)}); "
                f"resume with the same value, or start a new run")


def resume_command(run_dir: Path) -> str:
    return f"resnet-train resume={shlex.quote(str(run_dir))}"


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
    epoch: int = 0  # completed epochs
    step: int = 0  # steps done in epoch `epoch + 1`
    running: Running | None = None
    best_acc: float = -1.0
    best_epoch: int = 0

    def state(self) -> dict[str, Any]:
        sched = self.ctx.scheduler
        return {
            "model": self.core.state_dict(),
            "optimizer": self.ctx.optimizer.state_dict(),
            "lr_scheduler": sched.state_dict() if sched is not None else None,
            "scaler": self.ctx.scaler.state_dict() if self.ctx.scaler is not None else None,
            "epoch": self.epoch, "step": self.step,
            "running": self.running.as_dict() if self.running else None,
            "best_acc": self.best_acc, "best_epoch": self.best_epoch,
            "config": self.cfg, "rng": rng_state(),
            "preprocess": self.data.prep.as_dict(), "class_names": self.data.class_names,
            "num_classes": self.data.num_classes,
        }

    def save(self, name: str) -> None:
        if not self.dist.is_main:
            return
        state = self.state()
        # Never replace a good checkpoint with diverged weights (the loss shows a blow-up
        # one step after the update that caused it).
        for key, value in state["model"].items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise NonFiniteLoss(self.epoch + (1 if self.step else 0), self.step, float("nan"), what=f"weight {key}")
        save_checkpoint(self.run_dir / "checkpoints" / name, state)


def train(cfg: dict[str, Any], run_dir: Path, dinfo: DistInfo = DistInfo()) -> dict[str, Any]:
    """Train as `cfg` says, writing into `run_dir`. Returns the results dict."""
    # Signals are caught from the start: one that arrives while data loads stops the run
    # at its first step boundary, like one during training.
    with StopSignals() as stop, Trackers(cfg.get("logger"), run_dir, dinfo.is_main) as trackers:
        return _train(cfg, run_dir, dinfo, stop, trackers)


def _train(cfg: dict[str, Any], run_dir: Path, dinfo: DistInfo, stop: StopSignals,
           trackers: Trackers) -> dict[str, Any]:
    t_start = time.perf_counter()
    check_values(cfg)
    device = resolve_device(cfg["trainer"]["device"], dinfo.local_rank if dinfo.enabled else None)
    precision = resolve_precision(cfg["trainer"]["precision"], device)
    tcfg = cfg["trainer"]
    resume_ckpt = None
    if cfg.get("resume"):
        _, ckpt_path = resolve_resume(cfg["resume"])
        resume_ckpt = load_checkpoint(ckpt_path, map_location=device)
        check_resume_compatible(cfg, resume_ckpt["config"], ckpt_path)

    seed_everything(cfg["seed"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(tcfg["cudnn_benchmark"])
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = load_data(cfg["data"], cfg["batch_size"], tcfg["eval_batch_size"], cfg["seed"], device,
                     dinfo.rank, dinfo.world)
    spec = ModelSpec.from_mapping(cfg["model"])
    in_ch, ncls = spec.in_channels or data.prep.channels, spec.num_classes or data.num_classes
    stage_sizes(spec, in_ch, data.prep.size)  # fails early, naming the stage, if the input is too small
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
            model = core = nn.SyncBatchNorm.convert_sync_batchnorm(core)
        model = nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None)
    if tcfg["compile"]:
        model = torch.compile(model)

    steps_per_epoch = len(data.train)
    optimizer = build_optimizer(core, cfg["optimizer"], spec.backbone_lr_scale)
    scheduler = build_scheduler(optimizer, cfg["scheduler"], steps_per_epoch, cfg["epochs"])
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=float(tcfg["label_smoothing"]))
    ctx = StepContext(optimizer, scheduler, loss_fn, device, precision, scaler, tcfg["grad_clip"],
                      tcfg["skip_nonfinite"], tcfg["channels_last"],
                      report_every=1 if device.type == "cpu" or tcfg["checkpoint_every_steps"] else 25)
    tr = Trainer(model, core, ctx, data, cfg, run_dir, dinfo)
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    rows: list[dict[str, Any]] = []
    if resume_ckpt is not None:
        rows = _restore(tr, resume_ckpt, metrics if dinfo.is_main else None, steps_per_epoch)

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
        log.info("run dir %s", run_dir)
        if resume_ckpt is not None:
            log.info("resumed from epoch %d step %d", tr.epoch, tr.step)
    trackers.start(cfg, steps_per_epoch, tr.epoch * steps_per_epoch + tr.step, tr.running, str(device))

    mode = progress_mode(tcfg["progress"]) if dinfo.is_main else "none"
    every = tcfg["checkpoint_every_steps"]
    while tr.epoch < cfg["epochs"]:
        epoch = tr.epoch + 1
        tr.running = tr.running or Running()
        t_epoch = time.perf_counter() - tr.running.train_seconds
        with epoch_progress(mode, epoch, cfg["epochs"], steps_per_epoch, tr.step) as update:
            def on_step(run: Running) -> None:
                tr.step = run.steps
                trackers.log_step(epoch, run, ctx.optimizer.param_groups[0]["lr"])
                if run.steps and run.train_seconds:
                    update(run.steps, run.loss_sum / max(run.counted, 1), run.correct / max(run.counted, 1),
                           run.seen / run.train_seconds)
                if every and run.steps % every == 0 and run.steps < steps_per_epoch:
                    tr.save("last.pt")

            def should_stop() -> bool:
                return distributed.any_rank(stop.signum is not None, device) if dinfo.enabled \
                    else stop.signum is not None

            run = train_one_epoch(model, data.train.batches(epoch, tr.step), ctx, epoch, tr.running,
                                  on_step, should_stop)
        tr.running, tr.step = run, run.steps
        if run.steps < steps_per_epoch:  # stopped by a signal mid-epoch
            tr.save("last.pt")
            if dinfo.is_main:
                log.warning("stopped at epoch %d, step %d/%d; saved %s", epoch, run.steps, steps_per_epoch,
                            run_dir / "checkpoints" / "last.pt")
            _exit_resumable(run_dir, dinfo, stop.exit_code)
        row = _finish_epoch(tr, epoch, t_epoch, precision)
        rows.append(row)
        if dinfo.is_main:
            metrics.append(row)
            log.info(epoch_line(row, cfg["epochs"]))
            plot_curves(rows, run_dir / "curves.png", f"{spec.name} on {cfg['data']['name']}")
            trackers.log_epoch(row)
        if stop.signum is not None and tr.epoch < cfg["epochs"]:  # last.pt of this epoch is saved
            _exit_resumable(run_dir, dinfo, stop.exit_code)

    if dinfo.enabled:
        if not distributed.params_identical(core):
            raise RuntimeError("DDP ranks ended with different parameters; please report this")
        if dinfo.is_main:
            log.info("parameters identical on all %d ranks", dinfo.world)
    results = _results(rows, tr, n_params, device, precision, time.perf_counter() - t_start)
    if dinfo.is_main:
        atomic_write_json(run_dir / "results.json", results)
        trackers.log_results(cfg, results)
        log.info("best test_acc %.4f at epoch %d; final %.4f; wrote %s", tr.best_acc, tr.best_epoch,
                 rows[-1]["test_acc"] if rows else float("nan"), run_dir)
    return results


def _exit_resumable(run_dir: Path, dinfo: DistInfo, code: int) -> None:
    if dinfo.is_main:
        print(f"resume with: {resume_command(run_dir)}", file=sys.stderr)
    distributed.shutdown()
    sys.exit(code)


def _finish_epoch(tr: Trainer, epoch: int, t_epoch: float, precision: str) -> dict[str, Any]:
    run, device = tr.running, tr.ctx.device
    stats = global_epoch_stats(run, device)
    train_time = run.train_seconds
    t_eval = time.perf_counter()
    ev = evaluate(tr.model, tr.data.test.batches(), device, precision, tr.ctx.channels_last)
    eval_time = time.perf_counter() - t_eval
    lr = tr.ctx.optimizer.param_groups[0]["lr"]
    row = {"epoch": epoch, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
           "test_loss": ev["loss"], "test_acc": ev["top1"], "lr": lr,
           "epoch_time_s": time.perf_counter() - t_epoch, "train_images_per_s": stats["train_images"] / train_time,
           "eval_time_s": eval_time}
    if tr.ctx.skip_nonfinite:
        row["skipped_steps"] = stats["skipped_steps"]
    tr.epoch, tr.step, tr.running = epoch, 0, None
    improved = row["test_acc"] > tr.best_acc
    if improved:
        tr.best_acc, tr.best_epoch = row["test_acc"], epoch
    tr.save("last.pt")
    if improved:
        tr.save("best.pt")
    return row


def _restore(tr: Trainer, ckpt: dict[str, Any], metrics: MetricsFile | None, steps_per_epoch: int) -> list[dict]:
    tr.core.load_state_dict(ckpt["model"])
    tr.ctx.optimizer.load_state_dict(ckpt["optimizer"])
    if tr.ctx.scaler is not None and ckpt.get("scaler"):
        tr.ctx.scaler.load_state_dict(ckpt["scaler"])
    tr.epoch, tr.step = int(ckpt["epoch"]), int(ckpt.get("step", 0))
    tr.running = Running(**ckpt["running"]) if ckpt.get("running") else None
    tr.best_acc, tr.best_epoch = float(ckpt["best_acc"]), int(ckpt["best_epoch"])
    sched = tr.ctx.scheduler
    if sched is not None and ckpt.get("lr_scheduler"):
        if ckpt["config"]["epochs"] == tr.cfg["epochs"]:
            sched.load_state_dict(ckpt["lr_scheduler"])
        else:  # a new horizon: the new schedule, at the point this run has reached
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(tr.epoch * steps_per_epoch + tr.step):
                    sched.step()
            log.info("epochs changed %s -> %s: the schedule follows the new length",
                     ckpt["config"]["epochs"], tr.cfg["epochs"])
    set_rng_state(ckpt["rng"])
    return metrics.keep_until(tr.epoch) if metrics is not None else []


def _results(rows, tr: Trainer, n_params: int, device: torch.device, precision: str, wall: float) -> dict:
    final = rows[-1] if rows else {}
    best = max(rows, key=lambda r: r["test_acc"]) if rows else {}
    return {
        "model": tr.cfg["model"]["name"], "dataset": tr.cfg["data"]["name"], "epochs": tr.epoch,
        "final": {k: final.get(k) for k in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")},
        "best": {k: best.get(k) for k in ("epoch", "test_acc", "test_loss")},
        "best_test_acc": tr.best_acc, "best_epoch": tr.best_epoch,
        "parameters": n_params, "device": str(device), "device_name": _device_name(device),
        "world_size": tr.dist.world, "precision": precision, "wall_time_s": wall,
        "mean_train_images_per_s": (sum(r["train_images_per_s"] for r in rows) / len(rows)) if rows else None,
    }


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

    from .config import to_container

    from .checkpoint import OutputError

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return train(with_run_names(to_container(cfg), HydraConfig.get()), run_dir, dinfo)
    except OSError as e:
        if e.filename is None or not str(e.filename).startswith(str(run_dir)):
            raise
        raise OutputError(f"cannot write {e.filename}: {e.strerror}; files written before are intact") from None


if __name__ == "__main__":
    main()
