"""
common.py - the generic helpers of the method files and finetune.py; nothing from a paper is here.

Sections: config parsing | processes | schedules, decay | --out, checkpoints | the training run |
data. The contracts a method file relies on are in each docstring; docs/finetune.md
(section common.py) has the overview.
"""
import argparse
import atexit
import dataclasses
import datetime
import errno
import hashlib
import inspect
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from io import BytesIO

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, default_collate
from torchvision import datasets, transforms
from torchvision.transforms import v2

try:
    # torchvision's image decoders (deprecated in 0.29 for TorchCodec): without them, PIL decodes
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
except ImportError:
    decode_image = decode_jpeg = None

try:
    import fcntl   # POSIX file locks; on Windows --out is not locked
except ImportError:
    fcntl = None

if sys.version_info < (3, 10):
    raise SystemExit("error: this project needs Python 3.10 or newer")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# --data NAME: torchvision's sets, downloaded once into the cache (named_dataset)
DATASETS = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "stl10": datasets.STL10}
# config fields that may change between a run and its resume: they do not change the run's math
RESUME_FREE = ("workers", "log_every", "viz_every", "compile", "device", "decode", "stop_after",
               "out", "preset", "allow_change", "paper_row", "paper_batch")
_held_locks = {}   # --out path -> its open run.lock, flock-ed until this process ends


def fail(msg):
    """Stop with one line on stderr, `error: msg`, and exit code 1."""
    raise SystemExit(f"error: {msg}")


def fail_all(ok, msg):
    """A collective stop: every rank calls this with its own `ok`; if any rank is not ok, rank 0
    prints `msg` (one line) and every rank exits with code 1. One all-reduce."""
    if not all_finite(torch.tensor(bool(ok))):
        raise SystemExit(f"error: {msg}" if rank0() else 1)

# ----------------------------------------------------------------------------- config parsing


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse prints usage + error; we print one line
        fail(f"{message} (see --help)")


def _to_bool(s):
    words = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    if s.lower() not in words:
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return words[s.lower()]


def parse_range(spec):
    """'> 0', '>= 1', '(0, 1)', '[0, 1)' ... -> (low, high, low_inclusive, high_inclusive)."""
    m = re.fullmatch(r"\s*(>=?)\s*(\S+)\s*", spec)
    if m:
        return float(m[2]), math.inf, m[1] == ">=", False
    m = re.fullmatch(r"\s*([\[(])\s*([^,]+),\s*([^\])]+)([\])])\s*", spec)
    if not m:
        raise ValueError(f"bad range {spec!r}")
    return float(m[2]), float(m[3]), m[1] == "[", m[4] == "]"


def in_range(value, spec):
    low, high, low_in, high_in = parse_range(spec)
    above = value >= low if low_in else value > low
    below = value <= high if high_in else value < high
    return math.isfinite(value) and above and below


