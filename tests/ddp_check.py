"""Run by tests/test_common.py::test_ddp_matches_single_process, under `python` or `torchrun` (gloo, CPU).
Trains a 2-block ViT classifier for 3 steps on deterministic images with the project's loader and DDP wiring,
then writes the per-step mean losses and final weights (rank 0)."""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

from common import SyntheticImages, build_loader, reduce_mean, seed_all, setup_dist
from finetune import VisionTransformer

global_batch, out = int(sys.argv[1]), sys.argv[2]
rank, world, device = setup_dist("cpu")
seed_all(0)   # same init on every rank (DDP also broadcasts rank 0's weights)
model = nn.Sequential(VisionTransformer(16, 4, 32, 2, 2), nn.Flatten(1), nn.Linear(17 * 32, 10))
ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
# SGD, not Adam: the k part of qkv.bias has an exactly-zero true gradient (softmax ignores it) and Adam would
# blow its rounding noise up to lr-sized steps that differ between 1 and 2 processes without any DDP bug.
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
loader = build_loader(SyntheticImages(64, 16, T.ToTensor()), global_batch // world, world, rank, 0, 0, device)
loader.sampler.set_epoch(3)
losses = []
for step, (x, y) in zip(range(3), loader):
    loss = F.cross_entropy(ddp(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(reduce_mean(loss))
if rank == 0:
    torch.save({"losses": losses, "weights": model.state_dict()}, out)
if world > 1:   # leave together: a gloo peer that exits first can abort the others
    torch.distributed.barrier(), torch.distributed.destroy_process_group()
