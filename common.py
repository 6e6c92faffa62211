"""common.py - generic helpers of the method files and finetune.py (no paper's method is in here): config parsing,
distributed setup, seeding, schedules, checkpoints with safe auto-resume, an image folder that survives bad files."""
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
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets import DatasetFolder

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def fail(msg):
    """One clear line on stderr and exit code 1: for every bad input, before work is lost."""
    raise SystemExit(f"error: {msg}")


def parse_config(cls, argv=None, defaults=None):
    """Flat @dataclass -> CLI (`--mask-ratio` or `--mask_ratio`; --help shows each field's comment; CHOICES =
    {"field": (...)} restricts values). Precedence: field < `defaults` < PRESETS[--preset] < command line."""
    comments = dict(re.findall(r"^\s+(\w+)\s*:.*?#\s*(.*)$", inspect.getsource(cls), re.M))
    parser = argparse.ArgumentParser(description=cls.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    to_bool = lambda s: {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[s.lower()]
    for f in dataclasses.fields(cls):
        kind = dict(type=to_bool, nargs="?", const=True) if isinstance(f.default, bool) else dict(type=type(f.default))
        name = f.name.rstrip("_")   # `from_` -> --from
        parser.add_argument(*sorted({"--" + name, "--" + name.replace("_", "-")}), dest=f.name, default=f.default,
                            choices=getattr(cls, "CHOICES", {}).get(f.name),
                            help=comments.get(f.name, " ").replace("%", "%%"), **kind)
    presets = getattr(cls, "PRESETS", {})
    preset = parser.parse_known_args(argv)[0].__dict__.get("preset", "")
    if preset and preset not in presets:
        fail(f"--preset {preset}: unknown; choose from {', '.join(presets)}")
    parser.set_defaults(**{**(defaults or {}), **presets.get(preset, {})})
    return cls(**vars(parser.parse_args(argv)))


def setup_dist(device="cuda"):
    """-> (rank, world, torch.device). Plain `python`: one process. torchrun: NCCL per GPU, or gloo on CPU."""
    if "RANK" not in os.environ:
        if device.startswith("cuda") and not torch.cuda.is_available():
            fail("--device cuda but no GPU is visible; pass --device cpu")
        return 0, 1, torch.device(device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = device.startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return rank, world, torch.device(f"cuda:{local}" if use_cuda else "cpu")


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def seed_all(seed):
    random.seed(seed), np.random.seed(seed % 2**32), torch.manual_seed(seed)


def rng_state():
    """Every RNG a training step touches, in a form torch.load(weights_only=True) accepts."""
    npst = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (npst[0], torch.from_numpy(npst[1].astype(np.int64)), *npst[2:]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["torch"]), random.setstate(s["python"])
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def accum_steps(global_batch, batch_size, world, accum_iter=1):
    """Micro-batches per optimizer step: global_batch / (batch_size x world) if set, else accum_iter."""
    if global_batch and global_batch % (batch_size * world):
        fail(f"--global-batch {global_batch} is not a multiple of --batch-size {batch_size} x {world} processes")
    if accum_iter < 1:
        fail(f"--accum-iter {accum_iter}: must be >= 1")
    return global_batch // (batch_size * world) if global_batch else accum_iter


def batch_warning(global_batch, paper_batch, steps_per_epoch):
    """Warn when the global batch is > 2x away from the recipe's: per-step schedules (EMA, lr) then change."""
    if paper_batch and not 0.5 <= global_batch / paper_batch <= 2:
        r = paper_batch / global_batch
        print0(f"warning: global batch {global_batch} vs the recipe's {paper_batch}: {r:.1f}x as many optimizer steps "
               f"per epoch ({steps_per_epoch}), so per-step EMA momentum and the lr schedule act {r:.1f}x as often per "
               f"image; use --global-batch {paper_batch} (accumulation) to match")


def all_finite(flag):
    """True when the 0-d bool tensor `flag` is True on every rank (one all-reduce: call it on log steps only)."""
    t = flag.detach().to(torch.int32).clone()
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def cosine_schedule(base, final, total_steps, warmup_steps=0, warmup_start=0.0, warmup_endpoint=False):
    """Per-step values (DINO-style array of floats): linear warmup_start -> base, then cosine -> final.
    warmup_endpoint=True: the last warmup step is already at base (BEiT's and ConMIM's utils.cosine_scheduler)."""
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=warmup_endpoint)
    t = np.arange(max(total_steps - warmup_steps, 0)) / max(total_steps - warmup_steps, 1)
    return np.concatenate([warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * t))])[:total_steps].tolist()


