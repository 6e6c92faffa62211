"""Two gloo processes on CPU: a NaN on one rank stops both (all_finite), extract() keeps each sample once, the
unreadable-image count is summed over ranks, and Run stops both ranks on one rank's NaN between log steps, with one
line from rank 0 and the last good checkpoint kept."""
import dataclasses
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from common import Indexed, Run, all_finite, build_loader, skipped_images
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
    loader = build_loader(Indexed(ds), 2, world, rank, 0, 0, torch.device("cpu"), shuffle=False)
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


@dataclasses.dataclass
class Cfg:
    out: str = ""
    epochs: int = 2
    stop_after: int = 0
    log_every: int = 100   # no log step before the last: the save is where the NaN is found
    allow_change: str = ""
    seed: int = 0


def run_worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    os.environ["RANK"] = str(rank)
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = build_loader(Numbers(), 1, world, rank, 0, 0, torch.device("cpu"))
    run = Run(Cfg(out=out), __file__, model, opt, scaler, loader, 2, derived={"global_batch": world})
    run.resume()
    code = 0
    try:
        for it, batches in run.steps():
            for _, (x, _) in batches:
                loss = model(x).pow(2).mean()
                loss = loss * float("nan") if rank == 1 and it == 2 else loss   # rank 1, step 3
                opt.zero_grad()
                loss.backward()
                opt.step()
                run.add(loss=loss)
            if run.end_step(it, 0.01):
                state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict()}
                run.save(state, check=lambda: model(x).pow(2).mean())
    except SystemExit as e:
        code = e.code
    torch.save({"code": code}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_run_stops_every_rank_on_one_ranks_nan_and_keeps_the_checkpoint(tmp_path):
    out = str(tmp_path / "o")
    mp.start_processes(run_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True, start_method="spawn")
    codes = [torch.load(f"{out}.{rank}")["code"] for rank in range(2)]
    assert codes[1] == 1 and codes[0].startswith("error: training diverged: the loss was first NaN/inf at step 3")
    assert "checkpoint.pth from step 2 is kept" in codes[0]
    assert torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["step"] == 2
