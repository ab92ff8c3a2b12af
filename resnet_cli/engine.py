"""One epoch of training, one pass of evaluation, and the device/precision policy."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ConfigError
from .errors import NonFiniteLoss


# On CUDA the host reads a step's results only every this many steps (each read waits for the
# GPU): the non-finite-loss check here, and the ranks' agreement to stop in train.py.
HOST_READ_EVERY = 20

# ---------------------------------------------------------------- device and precision

def configure_cuda(device: torch.device, cudnn_benchmark: bool) -> None:
    """The CUDA settings a run trains and evaluates with (resnet-eval applies the run's, so it
    scores with the same kind of kernels): cuDNN autotuning as configured, TF32 matmuls and
    convolutions. The CUDA context is made here, so start-up pays for it, not data loading."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.zeros((), device=device)


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank or 0)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"trainer.device={spec}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device={spec}: CUDA is not available on this machine; use auto or cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank or 0)
        elif local_rank is not None:
            # distributed.init() puts each process on the GPU of its LOCAL_RANK; one fixed index
            # would put every rank on one GPU, which NCCL refuses.
            raise ConfigError(f"trainer.device={spec}: under torchrun each process takes the GPU of its local rank; "
                              "use cuda or auto (CUDA_VISIBLE_DEVICES chooses the GPUs)")
        elif device.index >= torch.cuda.device_count():
            raise ConfigError(f"trainer.device={spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"trainer.device={spec}: MPS is not available on this machine; use auto or cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"trainer.device={spec}: choose from auto, cpu, cuda, cuda:N, mps")
    return device


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPUs where bf16 autocast is faster, not slower, than fp32.
    The CPU flags alone are not enough: torch may be told to use narrower kernels
    (ATEN_CPU_CAPABILITY=avx2), and then bf16 is emulated even on such a CPU."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Ampere (compute capability 8.0) and newer. `torch.cuda.is_bf16_supported()` also says yes
    on V100/T4, where bf16 is emulated and slower than fp16 with a gradient scaler."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(spec: str, device: torch.device) -> str:
    if spec != "auto":
        if spec == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("trainer.precision=bf16: this GPU has no bf16 support; use fp16 or fp32")
        return spec
    if device.type == "cuda":
        return "bf16" if cuda_has_native_bf16(device) else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------- the loops

@dataclass
class StepContext:
    """What train_one_epoch needs besides the model and the batches."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    loss_fn: nn.Module
    device: torch.device
    precision: str
    scaler: torch.amp.GradScaler | None = None
    grad_clip: float | None = None
    skip_nonfinite: bool = False
    channels_last: bool = True
    # on_step runs after the steps whose number in the epoch is a multiple of one of `report_at`,
    # or whose number in the run (step_offset + the step in the epoch) is a multiple of one of
    # `report_global` (each call syncs a GPU): every step on the CPU; on CUDA the host-read
    # cadence plus the steps that must be hit exactly (mid-epoch checkpoints count in the
    # epoch, tracker points in the run), so the reads fall together.
    report_at: tuple[int, ...] = (1,)
    report_global: tuple[int, ...] = ()
    step_offset: int = 0  # steps of the run before this epoch
    # An exponential moving average of the weights (torch.optim.swa_utils.AveragedModel), updated
    # after every optimizer step from `ema_source` (the un-wrapped model).
    ema: nn.Module | None = None
    ema_source: nn.Module | None = None
    # (ctx, model, x, y) -> (logits, loss); None runs eager_forward. On CUDA, train.py may set
    # a cuda_graphs.GraphedForward, which replays a captured forward+backward (issue 12).
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class Running:
    """Sums over an epoch so far (kept in checkpoints for a mid-epoch resume)."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    counted: int = 0  # images of the steps that were not skipped
    skipped: int = 0
    steps: int = 0
    train_seconds: float = 0.0
    last_lr: float = 0.0  # the lr of the latest optimizer step (the scheduler moves on after it)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def eager_forward(ctx: StepContext, model: nn.Module, x: torch.Tensor, y: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    with autocast(ctx.device, ctx.precision):
        logits = model(x)
        return logits, ctx.loss_fn(logits, y)


