"""
finetune.py - evaluate a method file's exported encoder (or a random one) as the papers' tables do:
BEiT/MAE fine-tuning, MAE's linear probe (or BEiT's per-block probe), or DINO's weighted kNN.

    python finetune.py --pretrained out/conmim/checkpoint.pth --data /imagenet --mode finetune
    python finetune.py --pretrained out/conmim/checkpoint.pth --data /imagenet --mode linear
    python finetune.py --pretrained out/conmim/checkpoint.pth --data /imagenet --mode knn
    torchrun --nproc_per_node 8 finetune.py --pretrained ... --data /imagenet   # 8 x 128 = 1024

ImageNet numbers: not run. Protocols and their sources: docs/finetune.md.
Sections: config | protocols | data | evaluation, training, main | appendix: encoder loading.
"""
import dataclasses
import os
from collections import OrderedDict, defaultdict
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import Subset
from torchvision import transforms
from torchvision.ops import stochastic_depth
from torchvision.transforms import v2

from common import (IMAGENET_MEAN, IMAGENET_STD, Indexed, Run, build_dataset, build_loader,
                    check_ranges, cosine_schedule, epoch_steps, fail, fail_all, file_hash,
                    load_checkpoint, log_json, no_decay, parse_config, prepare_out, print0,
                    seed_all, setup_dist, skipped_images)

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass
class Config:
    """Fine-tuning, linear probe or kNN of a pre-trained encoder (defaults: BEiT ViT-B fine-tuning;
    --mode linear takes MAE's probe defaults, --probe blocks BEiT's)."""
    mode: str = "finetune"           # finetune (BEiT/MAE) | linear (MAE's probe) | knn (DINO)
    pretrained: str = ""             # a method file's checkpoint.pth, or random (a random encoder)
    from_: str = ""                  # which saved encoder (--from); "" = the checkpoint's default
    data: str = "/imagenet"          # root with train/ and val/ (flat: 10% held out), or a set name
    img_size: int = 0                # 0 = the pre-training size; others resize positions and tables
    arch: str = "vit_base"           # the random encoder's architecture (--pretrained random)
    patch_size: int = 16             # the random encoder's patch size (--pretrained random)
    pool: str = ""                   # cls | mean | both; "" = the encoder's own (its checkpoint's)
    probe: str = "final"             # linear: final (MAE: the pooled output) | blocks (BEiT)
    preset: str = ""                 # tiny (CPU smoke run) | resnet50 (ResNet fine-tuning recipe)
    epochs: int = 100                # fine-tuning 100 (BEiT ViT-B); linear 90 (MAE)
    batch_size: int = 128            # per GPU: 128 x 8 = 1024 (BEiT); linear 512 (MAE)
    blr: float = 1e-3                # lr = blr x global batch / 256
    min_lr: float = 1e-6             # cosine floor
    warmup_epochs: int = 20          # linear warmup
    weight_decay: float = 0.05       # AdamW, or LARS for MAE's probe
    layer_decay: float = 0.65        # lr x layer_decay^(L+1-i) for block i (BEiT ViT-B)
    drop_path: float = 0.1           # stochastic depth while fine-tuning
    mixup: float = 0.8               # MixUp alpha; 0 = off
    cutmix: float = 1.0              # CutMix alpha; 0 = off (one of the two per batch, p 0.5 each)
    smoothing: float = 0.1           # label smoothing, folded into the (mixed) soft targets
    randaug: int = 9                 # RandAugment magnitude of 10 (timm rand-m9-mstd0.5); 0 = off
    reprob: float = 0.25             # random erasing probability (per-pixel normal values)
    knn_k: int = 20                  # kNN neighbours (DINO)
    knn_t: float = 0.07              # temperature of the exp(sim / t) vote weights (DINO)
    device: str = "cuda"             # cuda | cpu
    amp: str = "bf16"                # bf16 | fp16 | off (autocast on CUDA; the CPU runs fp32)
    workers: int = 10                # data loader processes per GPU
    steps_per_epoch: int = 0         # optimizer steps per epoch; 0 = one pass over the data
    stop_after: int = 0              # exit after N steps with a resumable checkpoint; 0 = off
    log_every: int = 50              # progress line every N steps
    out: str = ""                    # "" = out/finetune_<mode>; a checkpoint there is resumed
    compile: bool = False            # torch.compile the classifier (--mode finetune)
    seed: int = 0                    # process r uses seed + r after the model is built
    allow_change: str = ""           # resume despite these changed settings: name,name or all

    CHOICES = {"mode": ("finetune", "linear", "knn"), "pool": ("", "cls", "mean", "both"),
               "probe": ("final", "blocks"), "amp": ("bf16", "fp16", "off"),
               "arch": ("vit_tiny", "vit_small", "vit_base", "vit_large", "resnet50")}
    RANGES = {"img_size": ">= 0", "patch_size": ">= 1", "epochs": ">= 1", "batch_size": ">= 1",
              "blr": "> 0", "min_lr": ">= 0", "warmup_epochs": ">= 0", "weight_decay": ">= 0",
              "layer_decay": "(0, 1]", "drop_path": "[0, 1)", "mixup": ">= 0", "cutmix": ">= 0",
              "smoothing": "[0, 1)", "randaug": "[0, 10]", "reprob": "[0, 1]", "knn_k": ">= 1",
              "knn_t": "> 0", "workers": ">= 0", "steps_per_epoch": ">= 0", "stop_after": ">= 0",
              "log_every": ">= 1", "seed": ">= 0"}
    # a flag given on the command line that its mode (or --pretrained) would ignore is an error
    ONLY_WITH = {"arch": ("pretrained", ("random",)), "patch_size": ("pretrained", ("random",)),
                 "knn_k": ("mode", ("knn",)), "knn_t": ("mode", ("knn",)),
                 "probe": ("mode", ("linear",)),
                 **{k: ("mode", ("finetune",))
                    for k in ("layer_decay", "drop_path", "mixup", "cutmix", "smoothing", "randaug",
                              "reprob", "compile")},
                 **{k: ("mode", ("finetune", "linear"))
                    for k in ("epochs", "blr", "min_lr", "warmup_epochs", "weight_decay",
                              "steps_per_epoch", "stop_after", "allow_change")}}
    # each protocol's own defaults: MAE's main_linprobe.py, BEiT's run_linear_eval.py (docs)
    MODE_DEFAULTS = {"linear": dict(epochs=90, batch_size=512, blr=0.1, min_lr=0.0,
                                    warmup_epochs=10, weight_decay=0.0),
                     "blocks": dict(epochs=100, batch_size=128, blr=1e-3, min_lr=0.0,
                                    warmup_epochs=0, weight_decay=1e-4)}
    # tiny: machine and size only, so every mode keeps its protocol; resnet50: --mode finetune only
    PRESETS = {"tiny": dict(device="cpu", workers=0, batch_size=8, img_size=32, warmup_epochs=0,
                            log_every=1, arch="vit_tiny", patch_size=4, epochs=1),
               # "ResNet strikes back" A3's schedule and augmentation with AdamW (docs)
               "resnet50": dict(epochs=100, batch_size=256, blr=1e-3, weight_decay=0.02,
                                warmup_epochs=5, layer_decay=1.0, drop_path=0.0, mixup=0.1,
                                cutmix=1.0, smoothing=0.0, randaug=6, reprob=0.0)}

    @staticmethod
    def mode_defaults(cfg):
        """The protocol defaults that replace the fine-tuning ones: linear (MAE) or linear with
        --probe blocks (BEiT)."""
        if cfg.mode != "linear":
            return {}
        return Config.MODE_DEFAULTS["blocks" if cfg.probe == "blocks" else "linear"]