def parse_config(cls, argv=None, defaults=None):
    """Flat @dataclass -> command line; precedence: field < `defaults` < PRESETS[--preset] < flags.

    The class may declare CHOICES (field -> allowed values), PRESETS (name -> field values) and
    ONLY_WITH (field -> (other field, allowed values): a flag given on the command line while the
    other field has another value would be ignored, so it is an error), and must declare RANGES
    (field -> '> 0', '[0, 1)', ...) for every int and float field. Every check runs here, before any
    work; a bad value ends in one `error:` line. The comment after a field is its --help text."""
    source = inspect.getsource(cls)
    comments = dict(re.findall(r"^\s+(\w+)\s*:.*?#\s*(.*)$", source, re.M))
    parser = _Parser(description=cls.__doc__,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    presets = getattr(cls, "PRESETS", {})
    choices = {**getattr(cls, "CHOICES", {}), "preset": ["", *presets]}
    ranges = getattr(cls, "RANGES", {})
    for f in dataclasses.fields(cls):
        if isinstance(f.default, bool):
            kind = dict(type=_to_bool, nargs="?", const=True)
        else:
            kind = dict(type=type(f.default))
            if type(f.default) in (int, float) and f.name not in ranges:
                raise TypeError(f"{cls.__name__}.{f.name}: a numeric field without a RANGES entry")
        name = f.name.rstrip("_")   # `from_` -> --from
        flags = sorted({"--" + name, "--" + name.replace("_", "-")})
        spec = f" [{ranges[f.name]}]" if f.name in ranges else ""
        text = comments.get(f.name, " ").replace("%", "%%") + spec
        parser.add_argument(*flags, dest=f.name, default=f.default, choices=choices.get(f.name),
                            help=text, **kind)
    preset = presets.get(parser.parse_known_args(argv)[0].__dict__.get("preset", ""), {})
    parser.set_defaults(**{**(defaults or {}), **preset})
    cfg = cls(**vars(parser.parse_args(argv)))
    check_ranges(cfg)
    # argparse fills in defaults only for names the namespace lacks: what stays unset was not given
    unset = object()
    namespace = argparse.Namespace(**{f.name: unset for f in dataclasses.fields(cls)})
    given = {k for k, v in vars(parser.parse_args(argv, namespace)).items() if v is not unset}
    for name, (other, allowed) in getattr(cls, "ONLY_WITH", {}).items():
        if name in given and getattr(cfg, other) not in allowed:
            if allowed == (True,):
                where = f"--{_flag(other)}"
                now = f"a run without --{_flag(other)}"
            else:
                where = f"--{_flag(other)} {' or '.join(map(str, allowed))}"
                now = f"--{_flag(other)} {getattr(cfg, other)}"
            fail(f"--{_flag(name)} applies only with {where}; {now} ignores it, so drop it")
    return cfg


def check_ranges(cfg):
    """Every field named in the config's RANGES within its range, else one error line. parse_config
    calls it; each validate() calls it again, for a Config built in Python."""
    for name, spec in getattr(cfg, "RANGES", {}).items():
        value = getattr(cfg, name)
        if not in_range(value, spec):
            fail(f"--{_flag(name)} {value}: must be {spec}")


def _flag(name):
    return name.rstrip("_").replace("_", "-")

# ----------------------------------------------------------------------------- processes


def setup_dist(device="cuda"):
    """-> (rank, world, torch.device). Plain `python`: one process; torchrun: NCCL per GPU, or gloo
    on the CPU."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda but no GPU is visible; pass --device cpu")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local}" if device.startswith("cuda") else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    # leave together: a gloo peer that exits first can abort the others
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return rank, world, device


def rank0():
    return int(os.environ.get("RANK", 0)) == 0


def print0(*args, **kwargs):
    if rank0():
        print(*args, **kwargs, flush=True)


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """Every RNG a training step touches, in a form torch.load(weights_only=True) accepts."""
    npst = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (npst[0], torch.from_numpy(npst[1].astype(np.int64)), *npst[2:]), "cuda": cuda}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def reduce_mean(t):
    """Mean over ranks of a 0-d tensor or a number -> float (a host sync: on log steps only)."""
    t = torch.as_tensor(t).detach().float().clone()
    if dist.is_initialized():
        t = t.cuda() if dist.get_backend() == "nccl" else t
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.item()


def all_finite(flag):
    """True when the 0-d bool tensor `flag` is True on every rank (one all-reduce)."""
    return reduce_mean(flag) == 1.0


def no_sync(model, last):
    """DDP all-reduces gradients on the last micro-batch of an optimizer step only."""
    return model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext()

# ----------------------------------------------------------------------------- schedules, decay


def accum_steps(cfg, world):
    """Micro-batches per optimizer step: G / (batch x GPUs) with --global-batch G, else
    --accum-iter."""
    if cfg.global_batch and cfg.accum_iter != 1:
        fail(f"--global-batch {cfg.global_batch} and --accum-iter {cfg.accum_iter} both set the "
             "accumulation: pass one of them")
    if cfg.global_batch and cfg.global_batch % (cfg.batch_size * world):
        fail(f"--global-batch {cfg.global_batch} is not a multiple of --batch-size "
             f"{cfg.batch_size} x {world} processes")
    if cfg.global_batch:
        return cfg.global_batch // (cfg.batch_size * world)
    return cfg.accum_iter


def epoch_steps(loader, accum, cap):
    """Optimizer steps per epoch: the loader's micro-batches per process over accum, at most cap
    (--steps-per-epoch; 0 = no cap)."""
    steps = min(len(loader) // accum, cap or len(loader))
    if steps < 1:
        fail(f"one optimizer step takes {accum} micro-batches per process but the data gives "
             f"{len(loader)}: lower --accum-iter / --global-batch or add images")
    return steps


def batch_warning(global_batch, paper_batch, steps_per_epoch):
    if paper_batch and not 0.5 <= global_batch / paper_batch <= 2:
        r = paper_batch / global_batch
        print0(f"warning: global batch {global_batch} vs the recipe's {paper_batch}: "
               f"{steps_per_epoch} steps/epoch, so per-step EMA and lr schedules act {r:.1f}x as "
               f"often per image; --global-batch {paper_batch} matches")


def cosine_schedule(base, final, total_steps, warmup_steps=0, warmup_start=0.0,
                    warmup_endpoint=False):
    """Per-step values: linear warmup_start -> base (with warmup_endpoint, the last warmup step is
    the peak, as BEiT's scheduler), then a cosine to final."""
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=warmup_endpoint)
    n = max(total_steps - warmup_steps, 0)
    t = np.arange(n) / max(n, 1)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t))
    return np.concatenate([warmup, cosine])[:total_steps].tolist()


def no_decay(name, p):
    """timm's rule (its Beit.no_weight_decay): no weight decay on 1-D params (biases, norms, layer
    scale), positions, tokens, relative-position tables. BEiT's own pre-training decays the
    tables."""
    names = ("pos_embed", "cls_token", "mask_token", "relative_position_bias_table")
    return p.ndim <= 1 or name.split(".")[-1] in names


