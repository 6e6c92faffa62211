"""common.py - generic helpers of the method files and finetune.py (no method in here); notes: docs/finetune.md."""
import argparse
import atexit
import dataclasses
import datetime
import hashlib
import inspect
import json
import os
import random
import re
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import datasets

try:
    import fcntl   # POSIX file locks; on Windows --out is not locked
except ImportError:
    fcntl = None

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "stl10": datasets.STL10}   # --data NAME
_held_locks = {}   # --out path -> its open run.lock, flock-ed until this process ends


def fail(msg):
    raise SystemExit(f"error: {msg}")   # one line on stderr, exit code 1


def parse_config(cls, argv=None, defaults=None):
    """Flat @dataclass -> CLI; precedence: field < `defaults` < PRESETS[--preset] < command line."""
    comments = dict(re.findall(r"^\s+(\w+)\s*:.*?#\s*(.*)$", inspect.getsource(cls), re.M))
    parser = argparse.ArgumentParser(description=cls.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    presets = getattr(cls, "PRESETS", {})
    choices = {**getattr(cls, "CHOICES", {}), "preset": ["", *presets]}   # field -> allowed values
    to_bool = lambda s: {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[s.lower()]
    for f in dataclasses.fields(cls):
        kind = dict(type=to_bool, nargs="?", const=True) if isinstance(f.default, bool) else dict(type=type(f.default))
        name = f.name.rstrip("_")   # `from_` -> --from
        parser.add_argument(*sorted({"--" + name, "--" + name.replace("_", "-")}), dest=f.name, default=f.default,
                            choices=choices.get(f.name), help=comments.get(f.name, " ").replace("%", "%%"), **kind)
    preset = presets.get(parser.parse_known_args(argv)[0].__dict__.get("preset", ""), {})
    parser.set_defaults(**{**(defaults or {}), **preset})
    return cls(**vars(parser.parse_args(argv)))


def setup_dist(device="cuda"):
    """-> (rank, world, torch.device). Plain `python`: one process. torchrun: NCCL per GPU, or gloo on CPU."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda but no GPU is visible; pass --device cpu")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local}" if device.startswith("cuda") else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())   # clean exit of every rank
    return rank, world, device


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """Every RNG a training step touches, in a form torch.load(weights_only=True) accepts."""
    npst = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (npst[0], torch.from_numpy(npst[1].astype(np.int64)), *npst[2:]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def accum_steps(global_batch, batch_size, world, accum_iter=1):
    if global_batch and global_batch % (batch_size * world):
        fail(f"--global-batch {global_batch} is not a multiple of --batch-size {batch_size} x {world} processes")
    if accum_iter < 1:
        fail(f"--accum-iter {accum_iter}: must be >= 1")
    return global_batch // (batch_size * world) if global_batch else accum_iter


def batch_warning(global_batch, paper_batch, steps_per_epoch):
    if paper_batch and not 0.5 <= global_batch / paper_batch <= 2:
        r = paper_batch / global_batch
        print0(f"warning: global batch {global_batch} vs the recipe's {paper_batch}: {steps_per_epoch} steps/epoch, so "
               f"per-step EMA and lr schedules act {r:.1f}x as often per image; --global-batch {paper_batch} matches")


def reduce_mean(t):
    t = t.detach().float().clone()
    if dist.is_initialized():
        t = t.cuda() if dist.get_backend() == "nccl" else t
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.item()


def all_finite(flag):
    """True when the 0-d bool tensor `flag` is True on every rank (one all-reduce: call it on log steps only)."""
    return reduce_mean(flag) == 1.0


def cosine_schedule(base, final, total_steps, warmup_steps=0, warmup_start=0.0, warmup_endpoint=False):
    """Per-step values: linear warmup_start -> base (endpoint included as BEiT's scheduler), then cosine -> final."""
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=warmup_endpoint)
    t = np.arange(max(total_steps - warmup_steps, 0)) / max(total_steps - warmup_steps, 1)
    return np.concatenate([warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * t))])[:total_steps].tolist()


def no_decay(name, p):
    """timm/BEiT: no weight decay on 1-D params (biases, norms, layer scale), positions, tokens, rel-pos tables."""
    names = ("pos_embed", "cls_token", "mask_token", "relative_position_bias_table")
    return p.ndim <= 1 or name.split(".")[-1] in names


def param_groups(model, weight_decay, skip_decay=no_decay):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if not skip_decay(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if skip_decay(n, p)], "weight_decay": 0.0}]