def sum_dtype(device: torch.device) -> torch.dtype:
    """Loss sums over an epoch in float64 (thousands of batches), except on Apple GPUs: MPS has
    no float64 at all, and a float64 tensor there fails at the first step."""
    return torch.float32 if device.type == "mps" else torch.float64


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _reduce(values: list[float], device: torch.device) -> list[float]:
    if not _distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _all_finite(finite: bool, device: torch.device) -> bool:
    """Under DDP every rank must take the same branch: a rank that skipped backward while the
    others wait in its all-reduce would hang the job."""
    if not _distributed():
        return finite
    t = torch.tensor([1 if finite else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def train_one_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], ctx: StepContext,
                    epoch: int, running: Running | None = None,
                    on_step: Callable[[Running], None] | None = None,
                    should_stop: Callable[[], bool] = lambda: False) -> Running:
    """Train over `batches`; returns the running sums (local to this rank).

    `on_step` runs after each step (progress, mid-epoch checkpoints); `should_stop` is asked
    between steps, so an interrupt leaves the model at a step boundary."""
    model.train()
    run = running or Running()
    sync_every_step = ctx.device.type != "cuda" or ctx.skip_nonfinite
    smoothing = float(getattr(ctx.loss_fn, "label_smoothing", 0.0))
    loss_sum = torch.zeros((), dtype=sum_dtype(ctx.device), device=ctx.device)
    correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
    pending = []  # CUDA: losses checked in groups, so the GPU is not stalled every step
    forward = ctx.forward or eager_forward
    t0 = time.perf_counter()
    it: Iterator = iter(batches)
    while not should_stop():
        try:
            x, y = next(it)
        except StopIteration:
            break
        if ctx.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # A skipped step must leave no trace, but its forward pass already updated the
        # BatchNorm running statistics: keep a copy to put back (buffers are small).
        saved = [b.detach().clone() for b in model.buffers()] if ctx.skip_nonfinite else None
        logits, loss = forward(ctx, model, x, y)
        finite = True
        if sync_every_step:
            value = loss.item()
            here = value == value and abs(value) != float("inf")
            finite = _all_finite(here, ctx.device)
            if not finite:
                if not ctx.skip_nonfinite:
                    raise NonFiniteLoss(epoch, run.steps + 1, float("nan") if here else value)
                run.skipped += 1
                with torch.no_grad():
                    for b, old in zip(model.buffers(), saved):
                        b.copy_(old)
        if finite:
            ctx.optimizer.zero_grad(set_to_none=True)
            if ctx.scaler is not None:
                ctx.scaler.scale(loss).backward()
                if ctx.grad_clip:
                    ctx.scaler.unscale_(ctx.optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)
                ctx.scaler.step(ctx.optimizer)
                ctx.scaler.update()
            else:
                loss.backward()
                if ctx.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)
                ctx.optimizer.step()
            if ctx.ema is not None:
                ctx.ema.update_parameters(ctx.ema_source)
            # The logged train_loss is plain cross-entropy, like test_loss: with label smoothing
            # the optimized loss is a different quantity and the curves would not compare.
            shown = loss if not smoothing else F.cross_entropy(logits.detach().float(), y)
            loss_sum += shown.detach().to(loss_sum.dtype) * y.shape[0]
            correct += (logits.argmax(1) == y).sum()
            run.counted += y.shape[0]
        run.last_lr = ctx.optimizer.param_groups[0]["lr"]
        if ctx.scheduler is not None:
            ctx.scheduler.step()
        run.steps += 1
        run.seen += y.shape[0]
        if not sync_every_step:
            pending.append((run.steps, loss.detach()))  # 1-based step number
            # at the same steps as on_step's reads, also in an epoch resumed mid-way
            if len(pending) >= HOST_READ_EVERY or run.steps % HOST_READ_EVERY == 0:
                _check_pending(pending, epoch, ctx.device)
        if on_step is not None and (any(run.steps % k == 0 for k in ctx.report_at)
                                    or any((ctx.step_offset + run.steps) % k == 0 for k in ctx.report_global)):
            _fold(run, loss_sum, correct)
            loss_sum.zero_(), correct.zero_()
            run.train_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            if on_step is not None:
                on_step(run)
    _check_pending(pending, epoch, ctx.device)
    _fold(run, loss_sum, correct)
    run.train_seconds += time.perf_counter() - t0
    return run


