"""An exponential moving average of the weights (`trainer.ema_decay`), through torch's
AveragedModel and its EMA helper.

AveragedModel.update_parameters reads its step counter on the host twice per call
(`bool(n_averaged == 0)`, `if n_averaged > 0`); the counter lives on the model's device, so on
CUDA every training step would wait for the GPU, the stall the training loop avoids everywhere
else (issue 12). `EMA` keeps the same arithmetic, done by the same helper on the same tensor
groups, with a host-side mirror of "has averaged before" instead of those reads.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMA(AveragedModel):
    """AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True) whose
    updates never read a device tensor on the host."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.started = False  # host mirror of n_averaged > 0

    def update_parameters(self, model: nn.Module) -> None:
        if not self.started:  # the first update copies the weights: torch's own code path
            super().update_parameters(model)
            self.started = True
            return
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for mine, theirs in zip(chain(self.module.parameters(), self.module.buffers()),
                                chain(model.parameters(), model.buffers())):
            mine = mine.detach()
            ours, src = groups.setdefault((mine.device, mine.dtype), ([], []))
            ours.append(mine)
            src.append(theirs.detach().to(mine.device))
        for ours, src in groups.values():  # as AveragedModel groups them: by device and dtype
            self.multi_avg_fn(ours, src, self.n_averaged)
        self.n_averaged += 1

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.started = bool(self.n_averaged > 0)  # one host read, at a resume
        return out


def build_ema(model: nn.Module, decay: float | None) -> EMA | None:
    """use_buffers=True averages the BatchNorm running statistics along with the weights, so
    the average is evaluated with statistics that belong to it (as torchvision's references
    do), not with the raw model's."""
    return EMA(model, decay) if decay else None


__all__ = ["EMA", "build_ema"]
