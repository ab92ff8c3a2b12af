"""Training-step time of resnet18, d2l_resnet18 and variants of d2l that each change one thing.

    python benchmarks/step_variants.py                             # all variants, bf16 channels_last
    python benchmarks/step_variants.py --variants resnet18,d2l_resnet18 --profile --json out.json

On an H100, d2l_resnet18 stepped 2.5x slower than resnet18 in bf16 channels_last (issue 12).
Both have a 1-input-channel 7x7 stem here. d2l differs in three ways: a bias on every conv,
including those right before a BatchNorm (whose mean subtraction cancels it); bare biased
1x1 projections with no BatchNorm; and Xavier init, which cannot change speed. PyTorch's
cuDNN path does not fuse a conv bias: since pytorch/pytorch#31524 it adds it in a separate
kernel, and convolution_backward reduces grad_output over N, H and W in a separate `sum` for
its gradient (pytorch/pytorch#89128), once per biased conv and step, plus autocast's casts of
each bias. The variants below separate these causes. Variants marked equivalent
have the same parameters, state_dict keys and outputs (checked here, in fp32, on every run);
the others are different networks, measured only to find the cause.

The step is resnet-train's own (engine.train_one_epoch: SGD with Nesterov momentum, label
smoothing 0.1) on random batches already on the device, so data loading is excluded. Prints
ms per step (mean over --steps after --warmup), images/s and the ratio to resnet18;
--profile adds each variant's top kernels; --json writes everything to a file.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


# ---------------------------------------------------------------- rewrites of a built model

class BiasAddConv2d(nn.Conv2d):
    """The conv without its bias, then the bias as its own broadcast add (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(x, self.weight, None)
        return out + self.bias.to(out.dtype).view(1, -1, 1, 1)


def _convs(model: nn.Module, where: str) -> list[tuple[nn.Module, str, nn.Conv2d]]:
    """(parent, attribute, conv) for the biased convs in the stem, the blocks or the projections."""
    out = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if not isinstance(child, nn.Conv2d) or child.bias is None:
                continue
            name = f"{parent_name}.{attr}" if parent_name else attr
            kind = "stem" if "." not in name else "projections" if ".downsample." in name else "blocks"
            if where in ("all", kind):
                out.append((parent, attr, child))
    return out


def bias_as_add(model: nn.Module) -> None:
    for parent, attr, conv in _convs(model, "all"):
        new = BiasAddConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation, conv.groups, bias=True).to(conv.weight.device)
        new.weight, new.bias = conv.weight, conv.bias  # the very same Parameters
        setattr(parent, attr, new)


def drop_bias(where: str) -> Callable[[nn.Module], None]:
    def rewrite(model: nn.Module) -> None:
        for _, _, conv in _convs(model, where):
            conv.register_parameter("bias", None)
    return rewrite


def nchw_stem(model: nn.Module) -> None:
    """Stem (conv1 .. maxpool) in NCHW, the stages in channels_last. With one input channel a
    channels_last tensor also counts as contiguous (size-1 dims are ignored), so .contiguous()
    would keep its strides and cuDNN would still pick channels_last: clone into NCHW strides."""
    model.conv1.weight.data = model.conv1.weight.data.clone(memory_format=torch.contiguous_format)
    model.conv1.register_forward_pre_hook(lambda m, args: (args[0].clone(memory_format=torch.contiguous_format),))
    model.maxpool.register_forward_hook(lambda m, args, out: out.contiguous(memory_format=torch.channels_last))


@dataclass(frozen=True)
class Variant:
    preset: str
    what: str
    overrides: dict[str, Any] = field(default_factory=dict)
    rewrite: Callable[[nn.Module], None] | None = None
    layout: str = "channels_last"
    graphs: bool = False
    equivalent: bool = False  # same parameters and outputs as the preset