def param_groups(model, weight_decay, skip_decay=no_decay):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not skip_decay(n, p)]
    rest = [p for n, p in named if skip_decay(n, p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]

# ----------------------------------------------------------------------------- --out, checkpoints


def lock_out(out, create):
    """Rank 0: flock OUT/run.lock for the life of this process (a second live run into --out stops).
    With create=False nothing is created: an --out without run.lock has no live run to wait for."""
    if not rank0() or os.path.realpath(out) in _held_locks:
        return
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {out} is a file, not a folder; pass a folder")
    path = os.path.join(out, "run.lock")
    if not create and not os.path.exists(path):
        return
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(path, "a")
    except OSError as e:
        fail(f"cannot write to --out {out} ({e.strerror}); pass a folder you can write to")
    # the kernel drops the lock when the process ends, however it ends: no stale lock
    try:
        if fcntl:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"--out {out} is in use by another running process; pass another --out")
    except OSError as e:
        # a file system without flock (e.g. Lustre mounted without it): run unlocked
        print0(f"warning: cannot lock --out {out} ({e.strerror}): make sure no other run writes "
               "there")
    _held_locks[os.path.realpath(out)] = lock


def write_record(out, cfg, script):
    """Rank 0, once the run is accepted: OUT/config.json and copies of the script and of common.py,
    so that OUT says exactly which code and settings made it."""
    if not rank0():
        return
    lock_out(out, create=True)
    try:
        for src in (script, __file__):
            shutil.copy(src, os.path.join(out, os.path.basename(src)))
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    except OSError as e:
        fail(f"cannot write to --out {out} ({e.strerror}); pass a folder you can write to")


def prepare_out(out, cfg, script):
    """--out of a run that resumes nothing (kNN): lock it and write the run record."""
    lock_out(out, create=True)
    write_record(out, cfg, script)


def save_checkpoint(state, path):
    """Atomic: write PATH.tmp, fsync, rename. On any error the temporary file is removed, the
    previous PATH stays as it was, and the error (one line) is returned; None on success."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return None
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        hint = "free some space" if e.errno == errno.ENOSPC else "check the folder"
        return f"cannot save {path} ({e.strerror or e}): {hint} and run the same command to resume"


def load_checkpoint(path, what="checkpoint"):
    """torch.load(weights_only) -> dict, or one error line for a missing, empty, truncated or
    foreign file."""
    if not os.path.isfile(path):
        fail(f"{what} {path} does not exist")
    if os.path.getsize(path) == 0:
        fail(f"{what} {path} is an empty file; pass a checkpoint written by this project")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # a truncated zip, a text file, a pickle with code in it, ...
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        fail(f"cannot read {what} {path} ({reason}); pass a complete checkpoint written by this "
             "project")
    if not isinstance(ck, dict):
        fail(f"{what} {path} holds a {type(ck).__name__}, not a checkpoint of this project")
    return ck


def file_hash(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def log_json(out, record, name="log.jsonl"):
    if rank0():
        with open(os.path.join(out, name), "a") as f:
            f.write(json.dumps(record) + "\n")


def trim_log(path, step):
    """Drop the records of steps after `step` (a resume redoes them): every step is logged once."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) < len(records):
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(path + ".tmp", path)


def compare_settings(old, new, allowed):
    """-> (refused, accepted): 'name: old -> new' for every differing key; RESUME_FREE keys never
    count."""
    keys = [k for k in new if k in old and k not in RESUME_FREE and old[k] != new[k]]
    diffs = {k: f"{k}: {old[k]} -> {new[k]}" for k in keys}
    free = set(keys) if "all" in allowed else set(allowed) & set(keys)
    refused = [d for k, d in diffs.items() if k not in free]
    accepted = [d for k, d in diffs.items() if k in free]
    return refused, accepted

# ----------------------------------------------------------------------------- the training run


