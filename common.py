"""common.py - small generic helpers shared by the method files and finetune.py.

Config parsing, distributed setup, seeding, schedules, weight-decay groups, checkpoints with auto-resume,
ImageFolder loading that survives bad files, logging. Nothing here is part of any paper's method.
"""
import argparse, dataclasses, datetime, inspect, json, os, random, re, shutil, sys, time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset, DataLoader, DistributedSampler

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

def fail(msg):   # one clear line on stderr, exit code 1: for every bad input, before training starts
    raise SystemExit(f"error: {msg}")

# ----------------------------------------------------------------------------- config

def parse_config(cls, argv=None):
    """Flat @dataclass of defaults -> CLI. `--mask-ratio 0.6` and `--mask_ratio 0.6` both work; --help shows each
    default with the comment written next to it. `--preset NAME` first applies cls.PRESETS[NAME] (a dict of field
    values), then any flag given on the command line overrides it."""
    comments = dict(re.findall(r"^\s+(\w+)\s*:.*?#\s*(.*)$", inspect.getsource(cls), re.M))
    parser = argparse.ArgumentParser(description=cls.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    to_bool = lambda s: {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[s.lower()]
    for f in dataclasses.fields(cls):
        kind = dict(type=to_bool, nargs="?", const=True) if isinstance(f.default, bool) else dict(type=type(f.default))
        name = f.name.rstrip("_")   # `from_` -> --from
        parser.add_argument(*sorted({"--" + name, "--" + name.replace("_", "-")}), dest=f.name,
                            default=f.default, help=comments.get(f.name, " ").replace("%", "%%"), **kind)
    presets = getattr(cls, "PRESETS", {})
    preset = parser.parse_known_args(argv)[0].__dict__.get("preset", "")
    if preset and preset not in presets:
        fail(f"--preset {preset}: unknown; choose from {', '.join(presets)}")
    parser.set_defaults(**presets.get(preset, {}))
    return cls(**vars(parser.parse_args(argv)))

# ----------------------------------------------------------------------------- distributed, seeding, printing

def setup_dist(device="cuda"):
    """Plain `python`: (rank 0, world 1, cfg device), no process group. Under torchrun: one process per GPU with
    NCCL, or gloo on CPU (`--device cpu`). Returns (rank, world, torch.device)."""
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
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

def set_rng_state(s):
    torch.set_rng_state(s["torch"]), random.setstate(s["python"])
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])

# ----------------------------------------------------------------------------- schedules and optimizer groups

def accum_steps(global_batch, batch_size, world, accum_iter=1):
    """Micro-batches per optimizer step: global_batch / (batch_size x world) if --global-batch is set, else accum_iter."""
    if global_batch:
        if global_batch % (batch_size * world):
            fail(f"--global-batch {global_batch} is not a multiple of --batch-size {batch_size} x {world} processes")
        return global_batch // (batch_size * world)
    if accum_iter < 1:
        fail(f"--accum-iter {accum_iter}: must be >= 1")
    return accum_iter

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

def cosine_schedule(base, final, total_steps, warmup_steps=0, warmup_start=0.0):
    """Per-step values (DINO-style array, as Python floats): linear warmup_start -> base, then cosine -> final."""
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=False)
    t = np.arange(max(total_steps - warmup_steps, 0)) / max(total_steps - warmup_steps, 1)
    return np.concatenate([warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * t))])[:total_steps].tolist()

def no_decay(name, p):
    """timm/BEiT: no weight decay on 1-D params (biases, norms, layer scale), position/cls/mask tokens, rel-pos tables."""
    return p.ndim <= 1 or name.split(".")[-1] in ("pos_embed", "cls_token", "mask_token", "relative_position_bias_table")

def param_groups(model, weight_decay, skip_decay=no_decay):
    """Two AdamW groups; `skip_decay(name, param) -> bool` picks the no-decay ones (a method may pass its own rule)."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not skip_decay(n, p)]
    skip = [p for n, p in model.named_parameters() if p.requires_grad and skip_decay(n, p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": skip, "weight_decay": 0.0}]

# ----------------------------------------------------------------------------- checkpoints and output dir

def prepare_out(out, cfg, script):
    """Create the output dir and keep the exact config and script source next to the checkpoints (rank 0)."""
    if int(os.environ.get("RANK", 0)) == 0:
        os.makedirs(out, exist_ok=True)
        shutil.copy(script, os.path.join(out, os.path.basename(script)))
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)

def save_checkpoint(state, path):
    """Atomic: write a temp file, then rename, so a kill mid-write never leaves a broken checkpoint."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)

def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        fail(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}")

def run_settings(cfg, script, keys=("arch", "epochs")):
    """The values that define a run; stored in the checkpoint as "settings" and compared by resume()."""
    return {"script": os.path.basename(script), **{k: getattr(cfg, k) for k in keys}}

