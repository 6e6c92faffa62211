"""Two gloo processes on CPU: a NaN on one rank stops both (all_finite), extract() keeps each sample once, and the
unreadable-image count is summed over ranks."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from common import all_finite, build_loader, skipped_images
from finetune import extract


class Numbers(Dataset):   # sample i is the vector [i, i], label i % 3
    classes = ["a", "b", "c"]

    def __init__(self):
        self.skipped = torch.zeros(1, dtype=torch.int64)

    def __len__(self):
        return 5   # odd: DistributedSampler pads one rank with a repeat

    def __getitem__(self, i):
        return torch.tensor([float(i), float(i)]), i % 3


def worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    os.environ["RANK"] = str(rank)
    steps = []
    for step in range(10):   # the training loop's stop rule: rank 1 hits a NaN at step 3
        loss = torch.tensor(float("nan") if rank == 1 and step == 3 else 1.0)
        if not all_finite(torch.isfinite(loss)):
            break
        steps.append(step)
    ds = Numbers()
    ds.skipped += rank + 1
    loader = build_loader(ds, 2, world, rank, 0, 0, torch.device("cpu"), shuffle=False)
    feats, labels = extract(lambda x: {"f": x}, loader, torch.device("cpu"), torch.no_grad)
    torch.save({"steps": steps, "f": feats["f"], "y": labels, "skipped": skipped_images(ds)}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_nan_stop_dedup_and_skip_count(tmp_path):
    out = str(tmp_path / "r")
    mp.start_processes(worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        r = torch.load(f"{out}.{rank}")
        assert r["steps"] == [0, 1, 2]   # both ranks stop at the same step
        assert torch.equal(r["f"][:, 0], torch.arange(5.0)) and r["y"].tolist() == [0, 1, 2, 0, 1]
        assert r["skipped"] == 3