class Run:
    """What a training loop does besides the method: resume and its settings guard, the run record
    in --out, epochs and optimizer steps (a mid-epoch resume, gradient accumulation, --stop-after),
    progress lines, the divergence guard, and checkpoints never worse than the last good one.
    A method file's loop:

        for it, batches in run.steps():        # the optimizer steps still to run
            (set the lr of step it)
            for last, batch in batches:        # `accum` micro-batches
                with no_sync(model, last):     # DDP all-reduces on the last one
                    (forward, backward)
                run.add(loss=loss, **logs)     # 0-d tensors or floats; the step logs their means
            (optimizer step, EMA)
            if run.end_step(it, lr):           # progress line; True at an epoch end or a stop
                run.save(state, check)         # checks every parameter and check() (a loss) first

    `derived` holds what defines the run without being a flag (global batch, steps per epoch, data
    size): a resume compares it too. `prefix` names a second run in the same --out (a tokenizer)."""

    def __init__(self, cfg, script, raw_model, opt, scaler, loader, steps_per_epoch, accum=1,
                 derived=None, epochs=None, prefix=""):
        self.cfg = cfg
        self.script = script
        self.raw_model = raw_model
        self.opt = opt
        self.scaler = scaler
        self.loader = loader
        self.steps_per_epoch = steps_per_epoch
        self.accum = accum
        self.epochs = cfg.epochs if epochs is None else epochs
        self.total = self.epochs * steps_per_epoch
        self.derived = {"script": os.path.basename(script), **(derived or {})}
        self.path = os.path.join(cfg.out, prefix + "checkpoint.pth")
        self.log_name = prefix + "log.jsonl"
        self.steps_name = prefix + "steps.jsonl"
        global_batch = self.derived.get("global_batch", 0)
        self.progress = Progress(self.total, global_batch, cfg.log_every, cfg.out, self.steps_name)
        # optimizer steps done at the start, and in the last checkpoint
        self.start = 0
        self.saved = 0
        self.epoch = 0
        self.stopping = False
        self.logs = {}
        self.vals = {}
        # a device tensor: the first step whose loss was not finite (-1: none yet)
        self.first_bad = None
        # the resumed checkpoint's plain values (step, epoch, and what the script added)
        self.meta = {}

    def resume(self):
        """Lock --out; resume OUT/checkpoint.pth if there is one. Settings that differ from the
        checkpoint's (every config field but RESUME_FREE, and `derived`) stop the run with one line
        naming each, unless --allow-change names them. Only then is the run record written.
        -> optimizer steps already done."""
        cfg = self.cfg
        out = cfg.out
        lock_out(out, create=False)
        changes = []
        if os.path.isfile(self.path):
            ck = load_checkpoint(self.path)
            old = {**ck.get("config", {}), **ck.get("derived", {})}
            new = {**dataclasses.asdict(cfg), **self.derived}
            allowed = [k.strip().replace("-", "_") for k in cfg.allow_change.split(",")]
            refused, changes = compare_settings(old, new, [k for k in allowed if k])
            if refused:
                names = ",".join(r.split(":")[0] for r in refused)
                fail(f"--out {out} holds a run with other settings ({'; '.join(refused)}); pass "
                     f"the old values to resume it, --allow-change {names} to resume with the new "
                     "ones, or a new --out")
            try:
                self.raw_model.load_state_dict(ck["model"])
                self.opt.load_state_dict(ck["optimizer"])
                self.scaler.load_state_dict(ck["scaler"])
            except (RuntimeError, ValueError, KeyError) as e:
                reason = str(e).splitlines()[0][:100]
                fail(f"--out {out} holds another model's checkpoint ({reason}); pass a new --out")
            # rank 0's streams; the other ranks get fresh, distinct ones
            set_rng_state(ck["rng"])
            if not rank0():
                seed_all(cfg.seed + 1000 * ck["step"] + int(os.environ.get("RANK", 0)))
            self.meta = {k: v for k, v in ck.items() if isinstance(v, (int, float, str))}
            self.start = ck["step"]
            self.saved = ck["step"]
        write_record(out, cfg, self.script)
        if rank0():
            for name in (self.log_name, self.steps_name):
                trim_log(os.path.join(out, name), self.start)
        if self.start:
            print0(f"resumed from {self.path} at step {self.start}")
        if changes:
            print0(f"resuming with changed settings (--allow-change): {'; '.join(changes)}")
            log_json(out, {"resumed_at": self.start, "resume_changes": changes}, self.log_name)
        return self.start

    def steps(self):
        """Yield (it, batches) for every optimizer step still to run, it = the global step index;
        `batches` yields (last, micro-batch) `accum` times. The sampler resumes mid-epoch;
        --stop-after ends the loop."""
        spe = self.steps_per_epoch
        accum = self.accum
        for epoch in range(self.start // spe, self.epochs):
            self.epoch = epoch
            first = self.start % spe if epoch == self.start // spe else 0
            self.loader.sampler.set_epoch(epoch)
            # the sampler counts micro-batches; islice fetches no extra batch
            self.loader.sampler.start_step = first * accum
            micro = iter(itertools.islice(self.loader, (spe - first) * accum))
            self.raw_model.train()
            for i in range(first, spe):
                yield epoch * spe + i, ((j + 1 == accum, next(micro)) for j in range(accum))
                if self.stopping:
                    return

    def add(self, **logs):
        """The values of one micro-batch (0-d tensors or plain floats); a step logs their mean."""
        for k, v in logs.items():
            v = v.detach() if torch.is_tensor(v) else torch.tensor(float(v))
            self.logs[k] = self.logs.get(k, 0) + v.float() / self.accum

    def end_step(self, it, lr):
        """After optimizer step `it`: the progress line on log steps, where a NaN/inf loss on any
        rank also stops the run (before any save). -> True when a checkpoint is due (an epoch end
        or --stop-after)."""
        logs = self.logs
        self.logs = {}
        loss = torch.as_tensor(logs["loss"])
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        # device work only: no host sync on steps that do not log
        new_bad = (self.first_bad < 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(new_bad, torch.full_like(self.first_bad, it + 1),
                                     self.first_bad)
        vals = self.progress.step(it, self.epoch, logs, lr)
        if vals is not None:
            self.vals = vals
            if not all_finite(self.first_bad < 0):
                self.stop_diverged(it + 1)
        stop = self.cfg.stop_after
        self.stopping = bool(stop) and it + 1 - self.start >= stop and it + 1 < self.total
        return (it + 1) % self.steps_per_epoch == 0 or self.stopping

    def stop_diverged(self, step):
        """Every rank (the first bad step is a collective): one line from rank 0, exit code 1."""
        first = self.first_bad_step()
        if first:
            what = f"the loss was first NaN/inf at step {first}"
        else:
            what = f"the weights after step {step} are NaN/inf or give a NaN/inf loss"
        if self.saved:
            kept = (f"{self.path} from step {self.saved} is kept: resume it with a lower lr or "
                    "with clipping")
        else:
            kept = "no checkpoint was saved yet: start again with a lower lr or with clipping"
        raise SystemExit(f"error: training diverged: {what}; stopped, {kept}" if rank0() else 1)

    def first_bad_step(self):
        if self.first_bad is None:
            return 0
        never = torch.full_like(self.first_bad, 2**62)
        t = torch.where(self.first_bad < 0, never, self.first_bad)
        if dist.is_initialized():
            t = t.cuda() if dist.get_backend() == "nccl" else t
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t) if int(t) < 2**62 else 0

    def save(self, state, check, files=None, **record):
        """Every rank: the loss of every step since the last check, every parameter and buffer, and
        check() - the loss of the weights about to be saved, on the last batch - must be finite (one
        all-reduce), else the run stops with the step where it diverged and the checkpoint kept
        (weights that one step at a huge lr blew up to finite but useless values fail check()).
        Rank 0 then writes OUT/checkpoint.pth (state + step, epoch, RNG, config) and `files`
        ({name: state}) atomically; a failed write keeps the previous files and stops every rank.
        Then one log.jsonl record: the last logged values and `record`."""
        step = self.progress.done
        tensors = itertools.chain(self.raw_model.parameters(), self.raw_model.buffers())
        tensors = [t for t in tensors if t.is_floating_point()]
        ok = torch.stack([t.isfinite().all() for t in tensors]).all() & (self.first_bad < 0)
        ok = ok & torch.isfinite(self.loss_now(check)).to(ok.device)
        if not all_finite(ok):
            self.stop_diverged(step)
        error = None
        if rank0():
            state = {**state, "step": step, "epoch": self.epoch, "rng": rng_state(),
                     "config": dataclasses.asdict(self.cfg), "derived": self.derived}
            for name, s in {**(files or {}), os.path.basename(self.path): state}.items():
                error = error or save_checkpoint(s, os.path.join(self.cfg.out, name))
        fail_all(error is None, error)
        self.saved = step
        record = {"epoch": self.epoch, "step": step, **self.vals, **record}
        log_json(self.cfg.out, record, self.log_name)
        n = skipped_images(self.loader.dataset)
        if n:
            print0(f"{n} unreadable images skipped so far (named above)")
        if self.stopping:
            print0(f"stopping after {self.cfg.stop_after} steps; run the same command again to "
                   "resume")

    def loss_now(self, check):
        """check() without gradients, then the RNG streams and buffers (BatchNorm statistics) as
        they were: the run trains exactly as it would without the check."""
        buffers = [b.clone() for b in self.raw_model.buffers()]
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            loss = torch.as_tensor(check()).float()
        for b, saved in zip(self.raw_model.buffers(), buffers):
            b.copy_(saved)
        return loss


class Progress:
    """Prints `ep e step s/n | loss .. | lr | img/s | eta` every `every` steps, and with `out`
    appends the same values to OUT/steps.jsonl (pretext metrics against steps). Only log steps read
    device values."""

    def __init__(self, total_steps, global_batch, every=50, out=None, name="steps.jsonl"):
        self.total = total_steps
        self.batch = global_batch
        self.every = every
        self.out = out
        self.name = name
        self.last = None
        self.t0 = time.time()
        self.done = 0

    def step(self, it, epoch, logs, lr):
        """it: the global step just done; logs: 0-d tensors or floats (averaged over ranks here)
        -> a dict of floats on log steps, else None."""
        self.done = it + 1
        # the first call, maybe after a resume
        self.last = self.last or (it, self.t0)
        if (it + 1) % self.every and it + 1 != self.total:
            return None
        vals = {k: reduce_mean(v) for k, v in logs.items()}
        seconds = max(time.time() - self.last[1], 1e-9)
        rate = (it + 1 - self.last[0]) * self.batch / seconds             # img/s since the last log
        self.last = (it + 1, time.time())
        eta = datetime.timedelta(seconds=int((self.total - it - 1) * self.batch / max(rate, 1e-9)))
        metrics = " ".join(f"{k} {v:.4f}" for k, v in vals.items())
        print0(f"ep {epoch} step {it + 1}/{self.total} | {metrics} | lr {lr:.2e} | "
               f"{rate:.1f} img/s | eta {eta}")
        if self.out:
            record = {"step": it + 1, "epoch": epoch, **vals, "lr": lr, "img_s": rate}
            log_json(self.out, record, self.name)
        return vals

# ----------------------------------------------------------------------------- data


def load_image(path):
    """Any PIL-readable image as RGB: grayscale, CMYK, palette, alpha and 16-bit (rescaled, not
    clipped)."""
    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            a = np.asarray(img, dtype=np.float32)
            a = 255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-6)
            img = Image.fromarray(np.uint8(a))
        if img.mode in ("P", "PA", "LA"):
            return img.convert("RGBA").convert("RGB")
        return img.convert("RGB")