# ----------------------------------------------------------------------------- protocols


# the geometric ops fill with the ImageNet mean pixel (124, 116, 104)
FILL = tuple(round(255 * c) for c in IMAGENET_MEAN)


def _affine(img, *matrix):
    return img.transform(img.size, Image.AFFINE, matrix, Image.BICUBIC, fillcolor=FILL)


def _posterize(img, bits):   # 0 bits (magnitude 10) is black, as old Pillow
    return ImageOps.posterize(img, bits) if bits else Image.new(img.mode, img.size)


def _solarize_add(img, v):
    return img.point([min(255, i + v) if i < 128 else i for i in range(256)] * 3)


def _enhance(name):   # factor 1 +- level, at least 0.1 (timm)
    return lambda img, v: getattr(ImageEnhance, name)(img).enhance(max(0.1, 1.0 + v))


def _no_argument(name):
    return lambda img, v: getattr(ImageOps, name.lower())(img)


# timm's 15 "increasing" ops: name -> (magnitude m of 10 -> argument, random sign?, op(img, arg))
RA_OPS = {
    **{k: (None, False, _no_argument(k)) for k in ("AutoContrast", "Equalize", "Invert")},
    "Rotate": (lambda m: 30 * m / 10, True,
               lambda img, v: img.rotate(v, Image.BICUBIC, fillcolor=FILL)),
    "PosterizeIncreasing": (lambda m: 4 - int(4 * m / 10), False, _posterize),
    "SolarizeIncreasing": (lambda m: 256 - int(256 * m / 10), False, ImageOps.solarize),
    "SolarizeAdd": (lambda m: min(128, int(110 * m / 10)), False, _solarize_add),
    **{f"{k}Increasing": (lambda m: 0.9 * m / 10, True, _enhance(k))
       for k in ("Color", "Contrast", "Brightness", "Sharpness")},
    "ShearX": (lambda m: 0.3 * m / 10, True, lambda img, v: _affine(img, 1, v, 0, 0, 1, 0)),
    "ShearY": (lambda m: 0.3 * m / 10, True, lambda img, v: _affine(img, 1, 0, 0, v, 1, 0)),
    "TranslateXRel": (lambda m: 0.45 * m / 10, True,
                      lambda img, v: _affine(img, 1, 0, v * img.size[0], 0, 1, 0)),
    "TranslateYRel": (lambda m: 0.45 * m / 10, True,
                      lambda img, v: _affine(img, 1, 0, 0, 0, 1, v * img.size[1])),
}