VARIANTS = {
    "resnet18": Variant("resnet18", "the default model"),
    "resnet18_graphed": Variant("resnet18", "forward+backward from CUDA graphs (cuda only)", graphs=True,
                                equivalent=True),
    "resnet18_nchw": Variant("resnet18", "NCHW layout", layout="nchw", equivalent=True),
    "resnet18_conv_bias": Variant("resnet18", "a bias on every conv, as d2l", overrides={"conv_bias": True}),
    "d2l_resnet18": Variant("d2l_resnet18", "the reference model"),
    "d2l_resnet18_graphed": Variant("d2l_resnet18", "forward+backward from CUDA graphs (cuda only)", graphs=True,
                                    equivalent=True),
    "d2l_resnet18_nchw": Variant("d2l_resnet18", "NCHW layout", layout="nchw", equivalent=True),
    "d2l_bias_as_add": Variant("d2l_resnet18", "each conv bias added by a separate op", rewrite=bias_as_add,
                               equivalent=True),
    "d2l_nchw_stem": Variant("d2l_resnet18", "stem in NCHW, stages channels_last", rewrite=nchw_stem,
                             equivalent=True),
    "d2l_no_stem_bias": Variant("d2l_resnet18", "no bias on the 7x7 stem conv", rewrite=drop_bias("stem")),
    "d2l_no_block_bias": Variant("d2l_resnet18", "no bias on the 3x3 convs before BN", rewrite=drop_bias("blocks")),
    "d2l_no_projection_bias": Variant("d2l_resnet18", "no bias on the 1x1 projections",
                                      rewrite=drop_bias("projections")),
    "d2l_no_conv_bias": Variant("d2l_resnet18", "no conv bias anywhere", overrides={"conv_bias": False}),
    "d2l_bn_projection": Variant("d2l_resnet18", "biased 1x1 projection + BN, as resnet18",
                                 overrides={"shortcut": "projection"}),
}


def build(v: Variant, device: torch.device) -> nn.Module:
    from resnet_cli import build_model

    torch.manual_seed(0)
    model = build_model(v.preset, in_channels=1, num_classes=10, **v.overrides).to(device)
    if v.layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    if v.rewrite is not None:
        v.rewrite(model)
    return model


def equivalence(v: Variant, device: torch.device, size: int) -> dict[str, Any]:
    """Same state_dict keys and shapes as the preset, and the largest output difference in true
    fp32: TF32 and autotuning off while comparing (layouts would otherwise pick different TF32
    algorithms and differ by ~1e-3 for reasons that are not the variant's)."""
    base, other = build(Variant(v.preset, ""), device), build(v, device)
    shapes = [{k: t.shape for k, t in m.state_dict().items()} for m in (base, other)]
    same_keys = shapes[0] == shapes[1]
    x = torch.randn(8, 1, size, size, device=device, generator=torch.Generator(device).manual_seed(1))
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                                         allow_tf32=False):
            diff = max((base.train()(x) - other.train()(x)).abs().max().item(),
                       (base.eval()(x) - other.eval()(x)).abs().max().item())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    conv1 = getattr(other, "conv1", None)
    return {"same_state_dict_keys": same_keys, "max_abs_diff_fp32": diff,
            "conv1_weight_stride": list(conv1.weight.stride()) if conv1 is not None else None}