def prepare_out(out, cfg, script):
    """Rank 0: create --out, lock it for this process's life, save config.json and a copy of the script."""
    if int(os.environ.get("RANK", 0)) or os.path.realpath(out) in _held_locks:
        return
    os.makedirs(out, exist_ok=True)
    lock = open(os.path.join(out, "run.lock"), "a")
    try:   # the kernel drops the lock when the process ends, however it ends: no stale lock
        if fcntl:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"--out {out} is in use by another running process; pass another --out")
    except OSError as e:   # a file system without flock (e.g. Lustre mounted without it): run unlocked
        print0(f"warning: cannot lock --out {out} ({e.strerror}): make sure no other run writes there")
    _held_locks[os.path.realpath(out)] = lock
    shutil.copy(script, os.path.join(out, os.path.basename(script)))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)


def save_checkpoint(state, path):
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)   # atomic: a crash never leaves a broken checkpoint


def load_checkpoint(path):
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}")


def file_hash(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:12]


def run_settings(cfg, script, keys=("arch", "epochs"), **extra):
    return {"script": os.path.basename(script), **{k: getattr(cfg, k) for k in keys}, **extra}


def resume(out, raw_model, opt, scaler, rank=0, seed=0, settings=None):
    """Resume out/checkpoint.pth if present -> global step done; other `settings` (run_settings) stop the run."""
    path = os.path.join(out, "checkpoint.pth")
    if not os.path.isfile(path):
        return 0
    ck = load_checkpoint(path)
    old = ck.get("settings", {})
    diff = [f"{k}: {old[k]} -> {v}" for k, v in (settings or {}).items() if old.get(k, v) != v]
    if diff:
        fail(f"--out {out} holds a different run ({', '.join(diff)}); pass a new --out, or the old values to resume")
    try:
        raw_model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        fail(f"--out {out} holds another model's checkpoint ({str(e).splitlines()[0][:100]}); pass a new --out")
    scaler.load_state_dict(ck["scaler"])
    s = ck["rng"]   # rank 0's RNG streams
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    if rank:
        seed_all(seed + 1000 * ck["step"] + rank)   # other ranks: fresh, distinct streams
    print0(f"resumed from {path} at step {ck['step']}")
    return ck["step"]


def log_json(out, record):
    if int(os.environ.get("RANK", 0)) == 0:
        with open(os.path.join(out, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def load_image(path):
    """Any PIL-readable image as RGB: grayscale, CMYK, palette, alpha and 16-bit (rescaled, not clipped) too."""
    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            a = np.asarray(img, dtype=np.float32)
            img = Image.fromarray(np.uint8(255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-6)))
        return img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA", "LA") else img.convert("RGB")


class ImageFolder(datasets.ImageFolder):
    """torchvision's class folders via load_image; an unreadable file is reported, counted and replaced."""

    def __init__(self, root, transform):
        try:   # torchvision's errors: no such directory, no class folder, a class folder without images
            super().__init__(root, transform, loader=load_image)
        except FileNotFoundError as e:
            fail(f"data directory {root}: {e}")
        self.skipped = torch.zeros(1, dtype=torch.int64).share_memory_()   # loader workers add to it too

    def __getitem__(self, idx):
        for k in range(len(self.samples)):
            try:
                return super().__getitem__((idx + k) % len(self.samples))
            except Exception as e:   # truncated, corrupt, not an image: skip and count, never crash mid-epoch
                self.skipped += 1
                path = self.samples[(idx + k) % len(self.samples)][0]
                print(f"warning: skipping unreadable image {path}: {type(e).__name__}: {e}", file=sys.stderr)
        raise RuntimeError(f"no readable image in {len(self.samples)} files")


def skipped_images(dataset):
    """Unreadable images met so far, summed over loader workers (shared counter) and ranks; 0 for a named set."""
    dataset = getattr(dataset, "dataset", dataset)   # a Subset: look inside
    skipped = getattr(dataset, "skipped", torch.zeros(1))   # named sets: arrays in memory are never unreadable
    return round(reduce_mean(skipped[0]) * (dist.get_world_size() if dist.is_initialized() else 1))


class SyntheticImages(datasets.FakeData):
    """Deterministic random images (smoke tests, speed runs): sample i is always the same blobs + noise picture."""

    def __init__(self, n, img_size, transform, num_classes=10):
        super().__init__(n, (3, img_size, img_size), num_classes, transform)
        self.classes, self.skipped = [str(i) for i in range(num_classes)], torch.zeros(1, dtype=torch.int64)

    def __getitem__(self, idx):
        g, s = torch.Generator().manual_seed(idx), self.image_size[-1]
        low = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(s, s), mode="bilinear")[0]
        img = (0.8 * low + 0.2 * torch.rand(3, s, s, generator=g)).permute(1, 2, 0).numpy()
        return self.transform(Image.fromarray((img * 255).astype(np.uint8))), idx % self.num_classes


