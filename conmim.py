"""
conmim.py - ConMIM pre-training in one file: masked image modeling as patch-level denoising contrast.

Paper: Yi, Ge, Li, Yang, Li, Wu, Shan, Qie, "Masked Image Modeling with Denoising Contrast", ICLR 2023,
arXiv 2205.09616. Official code: https://github.com/TencentARC/ConMIM (cited as TencentARC/ConMIM/path:line@4263955).

    python conmim.py --data /imagenet --epochs 300                                   # ViT-B/16, 1 GPU, batch 64
    torchrun --nproc_per_node 8 conmim.py --preset vit_base_300ep --data /imagenet   # 64 x 8 GPUs x 4 accum = 2048
    python conmim.py --preset tiny --data synthetic --out out/conmim_tiny            # CPU smoke run, seconds

A student ViT sees the weakly augmented view with patches replaced by a mask token; a momentum teacher sees the full,
strongly augmented view. Each masked student patch feature must find the teacher feature at its own position among
all patches of the same image (InfoNCE, tau 0.1). No tokenizer, no pixel targets. finetune.py fine-tunes the teacher.
Result: ImageNet not measured (paper Table 1: ViT-B/16 300 ep -> 83.5). Measured 2026-11-28 on a 2-core CPU: small32
on sklearn digits, 300 s (280 steps, 3 seeds): teacher kNN 75.8 vs 66.6 at init (benchmarks/README.md).

Sections: config | masking | loss | projector, teacher, EMA | model | data | training loop, main |
appendix: BEiT-style ViT, visualisation, argument checks.
"""
import copy
import dataclasses
import itertools
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import stochastic_depth
from torchvision.utils import save_image