def read_image(path):
    """An image file -> uint8 (3, H, W) tensor: torchvision's decoders (libjpeg-turbo, libpng) for
    JPEG and PNG, load_image (PIL) for every other format and mode (16-bit, TIFF, ...); the same
    pixels as load_image (tested)."""
    if decode_image is not None:
        try:
            img = decode_image(read_file(path), mode=ImageReadMode.RGB)
            if img.dtype == torch.uint8:
                return img
        except RuntimeError:
            # not a format torchvision decodes, or a broken file: PIL decides
            pass
    return v2.functional.pil_to_tensor(load_image(path))


def read_bytes(path):
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


# ImageFolder(decode=...): what a file becomes before the transform
READERS = {"pil": load_image, "tensor": read_image, "bytes": read_bytes}


def decode_mode(decode):
    """--decode cpu | device -> the READERS key of the method files' folders."""
    if decode == "device" and decode_jpeg is None:
        fail("--decode device needs torchvision.io.decode_jpeg, which this torchvision lacks; "
             "pass --decode cpu")
    return "bytes" if decode == "device" else "tensor"


class Encoded:
    """A JPEG file's bytes and the crop CropFlip drew for it, to decode and crop on the device."""

    def __init__(self, data, box, flip, size):
        self.data = data
        self.box = box
        self.flip = flip
        self.size = size
        self.path = ""