def rand_augment(img, m=9, n=2, std=0.5):
    """timm's `rand-m{m}-mstd0.5-inc1`: n ops, each applied with probability 0.5 at a magnitude
    ~ N(m, std) clipped to [0, 10] (torch's RNG)."""
    for i in torch.randint(len(RA_OPS), (n,)).tolist():
        level_fn, signed, op = list(RA_OPS.values())[i]
        if torch.rand(()) < 0.5:
            continue
        level = float(torch.clamp(m + std * torch.randn(()), 0, 10))
        v = level_fn(level) if level_fn else None
        img = op(img, -v if signed and torch.rand(()) < 0.5 else v)
    return img


class LARS(torch.optim.Optimizer):
    """MAE's LARS: momentum SGD; a >1-D weight's decayed update is rescaled to trust x |w| / |u|."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust=0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust=trust)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in (p for p in g["params"] if p.grad is not None):
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    w = p.norm()
                    u = d.norm()
                    scale = torch.where((w > 0) & (u > 0), g["trust"] * w / u, torch.ones_like(w))
                    d = d * scale
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                p.add_(mu.mul_(g["momentum"]).add_(d), alpha=-g["lr"])


class Classifier(nn.Module):
    """Encoder + one head per pooled feature (names: cls, mean; avg for a ResNet; block1.. for
    BEiT's probe)."""

    def __init__(self, encoder, dim, num_classes, mode, pool, is_vit, probe="final"):
        super().__init__()
        self.encoder = encoder
        self.mode = mode
        self.is_vit = is_vit
        # BEiT's probe: one head per block
        blocks = mode == "linear" and probe == "blocks" and is_vit
        if not is_vit:
            self.names = ["avg"]
        elif blocks:
            self.names = [f"block{i + 1}" for i in range(len(encoder.blocks))]
        elif pool == "both":
            self.names = ["cls", "mean"]
        else:
            self.names = [pool]
        # BEiT's use_mean_pooling: the final norm moves to fc_norm; probes get a fresh, frozen one
        learned = mode == "finetune" and pool == "mean" and is_vit
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=learned)
        if learned:
            self.encoder.norm = nn.Identity()
        in_dim = 2 * dim if blocks else dim
        self.heads = nn.ModuleDict({n: nn.Linear(in_dim, num_classes) for n in self.names})
        # std: MAE's probe 0.01; BEiT 0.02 x head_init_scale 0.001
        std = 0.01 if mode == "linear" else 0.02
        scale = 0.001 if mode == "finetune" else 1.0
        for h in self.heads.values():
            nn.init.trunc_normal_(h.weight.data, std=std).mul_(scale)
            nn.init.zeros_(h.bias)
        if mode == "linear" and probe == "final":
            bn = {n: nn.BatchNorm1d(in_dim, affine=False, eps=1e-6) for n in self.heads}
            self.heads = nn.ModuleDict({n: nn.Sequential(bn[n], h) for n, h in self.heads.items()})
        self.encoder.requires_grad_(mode == "finetune")

    def pooled(self, x):                                       # (B, C, H, W) -> {name: (B, F)}
        if not self.is_vit:
            return {"avg": self.encoder(x.contiguous(memory_format=torch.channels_last))}
        outs = self.encoder.forward_blocks(x)                  # per block (B, 1+N, D), raw
        if self.names[0].startswith("block"):
            # [cls, mean] of every raw block output
            return {n: torch.cat([t[:, 0], t[:, 1:].mean(1)], -1) for n, t in zip(self.names, outs)}
        last = outs[-1]
        feats = {"cls": self.encoder.norm(last[:, 0]), "mean": self.fc_norm(last[:, 1:].mean(1))}
        return {n: feats[n] for n in self.names}

    def forward(self, x):                                      # -> {name: (B, classes) logits}
        if self.mode != "finetune":
            # frozen: no dropout, drop path or BatchNorm updates
            self.encoder.eval()
        with torch.set_grad_enabled(self.mode == "finetune" and torch.is_grad_enabled()):
            feats = self.pooled(x)
        return {n: self.heads[n](f.float()) for n, f in feats.items()}