def resume(out, raw_model, opt, scaler, rank=0, seed=0, settings=None):
    """Auto-resume from out/checkpoint.pth if present: model, optimizer, scaler, RNG. Returns the global step done.
    With loader workers=0 a resumed CPU run reproduces the uninterrupted loss curve exactly (tests/test_common.py).
    `settings` (run_settings(...)) must equal the checkpoint's, else one error line names the keys that differ."""
    path = os.path.join(out, "checkpoint.pth")
    if not os.path.isfile(path):
        return 0
    ck = load_checkpoint(path)
    diff = sorted(k for k in (settings or {}) if ck.get("settings", {}).get(k, settings[k]) != settings[k])
    if diff:
        changed = ", ".join(f"{k}: {ck['settings'][k]} -> {settings[k]}" for k in diff)
        fail(f"{path} was written by a different run ({changed}); pass a new --out to start a fresh run, "
             "or the old values to resume")
    raw_model.load_state_dict(ck["model"]), opt.load_state_dict(ck["optimizer"]), scaler.load_state_dict(ck["scaler"])
    set_rng_state(ck["rng"])   # rank 0's streams; other ranks get fresh, distinct ones
    if rank:
        seed_all(seed + 1000 * ck["step"] + rank)
    print0(f"resumed from {path} at step {ck['step']}")
    return ck["step"]

def log_json(out, record):
    if int(os.environ.get("RANK", 0)) == 0:
        with open(os.path.join(out, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

# ----------------------------------------------------------------------------- data

def load_image(path):
    """Any PIL-readable image as RGB: grayscale, CMYK, palette, alpha (composited on black) and 16-bit too."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):   # 16-bit / float: rescale to 8 bits, don't clip
            a = np.asarray(img, dtype=np.float32)
            img = Image.fromarray(np.uint8(255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-6)))
        return img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA", "LA") else img.convert("RGB")

class ImageFolder(Dataset):
    """root/class_x/*.jpg. An unreadable or non-image file is reported by name, counted in shared memory (seen by
    all loader workers) and replaced by the next readable image."""
    def __init__(self, root, transform):
        if not os.path.isdir(root):
            fail(f"data directory {root} does not exist")
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        if not self.classes:
            fail(f"data directory {root} has no class folders (expected {root}/<class>/<image>)")
        self.samples = [(os.path.join(dp, f), i) for i, c in enumerate(self.classes)
                        for dp, _, fs in sorted(os.walk(os.path.join(root, c), followlinks=True)) for f in sorted(fs)
                        if f.lower().endswith(IMG_EXTENSIONS)]
        if not self.samples:
            fail(f"data directory {root} has class folders but no images ({', '.join(IMG_EXTENSIONS)})")
        self.transform, self.skipped = transform, torch.zeros(1, dtype=torch.int64).share_memory_()

    def __len__(self): return len(self.samples)

    def __getitem__(self, idx):
        for k in range(len(self.samples)):
            path, label = self.samples[(idx + k) % len(self.samples)]
            try:
                img = load_image(path)
            except Exception as e:   # truncated, corrupt, not an image: skip and count, never crash mid-epoch
                self.skipped += 1
                print(f"warning: skipping unreadable image {path}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            return self.transform(img), label
        raise RuntimeError(f"no readable image in {len(self.samples)} files")

class SyntheticImages(Dataset):
    """Deterministic random images (smoke tests, speed runs): sample i is always the same picture."""
    def __init__(self, n, img_size, transform, num_classes=10):
        self.n, self.size, self.transform, self.classes = n, img_size, transform, [str(i) for i in range(num_classes)]
        self.skipped = torch.zeros(1, dtype=torch.int64)

    def __len__(self): return self.n

    def __getitem__(self, idx):
        g = torch.Generator().manual_seed(idx)
        low = torch.rand(3, 4, 4, generator=g)   # smooth blobs + noise, so crops and blur do something
        low = torch.nn.functional.interpolate(low[None], size=(self.size, self.size), mode="bilinear")[0]
        img = 0.8 * low + 0.2 * torch.rand(3, self.size, self.size, generator=g)
        return self.transform(Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8))), idx % len(self.classes)

def build_dataset(data, split, transform, img_size=224, synthetic_size=512):
    """`--data synthetic`, `--data ROOT` with ROOT/train and ROOT/val (or validate), or a flat class-folder ROOT
    (train only: returns None for val, and the caller holds out a split)."""
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

# ----------------------------------------------------------------------------- logging

class Progress:
    """Prints `ep e step s/n | loss .. | lr | img/s | eta` every `every` steps; only log steps read device values."""
    def __init__(self, total_steps, global_batch, every=50):
        self.total, self.batch, self.every, self.last, self.t0 = total_steps, global_batch, every, None, time.time()

    def step(self, it, epoch, logs, lr):
        """it: global step just done; logs: dict of 0-d tensors (averaged over ranks here). -> dict of floats or None"""
        if self.last is None:   # first call (maybe after a resume): time since construction covers step `it`
            self.last = (it, self.t0)
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
