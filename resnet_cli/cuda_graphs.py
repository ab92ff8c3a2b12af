"""The training step's forward and backward as CUDA graphs (`trainer.cuda_graphs`).

At batch 256 the bf16 step is bound by kernel launches: on an H100, 5.3 ms of GPU work took
7.5 ms of wall time, and 5.4 ms once forward+backward were replayed from a graph (issue 12,
shared/docs/gpu-h100-2026-11-28.md). `torch.cuda.make_graphed_callables` captures them; the
optimizer step stays eager. That keeps everything that decides on the host between forward,
backward and step exactly as without graphs: the non-finite-loss check and
`skip_nonfinite`, the fp16 GradScaler (scale, unscale, skipped steps, a scale that changes),
`grad_clip`, and schedulers that set a Python-float lr. A whole-step capture would need a
capturable optimizer, a tensor lr and device-side versions of each of those.

Correct by construction:
- the graph takes one batch shape (the first full batch); any other batch runs eagerly;
- its outputs are static buffers that the next replay overwrites, so they are cloned;
- capture's warm-up passes run the model in training mode, which moves BatchNorm statistics
  and counters: every buffer and the RNG streams are put back afterwards, so a run with
  graphs computes what a run without them computes, and a resume stays exact;
- a failed capture leaves training eager, with one log line saying why; on torch before
  2.12, which cannot go on safely after one (see `recovers_from_failed_capture`), it stops
  the run with one line that says to turn graphs off.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .config import CUDA_GRAPHS, ConfigError
from .engine import StepContext, eager_forward
from .errors import first_line

log = logging.getLogger("resnet_cli")

def recovers_from_failed_capture(version: str = torch.__version__) -> bool:
    """Whether training can go on eagerly after a capture that failed on the GPU. Before torch
    2.12 (pytorch PR 180395) a failing cudaStreamEndCapture skipped the allocator's end of
    capture: it then believes a capture is still under way, never reuses memory freed with
    record_stream (every prefetched batch: ~9 MB a step for the default run) and can abort the
    process at a later empty_cache with "captures_underway.empty()"."""
    from torch.torch_version import TorchVersion

    return TorchVersion(version.split("+")[0]) >= (2, 12)


def thread_local_capture() -> bool:
    """Whether make_graphed_callables takes capture_error_mode (pytorch PR 188832, July 2026:
    torch 2.14 has it, 2.11 does not). Without it, capture runs in CUDA's "global" mode, in
    which CUDA calls from any other thread of the process break the capture."""
    return "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters


def decide(setting: object, device: torch.device, distributed: bool, compiled: bool,
           loader: bool = False) -> tuple[bool, str]:
    """(use graphs, why): the reason is for the run log ('' where there is nothing to say).
    `loader`: the training batches come from a DataLoader, whose pin-memory thread makes CUDA
    calls while the step is captured."""
    value = str(setting).lower()  # a command-line `true` arrives as "True"
    if value not in CUDA_GRAPHS:
        raise ConfigError(f"trainer.cuda_graphs={setting}: choose from {', '.join(CUDA_GRAPHS)}")
    if value == "false":
        return False, "off (trainer.cuda_graphs=false)" if device.type == "cuda" else ""
    if device.type != "cuda":
        if value == "true":
            raise ConfigError(f"trainer.cuda_graphs=true: CUDA graphs need a CUDA device, this run is on "
                              f"{device.type}; use auto or false")
        return False, ""
    if compiled:
        if value == "true":
            raise ConfigError("trainer.cuda_graphs=true: cannot be combined with trainer.compile=true "
                              "(torch.compile makes its own graphs); set one of them to false")
        return False, "off (trainer.compile=true)"
    if loader and not thread_local_capture():
        # The pin-memory thread's CUDA calls during a global-mode capture fail in that thread,
        # and the DataLoader re-raises the error at the next batch: no eager fallback then.
        why = (f"torch {torch.__version__} captures in global mode, which the DataLoader's pin-memory thread "
               "breaks (data.pipeline=loader)")
        if value == "true":
            raise ConfigError(f"trainer.cuda_graphs=true: {why}; use data.pipeline=memory where the data fits, "
                              "a torch whose make_graphed_callables takes capture_error_mode, or auto/false")
        return False, f"off: {why}"
    if distributed:
        # DDP all-reduces gradients from hooks inside backward; make_graphed_callables takes
        # modules without hooks, and a captured all-reduce would need DDP's static-graph mode.
        if value == "true":
            raise ConfigError("trainer.cuda_graphs=true: not available under DDP (torchrun with several processes: "
                              "the gradient all-reduce runs inside backward); use auto or false")
        return False, "off under DDP (its gradient all-reduce runs inside backward)"
    return True, "on: forward+backward captured at the first full batch"


@contextmanager
def preserved(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Put back, on exit, every buffer of `module` (BatchNorm running statistics and
    num_batches_tracked) and the CPU and CUDA random streams."""
    buffers = [b.detach().clone() for b in module.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in zip(module.buffers(), buffers):
                b.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)


