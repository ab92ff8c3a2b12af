"""Learning-rate schedules, stepped once per optimizer step.

Configs name these with `_target_` and `_partial_: true`; the trainer fills in what only it
knows (total and warmup steps). Each returns one of torch's own schedulers, whose
state_dicts hold plain numbers (safe to load with weights_only=True).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, MultiStepLR,
                                      OneCycleLR, SequentialLR)

from .errors import ConfigError


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
    t_max = max(total_steps - warmup, 1)
    # A floor of 0 is every param group's floor, so torch's own scheduler serves; a floor above
    # 0 is each group's own fraction (a fine-tuned backbone's lr is lower than the head's).
    main = (CosineAnnealingLR(optimizer, T_max=t_max) if min_lr_ratio == 0
            else CosineToFloor(optimizer, T_max=t_max, min_lr_ratio=min_lr_ratio))
    return _with_warmup(optimizer, main, warmup, warmup_start)


class CosineToFloor(CosineAnnealingLR):
    """Cosine decay from each param group's lr to min_lr_ratio times that lr. torch's
    CosineAnnealingLR has one eta_min for all groups: a backbone at a tenth of the head's lr
    (model.backbone_lr_scale) would end at the head's floor. Closed form, so a resumed run
    (load_state_dict restores last_epoch and base_lrs) continues on the same curve."""

    def __init__(self, optimizer: Optimizer, T_max: int, min_lr_ratio: float, last_epoch: int = -1):
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, T_max=T_max, eta_min=0.0, last_epoch=last_epoch)

    def get_lr(self) -> list[float]:
        t = min(max(self.last_epoch, 0), self.T_max)
        factor = self.min_lr_ratio + (1 - self.min_lr_ratio) * (1 + math.cos(math.pi * t / self.T_max)) / 2
        return [base * factor for base in self.base_lrs]

    _get_closed_form_lr = get_lr  # what step(epoch) uses (SequentialLR at its milestone)


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
    if pct_start * total_steps < 2:  # torch divides by (pct_start * total_steps - 1)
        raise ConfigError(f"scheduler.pct_start={pct_start}: one-cycle's rise would be {pct_start * total_steps:.3g} "
                          f"of this run's {total_steps} steps, it needs 2 or more; raise scheduler.pct_start "
                          f"to at least {2 / total_steps:.3g} or train more steps")
    peaks = [g["lr"] for g in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps, pct_start=pct_start,
                      div_factor=div_factor, final_div_factor=final_div_factor)