def layer_decay_groups(model, weight_decay, layer_decay, skip_decay=no_decay):
    """BEiT's layer-wise lr decay: lr scale layer_decay^(L+1-layer) (the layers: docs); weight
    decay on the parameters skip_decay does not exempt."""
    L = len(model.encoder.blocks) if model.is_vit else 0
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        n = n.removeprefix("encoder.")
        if n.startswith("blocks."):
            layer = int(n.split(".")[1]) + 1
        elif n.startswith(("cls_token", "pos_embed", "patch_embed")):
            layer = 0
        else:
            layer = L + 1
        wd = 0.0 if skip_decay(n, p) else weight_decay
        group = {"params": [], "weight_decay": wd, "lr_scale": layer_decay ** (L + 1 - layer)}
        groups.setdefault((layer, wd), group)["params"].append(p)
    return list(groups.values())


def knn_classify(train_f, train_y, test_f, num_classes, k=20, t=0.07, chunk=256):
    """DINO's weighted kNN: the top-k cosine neighbours vote with exp(sim / t)
    -> class scores (M_test, num_classes)."""
    train_f = F.normalize(train_f, dim=1)
    scores = []
    for q in F.normalize(test_f, dim=1).split(chunk):
        sim, idx = (q @ train_f.T).topk(min(k, len(train_f)), dim=1)          # (m, k)
        votes = sim.new_zeros(len(q), num_classes)
        scores.append(votes.scatter_add_(1, train_y[idx], (sim / t).exp()))   # (m, C)
    return torch.cat(scores)


def accuracy(scores, y, topk=(1, 5)):
    top = scores.topk(min(max(topk), scores.shape[1]), dim=1).indices          # (M, k)
    return [100.0 * (top[:, :k] == y[:, None]).any(1).float().mean().item() for k in topk]

# ----------------------------------------------------------------------------- data


def build_transforms(cfg, img_size):
    """-> (train transform, val transform); kNN uses the val transform for both."""
    norm = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    bicubic = transforms.InterpolationMode.BICUBIC
    # 256 -> 224 (MAE, DINO, BEiT)
    val = transforms.Compose([transforms.Resize(int(img_size / 0.875), interpolation=bicubic),
                              transforms.CenterCrop(img_size), *norm])
    # the probes: crop + flip only (MAE, BEiT); BEiT's probe crops with the default bilinear
    finetune = cfg.mode == "finetune"
    crop = transforms.InterpolationMode.BILINEAR if cfg.probe == "blocks" else bicubic
    train = [transforms.RandomResizedCrop(img_size, interpolation=crop),
             transforms.RandomHorizontalFlip()]
    if cfg.randaug and finetune:
        train.append(partial(rand_augment, m=cfg.randaug))
    train += norm
    if cfg.reprob and finetune:
        train.append(transforms.RandomErasing(cfg.reprob, value="random"))
    return (val if cfg.mode == "knn" else transforms.Compose(train)), val


def build_data(cfg, img_size):
    """(train set, val set) with the same classes in the same order; a flat class-folder root gets
    a fixed 10% hold-out. Unreadable images: training takes the next readable one, the val split
    and the kNN bank drop them."""
    train_tf, val_tf = build_transforms(cfg, img_size)
    train = build_dataset(cfg.data, "train", train_tf, img_size)
    val = build_dataset(cfg.data, "val", val_tf, img_size)
    if val is None:
        if os.path.isdir(os.path.join(cfg.data, "train")):
            fail(f"--data {cfg.data} has train/ but no val/ (or validate/) folder")
        full_val = build_dataset(cfg.data, "train", val_tf, img_size)
        full_val.substitute = False
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
        n_val = max(1, len(order) // 10)
        print0(f"no val/ split in {cfg.data}: holding out {n_val} of {len(order)} images "
               "(fixed seed)")
        train = Subset(train, order[n_val:])
        val = Subset(full_val, order[:n_val])
        train.classes = val.classes = train.dataset.classes
    if cfg.mode == "knn":
        # the kNN bank drops unreadable images too
        getattr(train, "dataset", train).substitute = False
    if val.classes != train.classes:
        extra = sorted(set(val.classes) ^ set(train.classes))[:3]
        detail = f", e.g. {', '.join(extra)})" if extra else ", same names in another order)"
        fail(f"--data {cfg.data}: val classes differ from train classes ({len(val.classes)} vs "
             f"{len(train.classes)}{detail}")
    return train, val

# ----------------------------------------------------------------------- evaluation, training, main


def all_gather_cat(t):
    """Concatenate the rows of `t` over ranks; ranks may hold different numbers of rows."""
    if not dist.is_initialized():
        return t
    world = dist.get_world_size()
    n = torch.tensor([len(t)], device=t.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(k) for k in sizes]
    padded = torch.cat([t, t.new_zeros(max(sizes) - len(t), *t.shape[1:])])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])