class _LossOf(nn.Module):
    """Model + loss in one module, the unit that is captured. Autocast sits inside, with its
    weight-cast cache off: make_graphed_callables refuses the cache (cached casts would be
    freed after capture while the graph still reads them)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, device: torch.device, precision: str):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None, cache_enabled=False):
            logits = self.model(x)
            loss = self.loss_fn(logits, y)
        # The logits are only counted (accuracy), never differentiated: no gradient buffer for them.
        return logits.detach(), loss


def _capture_mode() -> dict[str, str]:
    # DataLoader's pin-memory thread allocates pinned memory while we capture; in the default
    # "global" mode that invalidates the capture. "thread_local" only guards this thread.
    # Where torch lacks the argument, decide() keeps graphs off for the loader pipeline.
    return {"capture_error_mode": "thread_local"} if thread_local_capture() else {}


class GraphedForward:
    """A StepContext.forward that replays forward+backward of `model` from CUDA graphs.

    Captured lazily at the first training batch of `batch_size` images, when the model,
    optimizer and any resumed state exist. Call it like engine.eager_forward."""

    def __init__(self, model: nn.Module, batch_size: int, warmup: int = 3):
        self.model, self.batch_size, self.warmup = model, batch_size, warmup
        self.graphed = None  # the captured callable: (x, y) -> (logits, loss)
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None  # the graph's input buffers
        self.failure: str | None = None  # why capture failed (then every step is eager)

    def __call__(self, ctx: StepContext, model: nn.Module, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        usable = model is self.model and model.training and torch.is_grad_enabled()
        if usable and self.graphed is None and self.failure is None and x.shape[0] == self.batch_size:
            self._capture(ctx, x, y)
        if usable and self.graphed is not None and self._fits(x, y):
            with torch.cuda.device(x.device):  # a graph replays on the current device's stream
                logits, loss = self.graphed(x, y)
            # Static buffers: the next replay overwrites them (the engine keeps losses for its
            # batched non-finite check).
            return logits.clone(), loss.clone()
        return eager_forward(ctx, model, x, y)

    def _fits(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        sx, sy = self.static
        return (x.shape == sx.shape and x.dtype == sx.dtype and x.device == sx.device
                and y.shape == sy.shape and y.dtype == sy.dtype and y.device == sy.device)

    def _capture(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.device.type != "cuda":  # a graph would capture no CPU work and replay stale outputs
            self.failure = f"batches on {x.device}, not a CUDA device"
            log.warning("cuda graphs: capture failed (%s); training without them", self.failure)
            return
        static = (x.detach().clone(memory_format=torch.preserve_format), y.detach().clone())
        step = _LossOf(self.model, ctx.loss_fn, x.device, ctx.precision)
        try:
            main = torch.cuda.current_stream(x.device)
            with preserved(self.model, x.device):
                try:
                    with torch.cuda.device(x.device):
                        self.graphed = torch.cuda.make_graphed_callables(
                            step, static, num_warmup_iters=self.warmup, allow_unused_input=True, **_capture_mode())
                finally:
                    # torch.cuda.graph leaves its capture stream current when capture_end fails;
                    # put ours back before anything else (the buffers' restore) runs.
                    torch.cuda.set_stream(main)
        except Exception as e:  # noqa: BLE001 (whatever broke the capture, eager training still works)
            self.graphed = None
            self.failure = f"{type(e).__name__}: {first_line(e)}"
            if not recovers_from_failed_capture():
                raise ConfigError(f"trainer.cuda_graphs: capture failed ({self.failure}); torch {torch.__version__} "
                                  "cannot train on safely after a failed capture (fixed in torch 2.12): rerun with "
                                  "trainer.cuda_graphs=false") from None
            log.warning("cuda graphs: capture failed (%s); training without them", self.failure)
            return
        self.static = static
        log.info("cuda graphs: forward+backward captured for batches of %s", "x".join(map(str, x.shape)))


__all__ = ["GraphedForward", "decide", "preserved", "recovers_from_failed_capture", "thread_local_capture"]