def no_decay(name, p):
    """timm/BEiT: no weight decay on 1-D params (biases, norms, layer scale), positions, tokens, rel-pos tables."""
    names = ("pos_embed", "cls_token", "mask_token", "relative_position_bias_table")
    return p.ndim <= 1 or name.split(".")[-1] in names


def param_groups(model, weight_decay, skip_decay=no_decay):
    """Two AdamW groups; `skip_decay(name, param) -> bool` picks the no-decay ones (a method may pass its own rule)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if not skip_decay(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if skip_decay(n, p)], "weight_decay": 0.0}]


def prepare_out(out, cfg, script):
    """Rank 0: create --out, lock it (out/run.lock = "host pid" while this run lives; a dead pid's lock is taken over,
    Linux), keep config.json and the script's source next to the checkpoints."""
    lock, me = os.path.join(out, "run.lock"), f"{socket.gethostname()} {os.getpid()}"
    if int(os.environ.get("RANK", 0)) or os.path.exists(lock) and open(lock).read() == me:
        return
    os.makedirs(out, exist_ok=True)
    if os.path.exists(lock):
        host, _, pid = open(lock).read().partition(" ")
        if host != socket.gethostname() or os.path.exists(f"/proc/{pid or 'none'}"):
            fail(f"--out {out} is in use by pid {pid} on {host}; pass another --out, or delete {lock} if it is gone")
        os.remove(lock)   # stale: its process is dead
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        fail(f"--out {out} was locked by another run just now; pass another --out")
    os.write(fd, me.encode()), os.close(fd)
    atexit.register(lambda: os.path.exists(lock) and open(lock).read() == me and os.remove(lock))
    shutil.copy(script, os.path.join(out, os.path.basename(script)))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)


def save_checkpoint(state, path):
    """Atomic and durable: write a temp file, fsync it, rename; a crash never leaves a broken checkpoint."""
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        fail(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}")


def file_hash(path):
    """First 12 hex digits of the file's SHA-256: names a pre-trained checkpoint in the run settings."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:12]


def run_settings(cfg, script, keys=("arch", "epochs"), **extra):
    """Values that define a run (checkpoint "settings", checked by resume); `extra` adds derived ones."""
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
        raw_model.load_state_dict(ck["model"]), opt.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        fail(f"--out {out} holds another model's checkpoint ({str(e).splitlines()[0][:100]}); pass a new --out")
    scaler.load_state_dict(ck["scaler"]), set_rng_state(ck["rng"])   # rank 0's RNG streams
    if rank:
        seed_all(seed + 1000 * ck["step"] + rank)   # other ranks: fresh, distinct streams
    print0(f"resumed from {path} at step {ck['step']}")
    return ck["step"]


def log_json(out, record):
    if int(os.environ.get("RANK", 0)) == 0:
        with open(os.path.join(out, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def load_image(path):
    """Any PIL-readable image as RGB: grayscale, CMYK, palette, alpha (composited on black) and 16-bit too."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):   # 16-bit / float: rescale to 8 bits, don't clip
            a = np.asarray(img, dtype=np.float32)
            img = Image.fromarray(np.uint8(255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-6)))
        return img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA", "LA") else img.convert("RGB")