class CropFlip:
    """RandomResizedCrop (bicubic, antialiased) and a horizontal flip with probability 0.5, on uint8
    tensors: torchvision's draw of the crop box, one resized_crop call. Takes a PIL image, a uint8
    (3, H, W) tensor, or a file's bytes (--decode device): then it only draws the box from the JPEG
    header, and images_to() decodes and crops on the device with the same function.
    -> uint8 (3, size, size), or an Encoded."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size = size
        self.scale = scale
        self.ratio = ratio

    def draw(self, height, width):
        # get_params reads only the shape: a meta tensor stands in for the image
        shape = torch.empty(1, height, width, device="meta")
        box = transforms.RandomResizedCrop.get_params(shape, self.scale, self.ratio)
        return box, bool(torch.rand(()) < 0.5)

    def apply(self, img, box, flip):
        size = [self.size, self.size]
        bicubic = v2.InterpolationMode.BICUBIC
        img = v2.functional.resized_crop(img, *box, size, interpolation=bicubic, antialias=True)
        return v2.functional.horizontal_flip(img) if flip else img

    def __call__(self, img):
        if isinstance(img, Image.Image):
            img = v2.functional.pil_to_tensor(img.convert("RGB"))
        if img.ndim == 1 and img[:2].tolist() == [0xFF, 0xD8]:
            # JPEG bytes, to decode on the device: draw the crop from the header alone
            if img[-2:].tolist() != [0xFF, 0xD9]:
                raise ValueError("truncated JPEG (no end-of-image marker)")
            with Image.open(BytesIO(img.numpy().tobytes())) as header:
                width, height = header.size
            return Encoded(img, *self.draw(height, width), self.size)
        if img.ndim == 1:
            # the bytes of another format: decode here
            img = decode_image(img, mode=ImageReadMode.RGB)
        return self.apply(img, *self.draw(*img.shape[-2:]))


def images_to(images, device):
    """A batch from the loader -> uint8 (B, 3, S, S) on `device`. A tensor moves (non-blocking).
    With --decode device the batch is a list: its JPEGs are decoded there in one decode_jpeg call
    (nvjpeg on CUDA) and cropped by CropFlip.apply with the box drawn in the loader worker; a JPEG
    that fails to decode is named on stderr and replaced by another image of the batch."""
    if torch.is_tensor(images):
        return images.to(device, non_blocking=True)
    jpegs = [x for x in images if isinstance(x, Encoded)]
    try:
        decoded = decode_jpeg([x.data for x in jpegs], mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        # decode one by one to find the broken ones
        decoded = [decode_or_none(x, device) for x in jpegs]
    decoded = iter(decoded)
    out = []
    for x in images:
        if isinstance(x, Encoded):
            img = next(decoded)
            x = None if img is None else CropFlip(x.size).apply(img, x.box, x.flip)
        out.append(None if x is None else x.to(device))
    good = [x for x in out if x is not None]
    if not good:
        raise RuntimeError("no JPEG of the batch could be decoded on the device")
    return torch.stack([x if x is not None else good[0] for x in out])


def decode_or_none(encoded, device):
    try:
        return decode_jpeg(encoded.data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        warn_unreadable(encoded.path or "(a JPEG decoded on the device)", e)
        return None


# torchvision's photometric ops on a batch on the device, each image its own draws: ConMIM's
# strong view and CIM-corrupt's jitter (tests/test_conmim.py compares them with torchvision)


def grey(x):
    """(B, 3, H, W) -> (B, 1, H, W) luma with torchvision's weights (rgb_to_grayscale)."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def color_jitter(x, brightness, contrast, saturation, hue, gen=None):
    """torchvision's ColorJitter on a batch in [0, 1]: every image draws its own factors,
    U(1 - v, 1 + v) (hue: a shift U(-hue, hue)), and its own random order of the four adjustments
    (jitter_op). A zero strength is skipped, as torchvision skips None. (B, 3, H, W) -> same."""
    B = x.shape[0]
    dev = x.device
    strengths = (brightness, contrast, saturation, hue)
    u = 2 * torch.rand(4, B, 1, 1, 1, device=dev, generator=gen) - 1          # U[-1, 1)
    # brightness, contrast, saturation: a factor around 1; hue: a shift around 0
    factors = [u[op] * v + (op < 3) for op, v in enumerate(strengths)]
    # (B, 4) a permutation
    order = torch.rand(B, 4, device=dev, generator=gen).argsort(1)
    for k in range(4):
        for op, v in enumerate(strengths):
            if v:
                chosen = order[:, k].view(B, 1, 1, 1) == op
                x = torch.where(chosen, jitter_op(x, op, factors[op]), x)
    return x


