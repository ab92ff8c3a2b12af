"""Run by tests/test_faults.py under torchrun (2 processes, Gloo): a non-finite loss on ONE rank.
With skip_nonfinite every rank must skip that step together (a rank that skips its backward
while the other waits in the all-reduce hangs the job); without it every rank must stop at it."""

import datetime
import gc
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from resnet_cli.engine import NonFiniteLoss, StepContext, train_one_epoch

skip = sys.argv[1] == "skip"
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
ddp = nn.parallel.DistributedDataParallel(model)
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
g = torch.Generator().manual_seed(rank)
batches = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(5)]
bad_step = 2 if rank == 1 else 4  # 1-based; rank 0's own bad step comes later
batches[bad_step - 1] = (torch.full((8, 1, 8, 8), float("nan")), batches[bad_step - 1][1])
ctx = StepContext(opt, None, nn.CrossEntropyLoss(), torch.device("cpu"), "fp32", skip_nonfinite=skip,
                  channels_last=False)
out = {"rank": rank}
try:
    run = train_one_epoch(ddp, batches, ctx, epoch=1)
    out.update(skipped=run.skipped, steps=run.steps)
except NonFiniteLoss as e:
    out.update(stopped_at=e.step)
# parameters only: DDP re-broadcasts BatchNorm buffers from rank 0 at the next forward
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
ref = flat.clone()
dist.broadcast(ref, src=0)
out["identical"] = bool(torch.equal(flat, ref))
out["finite"] = bool(torch.isfinite(flat).all())
print("RESULT " + json.dumps(out), flush=True)
# DDP goes before its process group: a Reducer that outlives the destroyed Gloo group can
# abort the process at exit ("terminate called without an active exception"; 3 runs in 8
# on a loaded 2-core machine).
del ddp, ctx, opt
gc.collect()
dist.destroy_process_group()
