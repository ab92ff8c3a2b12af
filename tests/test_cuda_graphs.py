"""The CUDA fast path's choices and fallbacks, where they can be checked without a GPU:
when graphs are used, that a failed capture trains eagerly, that capture's warm-up leaves no
trace, and that prefetching is the plain iterator off CUDA or when turned off.
tests/test_gpu.py runs the same paths on a GPU."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from resnet_cli import build_model
from resnet_cli.config import ConfigError
from resnet_cli.cuda_graphs import GraphedForward, decide, preserved, recovers_from_failed_capture
from resnet_cli.data.prefetch import prefetched
from resnet_cli.engine import StepContext, train_one_epoch

from conftest import run_cli

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
TINY = {"block": "basic", "layers": [1, 1], "widths": [8, 16], "stem": "cifar"}


@pytest.mark.parametrize("setting,device,ddp,compiled,on,note", [
    ("auto", CUDA, False, False, True, "on"),
    ("true", CUDA, False, False, True, "on"),
    ("True", CUDA, False, False, True, "on"),  # a command-line true
    ("auto", CPU, False, False, False, ""),
    ("false", CPU, False, False, False, ""),
    ("false", CUDA, False, False, False, "trainer.cuda_graphs=false"),
    ("auto", CUDA, True, False, False, "DDP"),
    ("auto", CUDA, False, True, False, "trainer.compile=true"),
])
def test_when_graphs_are_used(setting, device, ddp, compiled, on, note):
    used, why = decide(setting, device, ddp, compiled)
    assert used is on and note in why


@pytest.mark.parametrize("torch_has_thread_local", [True, False])
def test_the_loader_pipeline_gets_graphs_only_where_capture_can_ignore_its_thread(monkeypatch, torch_has_thread_local):
    # torch 2.11's make_graphed_callables captures in global mode, which the DataLoader's
    # pin-memory thread breaks with an error the DataLoader re-raises (no eager fallback).
    import resnet_cli.cuda_graphs as cg

    monkeypatch.setattr(cg, "thread_local_capture", lambda: torch_has_thread_local)
    assert cg._capture_mode() == ({"capture_error_mode": "thread_local"} if torch_has_thread_local else {})
    assert decide("auto", CUDA, False, False, loader=False) == (True, "on: forward+backward captured at the first "
                                                                      "full batch")
    used, why = decide("auto", CUDA, False, False, loader=True)
    assert used is torch_has_thread_local and (torch_has_thread_local or "pin-memory thread" in why)
    if torch_has_thread_local:
        assert decide("true", CUDA, False, False, loader=True)[0] is True
    else:
        with pytest.raises(ConfigError, match=r"^trainer.cuda_graphs=true: torch .* data.pipeline=memory"):
            decide("true", CUDA, False, False, loader=True)


@pytest.mark.parametrize("setting,device,compiled,needle", [
    ("true", CPU, False, "need a CUDA device, this run is on cpu"),
    ("true", torch.device("mps"), False, "this run is on mps"),
    ("true", CUDA, True, "cannot be combined with trainer.compile=true"),
    ("sometimes", CUDA, False, "choose from auto, true, false"),
])
def test_impossible_settings_are_config_errors(setting, device, compiled, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        decide(setting, device, False, compiled)
    assert str(e.value).startswith(f"trainer.cuda_graphs={setting}: ") and "\n" not in str(e.value)


def test_graphs_asked_for_under_ddp_are_refused_like_under_compile():
    with pytest.raises(ConfigError, match=r"^trainer.cuda_graphs=true: not available under DDP"):
        decide("true", CUDA, True, False)


@pytest.mark.parametrize("value,needle", [("true", "need a CUDA device"), ("maybe", "choose from auto, true, false")])
def test_cli_refuses_graphs_it_cannot_give(tmp_path, value, needle):
    proc = run_cli("resnet-train", "data=synthetic", "trainer.device=cpu", f"trainer.cuda_graphs={value}",
                   cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: trainer.cuda_graphs={value}: ")
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_capture_warmup_leaves_no_trace():
    torch.manual_seed(0)
    model = build_model(TINY, in_channels=1, num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected_draw = torch.rand(3, generator=torch.Generator().set_state(torch.get_rng_state()))
    with preserved(model, CPU):
        for _ in range(3):  # what make_graphed_callables' warm-up does to a model in training mode
            model(torch.randn(4, 1, 12, 12)).sum().backward()
        moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        assert {"bn1.num_batches_tracked", "bn1.running_mean"} <= moved
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.rand(3), expected_draw)


def _batches(n: int, batch: int, last: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    sizes = [batch] * n + [last]
    return [(torch.randn(b, 1, 12, 12, generator=g), torch.randint(0, 10, (b,), generator=g)) for b in sizes]


def _train(forward, batches) -> tuple[nn.Module, list[float]]:
    torch.manual_seed(0)
    model = build_model(TINY, in_channels=1, num_classes=10).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctx = StepContext(opt, None, nn.CrossEntropyLoss(label_smoothing=0.1), CPU, "fp32", grad_clip=1.0)
    if forward is not None:
        ctx.forward = forward(model)
    losses = []
    train_one_epoch(model, batches, ctx, epoch=1, on_step=lambda run: losses.append(run.loss_sum))
    return model, losses


def test_a_failed_capture_trains_eagerly_and_says_so_once(caplog):
    batches = _batches(3, 8, 4)  # three full batches and a ragged one
    eager_model, eager_losses = _train(None, batches)
    graphed = {}

    def make(model):
        graphed["f"] = GraphedForward(model, batch_size=8)
        return graphed["f"]

    with caplog.at_level(logging.INFO, logger="resnet_cli"):
        model, losses = _train(make, batches)
    assert graphed["f"].graphed is None and "not a CUDA device" in graphed["f"].failure
    failed = [r for r in caplog.records if "capture failed" in r.getMessage()]
    assert len(failed) == 1 and "training without them" in failed[0].getMessage()
    assert losses == eager_losses
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), eager_model.state_dict().values()))


def test_only_torch_2_12_on_trains_on_after_a_failed_capture():
    """Older torch leaves its allocator mid-capture after a failed one (pytorch PR 180395)."""
    assert not recovers_from_failed_capture("2.11.0+cu130")
    assert not recovers_from_failed_capture("2.12.0a0+git1234abc")  # a nightly before the release
    assert recovers_from_failed_capture("2.12.0")
    assert recovers_from_failed_capture("2.14.1+cpu")


@pytest.mark.parametrize("device,enabled", [(CPU, True), (CUDA, False)])  # off CUDA, or trainer.prefetch=false
def test_prefetch_off_is_the_plain_iterator(device, enabled):
    batches = _batches(2, 4, 3)
    source = iter(batches)
    assert prefetched(source, device, enabled) is source  # no side stream is ever made
    got = list(prefetched(batches, device, enabled))
    assert len(got) == 3 and all(a is c and b is d for (a, b), (c, d) in zip(got, batches))


def test_under_torchrun_a_fixed_gpu_index_is_refused(monkeypatch):
    # distributed.init() sets each rank's GPU from LOCAL_RANK: cuda:1 on every rank would put
    # them all on one GPU, which NCCL refuses ("Duplicate GPU detected").
    from resnet_cli.engine import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # one process: any GPU it names
    with pytest.raises(ConfigError, match=r"^trainer.device=cuda:1: under torchrun each process takes the GPU"):
        resolve_device("cuda:1", local_rank=0)