@torch.no_grad()
def extract(fn, loader, device, autocast):
    """fn(images) -> {name: (B, F)} over a split (a loader over an Indexed dataset), gathered from
    all ranks, each readable sample once, in dataset order -> {name: (M, F)}, labels (M,)."""
    outs = defaultdict(list)
    labels = []
    index = []
    for batch in loader:
        if batch is None:   # every image of this batch was unreadable
            continue
        x, y, i = batch
        with autocast():
            for n, f in fn(x.to(device, non_blocking=True)).items():
                outs[n].append(f.float())
        labels.append(y.to(device))
        index.append(i.to(device))
    fail_all(bool(index), "a split has no readable image (on some rank); check the data folder")
    # the dataset index of every row: DistributedSampler pads the last shard with repeats
    idx = all_gather_cat(torch.cat(index))
    uniq, inv = idx.unique(return_inverse=True)
    order = torch.arange(len(idx), device=device)
    first = torch.full_like(uniq, len(idx)).scatter_reduce(0, inv, order, "amin")
    feats = {n: all_gather_cat(torch.cat(v))[first] for n, v in outs.items()}
    return feats, all_gather_cat(torch.cat(labels))[first]


def evaluate(raw_model, val_loader, device, autocast):
    """Top-1 / top-5 of every head on the val split -> ({head: (top1, top5)}, images used)."""
    scores, val_y = extract(raw_model.eval(), val_loader, device, autocast)
    return {n: accuracy(s, val_y) for n, s in scores.items()}, len(val_y)