def named_dataset(name, split, transform):
    """torchvision's CIFAR-10/100 (train, val = test) or STL-10 (pretrain = its 100k unlabeled images, train, val =
    test): PIL RGB images, int labels. Rank 0 downloads what is missing into the cache first, then the others load."""
    root = os.environ.get("MIMREF_DATASETS") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mimref-datasets")
    cls, rank, ds, err = DATASETS[name], int(os.environ.get("RANK", 0)), None, ""
    stl = {"pretrain": "unlabeled", "val": "test"}.get(split, split)   # STL-10 pre-trains on its unlabeled images
    which = {"split": stl} if name == "stl10" else {"train": split != "val"}
    if not rank:
        try:   # torchvision checks every file's md5 sum first, and downloads only when one is missing or wrong
            ds = cls(root, **which, transform=transform, download=True)
        except (RuntimeError, OSError) as e:   # no network (URLError), a partial archive or a bad md5 sum
            err = (f"--data {name}: cannot download or verify {cls.base_folder} in {root} ({' '.join(str(e).split())}"
                   f"); delete it and {cls.filename} there to download again, or save {cls.url} there by hand")
    if not all_finite(torch.tensor(not err)):   # one all-reduce: the other ranks wait here for rank 0
        raise SystemExit(f"error: {err}" if err else 1)   # one line, from rank 0; the other ranks leave quietly
    try:
        return ds if ds is not None else cls(root, **which, transform=transform)
    except RuntimeError:   # torchvision's "not found or corrupted": rank 0 filled another machine's cache
        fail(f"--data {name}: rank {rank} finds no verified copy in {root}; set MIMREF_DATASETS to a folder every node "
             f"shares (rank 0 downloads), or copy rank 0's there")


def build_dataset(data, split, transform, img_size=224, synthetic_size=512):
    """split pretrain | train | val of `synthetic`, a DATASETS name, ROOT with ROOT/train and ROOT/val (or validate),
    or a flat class-folder ROOT (-> None for val). pretrain = train, except STL-10's unlabeled images."""
    if data == "synthetic":
        return SyntheticImages(synthetic_size if split != "val" else synthetic_size // 4, img_size, transform)
    if data in DATASETS:
        return named_dataset(data, split, transform)
    if not os.path.isdir(data):
        fail(f"--data {data}: directory does not exist (names: synthetic, {', '.join(DATASETS)})")
    for name in ["train"] if split != "val" else ["val", "validate"]:
        if os.path.isdir(os.path.join(data, name)):
            return ImageFolder(os.path.join(data, name), transform)
    has_split_dirs = any(os.path.isdir(os.path.join(data, n)) for n in ("train", "val", "validate"))
    return None if split == "val" or has_split_dirs else ImageFolder(data, transform)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that skips the first `start_step` batches of `batch_size` (a mid-epoch resume)."""
    batch_size = start_step = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_step * self.batch_size:])


def build_loader(dataset, batch_size, world, rank, seed, workers, device, shuffle=True):
    """Rank shard of the dataset; shuffle: seeded per epoch (sampler.set_epoch), whole batches, resumable."""
    if len(dataset) < batch_size * world and shuffle:
        fail(f"dataset has {len(dataset)} images, fewer than one global batch ({batch_size} x {world} GPUs)")
    sampler = ResumableSampler(dataset, world, rank, shuffle=shuffle, seed=seed, drop_last=shuffle)
    sampler.batch_size = batch_size
    return DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                      drop_last=shuffle, persistent_workers=workers > 0,   # own generator: global RNG untouched
                      generator=torch.Generator().manual_seed(seed + rank))


class Progress:
    """Prints `ep e step s/n | loss .. | lr | img/s | eta` every `every` steps, and with `out` appends the same
    values to out/steps.jsonl (pretext metrics against steps); only log steps read device values."""

    def __init__(self, total_steps, global_batch, every=50, out=None):
        self.total, self.batch, self.every, self.last, self.t0 = total_steps, global_batch, every, None, time.time()
        self.out = out

    def step(self, it, epoch, logs, lr):
        """it: global step just done; logs: 0-d tensors (averaged over ranks here) -> dict of floats or None."""
        self.last = self.last or (it, self.t0)   # first call, maybe after a resume
        if (it + 1) % self.every and it + 1 != self.total:
            return None
        vals = {k: reduce_mean(v) for k, v in logs.items()}
        rate = (it + 1 - self.last[0]) * self.batch / max(time.time() - self.last[1], 1e-9)   # since the last log
        self.last = (it + 1, time.time())
        eta = datetime.timedelta(seconds=int((self.total - it - 1) * self.batch / max(rate, 1e-9)))
        print0(f"ep {epoch} step {it + 1}/{self.total} | " + " ".join(f"{k} {v:.4f}" for k, v in vals.items())
               + f" | lr {lr:.2e} | {rate:.1f} img/s | eta {eta}")
        if self.out and int(os.environ.get("RANK", 0)) == 0:
            with open(os.path.join(self.out, "steps.jsonl"), "a") as f:
                f.write(json.dumps({"step": it + 1, "epoch": epoch, **vals, "lr": lr, "img_s": rate}) + "\n")
        return vals
