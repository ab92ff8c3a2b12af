"""Training throughput: the d2l reference loop against resnet-cli's own path, in one process,
on one device, for the same model, input size and batch; once with the reference's model
(d2l_resnet18) and once with resnet-train's default (resnet18).

    python benchmarks/throughput.py                       # Fashion-MNIST if found, else synthetic
    python benchmarks/throughput.py --data-root ../shared/data --steps 8 --cli
    python benchmarks/throughput.py --model resnet18      # one model only

Reference loop (seed-reference.md): torchvision FashionMNIST -> per-sample PIL Resize(96) +
ToTensor -> DataLoader(batch 256, shuffle, 4 workers) -> fp32 NCHW model, plain SGD.
resnet-cli path: the dataset decoded once into a uint8 tensor on the device, per-batch resize
(+ crop/flip/normalize) there, `trainer.precision=auto` and channels_last, the same
train_one_epoch that resnet-train runs (on CUDA with its CUDA graphs and side-stream
prefetch, as `trainer.cuda_graphs=auto` gives). Both timings include data loading; the first
`--warmup` steps of each are not timed. Prints images/s, the ratio, training FLOPs per image
(3 x forward, forward = 2 x MACs) and the FLOP/s achieved, for the first model under plain
keys and for each further one under keys ending in _<model> (speedup_resnet18, ...); --json
writes them to a file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run, warmup: int, n: int, batch: int, device: torch.device) -> float:
    """Images/s over n steps after `warmup` untimed ones; run(k) trains k steps."""
    run(warmup)
    _sync(device)
    t0 = time.perf_counter()
    run(n)
    _sync(device)
    return n * batch / (time.perf_counter() - t0)


def _dataset(root: str | None, transform):
    """Fashion-MNIST through torchvision when available; else the same shapes, synthetic."""
    from torchvision import datasets

    if root:
        from resnet_cli.data.sources import open_torchvision

        train, _ = open_torchvision("fashion_mnist", root, download=False)
        train.transform = transform
        return train
    return datasets.FakeData(size=60000, image_size=(1, 28, 28), num_classes=10, transform=transform)


def reference_steps(model_name: str, size: int, batch: int, device: torch.device, root: str | None,
                    workers: int):
    from torchvision import transforms

    from resnet_cli import build_model

    tf = transforms.Compose([transforms.Resize(size), transforms.ToTensor()])
    loader = torch.utils.data.DataLoader(_dataset(root, tf), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True)
    model = build_model(model_name, in_channels=1, num_classes=10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def epochs():  # a new pass per epoch, as the reference loop does (itertools.cycle would replay
        while True:  # the first pass from memory, skipping the loading it is here to measure)
            yield from loader

    batches = epochs()

    def run(n: int) -> None:
        for x, y in itertools.islice(batches, n):
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    return run


def ours_steps(model_name: str, size: int, batch: int, device: torch.device, root: str | None, precision: str):
    from resnet_cli import build_model
    from resnet_cli.cuda_graphs import GraphedForward, decide
    from resnet_cli.data import load_data
    from resnet_cli.data.prefetch import prefetched
    from resnet_cli.engine import StepContext, resolve_precision, train_one_epoch

    cfg = {"name": "fashion_mnist" if root else "synthetic", "root": root or "", "download": False,
           "resize": size, "augment": "standard", "hflip": True, "normalize": True, "mean": [0.286], "std": [0.353],
           "image_size": 28, "channels": 1, "num_classes": 10, "train_size": 60000, "test_size": 16}
    data = load_data(cfg, batch, 1024, 0, device)
    precision = resolve_precision(precision, device)
    model = build_model(model_name, in_channels=1, num_classes=10).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    graphs, _ = decide("auto", device, distributed=False, compiled=False)
    ctx = StepContext(opt, None, nn.CrossEntropyLoss(label_smoothing=0.1), device, precision,
                      report_at=(1,) if device.type == "cpu" else (20,),
                      forward=GraphedForward(model, batch) if graphs else None)

    def endless():
        epoch = 0
        while True:
            yield from data.train.batches(epoch)
            epoch += 1

    source = prefetched(endless(), device)

    def run(n: int) -> None:
        train_one_epoch(model, itertools.islice(source, n), ctx, epoch=1)

    return run


def train_flops_per_image(model_name: str, size: int) -> float:
    from resnet_cli import build_model
    from resnet_cli.summary import summarize

    with torch.device("meta"):
        model = build_model(model_name, in_channels=1, num_classes=10)
    macs = summarize(model, (1, 1, size, size), depth=1)["total_macs"]
    return 6.0 * macs  # forward 2*MACs, backward about twice the forward


def cli_run(model_name: str, size: int, batch: int, steps: int, root: str | None) -> tuple[float, dict]:
    """What `resnet-train` itself logs as train_images_per_s for a short run (includes warm-up),
    and its results.json time_s: where the whole process's time went."""
    with tempfile.TemporaryDirectory() as tmp:
        data = [f"data.root={root}"] if root else ["data=synthetic", "data.image_size=28", f"data.resize={size}"]
        cmd = [str(Path(sys.executable).parent / "resnet-train"), f"model={model_name}", *data,
               f"data.resize={size}", f"data.limit_train={steps * batch}", "data.limit_test=256",
               f"batch_size={batch}", "epochs=1", "trainer.progress=none", f"hydra.run.dir={tmp}/run"]
        if not root:
            cmd.append(f"data.train_size={steps * batch}")
        subprocess.run(cmd, check=True, capture_output=True)
        row = json.loads((Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()[0])
        results = json.loads((Path(tmp) / "run" / "results.json").read_text())
        return row["train_images_per_s"], results.get("time_s", {})


def _cuda_settings(resnet_train: bool) -> None:
    """PyTorch's defaults for the reference loop; what resnet-train sets for its own."""
    torch.backends.cudnn.benchmark = resnet_train  # trainer.cudnn_benchmark=true
    torch.backends.cuda.matmul.allow_tf32 = resnet_train
    torch.backends.cudnn.allow_tf32 = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="d2l_resnet18,resnet18",
                   help="presets, comma-separated; each runs in both loops (default: the reference's, then ours)")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps per loop")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="resnet-cli path precision (auto|fp32|bf16|fp16)")
    p.add_argument("--workers", type=int, default=4, help="reference DataLoader workers (the reference used 4)")
    p.add_argument("--data-root", default=os.environ.get("RESNET_CLI_DATA"),
                   help="folder with FashionMNIST/raw (default $RESNET_CLI_DATA; synthetic if absent)")
    p.add_argument("--cli", action="store_true", help="also run resnet-train and report its logged images/s")
    p.add_argument("--json", help="write the numbers to this file")
    a = p.parse_args()

    from resnet_cli.engine import resolve_device, resolve_precision

    device = resolve_device(a.device)
    root = a.data_root if a.data_root and Path(a.data_root, "FashionMNIST").is_dir() else None
    models = [m for m in a.model.split(",") if m]
    out = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads", "model": models[0], "size": a.size, "batch": a.batch,
        "data": "fashion_mnist" if root else "synthetic", "precision": resolve_precision(a.precision, device),
    }
    for i, model in enumerate(models):
        torch.manual_seed(0)
        _cuda_settings(resnet_train=False)
        ref = _timed(reference_steps(model, a.size, a.batch, device, root, a.workers), a.warmup, a.steps, a.batch,
                     device)
        _cuda_settings(resnet_train=True)
        ours = _timed(ours_steps(model, a.size, a.batch, device, root, a.precision), a.warmup, a.steps, a.batch,
                      device)
        flops = train_flops_per_image(model, a.size)
        suffix = f"_{model}" if i else ""
        out.update({
            f"reference_images_per_s{suffix}": ref, f"resnet_cli_images_per_s{suffix}": ours,
            f"speedup{suffix}": ours / ref, f"train_gflops_per_image{suffix}": flops / 1e9,
            f"reference_tflops{suffix}": ref * flops / 1e12, f"resnet_cli_tflops{suffix}": ours * flops / 1e12,
        })
    out["timed_steps"] = a.steps
    if a.cli:
        ips, time_s = cli_run(models[0], a.size, a.batch, a.steps + a.warmup, root)
        out["resnet_train_logged_images_per_s"] = ips
        out.update({f"resnet_train_time_s_{k}": v for k, v in time_s.items()})
    width = max(len(k) for k in out)
    for k, v in out.items():
        print(f"{k:<{width}}  {v:,.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