def _fold(run: Running, loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
    run.loss_sum += float(loss_sum)
    run.correct += int(correct)


def _check_pending(pending: list, epoch: int, device: torch.device) -> None:
    """Losses of the last steps, checked in one sync. Under DDP the ranks agree on the first bad
    step, so that all of them stop there together instead of some waiting for the others."""
    if not pending and not _distributed():
        return
    values = torch.stack([v for _, v in pending]).float().cpu() if pending else torch.zeros(0)
    bad = (~torch.isfinite(values)).nonzero()
    first = int(bad[0]) if len(bad) else len(pending)
    if _distributed():
        t = torch.tensor([first], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        first = int(t.item())
    if first < len(pending):
        raise NonFiniteLoss(epoch, pending[first][0], float(values[first]))
    pending.clear()


_SUMS = ("loss_sum", "correct", "seen", "counted", "skipped")


def global_running(run: Running, device: torch.device) -> Running:
    """The epoch's sums over all ranks (a collective: every rank calls it). Checkpoints hold
    these, since only rank 0 writes; a resume gives them to rank 0 and zeros to the others
    (`rank_share`), so the epoch's totals come out as in an uninterrupted run."""
    totals = _reduce([float(getattr(run, k)) for k in _SUMS], device)
    return replace(run, **{k: type(getattr(run, k))(v) for k, v in zip(_SUMS, totals)})


def rank_share(run: Running, is_main: bool) -> Running:
    return run if is_main else replace(run, **{k: type(getattr(run, k))(0) for k in _SUMS})


def global_epoch_stats(run: Running, device: torch.device) -> dict:
    g = global_running(run, device)
    return {"train_loss": g.loss_sum / max(g.counted, 1), "train_acc": g.correct / max(g.counted, 1),
            "skipped_steps": int(g.skipped), "train_images": int(g.seen)}


def _pad_to(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[0] >= n:
        return x
    return torch.cat([x, x.new_zeros((n - x.shape[0], *x.shape[1:]))])


def scored_logits(model: nn.Module, x: torch.Tensor, device: torch.device, precision: str,
                  tta_hflip: bool = False) -> torch.Tensor:
    """The model's float logits for x as evaluation scores them. With flip TTA: the log of the
    mean of the image's and its mirror image's probabilities, still a proper input to
    cross-entropy and softmax (test-time augmentation, for data whose classes survive a flip)."""
    with autocast(device, precision):
        logits = model(x)
        mirrored = model(x.flip(3)) if tta_hflip else None
    if mirrored is None:
        return logits.float()
    probs = (logits.float().softmax(1) + mirrored.float().softmax(1)) / 2
    return probs.clamp_min(1e-12).log()


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             precision: str, channels_last: bool = True, loss_fn: nn.Module | None = None,
             topk: tuple[int, ...] = (1,), collect: bool = False, fixed_batch: int | None = None,
             tta_hflip: bool = False) -> dict:
    """Loss and top-k accuracy over all batches (summed over ranks). With collect=True also
    returns this rank's predictions and targets (for confusion matrices).

    fixed_batch: pad a short last batch to this size (the padded rows are dropped from the
    output; in eval mode every image is computed on its own): one input shape, so cudnn's
    autotuner does not time every layer again for the ragged tail (issue 12).
    tta_hflip: average the softmax of each image and its mirror image (`scored_logits`)."""
    model.eval()
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    loss_sum = torch.zeros((), dtype=sum_dtype(device), device=device)
    hits = torch.zeros(len(topk), dtype=torch.int64, device=device)
    seen = 0
    preds, targets = [], []
    for x, y in batches:
        n = x.shape[0]
        if fixed_batch:
            x = _pad_to(x, fixed_batch)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = scored_logits(model, x, device, precision, tta_hflip)[:n]
        loss_sum += loss_fn(logits, y).to(loss_sum.dtype) * y.shape[0]
        k = min(max(topk), logits.shape[1])
        top = logits.topk(k, dim=1).indices
        match = top == y[:, None]
        hits += torch.stack([match[:, :min(t, k)].any(1).sum() for t in topk])
        seen += y.shape[0]
        if collect:
            preds.append(top[:, 0].cpu())
            targets.append(y.cpu())
    totals = _reduce([float(loss_sum), float(seen)] + [float(h) for h in hits.tolist()], device)
    n = max(totals[1], 1)
    out = {"loss": totals[0] / n, "images": int(totals[1])}
    for t, h in zip(topk, totals[2:]):
        out[f"top{t}"] = h / n
    if collect:
        out["preds"] = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)
        out["targets"] = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.int64)
    return out