# ---------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stepper(v: Variant, device: torch.device, precision: str, size: int, batch: int) -> Callable[[int], None]:
    from resnet_cli.cuda_graphs import GraphedForward
    from resnet_cli.engine import StepContext, train_one_epoch

    model = build(v, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    ctx = StepContext(opt, None, nn.CrossEntropyLoss(label_smoothing=0.1), device, precision,
                      channels_last=v.layout == "channels_last", report_at=(1,) if device.type == "cpu" else (20,),
                      forward=GraphedForward(model, batch) if v.graphs else None)
    g = torch.Generator(device).manual_seed(0)
    data = [(torch.randn(batch, 1, size, size, device=device, generator=g),
             torch.randint(0, 10, (batch,), device=device, generator=g)) for _ in range(4)]

    def run(n: int) -> None:
        train_one_epoch(model, (data[i % len(data)] for i in range(n)), ctx, epoch=1)

    return run


def time_steps(run: Callable[[int], None], device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step over `steps`, after `warmup` untimed ones."""
    run(warmup)
    _sync(device)
    t0 = time.perf_counter()
    run(steps)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def top_kernels(run: Callable[[int], None], device: torch.device, steps: int = 5, top: int = 10) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    run(2)  # the first steps make the momentum buffers: not part of a steady step
    _sync(device)
    with profile(activities=acts) as prof:
        run(steps)
        _sync(device)

    def self_time(e) -> float:  # microseconds; the attribute's name changed across torch versions
        if device.type == "cuda":
            return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))
        return float(e.self_cpu_time_total)

    def counted(e) -> bool:
        # On CUDA only the kernels themselves: the aten op that launched a kernel carries the
        # same device time, and annotations (Optimizer.step#SGD.step) span many kernels.
        if device.type == "cuda":
            return e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        return True

    events = [e for e in prof.key_averages() if counted(e) and self_time(e) > 0]
    total = sum(self_time(e) for e in events) or 1.0
    events.sort(key=self_time, reverse=True)
    return [{"name": e.key[:120], "ms_per_step": self_time(e) / 1e3 / steps, "share": self_time(e) / total,
             "calls_per_step": e.count / steps} for e in events[:top]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16", help="auto|fp32|bf16|fp16")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="resnet-train's trainer.cudnn_benchmark=false")
    p.add_argument("--profile", action="store_true", help="top kernels of resnet18 and d2l_resnet18")
    p.add_argument("--json", help="write the numbers to this file")
    a = p.parse_args()

    from resnet_cli.engine import resolve_device, resolve_precision

    device = resolve_device(a.device)
    precision = resolve_precision(a.precision, device)
    names = [n for n in a.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]}; choose from {', '.join(VARIANTS)}")
    if device.type == "cuda":  # as resnet-train sets them
        torch.backends.cudnn.benchmark = not a.no_cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out: dict[str, Any] = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads", "torch": torch.__version__, "precision": precision,
        "size": a.size, "batch": a.batch, "steps": a.steps, "warmup": a.warmup,
        "cudnn_benchmark": device.type == "cuda" and not a.no_cudnn_benchmark, "variants": {}}
    for name in names:
        v = VARIANTS[name]
        row: dict[str, Any] = {"what": v.what, "equivalent": v.equivalent}
        if v.graphs and device.type != "cuda":
            row["skipped"] = "CUDA graphs need a CUDA device"
        else:
            seconds = time_steps(stepper(v, device, precision, a.size, a.batch), device, a.warmup, a.steps)
            row.update(ms_per_step=seconds * 1e3, images_per_s=a.batch / seconds)
            if v.rewrite is not None or v.layout != "channels_last":
                row.update(equivalence(v, device, a.size))
        out["variants"][name] = row
        print(f"{name:<24} " + (f"{row['ms_per_step']:8.2f} ms/step  {row['images_per_s']:10,.0f} img/s"
                                if "ms_per_step" in row else f"skipped: {row['skipped']}"), flush=True)
    base = out["variants"].get("resnet18", {}).get("images_per_s")
    for row in out["variants"].values():
        if base and "images_per_s" in row:
            row["vs_resnet18"] = row["images_per_s"] / base
    if a.profile:
        out["profile"] = {name: top_kernels(stepper(VARIANTS[name], device, precision, a.size, a.batch), device)
                          for name in ("resnet18", "d2l_resnet18")}
    print(f"\n{'variant':<24} {'img/s':>10} {'vs resnet18':>12}  {'equivalent':>10}  what")
    for name, row in out["variants"].items():
        ratio = f"{row['vs_resnet18']:.2f}x" if "vs_resnet18" in row else "-"
        speed = f"{row['images_per_s']:,.0f}" if "images_per_s" in row else "-"
        print(f"{name:<24} {speed:>10} {ratio:>12}  {str(row['equivalent']):>10}  {row['what']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