from common import (IMAGENET_MEAN, IMAGENET_STD, CropFlip, Run, accum_steps, batch_warning, build_dataset,
                    build_loader, check_ranges, cosine_schedule, decode_mode, fail, images_to, no_sync, param_groups,
                    parse_config, print0, seed_all, setup_dist)

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass
class Config:
    """ConMIM pre-training; defaults: ViT-B/16 with the official code's values (see docs/conmim.md)."""
    data: str = "/imagenet"       # ImageFolder (train/ or flat), cifar10, cifar100, stl10 (unlabeled), synthetic
    img_size: int = 224           # crop side (official --input_size 224)
    crop_min_scale: float = 0.08  # RandomResizedCrop area scale (min, 1), shared by both views (official 0.08)
    # model
    arch: str = "vit_base"        # vit_tiny | vit_small | vit_base | vit_large (paper: ViT-S/B/L, patch 16)
    depth: int = 0                # ViT depth override; 0 = the arch's depth
    patch_size: int = 16          # ViT patch side in pixels (official: 16)
    init_values: float = 0.1      # layer scale init (official default 0.1; README ViT-L 1e-5); 0 = off
    rel_pos_init: float = 0.0     # std of the initial relative-position table; 0 = zeros (BEiT, official)
    init: str = "beit"            # weight init: beit (official) | xavier (MAE-style; docs/conmim.md#small-presets)
    drop_path: float = 0.0        # stochastic depth, student and teacher (official default and README: 0)
    proj_hidden: int = 4096       # projector hidden width (official: Linear-BN-ReLU x2 at 4096)
    proj_dim: int = 256           # projector output width (official: 256, last BN without affine)
    # method
    mask_type: str = "random_mps32"   # random_mps32 (README) | block (BEiT blockwise, the official code's default)
    mask_ratio: float = 0.75      # random_mps32: ceil(ratio * mask patches) hidden per image (README 0.75)
    mask_patch: int = 32          # random_mps32: mask-patch side in pixels, the "32" of mps32; multiple of patch_size
    mask_patches: int = 0         # block: patches hidden per image; 0 = 75/196 of the grid (official 75 at 14x14)
    min_block: int = 0            # block: smallest block in patches; 0 = 16/196 of the grid (official 16 at 14x14)
    tau: float = 0.1              # InfoNCE temperature (official --temp 0.1, not changed in the README)
    negatives: str = "image"      # image: each image is its own dictionary (paper, official) | batch: all local patches
    ema: float = 0.996            # teacher momentum, cosine per step to 1 (official --t_momentum 0.996)
    teacher_bn: str = "batch"     # teacher BatchNorm: batch (official: teacher never in eval mode) | running statistics
    # optimisation (official AdamW betas 0.9/0.98, eps 1e-8)
    epochs: int = 300             # paper Table 1: ViT-B 300 ep -> 83.5
    batch_size: int = 64          # per GPU per micro-batch (official default; README ViT-L: 64 x 32 GPUs = 2048)
    accum_iter: int = 1           # micro-batches per optimizer step; inexact: projector BN sees each micro-batch alone
    global_batch: int = 0         # target global batch: accum = G / (batch size x GPUs); 0 = batch x GPUs x accum
    paper_batch: int = 0          # the recipe's global batch (presets set it); >2x away prints a warning
    paper_row: str = ""           # the paper result a preset reproduces, printed in the recipe line
    lr: float = 5e-4              # ABSOLUTE peak lr, not scaled with the batch (official default 5e-4)
    min_lr: float = 1e-5          # cosine floor (official --min_lr 1e-5)
    warmup_epochs: int = 10       # linear warmup from 0 (README 10; official default 5)
    weight_decay: float = 0.05    # constant (official); none on 1-D params, cls token (official_skip_decay)
    clip_grad: float = 1.0        # max global grad norm (README 1.0; official default: off); 0 = off
    # system
    device: str = "cuda"          # "cpu" works (slowly) - CI uses it
    amp: str = "bf16"             # bf16 | fp16 | off (CUDA only; CPU runs fp32). Official: fp16 autocast
    compile: bool = False         # torch.compile the model (student + teacher forward and the loss)
    workers: int = 10             # data loader processes per GPU (official 10)
    steps_per_epoch: int = 0      # optimizer steps per epoch: 0 = full pass; >0 caps it (smoke tests)
    stop_after: int = 0           # exit after this many optimizer steps, leaving a resumable checkpoint; 0 = off
    log_every: int = 50           # progress line every N optimizer steps
    viz_every: int = 0            # write OUT/viz_epoch{E}.png every N epochs (masks, student-teacher similarity)
    decode: str = "cpu"           # cpu: loader workers decode JPEGs | device: workers read bytes, the GPU decodes
    out: str = "out/conmim"       # checkpoints, log.jsonl, config.json; an existing checkpoint.pth is resumed
    seed: int = 0                 # global seed; process r uses seed + r
    preset: str = ""              # a paper row (vit_small_300ep ... vit_large_1600ep) | tiny | small32 (CPU runs)
    allow_change: str = ""        # resume although these settings differ from the checkpoint's: a,b or all

    CHOICES = {"arch": ("vit_tiny", "vit_small", "vit_base", "vit_large"), "mask_type": ("random_mps32", "block"),
               "negatives": ("image", "batch"), "teacher_bn": ("batch", "running"), "amp": ("bf16", "fp16", "off"),
               "init": ("beit", "xavier"), "decode": ("cpu", "device")}
    RANGES = {"img_size": ">= 1", "crop_min_scale": "(0, 1]", "depth": ">= 0", "patch_size": ">= 1",
              "init_values": ">= 0", "rel_pos_init": ">= 0", "drop_path": "[0, 1)", "proj_hidden": ">= 1",
              "proj_dim": ">= 1", "mask_ratio": "(0, 1)", "mask_patch": ">= 1", "mask_patches": ">= 0",
              "min_block": ">= 0", "tau": "> 0", "ema": "[0, 1]", "epochs": ">= 1", "batch_size": ">= 1",
              "accum_iter": ">= 1", "global_batch": ">= 0", "paper_batch": ">= 0", "lr": "> 0",
              "min_lr": ">= 0", "warmup_epochs": ">= 0", "weight_decay": ">= 0", "clip_grad": ">= 0",
              "workers": ">= 0", "steps_per_epoch": ">= 0", "stop_after": ">= 0", "log_every": ">= 1",
              "viz_every": ">= 0", "seed": ">= 0"}
    # a flag given on the command line that the chosen mask type would ignore is an error
    ONLY_WITH = {"mask_ratio": ("mask_type", ("random_mps32",)), "mask_patch": ("mask_type", ("random_mps32",)),
                 "mask_patches": ("mask_type", ("block",)), "min_block": ("mask_type", ("block",))}

    PRESETS = {
        # paper Table 2, TencentARC/ConMIM/README.md:15@4263955; S/B batch unpublished: the ViT-L command's 2048 assumed
        "vit_small_300ep": dict(arch="vit_small", epochs=300, global_batch=2048, paper_batch=2048,
                                paper_row="ViT-S/16 300 ep -> 82.0"),
        # paper Table 1 (TencentARC/ConMIM/imgs/results.png@4263955): the defaults, batch 2048 assumed
        "vit_base_300ep": dict(arch="vit_base", epochs=300, global_batch=2048, paper_batch=2048,
                               paper_row="ViT-B/16 300 ep -> 83.5"),
        # paper Table 1, TencentARC/ConMIM/README.md:16@4263955; batch 2048 assumed
        "vit_base_800ep": dict(arch="vit_base", epochs=800, global_batch=2048, paper_batch=2048,
                               paper_row="ViT-B/16 800 ep -> 83.7"),
        # TencentARC/ConMIM/README.md:53-67@4263955: 32 GPUs x 64, lr 7.5e-4, layer scale 1e-5; Table 3 / README.md:18
        "vit_large_1600ep": dict(arch="vit_large", epochs=1600, lr=7.5e-4, init_values=1e-5, global_batch=2048,
                                 paper_batch=2048, paper_row="ViT-L/16 1600 ep -> 85.5"),
        # the same command at 800 epochs: paper Table 3, TencentARC/ConMIM/README.md:17@4263955
        "vit_large_800ep": dict(arch="vit_large", epochs=800, lr=7.5e-4, init_values=1e-5, global_batch=2048,
                                paper_batch=2048, paper_row="ViT-L/16 800 ep -> 85.2"),
        # CPU smoke run: 32x32, patch 4, 4 blocks, narrow projector (docs/conmim.md)
        "tiny": dict(arch="vit_tiny", depth=4, img_size=32, patch_size=4, mask_patch=8, proj_hidden=256, proj_dim=64,
                     batch_size=8, epochs=1, warmup_epochs=0, device="cpu", workers=0, log_every=1),
        # CPU learning run (benchmarks/learning.py); each change from the recipe and why: docs/conmim.md
        "small32": dict(arch="vit_tiny", img_size=32, patch_size=4, mask_patch=8, proj_hidden=1024, proj_dim=128,
                        crop_min_scale=0.5, rel_pos_init=1.0, init_values=0.0, init="xavier", ema=0.99, batch_size=32,
                        lr=3e-4, warmup_epochs=1, epochs=8, device="cpu", workers=2, log_every=10),
    }

