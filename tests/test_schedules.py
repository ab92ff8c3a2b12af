"""Every learning-rate schedule against its closed-form formula, at every step, as the
trainer builds it from the shipped configs (issue 11 item 12), and the warmup cap (issue 13)."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from resnet_cli.cli import compose
from resnet_cli.schedules import warmup_steps
from resnet_cli.train import build_scheduler

BASE = 0.4


def lr_curve(scheduler: str, steps_per_epoch: int, epochs: int, *overrides: str) -> list[float]:
    """The lr each optimizer step uses, from the shipped scheduler config."""
    cfg = OmegaConf.to_container(compose("train", [f"scheduler={scheduler}", *overrides]), resolve=True)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE)
    sched = build_scheduler(opt, cfg["scheduler"], steps_per_epoch, epochs)
    lrs = []
    for _ in range(steps_per_epoch * epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def cosine_formula(k: int, total: int, warmup: int, start: float = 0.1, min_ratio: float = 0.0) -> float:
    if k < warmup:
        return BASE * (start + (1 - start) * k / warmup)
    low = BASE * min_ratio
    return low + (BASE - low) * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))) / 2


@pytest.mark.parametrize("spe,epochs,warmup", [
    (50, 10, 50),   # the default recipe's shape: 1 warmup epoch = 10% of the run
    (50, 2, 10),    # a 2-epoch run: the warmup is capped at 10% of it, not half of it
    (7, 3, 2),      # round(0.1 * 21) = 2 steps
])
def test_cosine_with_warmup_follows_its_formula(spe, epochs, warmup):
    lrs = lr_curve("cosine", spe, epochs)
    total = spe * epochs
    assert warmup_steps(1, spe, total, 0.1) == warmup
    expected = [cosine_formula(k, total, warmup) for k in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_cosine_warmup_cap_and_min_lr_are_keys():
    total = 20 * 4
    lrs = lr_curve("cosine", 20, 4, "scheduler.max_warmup_fraction=0.5", "scheduler.warmup_epochs=1.5",
                   "scheduler.min_lr_ratio=0.05", "scheduler.warmup_start=0.2")
    assert lrs == pytest.approx([cosine_formula(k, total, 30, 0.2, 0.05) for k in range(total)], rel=1e-9)
    uncapped = lr_curve("cosine", 20, 4, "scheduler.max_warmup_fraction=1.0", "scheduler.warmup_epochs=2")
    assert uncapped == pytest.approx([cosine_formula(k, total, 40) for k in range(total)], rel=1e-9)


def test_cosine_floor_is_each_param_groups_own_and_resumes_on_its_curve():
    # A fine-tuned backbone at a tenth of the head's lr (model.backbone_lr_scale=0.1) decays to
    # a tenth of its own lr, not to the head's floor.
    cfg = OmegaConf.to_container(compose("train", ["scheduler.min_lr_ratio=0.1"]), resolve=True)
    head, backbone = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))

    def build():
        opt = torch.optim.SGD([{"params": [head], "lr": BASE}, {"params": [backbone], "lr": BASE / 10}], lr=BASE)
        return opt, build_scheduler(opt, cfg["scheduler"], 10, 5)

    opt, sched = build()
    curve = []
    for k in range(50):
        curve.append([g["lr"] for g in opt.param_groups])
        if k == 20:
            saved_opt, saved = opt.state_dict(), sched.state_dict()
        opt.step()
        sched.step()
    curve.append([g["lr"] for g in opt.param_groups])
    expected = [cosine_formula(k, 50, 5, min_ratio=0.1) for k in range(51)]
    assert [h for h, _ in curve] == pytest.approx(expected, rel=1e-9)
    assert [b for _, b in curve] == pytest.approx([e / 10 for e in expected], rel=1e-9)
    assert curve[50] == pytest.approx([0.1 * BASE, 0.1 * BASE / 10], rel=1e-9)  # each at its own floor
    opt, sched = build()  # a resumed run: state loaded after step 20, as resume does
    opt.load_state_dict(saved_opt)
    sched.load_state_dict(saved)
    for k in range(21, 51):
        opt.step()
        sched.step()
        assert [g["lr"] for g in opt.param_groups] == curve[k], k


@pytest.mark.parametrize("warmup_epochs,warmup", [(0, 0), (1, 6)])
def test_step_follows_its_formula(warmup_epochs, warmup):
    spe, epochs = 12, 5  # 60 steps: warmup capped at 6, milestones at steps 30 and 45
    lrs = lr_curve("step", spe, epochs, f"scheduler.warmup_epochs={warmup_epochs}")

    def formula(k: int) -> float:
        if k < warmup:
            return BASE * (0.1 + 0.9 * k / warmup)
        return BASE * 0.1 ** sum(k >= m for m in (30, 45))

    assert lrs == pytest.approx([formula(k) for k in range(60)], rel=1e-9)


def test_onecycle_follows_its_formula():
    spe, epochs = 16, 5
    total = spe * epochs
    lrs = lr_curve("onecycle", spe, epochs)
    start, end = BASE / 25.0, BASE / 25.0 / 1e4  # div_factor 25, final_div_factor 1e4
    peak_at = 0.25 * total - 1  # torch's OneCycleLR (cos annealing): phase ends are step indices

    def cos_anneal(a: float, b: float, pct: float) -> float:
        return b + (a - b) / 2 * (1 + math.cos(math.pi * pct))

    def formula(k: int) -> float:
        if k <= peak_at:
            return cos_anneal(start, BASE, k / peak_at)
        return cos_anneal(BASE, end, (k - peak_at) / (total - 1 - peak_at))

    assert lrs == pytest.approx([formula(k) for k in range(total)], rel=1e-9)
    assert max(lrs) == pytest.approx(BASE) and lrs[-1] == pytest.approx(end)


@pytest.mark.parametrize("steps", [1, 4, 7])
def test_onecycle_too_short_a_rise_is_refused_in_one_line(steps):
    """pct_start 0.25 of 4 steps is a rise of one step, where torch's OneCycleLR divides by
    zero (and under one step its lr is meaningless): a config error naming the key."""
    from resnet_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^scheduler.pct_start=0.25: one-cycle's rise would be .* it needs 2 or more"):
        lr_curve("onecycle", steps, 1)
    assert len(lr_curve("onecycle", 8, 1)) == 8  # a rise of 2 steps works


def test_warmup_never_takes_the_whole_run():
    assert warmup_steps(5, 10, 20, 1.0) == 19
    assert warmup_steps(0.5, 10, 1000, 0.1) == 5
    assert warmup_steps(1, 10, 1000, 0.0) == 0