def jitter_op(x, op, f):
    """torchvision's adjust_brightness / contrast / saturation / hue (op 0-3) on float images, one
    factor per image, f (B, 1, 1, 1)."""
    if op == 0:
        y = x * f
    elif op == 1:
        y = f * x + (1 - f) * grey(x).mean((2, 3), keepdim=True)
    elif op == 2:
        y = f * x + (1 - f) * grey(x)
    else:
        y = adjust_hue(x, f.view(-1, 1, 1))
    return y.clamp(0, 1)


def adjust_hue(x, shift):
    """torchvision's adjust_hue with one shift per image: RGB -> HSV, h + shift mod 1, -> RGB.
    x (B, 3, H, W), shift (B, 1, 1)."""
    r, g, b = x.unbind(1)                                                      # 3 x (B, H, W)
    maxc = x.max(1).values
    minc = x.min(1).values
    flat = maxc == minc
    span = torch.where(flat, torch.ones_like(maxc), maxc - minc)
    s = (maxc - minc) / torch.where(flat, torch.ones_like(maxc), maxc)
    rc = (maxc - r) / span
    gc = (maxc - g) / span
    bc = (maxc - b) / span
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    h = (h + shift) % 1.0
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    v = maxc
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    # the six sectors of the hue circle: (r, g, b) is one of these triples
    sectors = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
    table = torch.stack([torch.stack(c) for c in sectors])                    # (6, 3, B, H, W)
    index = i[None, None].expand(1, 3, *i.shape)
    return table.gather(0, index)[0].transpose(0, 1)                           # (B, 3, H, W)


def warn_unreadable(path, e):
    print(f"warning: skipping unreadable image {path}: {type(e).__name__}: {e}", file=sys.stderr,
          flush=True)