# ----------------------------------------------------------------------------- masking (batched, on the device)


def random_mps_mask(B, grid, cell, ratio, device, generator=None):
    """`random_mps32` (SimMIM-style, official README): hide ceil(ratio * C) of the C cells of cell x cell patches
    (at 224 px: 37 of 49 cells of 2x2 patches = 148 of 196 patches), each image its own draw.
    Returns (B, h*w) bool, True = masked; exactly ceil(ratio * C) * cell^2 True per row."""
    gh, gw = grid[0] // cell, grid[1] // cell
    n_hide = math.ceil(ratio * gh * gw - 1e-9)                                       # official: np.ceil
    ranks = torch.rand(B, gh * gw, device=device, generator=generator).argsort(1).argsort(1)   # (B, C) random ranks
    coarse = (ranks < n_hide).view(B, gh, gw)
    return coarse.repeat_interleave(cell, 1).repeat_interleave(cell, 2).flatten(1)   # (B, h*w)


def block_mask(B, grid, n_mask, min_block, device, generator=None, rounds=0, min_aspect=0.3):
    """BEiT blockwise masking, batched: each round every image proposes one rectangle of area U(min_block, remaining)
    and aspect ratio log-U(0.3, 1/0.3) and records the patches it newly covers. Exactly n_mask patches are kept:
    earlier blocks first (the last block cut in raster order), random patches fill a row the rounds left short.
    Returns (B, h*w) bool, True = masked; exactly n_mask True per row."""
    h, w = grid
    N, rounds = h * w, rounds or 4 * math.ceil(n_mask / min_block)
    ys, xs = torch.arange(h, device=device).view(1, h, 1), torch.arange(w, device=device).view(1, 1, w)
    first = torch.full((B, N), rounds, device=device)                                # round that first covered a patch
    covered = torch.zeros(B, N, dtype=torch.bool, device=device)
    for r in range(rounds):
        u = torch.rand(B, 4, 1, 1, device=device, generator=generator).unbind(1)     # 4 x (B, 1, 1)
        remaining = (n_mask - covered.sum(1)).view(B, 1, 1)
        area = min_block + u[0] * (remaining - min_block)                            # BEiT: uniform(min, remaining)
        aspect = torch.exp(math.log(min_aspect) + u[1] * 2 * math.log(1 / min_aspect))
        bh = (area * aspect).sqrt().round().clamp(1, h - 1)                          # BEiT keeps blocks < the grid
        bw = (area / aspect).sqrt().round().clamp(1, w - 1)
        top, left = (u[2] * (h - bh + 1)).floor(), (u[3] * (w - bw + 1)).floor()
        new = ((ys >= top) & (ys < top + bh) & (xs >= left) & (xs < left + bw)).flatten(1) & ~covered   # (B, N)
        first.masked_fill_(new, r)
        covered |= new
    tie = torch.where(covered, torch.arange(N, device=device) / N, torch.rand(B, N, device=device, generator=generator))
    keep = (first + tie).argsort(1)[:, :n_mask]                                      # (B, n_mask) patch ids
    return torch.zeros(B, N, dtype=torch.bool, device=device).scatter_(1, keep, True)


def block_sizes(cfg, N):
    """(patches hidden, smallest block): the official 75 and 16 at 14x14, scaled with the grid."""
    return cfg.mask_patches or max(1, round(N * 75 / 196)), cfg.min_block or max(1, round(N * 16 / 196))