def knn(cfg, raw_model, train_set, val_loader, num_classes, protocol, device, autocast):
    """DINO's kNN on frozen features: the train split is the bank; prints and logs each pooling."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    loader = build_loader(Indexed(train_set), cfg.batch_size, world, rank, cfg.seed, cfg.workers,
                          device, shuffle=False)
    prepare_out(cfg.out, cfg, __file__)
    train_f, train_y = extract(raw_model.eval().pooled, loader, device, autocast)
    val_f, val_y = extract(raw_model.pooled, val_loader, device, autocast)
    res = {}
    for n in raw_model.names:
        scores = knn_classify(train_f[n], train_y, val_f[n], num_classes, cfg.knn_k, cfg.knn_t)
        res[n] = accuracy(scores, val_y)
        print0(f"kNN ({protocol}, pool {n}) on {len(val_y)} images, bank of {len(train_y)}: "
               f"top-1 {res[n][0]:.2f} top-5 {res[n][1]:.2f}")
    skipped = skipped_images(train_set) + skipped_images(val_loader.dataset)
    if skipped:
        print0(f"{skipped} unreadable images dropped (named above)")
    top1, top5 = res[raw_model.names[0]]
    log_json(cfg.out, {"mode": "knn", "protocol": protocol, "pool": cfg.pool, "top1": top1,
                       "top5": top5, "per_pool": res, "n_train": len(train_y), "n_val": len(val_y),
                       "skipped": skipped})
    return {"top1": top1, "top5": top5, "per_pool": res}


def main(cfg):
    # the same random encoder and head init on every rank
    seed_all(cfg.seed)
    validate(cfg)
    encoder, dim, args = build_encoder(cfg)
    cfg = dataclasses.replace(cfg, pool=cfg.pool or args["pool"],
                              out=cfg.out or f"out/finetune_{cfg.mode}")
    if cfg.mode == "finetune" and cfg.pool == "both":
        fail("--pool both is for --mode linear / knn")
    if cfg.probe == "blocks" and args["arch"] != "vit":
        fail("--probe blocks is for a ViT encoder")
    rank, world, device = setup_dist(cfg.device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    amp_dtype = amp_dtype if device.type == "cuda" else None

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    train_set, val_set = build_data(cfg, cfg.img_size or args.get("img_size", 224))
    num_classes = len(train_set.classes)
    val_loader = build_loader(Indexed(val_set), cfg.batch_size, world, rank, cfg.seed, cfg.workers,
                              device, shuffle=False)
    is_vit = args["arch"] == "vit"
    raw_model = Classifier(encoder, dim, num_classes, cfg.mode, cfg.pool, is_vit, cfg.probe)
    raw_model = raw_model.to(device)
    # distinct augmentation streams per rank
    seed_all(cfg.seed + rank)
    if not is_vit and cfg.mode == "finetune" and cfg.preset != "resnet50":
        print0("note: a ResNet-50 with the ViT fine-tuning recipe; --preset resnet50 gives the "
               "ResNet recipe")
    protocol = {"finetune": "BEiT/MAE fine-tuning" if is_vit else "ResNet fine-tuning",
                "knn": f"DINO weighted {cfg.knn_k}-NN, T {cfg.knn_t}",
                "linear": "BEiT per-block probe" if cfg.probe == "blocks" else "MAE linear probe"}
    protocol = protocol[cfg.mode]
    pools = "/".join(raw_model.names) if cfg.probe == "final" else "[cls, mean] per block"
    if cfg.mode == "knn":
        return knn(cfg, raw_model, train_set, val_loader, num_classes, protocol, device, autocast)

    loader = build_loader(train_set, cfg.batch_size, world, rank, cfg.seed, cfg.workers, device)
    # nanoGPT's order: compile, then DDP
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    steps_per_epoch = epoch_steps(loader, 1, cfg.steps_per_epoch)
    total_steps = cfg.epochs * steps_per_epoch
    lr = cfg.blr * cfg.batch_size * world / 256
    print0(f"{protocol} (pool {pools}): lr = {cfg.blr} x {cfg.batch_size} x {world} / 256 = "
           f"{lr:.2e}, {total_steps} steps, out {cfg.out}")
    blocks = cfg.probe == "blocks"
    # BEiT's probe decays every head parameter, biases too
    skip = (lambda n, p: False) if blocks else no_decay
    layer_decay = cfg.layer_decay if cfg.mode == "finetune" else 1.0
    groups = layer_decay_groups(raw_model, cfg.weight_decay, layer_decay, skip)
    if cfg.mode == "linear" and not blocks:
        opt = LARS(groups, lr=lr)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if blocks:
        # BEiT: CosineAnnealingLR stepped once per epoch, no warmup
        per_epoch = cosine_schedule(lr, cfg.min_lr, cfg.epochs)
        lr_sched = np.repeat(per_epoch, steps_per_epoch).tolist()
    else:
        warmup_steps = cfg.warmup_epochs * steps_per_epoch
        lr_sched = cosine_schedule(lr, cfg.min_lr, total_steps, warmup_steps)
    mixers = []
    if cfg.mode == "finetune":
        mixers = [m(alpha=a, num_classes=num_classes)
                  for m, a in ((v2.MixUp, cfg.mixup), (v2.CutMix, cfg.cutmix)) if a > 0]
    # one of MixUp / CutMix per batch, p 0.5 each
    mix = v2.RandomChoice(mixers) if mixers else None
    # the probes: plain cross-entropy (MAE, BEiT)
    smooth = cfg.smoothing if cfg.mode == "finetune" else 0.0
    pretrained_hash = file_hash(cfg.pretrained) if cfg.pretrained != "random" else ""
    derived = {"arch": args["arch"], "global_batch": cfg.batch_size * world,
               "steps_per_epoch": steps_per_epoch, "images": len(train_set),
               "pretrained_hash": pretrained_hash}
    run = Run(cfg, __file__, raw_model, opt, scaler, loader, steps_per_epoch, 1, derived)
    run.resume()
    best = run.meta.get("best", 0.0)
    top1 = top5 = 0.0

    def loss_of(x, target):   # one cross-entropy per head, summed
        logits = model(x).values()
        return sum(F.cross_entropy(out.float(), target, label_smoothing=smooth) for out in logits)

    for it, batches in run.steps():
        for g in opt.param_groups:
            g["lr"] = lr_sched[it] * g["lr_scale"]
        for _, (x, y) in batches:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if mix is not None:
                x, target = mix(x, y)
            else:
                target = F.one_hot(y, num_classes).float()
            with autocast():
                loss = loss_of(x, target)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            run.add(loss=loss)
        # an epoch end or --stop-after: evaluate (not on a stop), then save
        if not run.end_step(it, lr_sched[it]):
            continue
        state = {"model": raw_model.state_dict(), "optimizer": opt.state_dict(),
                 "scaler": scaler.state_dict()}

        def check():   # the loss of the weights about to be saved, on the last batch
            outs = raw_model(x).values()
            return sum(F.cross_entropy(o.float(), target, label_smoothing=smooth) for o in outs)

        if run.stopping:
            run.save({**state, "best": best}, check)
            continue
        res, n_val = evaluate(raw_model, val_loader, device, autocast)
        head, (top1, top5) = max(res.items(), key=lambda kv: kv[1][0])
        heads = ", ".join(f"{n} {r[0]:.2f}/{r[1]:.2f}" for n, r in res.items())
        print0(f"epoch {run.epoch}: {heads} val top-1/top-5 ({protocol}) on {n_val} images | "
               f"best {max(best, top1):.2f}")
        files = {}
        if top1 >= best:
            best = top1
            files["best.pth"] = {"model": raw_model.state_dict(), "epoch": run.epoch, "top1": top1,
                                 "config": vars(cfg)}
        run.save({**state, "best": best}, check, files, top1=top1, top5=top5, head=head,
                 per_head=res, protocol=protocol, pool=pools, n_val=n_val)
    return {"top1": top1, "top5": top5, "best": best}


def validate(cfg):
    """Cross-flag rules (each flag's own range is Config.RANGES, its mode Config.ONLY_WITH): one
    clear error before any work."""
    check_ranges(cfg)
    if cfg.preset == "resnet50" and cfg.mode != "finetune":
        fail(f"--preset resnet50 is a fine-tuning recipe; --mode {cfg.mode} keeps its own "
             "protocol's defaults: drop --preset")
    if cfg.probe == "blocks" and cfg.mode != "linear":
        fail("--probe blocks is for --mode linear")
    if cfg.mode != "knn" and cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs:
        fail(f"--warmup-epochs {cfg.warmup_epochs} >= --epochs {cfg.epochs}: the lr never reaches "
             "its peak")
    if cfg.compile and cfg.mode != "finetune":
        fail("--compile is for --mode finetune")

# ------------------------------------------------------------------------ appendix: encoder loading


VIT_SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),   # name: (width, depth, heads)
             "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}


def build_encoder(cfg):
    """-> (encoder, width, args incl. "pool"): a ViT (a bias table per block, positions resized) or
    a ResNet-50."""
    if not cfg.pretrained:
        fail("--pretrained is required: a method checkpoint, or 'random' for a randomly "
             "initialised baseline")
    if cfg.pretrained == "random":
        sd = None
        if cfg.arch == "resnet50":
            args = {"arch": "resnet50"}
        else:
            D, depth, heads = VIT_SIZES[cfg.arch]
            args = dict(arch="vit", img_size=cfg.img_size or 224, patch_size=cfg.patch_size,
                        embed_dim=D, depth=depth, num_heads=heads, pos_embed="sincos",
                        rel_pos="none", init_values=None, pool="mean")
    else:
        ck = load_checkpoint(cfg.pretrained, "--pretrained")
        if "encoders" not in ck or "encoder_args" not in ck:
            fail(f"{cfg.pretrained} has no 'encoders'/'encoder_args': not a checkpoint of this "
                 "project's method files")
        name = cfg.from_ or ck.get("default_encoder", next(iter(ck["encoders"])))
        if name not in ck["encoders"]:
            fail(f"--from {name}: {cfg.pretrained} holds encoders {', '.join(ck['encoders'])}")
        args = dict(ck["encoder_args"])
        sd = ck["encoders"][name]
        # BEiT/ConMIM use_mean_pooling, MAE/CIM global_pool: all mean
        args["pool"] = ck.get("pool", "mean")
        print0(f"loading encoder '{name}' ({args['arch']}) from {cfg.pretrained}")
    if args["arch"] == "resnet50":
        enc = torchvision.models.resnet50()
        enc.fc = nn.Identity()
        if sd is not None:
            enc.load_state_dict(sd)
        return enc.to(memory_format=torch.channels_last), 2048, {**args, "pool": "avg"}
    kw = {k: v for k, v in args.items() if k not in ("arch", "pool")}
    old_grid = (kw["img_size"] // kw["patch_size"],) * 2
    kw["img_size"] = cfg.img_size or kw["img_size"]
    # "shared" (pre-training) or "block": one table per block here
    kw["rel_pos"] = kw.get("rel_pos", "none") != "none"
    if kw["img_size"] % kw["patch_size"]:
        fail(f"--img-size {kw['img_size']} is not a multiple of the patch size {kw['patch_size']}")
    drop_path = cfg.drop_path if cfg.mode == "finetune" else 0.0
    enc = VisionTransformer(**kw, drop_path=drop_path)
    if sd is not None:
        sd = from_timm_layout(sd)
        if "pos_embed" in sd:
            # learned: bicubic to the new grid; fixed sin-cos: recomputed for it
            if isinstance(enc.pos_embed, nn.Parameter):
                sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], old_grid, enc.grid)
            else:
                sd["pos_embed"] = enc.pos_embed
        # a bias table: the offset grid (2h-1, 2w-1) resized, the 3 cls rows kept
        for k in [k for k in sd if k.endswith("relative_position_bias_table")]:
            offsets = [[2 * g - 1 for g in grid] for grid in (old_grid, enc.grid)]
            sd[k] = torch.cat([resize_grid(sd[k][:-3], *offsets), sd[k][-3:]])
        enc.load_state_dict(sd, strict=True)
    return enc, kw["embed_dim"], args


def from_timm_layout(sd):
    """timm's vit_* / beit_* keys -> ours: q_bias, v_bias -> qkv.bias (a zero k bias),
    gamma_i -> ls{i}.gamma."""
    out = {}
    for k, v in sd.items():
        if k.endswith(("attn.q_bias", "attn.v_bias")):
            continue
        out[k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")] = v
    for k, v in sd.items():
        if k.endswith("attn.q_bias"):
            prefix = k[:-6]
            out[prefix + "qkv.bias"] = torch.cat([v, torch.zeros_like(v), sd[prefix + "v_bias"]])
    return out


def resize_grid(rows, old, new):
    """(h*w, C) rows of an h x w grid -> (h'*w', C) for another grid, bicubic (positions, BEiT's
    bias tables)."""
    if tuple(old) == tuple(new):
        return rows
    grid = rows.T.reshape(1, -1, *old).float()
    grid = F.interpolate(grid, size=tuple(new), mode="bicubic", align_corners=False)
    return grid.reshape(rows.shape[1], -1).T.to(rows.dtype)


def resize_pos_embed(pos_embed, old_grid, new_grid):
    """(1, 1+h*w, D) -> (1, 1+h'*w', D), the cls position kept."""
    grid = resize_grid(pos_embed[0, 1:], old_grid, new_grid)[None]
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def sincos_pos_embed(D, h, w):
    """Fixed 2-D sin-cos positions (MAE): half the channels encode the column, half the row
    -> (h*w, D)."""
    omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D // 4))   # (D/4,)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                            torch.arange(w, dtype=torch.float64), indexing="ij")
    out = [f(c.flatten()[:, None] * omega) for c in (xs, ys) for f in (torch.sin, torch.cos)]
    return torch.cat(out, 1).float()


def rel_pos_index(h, w):
    """BEiT's relative-position index over 1 + h*w tokens; the last 3 table rows are cls->token,
    token->cls and cls->cls."""
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)          # (N, N, 2)
    num = (2 * h - 1) * (2 * w - 1)
    idx = torch.full((h * w + 1, h * w + 1), num + 2, dtype=torch.long)       # (1+N, 1+N)
    idx[1:, 1:] = (rel[..., 0] + h - 1) * (2 * w - 1) + rel[..., 1] + w - 1
    idx[0, 1:] = num
    idx[1:, 0] = num + 1
    return idx


class Attention(nn.Module):
    """Multi-head self-attention; with `grid`, its own BEiT relative-position bias table (timm's
    beit_* layout)."""

    def __init__(self, dim, num_heads, qkv_bias=True, grid=None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = None
        if grid:
            # (2h-1)(2w-1) + 3 rows, one column per head
            idx = rel_pos_index(*grid)
            self.register_buffer("relative_position_index", idx, persistent=False)
            rows = int(idx.max()) + 1
            self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))

    def forward(self, x):                                              # (B, T, D) -> (B, T, D)
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                          # 3 x (B, heads, T, hd)
        bias = None
        if self.relative_position_bias_table is not None:
            # (T, T, heads)
            table = self.relative_position_bias_table[self.relative_position_index]
            # (1, heads, T, T)
            bias = table.permute(2, 0, 1)[None].to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class LayerScale(nn.Module):

    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, init_values=None,
                 drop_path=0.0, grid=None):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, grid)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(),
                                             fc2=nn.Linear(hidden, dim)))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x):                                              # (B, T, D) -> (B, T, D)
        a = self.ls1(self.attn(self.norm1(x)))
        x = x + stochastic_depth(a, self.drop_path, "row", self.training)
        m = self.ls2(self.mlp(self.norm2(x)))
        return x + stochastic_depth(m, self.drop_path, "row", self.training)


class VisionTransformer(nn.Module):
    """ViT in timm's key layout; pos_embed "learned" | "sincos" (fixed) | "none"; rel_pos: a BEiT
    bias table per block."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, pos_embed="learned", rel_pos=False, init_values=None,
                 drop_path=0.0, in_chans=3):
        super().__init__()
        self.patch_size = patch_size
        self.grid = (img_size // patch_size,) * 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if pos_embed == "learned":
            tokens = 1 + self.grid[0] * self.grid[1]
            self.pos_embed = nn.Parameter(torch.zeros(1, tokens, embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        elif pos_embed == "sincos":
            # fixed, zero for cls (MAE); a buffer, so that timm finds it in the state dict
            pos = F.pad(sincos_pos_embed(embed_dim, *self.grid), (0, 0, 1, 0))[None]
            self.register_buffer("pos_embed", pos)
        else:
            self.register_buffer("pos_embed", None)
        # stochastic depth rate grows linearly with depth
        dpr = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        grid = self.grid if rel_pos else None
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values,
                                           dpr[i], grid) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # MAE-style init: xavier-uniform Linears, zero biases, the patch embedding as a Linear
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(embed_dim, -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def forward_blocks(self, images):                          # (B, C, H, W) -> depth x (B, 1+N, D)
        x = self.patch_embed.proj(images)                              # (B, D, h, w)
        pos = 0
        if self.pos_embed is not None:
            pos = resize_pos_embed(self.pos_embed, self.grid, x.shape[-2:])
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        x = x + pos
        return [x := blk(x) for blk in self.blocks]

    def forward(self, images):                                         # (B, C, H, W) -> (B, 1+N, D)
        return self.norm(self.forward_blocks(images)[-1])


if __name__ == "__main__":
    cfg = parse_config(Config)
    main(parse_config(Config, defaults=Config.mode_defaults(cfg)))
    if dist.is_initialized():
        # leave together: a gloo peer that exits first can abort the others
        dist.barrier()
        dist.destroy_process_group()