class ImageFolder(datasets.ImageFolder):
    """torchvision's class folders; hidden folders and files (names starting with '.') are not
    data. An unreadable file is named on stderr and counted in `skipped` (shared by the loader
    workers): training (substitute=True) takes the next readable image in its place, so batches
    keep their size; evaluation (substitute=False) drops it (__getitem__ returns None, collate()
    leaves it out). `decode`: what a file becomes before the transform (READERS)."""

    # files decoded at the start: if none is readable, the folder is one error line
    PROBE = 16

    def __init__(self, root, transform, substitute=True, decode="pil"):
        self.substitute = substitute
        # torchvision's errors: no such directory, no class folder, a class folder without images
        try:
            super().__init__(root, transform, loader=READERS[decode], is_valid_file=self.valid_file)
        except FileNotFoundError as e:
            fail(f"data directory {root}: {e}")
        # the loader workers add to it
        self.skipped = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.probe(root)

    @staticmethod
    def valid_file(path):
        name = os.path.basename(path)
        return not name.startswith(".") and name.lower().endswith(datasets.folder.IMG_EXTENSIONS)

    def find_classes(self, directory):
        entries = os.scandir(directory)
        classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {c: i for i, c in enumerate(classes)}

    def probe(self, root):
        step = max(1, len(self.samples) // self.PROBE)
        errors = []
        for path, _ in self.samples[::step][:self.PROBE]:
            try:
                load_image(path).load()
                return
            except Exception as e:
                errors.append(f"{path}: {type(e).__name__}")
        fail(f"data directory {root}: none of {len(errors)} sampled files is a readable image "
             f"(e.g. {errors[0]}); check the folder")

    def __getitem__(self, idx):
        tries = 50 if self.substitute else 1
        for k in range(tries):
            path = self.samples[(idx + k) % len(self.samples)][0]
            try:
                item = super().__getitem__((idx + k) % len(self.samples))
            except Exception as e:
                # truncated, corrupt, not an image: never crash mid-epoch
                self.skipped += 1
                warn_unreadable(path, e)
                continue
            if isinstance(item[0], Encoded):
                item[0].path = path
            return item
        if self.substitute:
            raise RuntimeError(f"{tries} unreadable images in a row in {self.root}")
        return None


class Indexed(torch.utils.data.Dataset):
    """(x, y) -> (x, y, index): evaluation tracks which sample each row is (None stays None)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.classes = dataset.classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return None if item is None else (*item, i)


def collate(batch):
    """default_collate without the samples a dataset dropped (None); images still to decode on the
    device (--decode device) stay a list."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    if any(isinstance(b[0], Encoded) for b in batch):
        return [b[0] for b in batch], default_collate([b[1:] for b in batch])[0]
    return default_collate(batch)


def skipped_images(dataset):
    """Unreadable images met so far, summed over loader workers (a shared counter) and ranks; 0 for
    a named set (arrays in memory are never unreadable)."""
    while hasattr(dataset, "dataset"):
        # Subset, Indexed: look inside
        dataset = dataset.dataset
    skipped = getattr(dataset, "skipped", torch.zeros(1))
    world = dist.get_world_size() if dist.is_initialized() else 1
    return round(reduce_mean(skipped[0]) * world)


class SyntheticImages(datasets.FakeData):
    """Deterministic random images (smoke tests, speed runs): sample i is always the same picture,
    blobs + noise."""

    def __init__(self, n, img_size, transform, num_classes=10):
        super().__init__(n, (3, img_size, img_size), num_classes, transform)
        self.classes = [str(i) for i in range(num_classes)]
        self.skipped = torch.zeros(1, dtype=torch.int64)

    def __getitem__(self, idx):
        g = torch.Generator().manual_seed(idx)
        s = self.image_size[-1]
        low = torch.rand(1, 3, 4, 4, generator=g)
        low = torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear")[0]
        img = (0.8 * low + 0.2 * torch.rand(3, s, s, generator=g)).permute(1, 2, 0).numpy()
        return self.transform(Image.fromarray((img * 255).astype(np.uint8))), idx % self.num_classes


def dataset_cache():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.environ.get("MIMREF_DATASETS") or os.path.join(cache, "mimref-datasets")


def named_dataset(name, split, transform):
    """torchvision's CIFAR-10/100 (train, val = test) or STL-10 (pretrain = its 100k unlabeled
    images, train, val = test): PIL RGB images, int labels. Rank 0 downloads what is missing into
    the cache first, then the others load."""
    root = dataset_cache()
    cls = DATASETS[name]
    ds = None
    err = ""
    # STL-10 pre-trains on its unlabeled images
    stl = {"pretrain": "unlabeled", "val": "test"}.get(split, split)
    which = {"split": stl} if name == "stl10" else {"train": split != "val"}
    if rank0():
        # torchvision checks every file's md5 sum, and downloads only a missing or wrong one
        try:
            ds = cls(root, **which, transform=transform, download=True)
        except (RuntimeError, OSError) as e:
            # no network (URLError), a partial archive, a bad md5 sum
            err = (f"--data {name}: cannot download or verify {cls.base_folder} in {root} "
                   f"({' '.join(str(e).split())}); delete it and {cls.filename} there to download "
                   f"again, or save {cls.url} there by hand")
    # the other ranks wait here for rank 0
    fail_all(not err, err)
    try:
        return ds if ds is not None else cls(root, **which, transform=transform)
    except RuntimeError:
        # torchvision's "not found or corrupted": rank 0 filled another machine's cache
        fail(f"--data {name}: rank {os.environ.get('RANK', 0)} finds no verified copy in {root}; "
             "set MIMREF_DATASETS to a folder every node shares (rank 0 downloads), or copy rank "
             "0's there")


def build_dataset(data, split, transform, img_size=224, synthetic_size=512, decode="pil"):
    """Split pretrain | train | val of `synthetic`, a DATASETS name, ROOT with ROOT/train and
    ROOT/val (or validate), or a flat class-folder ROOT (-> None for val). pretrain = train, but
    STL-10's unlabeled images. Folders: training substitutes unreadable images, val drops them;
    `decode`: what the transform gets from a file (READERS)."""
    if data == "synthetic":
        n = synthetic_size if split != "val" else synthetic_size // 4
        return SyntheticImages(n, img_size, transform)
    if data in DATASETS:
        return named_dataset(data, split, transform)
    if not os.path.isdir(data):
        fail(f"--data {data}: directory does not exist (names: synthetic, {', '.join(DATASETS)})")
    for name in ["train"] if split != "val" else ["val", "validate"]:
        if os.path.isdir(os.path.join(data, name)):
            return ImageFolder(os.path.join(data, name), transform, split != "val", decode)
    has_split_dirs = any(os.path.isdir(os.path.join(data, n)) for n in ("train", "val", "validate"))
    if split == "val" or has_split_dirs:
        return None
    return ImageFolder(data, transform, decode=decode)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that skips the first `start_step` batches of `batch_size` (a mid-epoch
    resume)."""
    batch_size = start_step = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_step * self.batch_size:])


def build_loader(dataset, batch_size, world, rank, seed, workers, device, shuffle=True):
    """This rank's shard of the dataset; shuffled: seeded per epoch (sampler.set_epoch), whole
    batches, resumable. Samples a dataset drops (None) are left out of their batch (collate)."""
    if len(dataset) < batch_size * world and shuffle:
        fail(f"dataset has {len(dataset)} images, fewer than one global batch ({batch_size} x "
             f"{world} GPUs)")
    sampler = ResumableSampler(dataset, world, rank, shuffle=shuffle, seed=seed, drop_last=shuffle)
    sampler.batch_size = batch_size
    # its own generator: the global RNG stays untouched
    generator = torch.Generator().manual_seed(seed + rank)
    return DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=device.type == "cuda", drop_last=shuffle,
                      persistent_workers=workers > 0, generator=generator)