def sample_mask(cfg, B, device, generator=None):
    """(B, N) bool, True = masked, for cfg's patch grid and mask type."""
    g = cfg.img_size // cfg.patch_size
    if cfg.mask_type == "block":
        return block_mask(B, (g, g), *block_sizes(cfg, g * g), device=device, generator=generator)
    return random_mps_mask(B, (g, g), cfg.mask_patch // cfg.patch_size, cfg.mask_ratio, device, generator)

# ----------------------------------------------------------------------------- loss


def conmim_loss(q, k, mask, tau=0.1, cross_image=False):
    """Denoising patch-level InfoNCE, the ConMIM objective:
        L = - 1/|M| sum_{j in M} log  exp(<q_j, sg[k_j]> / tau) / sum_{i=1..K} exp(<q_j, sg[k_i]> / tau)
    q: student features of the masked view, k: momentum-teacher features of the full view, both (B, N, d),
    L2-normalised here. K = N: each image is its own dictionary; the positive is the key at the query's own
    position. cross_image=True (not in the paper): the keys are all B*N patches of the local batch.
    mask: (B, N) bool, True = masked. Returns (loss, look-up top-1 accuracy at masked positions, detached)."""
    B, N, _ = q.shape
    q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
    if cross_image:
        logits = q @ k.flatten(0, 1).T / tau                                         # (B, N, B*N)
        target = torch.arange(B * N, device=q.device).view(B, N)                     # same image, same position
    else:
        logits = q @ k.transpose(1, 2) / tau                                         # (B, N, N)
        target = torch.arange(N, device=q.device).expand(B, N)                       # same position
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(B, N)
    w = mask.float()
    n = w.sum().clamp(min=1)                                                         # no boolean indexing: no host sync
    acc = ((logits.argmax(-1) == target).float() * w).sum() / n
    return (ce * w).sum() / n, acc.detach()

# ----------------------------------------------------------------------------- projector, teacher, EMA


def projector(dim, hidden, out):
    """3-layer MLP on every token (official; SimCLR style): two Linear-BN-ReLU, then Linear-BN without affine."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out, bias=False), nn.BatchNorm1d(out, affine=False))


def project(mlp, tokens, track=False):
    """(B, T, D) -> (B, T, d); BatchNorm statistics over all B*T tokens, cls included (official). track=True (teacher
    with --teacher-bn running, BN in eval mode): each BN first updates its own running statistics from these tokens,
    then normalises with them."""
    B, n_tokens, _ = tokens.shape
    x = tokens.flatten(0, 1)                                                         # (B*T, D)
    for layer in mlp:
        if track and isinstance(layer, nn.BatchNorm1d) and not layer.training:
            F.batch_norm(x.detach(), layer.running_mean, layer.running_var, training=True, momentum=layer.momentum)
        x = layer(x)
    return x.view(B, n_tokens, -1)


@torch.no_grad()
def ema_update(teachers, students, m):
    """Momentum teacher: xi <- m * xi + (1 - m) * theta for every parameter, projector included, after each
    optimizer step. Parameters only: BatchNorm buffers stay the teacher's own (official engine_for_pretraining.py:96-106
    @4263955)."""
    t = [p for mod in teachers for p in mod.parameters()]
    s = [p for mod in students for p in mod.parameters()]
    torch._foreach_lerp_(t, s, 1.0 - m)   # one fused multi-tensor kernel: t + (1 - m) (s - t)


def official_skip_decay(name, p):
    """No weight decay on 1-D params and biases, and on cls_token / pos_embed only: the mask token and the
    relative-position table are decayed (TencentARC/ConMIM/optim_factory.py:60, modeling_pretrain.py:124@4263955)."""
    return p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in ("cls_token", "pos_embed")


def beit_init(vit, *modules):
    """The official (BEiT) init: Linear / patch-conv weights ~ N(0, 0.02) truncated at +-1 std, zero biases;
    attn.proj and mlp.fc2 of block l divided by sqrt(2 l). `modules` (the projector) get the same Linear init."""
    for m in itertools.chain(vit.modules(), *(mod.modules() for mod in modules)):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    with torch.no_grad():
        for layer, blk in enumerate(vit.blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer)), blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))
    nn.init.trunc_normal_(vit.cls_token, std=0.02, a=-0.02, b=0.02)


def xavier_init(vit, *modules):
    """MAE's init (not official ConMIM): xavier-uniform Linear weights, the patch conv as a Linear, zero biases,
    cls token ~ N(0, 0.02); at 32 px it gives a stronger random encoder than BEiT's (docs/conmim.md#small-presets)."""
    for m in itertools.chain(vit.modules(), *(mod.modules() for mod in modules)):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(vit.cls_token, std=0.02)

# ----------------------------------------------------------------------------- model