class ImageFolder(DatasetFolder):
    """torchvision's class folders via load_image; an unreadable file is reported, counted and replaced."""

    def __init__(self, root, transform):
        if not os.path.isdir(root) or not any(d.is_dir() for d in os.scandir(root)):
            fail(f"data directory {root} " + ("has no class folders (expected <root>/<class>/<image>)"
                                              if os.path.isdir(root) else "does not exist"))
        super().__init__(root, load_image, IMG_EXTENSIONS, transform, allow_empty=True)
        if not self.samples:
            fail(f"data directory {root} has class folders but no images ({', '.join(IMG_EXTENSIONS)})")
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
    """Unreadable images met so far, summed over loader workers (shared counter) and ranks (all-reduce)."""
    while not hasattr(dataset, "skipped"):   # a Subset: look inside
        dataset = dataset.dataset
    t = dataset.skipped.clone().to("cuda" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t) if dist.is_initialized() else None
    return int(t.item())


class SyntheticImages(Dataset):
    """Deterministic random images (smoke tests, speed runs): sample i is always the same picture."""

    def __init__(self, n, img_size, transform, num_classes=10):
        self.n, self.size, self.transform, self.classes = n, img_size, transform, [str(i) for i in range(num_classes)]
        self.skipped = torch.zeros(1, dtype=torch.int64)

    def __len__(self):
        return self.n

    def __getitem__(self, idx):
        g = torch.Generator().manual_seed(idx)
        low = torch.rand(1, 3, 4, 4, generator=g)   # smooth blobs + noise, so crops and blur do something
        low = torch.nn.functional.interpolate(low, size=(self.size, self.size), mode="bilinear")[0]
        img = (0.8 * low + 0.2 * torch.rand(3, self.size, self.size, generator=g)).permute(1, 2, 0).numpy()
        return self.transform(Image.fromarray((img * 255).astype(np.uint8))), idx % len(self.classes)


def build_dataset(data, split, transform, img_size=224, synthetic_size=512):
    """`synthetic`, ROOT with ROOT/train and ROOT/val (or validate), or a flat class-folder ROOT (-> None for val)."""
    if data == "synthetic":
        return SyntheticImages(synthetic_size if split == "train" else synthetic_size // 4, img_size, transform)
    if not os.path.isdir(data):
        fail(f"--data {data}: directory does not exist")
    for name in ([split] if split == "train" else [split, "validate"]):
        if os.path.isdir(os.path.join(data, name)):
            return ImageFolder(os.path.join(data, name), transform)
    has_split_dirs = any(os.path.isdir(os.path.join(data, n)) for n in ("train", "val", "validate"))
    return None if split != "train" or has_split_dirs else ImageFolder(data, transform)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (per-epoch seeded shuffle, rank shard) that can start mid-epoch after a resume."""

    def __init__(self, dataset, world, rank, seed, batch_size):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size, self.start_step = batch_size, 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_step * self.batch_size:])


def build_loader(dataset, batch_size, world, rank, seed, workers, device, shuffle=True):
    if len(dataset) < batch_size * world and shuffle:
        fail(f"dataset has {len(dataset)} images, fewer than one global batch ({batch_size} x {world} GPUs)")
    sampler = ResumableSampler(dataset, world, rank, seed, batch_size) if shuffle else \
        DistributedSampler(dataset, world, rank, shuffle=False, drop_last=False)
    return DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                      drop_last=shuffle, persistent_workers=workers > 0,   # own generator: global RNG untouched
                      generator=torch.Generator().manual_seed(seed + rank))


class Progress:
    """Prints `ep e step s/n | loss .. | lr | img/s | eta` every `every` steps; only log steps read device values."""

    def __init__(self, total_steps, global_batch, every=50):
        self.total, self.batch, self.every, self.last, self.t0 = total_steps, global_batch, every, None, time.time()

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
        return vals


def reduce_mean(t):
    t = t.detach().float().clone()
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.item()
