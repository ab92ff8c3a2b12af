"""Learning-rate schedules, stepped once per optimizer step.

Configs name these with `_target_` and `_partial_: true`; the trainer fills in what only it
knows (total and warmup steps). Each returns one of torch's own schedulers, whose
state_dicts hold plain numbers (safe to load with weights_only=True).
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, MultiStepLR,
                                      OneCycleLR, SequentialLR)


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int, max_fraction: float) -> int:
    """warmup_epochs, but at most max_fraction of the run (and never all of it): a fixed
    epoch of warmup would be half of a 2-epoch run (issue 13)."""
    return max(0, min(round(warmup_epochs * steps_per_epoch), round(max_fraction * total_steps), total_steps - 1))


def _with_warmup(optimizer: Optimizer, main: LRScheduler, warmup_steps: int, start_factor: float) -> LRScheduler:
    if warmup_steps <= 0:
        return main
    warm = LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warm, main], milestones=[warmup_steps])


def constant(optimizer: Optimizer, *, total_steps: int, steps_per_epoch: int, warmup_epochs: float = 0.0,
             warmup_start: float = 0.1, max_warmup_fraction: float = 1.0) -> LRScheduler:
    warmup = warmup_steps(warmup_epochs, steps_per_epoch, total_steps, max_warmup_fraction)
    return _with_warmup(optimizer, ConstantLR(optimizer, factor=1.0, total_iters=0), warmup, warmup_start)


def cosine(optimizer: Optimizer, *, total_steps: int, steps_per_epoch: int, warmup_epochs: float = 1.0,
           warmup_start: float = 0.1, min_lr_ratio: float = 0.0, max_warmup_fraction: float = 1.0) -> LRScheduler:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at the last step."""
    warmup = warmup_steps(warmup_epochs, steps_per_epoch, total_steps, max_warmup_fraction)
    base = optimizer.param_groups[0]["lr"]
    main = CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup, 1), eta_min=base * min_lr_ratio)
    return _with_warmup(optimizer, main, warmup, warmup_start)


def step(optimizer: Optimizer, *, total_steps: int, steps_per_epoch: int, milestones: list[float] = (0.5, 0.75),
         gamma: float = 0.1, warmup_epochs: float = 0.0, warmup_start: float = 0.1,
         max_warmup_fraction: float = 1.0) -> LRScheduler:
    """Multiply the lr by gamma at each milestone, given as a fraction of the run."""
    warmup = warmup_steps(warmup_epochs, steps_per_epoch, total_steps, max_warmup_fraction)
    at = sorted({max(1, round(m * total_steps) - warmup) for m in milestones})
    return _with_warmup(optimizer, MultiStepLR(optimizer, milestones=at, gamma=gamma), warmup, warmup_start)


def onecycle(optimizer: Optimizer, *, total_steps: int, steps_per_epoch: int, pct_start: float = 0.25,
             div_factor: float = 25.0, final_div_factor: float = 1e4) -> LRScheduler:
    """Smith's one-cycle policy; its own warm-up phase is pct_start of the run. Each param
    group peaks at its own lr (a fine-tuned backbone's is lower: model.backbone_lr_scale)."""
    peaks = [g["lr"] for g in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps, pct_start=pct_start,
                      div_factor=div_factor, final_div_factor=final_div_factor)