class ConMIM(nn.Module):
    """Student ViT + mask token + projector, and a momentum teacher copy of encoder + projector (no mask token, no
    gradients). forward(weak, strong, mask) -> (loss, logs); mask: (B, N) bool, True = masked."""

    def __init__(self, cfg):
        super().__init__()
        D, depth, heads = VIT_SIZES[cfg.arch]
        self.vit_args = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=D, depth=cfg.depth or depth,
                             num_heads=heads, mlp_ratio=4.0, qkv_bias=True, pos_embed="none", rel_pos="shared",
                             init_values=cfg.init_values or None)               # what finetune.py rebuilds
        vit_kw = {k: v for k, v in self.vit_args.items() if k not in ("pos_embed", "rel_pos")}
        self.student = VisionTransformer(**vit_kw, drop_path=cfg.drop_path)
        self.projector = projector(D, cfg.proj_hidden, cfg.proj_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        (beit_init if cfg.init == "beit" else xavier_init)(self.student, self.projector)
        if cfg.rel_pos_init:   # not official: a zero table makes every mask token identical through the encoder
            nn.init.trunc_normal_(self.student.rel_pos_bias.relative_position_bias_table, std=cfg.rel_pos_init)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)            # starts as the student (official)
        self.teacher_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.tau, self.cross_image, self.teacher_bn = cfg.tau, cfg.negatives == "batch", cfg.teacher_bn

    def train(self, mode=True):
        super().train(mode)
        if self.teacher_bn == "running":   # BN on running statistics; "batch" (official): teacher stays in train mode
            self.teacher.eval(), self.teacher_projector.eval()
        return self

    def features(self, weak, strong, mask):
        """Student on the masked weak view, teacher on the full strong view -> patch features q, k (B, N, d)."""
        grid = (weak.shape[-2] // self.student.patch_size, weak.shape[-1] // self.student.patch_size)
        x = self.student.patchify(weak)                                              # (B, N, D)
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)          # mask token before the encoder
        q = project(self.projector, self.student.forward_tokens(x, grid))[:, 1:]     # (B, N, d): cls dropped after
        with torch.no_grad():                                                        # sg[.]: no gradient to the keys
            k = project(self.teacher_projector, self.teacher(strong), self.teacher_bn == "running")[:, 1:]
        return q, k

    def forward(self, images, mask):
        """images (B, 3, S, S) uint8 crops, mask (B, N) bool -> (loss, logs): the two views, then the loss."""
        return self.loss_on_views(*two_views(images), mask)

    def loss_on_views(self, weak, strong, mask):
        loss, acc = conmim_loss(*self.features(weak, strong, mask), mask, self.tau, self.cross_image)
        return loss, {"acc": acc}

    def ema_update(self, m):
        ema_update([self.teacher, self.teacher_projector], [self.student, self.projector], m)

# ----------------------------------------------------------------------------- data


def input_transform(cfg):
    """CPU: decode, one random resized crop (bicubic) + flip for both views -> uint8 crop; the two views are made
    from it on the device (two_views), so patch i is the same region in both."""
    return CropFlip(cfg.img_size, (cfg.crop_min_scale, 1.0))


def two_views(images, gen=None):
    """uint8 crops (B, 3, S, S) -> (weak, strong), each (B, 3, S, S) normalised. The student's weak view is the
    crop; the teacher's strong view adds the official photometric perturbations (TencentARC/ConMIM/datasets.py:
    77-85@4263955), batched on the device, each image its own draws, in the official order: ColorJitter(0.4, 0.4,
    0.2, 0.1) with p 0.8, grayscale p 0.2, Gaussian blur radius U(0.1, 2) p 0.1, solarize at 128 p 0.2.
    Distributions equal to the torchvision / PIL transforms they replace: tests/test_conmim.py."""
    x = images.float() / 255
    B = x.shape[0]

    def coin(p):   # (B, 1, 1, 1) bool, True with probability p, one draw per image
        return torch.rand(B, 1, 1, 1, device=x.device, generator=gen) < p

    y = torch.where(coin(0.8), color_jitter(x, 0.4, 0.4, 0.2, 0.1, gen), x)
    y = torch.where(coin(0.2), grey(y).expand_as(y), y)
    sigma = 0.1 + 1.9 * torch.rand(B, device=x.device, generator=gen)
    y = torch.where(coin(0.1), gaussian_blur(y, sigma), y)
    y = torch.where(coin(0.2) & (y >= 128 / 255), 1 - y, y)                      # solarize
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std, (y - mean) / std


def grey(x):
    """(B, 3, H, W) -> (B, 1, H, W) luma with torchvision's weights (rgb_to_grayscale)."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def color_jitter(x, brightness, contrast, saturation, hue, gen=None):
    """torchvision's ColorJitter on a batch in [0, 1]: every image draws its own factors, U(1 - v, 1 + v) (hue:
    U(-hue, hue)), and its own random order of the four adjustments (jitter_op). A zero strength is skipped, as
    torchvision skips None. x (B, 3, H, W) -> (B, 3, H, W)."""
    B, dev = x.shape[0], x.device
    strengths = (brightness, contrast, saturation, hue)
    u = 2 * torch.rand(4, B, 1, 1, 1, device=dev, generator=gen) - 1                # (4, B, 1, 1, 1) in [-1, 1)
    factors = [u[op] * v + (op < 3) for op, v in enumerate(strengths)]           # hue: a shift, not a factor
    order = torch.rand(B, 4, device=dev, generator=gen).argsort(1)               # (B, 4) a permutation each
    for k in range(4):
        for op, v in enumerate(strengths):
            if v:
                x = torch.where(order[:, k].view(B, 1, 1, 1) == op, jitter_op(x, op, factors[op]), x)
    return x


def jitter_op(x, op, f):
    """torchvision's adjust_brightness / contrast / saturation / hue (op 0-3) on float images, with a per-image
    factor f (B, 1, 1, 1)."""
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
    """torchvision's adjust_hue with a per-image shift: RGB -> HSV, h + shift mod 1, -> RGB. x (B, 3, H, W),
    shift (B, 1, 1)."""
    r, g, b = x.unbind(1)                                                         # 3 x (B, H, W)
    maxc, minc = x.max(1).values, x.min(1).values
    flat = maxc == minc
    span = torch.where(flat, torch.ones_like(maxc), maxc - minc)
    s = (maxc - minc) / torch.where(flat, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / span, (maxc - g) / span, (maxc - b) / span
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
    # the six sectors of the hue circle: (r, g, b) = one of these triples
    table = torch.stack([torch.stack(c) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v),
                                                   (v, p, q))])                  # (6, 3, B, H, W)
    return table.gather(0, i[None, None].expand(1, 3, *i.shape))[0].transpose(0, 1)   # (B, 3, H, W)


def gaussian_blur(x, sigma, taps=13):
    """PIL's GaussianBlur(radius = sigma) on a batch, one sigma per image (B,): a separable 13-tap Gaussian
    (enough for sigma <= 2), edges replicated as PIL does."""
    B, C, H, W = x.shape
    offsets = torch.arange(taps, device=x.device) - taps // 2
    k = torch.exp(-offsets.float() ** 2 / (2 * sigma.view(B, 1) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)                    # (B*C, taps)
    z = x.reshape(1, B * C, H, W)
    pad = taps // 2
    z = F.conv2d(F.pad(z, (pad, pad, 0, 0), mode="replicate"), k.view(B * C, 1, 1, taps), groups=B * C)
    z = F.conv2d(F.pad(z, (0, 0, pad, pad), mode="replicate"), k.view(B * C, 1, taps, 1), groups=B * C)
    return z.view(B, C, H, W)


# ----------------------------------------------------------------------------- training loop and main


def checkpoint(raw_model, opt, scaler):
    """What OUT/checkpoint.pth holds besides Run's bookkeeping: everything to resume, plus both encoders in timm
    beit_* layout (finetune.py loads the teacher; official fine-tuning pools by mean)."""
    encoders = {name: to_timm_layout(getattr(raw_model, name).state_dict()) for name in ("teacher", "student")}
    return {"model": raw_model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "encoders": encoders, "encoder_args": {"arch": "vit", **raw_model.vit_args},
            "default_encoder": "teacher", "pool": "mean"}


def optimizer_step(raw_model, opt, scaler, clip_grad, momentum):
    """Clip, step, scaler update, then teacher <- EMA(student); the EMA is skipped when fp16's GradScaler skipped the
    step (inf/NaN gradients: its scale drops). The scale is read on the host on the fp16 path only."""
    if clip_grad > 0:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(raw_model.parameters(), clip_grad)
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(opt)
    scaler.update()
    if scale is None or scaler.get_scale() >= scale:
        raw_model.ema_update(momentum)
    opt.zero_grad(set_to_none=True)


def recipe_line(cfg, world, accum, steps_per_epoch):
    """The one line that says which recipe this run is."""
    g = cfg.img_size // cfg.patch_size
    if cfg.mask_type == "block":
        n_mask, min_block = block_sizes(cfg, g * g)
        masking = f"block ({n_mask} of {g * g} patches, blocks >= {min_block})"
    else:
        cells, cell = (cfg.img_size // cfg.mask_patch) ** 2, (cfg.mask_patch // cfg.patch_size) ** 2
        hide = math.ceil(cfg.mask_ratio * cells - 1e-9)
        masking = f"random_mps32 ({hide} of {cells} {cfg.mask_patch}px cells = {hide * cell} of {g * g} patches)"
    precision = cfg.amp if cfg.device.startswith("cuda") and cfg.amp != "off" else "fp32"
    return (f"recipe: {cfg.preset or 'defaults'} | global batch {cfg.batch_size * world * accum} = {cfg.batch_size} "
            f"per GPU x {world} GPUs x {accum} accum | peak lr {cfg.lr:.2e} (absolute, not scaled with the batch: "
            f"official) | {steps_per_epoch} steps/epoch x {cfg.epochs} epochs | EMA {cfg.ema} -> 1 cosine per step | "
            f"{masking} | {precision}" + (f" | paper row: {cfg.paper_row}" if cfg.paper_row else ""))


def main(cfg):
    validate(cfg)
    rank, world, device = setup_dist(cfg.device)
    seed_all(cfg.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    accum = accum_steps(cfg, world)
    global_batch = cfg.batch_size * world * accum

    decode = decode_mode(cfg.decode)   # what the loader workers hand over: decoded pixels or JPEG bytes
    dataset = build_dataset(cfg.data, "pretrain", input_transform(cfg), cfg.img_size, decode=decode)
    loader = build_loader(dataset, cfg.batch_size, world, rank, cfg.seed, cfg.workers, device)
    steps_per_epoch = min(len(loader) // accum, cfg.steps_per_epoch or len(loader))   # optimizer steps
    if steps_per_epoch < 1:
        fail(f"{len(loader)} micro-batches per epoch: fewer than the {accum} accumulated per optimizer step")
    total_steps = cfg.epochs * steps_per_epoch

    raw_model = ConMIM(cfg).to(device)                 # saves / EMA / logs from this one
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    print0(recipe_line(cfg, world, accum, steps_per_epoch))
    batch_warning(global_batch, cfg.paper_batch, steps_per_epoch)
    opt = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay, skip_decay=official_skip_decay), lr=cfg.lr,
                            betas=(0.9, 0.98), eps=1e-8, fused=device.type == "cuda")   # teacher: no grad, not here
    lr_sched = cosine_schedule(cfg.lr, cfg.min_lr, total_steps, cfg.warmup_epochs * steps_per_epoch,
                               warmup_endpoint=True)   # BEiT utils.cosine_scheduler
    ema_sched = cosine_schedule(cfg.ema, 1.0, total_steps)   # momentum 0.996 -> 1, per optimizer step (official)
    derived = {"global_batch": global_batch, "steps_per_epoch": steps_per_epoch, "images": len(dataset)}
    run = Run(cfg, __file__, raw_model, opt, scaler, loader, steps_per_epoch, accum, derived)
    run.resume()   # OUT/checkpoint.pth, if any; other settings stop here

    for it, batches in run.steps():
        for g in opt.param_groups:
            g["lr"] = lr_sched[it]
        for last, (images, _) in batches:
            images = images_to(images, device)                                # (B, 3, S, S) uint8 crops
            mask = sample_mask(cfg, images.shape[0], device)                  # (B, N) bool on the device
            with no_sync(model, last):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss, logs = model(images, mask)                          # METHOD: views, student, teacher
                scaler.scale(loss / accum).backward()
            run.add(loss=loss, **logs)
        optimizer_step(raw_model, opt, scaler, cfg.clip_grad, ema_sched[it])   # METHOD: + teacher EMA
        if run.end_step(it, lr_sched[it]):                                     # epoch end or --stop-after
            run.save(checkpoint(raw_model, opt, scaler), check=lambda: raw_model(images, mask)[0])
            epoch = run.epoch
            if cfg.viz_every and (epoch + 1) % cfg.viz_every == 0 and rank == 0:   # own RNG: training unaffected
                n, gen = min(8, images.shape[0]), torch.Generator(device).manual_seed(epoch)
                weak, strong = two_views(images[:n], gen)
                visualize(raw_model, weak, strong, sample_mask(cfg, n, device, gen),
                          os.path.join(cfg.out, f"viz_epoch{epoch}.png"))

# ----------------------------------------------------------------------------- appendix: BEiT-style ViT


VIT_SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),   # name: (width D, depth, heads)
             "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}


def rel_pos_index(h, w):
    """BEiT relative-position index over 1+h*w tokens; the last 3 table rows are cls->tok, tok->cls, cls->cls."""
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)                     # (N, N, 2)
    num = (2 * h - 1) * (2 * w - 1)
    idx = torch.full((h * w + 1, h * w + 1), num + 2, dtype=torch.long)                  # (1+N, 1+N)
    idx[1:, 1:] = (rel[..., 0] + h - 1) * (2 * w - 1) + rel[..., 1] + w - 1
    idx[0, 1:], idx[1:, 0] = num, num + 1
    return idx


class RelPosBias(nn.Module):
    """One learned bias per head and relative offset (BEiT), shared by all blocks -> (heads, 1+N, 1+N)."""

    def __init__(self, grid, num_heads):
        super().__init__()
        rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        self.register_buffer("relative_position_index", rel_pos_index(*grid), persistent=False)

    def forward(self):
        return self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)


class Attention(nn.Module):

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias):                                        # x: (B, T, D), bias: (heads, T, T)
        B, n_tok, D = x.shape
        qkv = self.qkv(x).view(B, n_tok, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                           # 3 x (B, nh, T, hd)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype).unsqueeze(0))   # (B, nh, T, hd)
        return self.proj(x.transpose(1, 2).reshape(B, n_tok, D))


class LayerScale(nn.Module):

    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, init_values, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x, bias):                                        # (B, T, D) -> (B, T, D)
        x = x + stochastic_depth(self.ls1(self.attn(self.norm1(x), bias)), self.drop_path, "row", self.training)
        return x + stochastic_depth(self.ls2(self.mlp(self.norm2(x))), self.drop_path, "row", self.training)


class VisionTransformer(nn.Module):
    """The ViT ConMIM pre-trains (official modeling_pretrain.py): no absolute positions, one relative-position bias
    shared by all blocks, optional layer scale, qkv bias. Parameter names follow timm's vit_*; to_timm_layout gives
    timm's beit_*. forward(images) -> (B, 1+N, D) normed tokens, cls first."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 qkv_bias=True, init_values=None, drop_path=0.0, in_chans=3):
        super().__init__()
        self.patch_size, self.embed_dim, self.grid = patch_size, embed_dim, (img_size // patch_size,) * 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.rel_pos_bias = RelPosBias(self.grid, num_heads)
        dpr = [drop_path * i / max(depth - 1, 1) for i in range(depth)]   # linearly increasing stochastic depth
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values, dpr[i])
                                     for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)   # weights: beit_init, called by ConMIM

    def patchify(self, images):                                        # (B, C, H, W) -> (B, N, D)
        return self.patch_embed.proj(images).flatten(2).transpose(1, 2)

    def forward_tokens(self, x, grid):
        """x: (B, N, D) patch embeddings (mask tokens swapped in), grid = (h, w) of the training size -> (B, 1+N, D)."""
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        bias = self.rel_pos_bias()                                         # (heads, 1+N, 1+N)
        for blk in self.blocks:
            x = blk(x, bias)
        return self.norm(x)

    def forward(self, images):                                         # (B, C, H, W) -> (B, 1+N, D)
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        return self.forward_tokens(self.patchify(images), grid)


def to_timm_layout(sd):
    """Our encoder keys -> timm's beit_* layout: the shared table copied into every block (as BEiT fine-tuning does),
    qkv.bias split into q_bias/v_bias (the k bias is dropped: softmax ignores a per-query constant),
    ls{1,2}.gamma -> gamma_{1,2}."""
    sd = dict(sd)
    table = sd.pop("rel_pos_bias.relative_position_bias_table")
    for k in [k for k in sd if k.startswith("blocks.")]:
        b, v = k[:k.index(".", 7) + 1], sd.pop(k)   # b = "blocks.{i}."
        if k.endswith("attn.qkv.bias"):
            sd[b + "attn.q_bias"], _, sd[b + "attn.v_bias"] = v.chunk(3)
        else:
            sd[re.sub(r"ls(\d)\.gamma$", r"gamma_\1", k)] = v
        if k.endswith("norm1.weight"):
            sd[b + "attn.relative_position_bias_table"] = table.clone()
    return sd

# ----------------------------------------------------------------------------- appendix: visualisation, input checks


@torch.no_grad()
def visualize(raw_model, weak, strong, mask, path):
    """Rows: student input | the same with the mask overlaid (grey) | teacher input | cosine similarity of student
    and teacher features at each position (red = 1, white = 0, blue = -1). Training-mode BatchNorm, as in the loss;
    the BN buffers and the RNG are restored afterwards, so a run with --viz-every trains exactly as one without."""
    buffers = [b.clone() for b in raw_model.buffers()]
    with torch.random.fork_rng(devices=[weak.device] if weak.is_cuda else []):
        q, k = raw_model.features(weak, strong, mask)
    for b, saved in zip(raw_model.buffers(), buffers):
        b.copy_(saved)
    B, _, H, W = weak.shape
    g = (H // raw_model.student.patch_size, W // raw_model.student.patch_size)
    mean, std = (torch.tensor(v, device=weak.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    img, aug = (weak * std + mean).clamp(0, 1), (strong * std + mean).clamp(0, 1)
    m = F.interpolate(mask.float().view(B, 1, *g), size=(H, W), mode="nearest")
    s = F.interpolate(F.cosine_similarity(q.float(), k.float(), dim=-1).view(B, 1, *g), size=(H, W), mode="nearest")
    heat = torch.cat([(1 + s).clamp(max=1), 1 - s.abs(), (1 - s).clamp(max=1)], 1)
    save_image(torch.cat([img, img * (1 - 0.7 * m) + 0.35 * m, aug, heat]).float().cpu(), path, nrow=B)


def validate(cfg):
    """Cross-flag rules (each flag's own range is Config.RANGES, checked by parse_config): one clear error
    before any data or model is built."""
    check_ranges(cfg)
    if cfg.img_size % cfg.patch_size:
        fail(f"--img-size {cfg.img_size} must be a multiple of --patch-size {cfg.patch_size}")
    g = cfg.img_size // cfg.patch_size
    if g < 2:
        fail(f"--img-size {cfg.img_size} / --patch-size {cfg.patch_size} gives a {g}x{g} grid; need at least 2x2")
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs:
        fail(f"--warmup-epochs {cfg.warmup_epochs} >= --epochs {cfg.epochs}: the lr never reaches its peak")
    if cfg.min_lr > cfg.lr:
        fail(f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}")
    if cfg.mask_type == "random_mps32":
        if cfg.mask_patch < cfg.patch_size or cfg.mask_patch % cfg.patch_size or cfg.img_size % cfg.mask_patch:
            fail(f"--mask-patch {cfg.mask_patch} must be a multiple of --patch-size {cfg.patch_size} "
                 f"that divides --img-size {cfg.img_size}")
        cells = (cfg.img_size // cfg.mask_patch) ** 2
        if math.ceil(cfg.mask_ratio * cells - 1e-9) >= cells:
            fail(f"--mask-ratio {cfg.mask_ratio} hides all {cells} mask patches; "
                 "lower it or use a smaller --mask-patch")
    else:
        n_mask, min_block = block_sizes(cfg, g * g)
        if not 0 < n_mask < g * g or not 0 < min_block <= n_mask:
            fail(f"block masking: need 0 < --min-block ({min_block}) <= --mask-patches ({n_mask}) < {g * g} patches")


if __name__ == "__main__":
    main(parse_config(Config))
