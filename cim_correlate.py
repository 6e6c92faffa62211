"""
cim_correlate.py - Correlational Image Modeling (crop-and-correlate) pre-training in one file, ViT or ResNet-50.
Paper: Li, Xie, Loy, "Correlational Image Modeling for Self-Supervised Visual Pre-Training", CVPR 2023 (2303.12670).
Official code: https://github.com/weivision/Correlational-Image-Modeling (cited below as file:line@f00e35a).

    torchrun --nproc_per_node 8 cim_correlate.py --preset vit_base_300ep --data /imagenet   # the released recipe
    python cim_correlate.py --data /imagenet --epochs 300                                  # 1 GPU, batch 256, bf16
    python cim_correlate.py --preset tiny --data synthetic --out out/cim_correlate_tiny       # CPU smoke run, seconds

From each search image, E exemplars are cut (random scale, shape and rotation) and a light decoder must find them:
the target encoder (EMA of the online one) embeds the whole image (the context), the online encoder embeds each
exemplar, one cross-attention block (context queries, exemplar keys/values) predicts a 2-class map per exemplar.
Result: ImageNet not measured here (official README.md:37: ViT-B/16 300 ep + 100 ep fine-tune -> 83.1 top-1).
Docs (implementation map, differences from the release, pictures): docs/cim_correlate.md. Sections: config |
crop-and-correlate sampling | loss, EMA | model | data | training | appendix: ViT, ResNet-50, visualisation, checks.
"""
import copy
import dataclasses
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.ops import stochastic_depth
from torchvision.utils import save_image

from common import (IMAGENET_MEAN, IMAGENET_STD, CropFlip, Run, accum_steps, batch_warning, build_dataset,
                    build_loader, check_ranges, cosine_schedule, decode_mode, fail, images_to, no_sync, param_groups,
                    parse_config, print0, seed_all, setup_dist)


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass
class Config:
    """Correlational Image Modeling pre-training. Defaults: the released ViT-B/16 values (scripts/dist_pretrain.sh),
    but bf16, clipping 1.0 and no accumulation; --preset vit_base_300ep is the released run."""
    data: str = "/imagenet"           # ImageFolder (train/ or flat), cifar10, cifar100, stl10 (unlabeled), synthetic
    img_size: int = 224               # search image side (dist_pretrain.sh:44 --input_size)
    arch: str = "vit_base"            # ViT size, or resnet50 with our token neck (dist_pretrain.sh:25 vit_base_patch16)
    depth: int = 0                    # ViT depth override; 0 = the arch's depth
    patch_size: int = 16              # ViT patch (dist_pretrain.sh:25). ResNet-50 tokens are always at stride 16
    preset: str = ""                  # vit_base_300ep (released run) | tiny | small32 (CPU; docs/cim_correlate.md)
    # crop-and-correlate sampling
    search_scale_min: float = 0.5     # RandomResizedCrop scale (min, 1) of the search image (dist_pretrain.sh:43)
    context_size: int = 160           # whole search image resized to this side = target input (dist_pretrain.sh:44)
    exemplar_size: int = 64           # exemplar side: 4x4 tokens for a /16 ViT (dist_pretrain.sh:44 --template_size)
    num_exemplars: int = 6            # exemplars per image, one online-encoder pass each (dist_pretrain.sh:44)
    exemplar_scale_min: float = 0.05  # box area / search-image area, lower end (dist_pretrain.sh:46)
    exemplar_scale_max: float = 0.48  # upper end (dist_pretrain.sh:46)
    exemplar_ratio_min: float = 1 / 3  # box aspect w/h, log-uniform (tools/main_pretrain.py:69)
    exemplar_ratio_max: float = 3.0   # (tools/main_pretrain.py:71)
    rotation: int = 45                # angle ~ uniform integer in [-rotation, rotation) degrees (dist_pretrain.sh:43)
    box_tries: int = 10               # box draws before the whole-image fallback (util/datasets.py:153)
    box_rule: str = "corner"          # keep the exemplar in the image: corner (release, datasets.py:211) | centre
    exemplar_aug: bool = True         # colour jitter / grey / blur / solarize on exemplars only (dist_pretrain.sh:45)
    exemplar_flip: bool = True        # horizontal flip of the exemplar only, map unflipped (dist_pretrain.sh:45)
    # model
    freeze_patch_embed: bool = True   # random frozen patch projection (models/cim.py:34 stop_grad_conv)
    ema_momentum: float = 0.99        # target = EMA of online, momentum cosine 0.99 -> 1 per step (models/cim.py:33)
    decoder_dim: int = 512            # correlation decoder width (models/cim.py:440)
    decoder_heads: int = 16           # cross-attention heads (models/cim.py:440)
    decoder_mlp_ratio: float = 4.0    # (models/cim.py:441)
    # optimisation
    epochs: int = 300                 # (dist_pretrain.sh:13)
    batch_size: int = 256             # per GPU (dist_pretrain.sh:72; the release adds --accum_iter 2 on 8 GPUs)
    accum_iter: int = 1               # micro-batches per optimizer step (exact for ViT; ResNet-50 BatchNorm sees each)
    global_batch: int = 0             # >0: accum = global / (batch_size x GPUs), an error if it does not divide
    paper_batch: int = 0              # the recipe's global batch (presets set it): warn when > 2x away
    blr: float = 1.5e-4               # lr = blr * global batch / 256 (dist_pretrain.sh:47, main_pretrain.py:268)
    min_lr: float = 0.0               # cosine floor (main_pretrain.py:90)
    warmup_epochs: int = 40           # (dist_pretrain.sh:14)
    weight_decay: float = 0.05        # AdamW (0.9, 0.95) (dist_pretrain.sh:47, main_pretrain.py:284)
    clip_grad: float = 1.0            # max grad norm; 0 = off, as the released fp32 path runs (pretrain_cim.py:66-74)
    steps_per_epoch: int = 0          # 0 = full pass over the data; >0 caps it (smoke tests)
    # system
    device: str = "cuda"              # "cpu" works (slowly) - CI uses it
    amp: str = "bf16"                 # bf16 | fp16 | off (CUDA only; the release runs fp32: main_pretrain.py:80)
    compile: bool = False             # torch.compile the model (sampling included)
    workers: int = 10                 # data loader processes per GPU (release: 12, dist_pretrain.sh:55)
    out: str = "out/cim_correlate"    # checkpoints, log.jsonl, config.json; an existing checkpoint.pth is resumed
    seed: int = 0
    log_every: int = 50               # progress line every N steps
    stop_after: int = 0               # exit after N steps of this run with a resumable checkpoint; 0 = off
    viz_every: int = 0                # PNG every N epochs: context | exemplars | target maps | predicted maps; 0 = off
    allow_change: str = ""            # resume although these settings differ from the checkpoint's: a,b or all
    decode: str = "cpu"               # cpu: loader workers decode JPEGs | device: workers read bytes, the GPU decodes

    CHOICES = {"arch": ("vit_tiny", "vit_small", "vit_base", "vit_large", "resnet50"), "amp": ("bf16", "fp16", "off"),
               "box_rule": ("corner", "centre"), "decode": ("cpu", "device")}
    RANGES = {"img_size": ">= 1", "depth": ">= 0", "patch_size": ">= 1", "search_scale_min": "(0, 1]",
              "context_size": ">= 1", "exemplar_size": ">= 1", "num_exemplars": "[1, 32]",
              "exemplar_scale_min": "(0, 1]", "exemplar_scale_max": "(0, 1]", "exemplar_ratio_min": "> 0",
              "exemplar_ratio_max": "> 0", "rotation": "[0, 180]", "box_tries": ">= 1", "ema_momentum": "[0, 1]",
              "decoder_dim": ">= 4", "decoder_heads": ">= 1", "decoder_mlp_ratio": "> 0", "epochs": ">= 1",
              "batch_size": ">= 1", "accum_iter": ">= 1", "global_batch": ">= 0", "paper_batch": ">= 0",
              "blr": "> 0", "min_lr": ">= 0", "warmup_epochs": ">= 0", "weight_decay": ">= 0", "clip_grad": ">= 0",
              "steps_per_epoch": ">= 0", "workers": ">= 0", "seed": ">= 0", "log_every": ">= 1",
              "stop_after": ">= 0", "viz_every": ">= 0"}
    # a flag given on the command line that the chosen arch would ignore is an error
    ONLY_WITH = {k: ("arch", ("vit_tiny", "vit_small", "vit_base", "vit_large"))
                 for k in ("depth", "patch_size", "freeze_patch_embed")}
    _TINY = dict(arch="vit_tiny", img_size=32, patch_size=4, context_size=24, exemplar_size=16, num_exemplars=2,
                 decoder_dim=128, decoder_heads=4, batch_size=8, device="cpu", workers=0, epochs=1, warmup_epochs=0,
                 log_every=1, blr=1e-2)
    PRESETS = {
        "vit_base_300ep": dict(   # released run; source: weivision/Correlational-Image-Modeling/<path:line>@f00e35a
            arch="vit_base", patch_size=16,                   # scripts/dist_pretrain.sh:25
            epochs=300, warmup_epochs=40,                     # scripts/dist_pretrain.sh:13-14
            search_scale_min=0.5, rotation=45,                # scripts/dist_pretrain.sh:43
            img_size=224, context_size=160, exemplar_size=64, num_exemplars=6,   # scripts/dist_pretrain.sh:44
            exemplar_aug=True, exemplar_flip=True,            # scripts/dist_pretrain.sh:45
            exemplar_scale_min=0.05, exemplar_scale_max=0.48,   # scripts/dist_pretrain.sh:46
            blr=1.5e-4, weight_decay=0.05,                    # scripts/dist_pretrain.sh:47
            batch_size=256,                                   # scripts/dist_pretrain.sh:72
            global_batch=4096, paper_batch=4096,              # 256 x 8 GPUs (docs/PRETRAIN.md:1) x accum 2 (sh:72)
            exemplar_ratio_min=1 / 3, exemplar_ratio_max=3.0, min_lr=0.0,   # tools/main_pretrain.py:69-72, 90
            box_tries=10, box_rule="corner",                  # util/datasets.py:153, util/datasets.py:211
            amp="off",                                        # tools/main_pretrain.py:80 (--amp sets FP16, never amp)
            clip_grad=0.0,                                    # engines/pretrain_cim.py:66-74 (clips only under amp)
            ema_momentum=0.99, freeze_patch_embed=True,       # models/cim.py:33-34
            decoder_dim=512, decoder_heads=16, decoder_mlp_ratio=4.0),   # models/cim.py:440-441
        "tiny": _TINY,   # CPU smoke run: the release's geometry scaled to 32 px (docs/cim_correlate.md#presets)
        "small32": {**_TINY, "batch_size": 64, "epochs": 16, "warmup_epochs": 1, "log_every": 10, "workers": 2,
                    "blr": 4e-4, "exemplar_scale_min": 0.15},   # CPU, 32 px real images (docs/cim_correlate.md#presets)
    }
    PAPER_ROWS = {"vit_base_300ep": "ViT-B/16 300 ep -> 83.1 top-1 after 100 ep fine-tuning (README.md:37@f00e35a)"}


# ----------------------------------------------------------------------------- crop-and-correlate sampling
# Coordinates: grid_sample's normalised ones on the square search image (x right, y down, [-1, 1] edge to edge).
# An exemplar is (angle t, centre c, half sizes (a, b)): the rectangle {c + u*a*e1 + v*b*e2 : |u|, |v| <= 1},
# e1 = (cos t, sin t), e2 = (-sin t, cos t): an axis-aligned crop of the image rotated counter-clockwise by t.

def sample_boxes(B, E, cfg, device, gen=None):
    """The release's box recipe (util/datasets.py:148-178, 330-353), vectorised. Per exemplar: integer angle in
    [-rot, rot) degrees; box of area s * |image|, s ~ U[scale_min, scale_max], log-uniform aspect (first of
    cfg.box_tries draws that fits, else the whole image), placed uniformly. In the image rotated by the angle, the
    exemplar is the bounding box of the rotated box, kept inside the rotated image by cfg.box_rule: "corner" moves
    each outside corner onto the edge (the release), "centre" shrinks it about its centre (largest k <= 1 that fits).
    Returns angle (B, E) radians, center (B, E, 2), half (B, E, 2) = (a, b), all normalised."""
    r, K = cfg.rotation, cfg.box_tries
    angle = torch.randint(-r, r + (r == 0), (B, E), device=device, generator=gen).float() * (math.pi / 180)
    lo, hi = cfg.exemplar_scale_min, cfg.exemplar_scale_max
    area = torch.rand(B, E, K, device=device, generator=gen) * (hi - lo) + lo               # (B, E, K) area fraction
    lo, hi = math.log(cfg.exemplar_ratio_min), math.log(cfg.exemplar_ratio_max)
    ratio = torch.exp(torch.rand(B, E, K, device=device, generator=gen) * (hi - lo) + lo)   # log-uniform w / h
    w, h = (area * ratio).sqrt(), (area / ratio).sqrt()              # (B, E, K) fractions of the side
    fits = (w <= 1) & (h <= 1)
    first = fits.int().argmax(-1, keepdim=True)                      # (B, E, 1) first draw that fits
    found = fits.any(-1)
    w = torch.where(found, w.gather(-1, first)[..., 0], 1.0)         # none fits: the whole image
    h = torch.where(found, h.gather(-1, first)[..., 0], 1.0)         # (B, E); also the normalised half sizes
    center = (2 * torch.rand(B, E, 2, device=device, generator=gen) - 1) * (1 - torch.stack([w, h], -1))
    if cfg.box_rule == "corner":
        return angle, *revise_corners(angle, center, w, h)
    cos, sin = angle.cos().abs(), angle.sin().abs()
    a, b = w * cos + h * sin, w * sin + h * cos                      # bounding box of the rotated box (rotated frame)
    ext_x, ext_y = a * cos + b * sin, a * sin + b * cos              # its half extent back in the image frame
    k = torch.minimum((1 - center[..., 0].abs()) / ext_x, (1 - center[..., 1].abs()) / ext_y).clamp(max=1.0)
    return angle, center, torch.stack([a * k, b * k], -1)


def revise_corners(angle, center, w, h):
    """The release's per-corner rule (util/datasets.py:211-290), closed form. In the rotated frame q = (p.e1, p.e2),
    each corner of the bounding box [x1, x2] x [y1, y2] of the rotated box that lies outside the rotated image moves
    along one side onto its edge, in the release's order (t > 0: top-left down, top-right left, bottom-left right,
    bottom-right up; t <= 0: top-left right, top-right down, bottom-left up, bottom-right left).
    -> center (B, E, 2) in the image frame, half (B, E, 2) in the rotated frame."""
    c, s = angle.cos(), angle.sin()

    def span(alpha, beta):                     # {z : |alpha + beta * z| <= 1} as (low, high)
        beta = torch.where(beta.abs() < 1e-9, torch.full_like(beta, 1e-9), beta)
        lo, hi = (-1 - alpha) / beta, (1 - alpha) / beta
        return torch.minimum(lo, hi), torch.maximum(lo, hi)

    def rows(x):                               # (top, bottom) of the rotated image in column x: p = x e1 + y e2
        (l1, h1), (l2, h2) = span(x * c, -s), span(x * s, c)
        return torch.maximum(l1, l2), torch.minimum(h1, h2)

    def cols(y):                               # (left, right) of the rotated image in row y
        (l1, h1), (l2, h2) = span(-y * s, c), span(y * c, s)
        return torch.maximum(l1, l2), torch.minimum(h1, h2)

    def out(x, y):                             # corner outside the rotated image
        return ((x * c - y * s).abs() > 1 + 1e-6) | ((x * s + y * c).abs() > 1 + 1e-6)

    qx, qy = center[..., 0] * c + center[..., 1] * s, center[..., 1] * c - center[..., 0] * s
    A, B = w * c.abs() + h * s.abs(), w * s.abs() + h * c.abs()       # half extents of the bounding box
    x1, x2, y1, y2 = qx - A, qx + A, qy - B, qy + B
    pos = angle > 0
    tl, tr, bl = out(x1, y1), out(x2, y1), out(x1, y2)                # the release tests the original corners
    y1n = torch.where(pos & tl, rows(x1)[0], y1)
    x1n = torch.where(~pos & tl, cols(y1)[0], x1)
    x2n = torch.where(pos & tr, cols(y1n)[1], x2)
    y1n = torch.where(~pos & tr, rows(x2)[0], y1n)
    x1n = torch.where(pos & bl, cols(y2)[0], x1n)
    y2n = torch.where(~pos & bl, rows(x1n)[1], y2)
    br = out(x2n, y2n)
    y2n = torch.where(pos & br, rows(x2n)[1], y2n)
    x2n = torch.where(~pos & br, cols(y2n)[1], x2n)
    mx, my = (x1n + x2n) / 2, (y1n + y2n) / 2                         # new centre, rotated frame
    half = torch.stack([(x2n - x1n) / 2, (y2n - y1n) / 2], -1).clamp(min=1e-3)
    return torch.stack([mx * c - my * s, mx * s + my * c], -1), half


def crop_exemplars(images, angle, center, half, size, flip=None, supersample=2):
    """images (B, 3, H, W) float -> exemplars (B, E, 3, size, size). Output pixel (u, v) samples the image at
    c + u*a*e1 + v*b*e2: one affine grid per exemplar, one grid_sample call for all (grids stacked along the height,
    so the image is never copied E times). Sampled at supersample x size, then average-pooled (cheap anti-aliasing).
    flip (B, E) bool mirrors the exemplar (u -> -u) without touching the target map."""
    (B, E), n = angle.shape, size * supersample
    cos, sin = angle.cos(), angle.sin()
    a = half[..., 0] * (1 - 2 * flip.float()) if flip is not None else half[..., 0]
    b, cx, cy = half[..., 1], center[..., 0], center[..., 1]
    theta = torch.stack([a * cos, -b * sin, cx, a * sin, b * cos, cy], -1).view(B * E, 2, 3)   # (B*E, 2, 3)
    grid = F.affine_grid(theta, [B * E, 1, n, n], align_corners=False)                         # (B*E, n, n, 2)
    out = F.grid_sample(images, grid.view(B, E * n, n, 2).to(images.dtype), mode="bilinear", padding_mode="border",
                        align_corners=False)                                                    # (B, 3, E*n, n)
    out = F.avg_pool2d(out.view(B, 3 * E, n, n), supersample)                                   # (B, 3E, size, size)
    return out.view(B, 3, E, size, size).transpose(1, 2)                                        # (B, E, 3, size, size)


def target_maps(angle, center, half, size):
    """Target correlation map: M[i, j] = 1 iff context pixel centre p satisfies |(p - c).e1| <= a and
    |(p - c).e2| <= b, i.e. the rotated rectangle the exemplar shows. Exact (the release resizes a label map
    bicubically, util/datasets.py:369-373). -> (B, E, size, size) bool; the context is the whole search image."""
    p = (torch.arange(size, device=angle.device) * 2 + 1) / size - 1          # (size,) pixel centres
    dx = p.view(1, 1, 1, size) - center[..., 0, None, None]                   # (B, E, 1, size)
    dy = p.view(1, 1, size, 1) - center[..., 1, None, None]                   # (B, E, size, 1)
    cos, sin = angle.cos()[..., None, None], angle.sin()[..., None, None]
    u, v = dx * cos + dy * sin, dy * cos - dx * sin                          # (B, E, size, size)
    return (u.abs() <= half[..., 0, None, None]) & (v.abs() <= half[..., 1, None, None])


def augment_exemplars(x, gen=None, jitter=(0.4, 0.4, 0.2, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=0.5,
                      sigma=(0.1, 2.0), p_solarize=0.2):
    """The release's exemplar augmentation (tools/main_pretrain.py:150-157), batched, one draw per exemplar.
    x (N, 3, h, w) in [0, 1]. ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8 (fixed order b, c, s, h; hue = rotation about
    the grey axis), grayscale p=0.2, Gaussian blur sigma ~ U[0.1, 2] p=0.5 (13 taps, separable), solarize p=0.2."""
    N, dev = x.shape[0], x.device

    def draw(lo, hi):                                                        # (N, 1, 1, 1), one draw per exemplar
        return torch.rand(N, 1, 1, 1, device=dev, generator=gen) * (hi - lo) + lo

    def grey(z):                                                             # (N, 1, h, w) luma
        return (z * z.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)

    bri, con, sat, hue = jitter
    y = (x * draw(1 - bri, 1 + bri)).clamp(0, 1)
    m = grey(y).mean((2, 3), keepdim=True)
    y = ((y - m) * draw(1 - con, 1 + con) + m).clamp(0, 1)
    g = grey(y)
    y = ((y - g) * draw(1 - sat, 1 + sat) + g).clamp(0, 1)
    t = draw(-hue, hue).view(N, 1, 1) * 2 * math.pi                          # hue turn, (N, 1, 1)
    cross = x.new_tensor([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / math.sqrt(3)
    rot = t.cos() * torch.eye(3, device=dev) + (1 - t.cos()) / 3 + t.sin() * cross   # (N, 3, 3) Rodrigues
    y = torch.einsum("nij,njhw->nihw", rot, y).clamp(0, 1)
    x = torch.where(draw(0, 1) < p_jitter, y, x)
    x = torch.where(draw(0, 1) < p_gray, grey(x).expand_as(x), x)
    s = draw(*sigma).view(N, 1)
    k = torch.exp(-torch.arange(-6, 7, device=dev).float() ** 2 / (2 * s ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)                 # (3N, 13)
    z = x.reshape(1, 3 * N, *x.shape[2:])
    z = F.conv2d(F.pad(z, (6, 6, 0, 0), mode="replicate"), k.view(3 * N, 1, 1, 13), groups=3 * N)
    z = F.conv2d(F.pad(z, (0, 0, 6, 6), mode="replicate"), k.view(3 * N, 1, 13, 1), groups=3 * N)
    x = torch.where(draw(0, 1) < p_blur, z.view_as(x), x)
    return torch.where(draw(0, 1) < p_solarize, torch.where(x >= 128 / 255, 1 - x, x), x)


def sample_pairs(images, cfg, gen=None):
    """Search images (B, 3, H, W) uint8 or [0, 1] float -> context (B, 3, Hc, Wc), exemplars (B, E, 3, h, w), both in
    [0, 1], and target maps (B, E, Hc, Wc) bool. Everything for the whole batch on the images' device."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    B, E, dev = x.shape[0], cfg.num_exemplars, x.device
    angle, center, half = sample_boxes(B, E, cfg, dev, gen)
    flip = torch.rand(B, E, device=dev, generator=gen) < 0.5 if cfg.exemplar_flip else None
    exemplars = crop_exemplars(x, angle, center, half, cfg.exemplar_size, flip)
    if cfg.exemplar_aug:
        exemplars = augment_exemplars(exemplars.flatten(0, 1), gen).view_as(exemplars)
    context = F.interpolate(x, size=cfg.context_size, mode="bicubic", antialias=True).clamp(0, 1)   # no photometric aug
    return context, exemplars, target_maps(angle, center, half, cfg.context_size)


# ----------------------------------------------------------------------------- loss and EMA

def correlation_loss(logits, target):
    """L = sum_e mean_{b, i} CE(z[b, e, :, i], M[b, e, i]): 2-class cross-entropy per context pixel i, averaged over
    pixels and images, summed over the E exemplars (models/cim.py:344-349, weight sigma_corr = 1).
    logits (B, E, 2, H, W), target (B, E, H, W) bool -> scalar."""
    B, E = target.shape[:2]
    ce = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(0, 1).long(), reduction="none")  # (B*E, H, W)
    return ce.view(B, E, -1).mean(dim=(0, 2)).sum()


@torch.no_grad()
def momentum_update(target, online, m):
    """theta_t <- m * theta_t + (1 - m) * theta_o (models/cim.py:143-155), on lists of tensors (foreach kernels)."""
    torch._foreach_lerp_(target, online, 1 - m)   # one fused multi-tensor kernel


# ----------------------------------------------------------------------------- model

class CrossBlock(nn.Module):
    """The release's CorrelationBlockV1: x = x + CrossAttn(q = LN1(x), k, v = LN1(y)); x = x + MLP(LN2(x)).
    One LayerNorm for both inputs; context tokens x are the queries, exemplar tokens y the keys and values."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, y):                                           # x: (M, Nq, C), y: (M, Nk, C) -> (M, Nq, C)
        (M, Nq, C), Nk, nh = x.shape, y.shape[1], self.num_heads
        q = self.q(self.norm1(x)).view(M, Nq, nh, C // nh).transpose(1, 2)                # (M, nh, Nq, hd)
        k, v = self.kv(self.norm1(y)).view(M, Nk, 2, nh, C // nh).permute(2, 0, 3, 1, 4)  # 2 x (M, nh, Nk, hd)
        a = F.scaled_dot_product_attention(q, k, v)                                        # (M, nh, Nq, hd)
        x = x + self.proj(a.transpose(1, 2).reshape(M, Nq, C))
        return x + self.mlp(self.norm2(x))


class CorrelationalIM(nn.Module):
    """forward(search images) -> (loss, logs). Online encoder (trained) on exemplars, target encoder (EMA, no grad)
    on the context, shared decoder_embed, fixed sin-cos positions on the context tokens, one CrossBlock, norm,
    1x1 conv to 2 classes, bilinear upsampling to the context size (models/cim.py:308-330)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        if cfg.arch == "resnet50":
            self.online, dim, stride = ResNetTokens(), ResNetTokens.dim, 16
            self.encoder_args = {"arch": "resnet50", "img_size": cfg.img_size}
        else:
            D, depth, heads = VIT_SIZES[cfg.arch]
            kw = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=D, depth=cfg.depth or depth,
                      num_heads=heads, mlp_ratio=4.0)
            self.online, dim, stride = VisionTransformer(**kw), D, cfg.patch_size   # MAE-style: fixed sin-cos, xavier
            # finetune.py builds its ViT from these kwargs (qkv bias, sin-cos positions, no relative bias/layer scale)
            self.encoder_args = {"arch": "vit", **kw, "qkv_bias": True, "pos_embed": "sincos", "rel_pos": "none",
                                 "init_values": None}
            if cfg.freeze_patch_embed:   # MoCo v3 random projection, bias zeroed first (models/cim.py:178-187)
                nn.init.zeros_(self.online.patch_embed.proj.bias)
                self.online.patch_embed.proj.requires_grad_(False)
        self.target = copy.deepcopy(self.online).requires_grad_(False)               # EMA copy, never in the optimizer
        self.grid = cfg.context_size // stride                                      # 160 / 16 = 10
        C = cfg.decoder_dim
        self.decoder_embed = nn.Linear(dim, C)                                      # shared: context and exemplars
        self.register_buffer("decoder_pos_embed", F.pad(sincos_pos_embed(C, self.grid, self.grid), (0, 0, 1, 0))[None])
        self.decoder_block = CrossBlock(C, cfg.decoder_heads, cfg.decoder_mlp_ratio)
        self.decoder_norm = nn.LayerNorm(C, eps=1e-6)
        self.decoder_pred = nn.Conv2d(C, 2, 1)                                      # background / exemplar logits
        for m in (self.decoder_embed, self.decoder_block, self.decoder_norm):
            m.apply(VisionTransformer._init_weights)
        nn.init.normal_(self.decoder_pred.weight, std=1.0)   # release: N(0, sqrt(2 / (1*1*2))) (models/cim.py:195-197)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def ema_pairs(self):
        """(target, online) tensor lists the EMA covers: every encoder parameter but the ViT cls token, which the
        target takes straight from the online encoder (the release's target uses the online cls_token)."""
        names = [n for n, _ in self.online.named_parameters() if n != "cls_token"]
        t, o = dict(self.target.named_parameters()), dict(self.online.named_parameters())
        return [t[n] for n in names], [o[n] for n in names]

    @torch.no_grad()
    def ema_update(self, m):
        momentum_update(*self.ema_pairs(), m)
        if hasattr(self.online, "cls_token"):
            self.target.cls_token.copy_(self.online.cls_token)

    def correlate(self, context, exemplars):
        """context (B, 3, Hc, Wc), exemplars (B, E, 3, h, w) in [0, 1] -> logits (B, E, 2, Hc, Wc)."""
        (B, E), (Hc, Wc) = exemplars.shape[:2], context.shape[-2:]
        with torch.no_grad():
            ctx = self.target((context - self.mean) / self.std)                   # (B, 1+Nc, D), no gradient
        ex = self.online((exemplars.flatten(0, 1) - self.mean) / self.std)        # (B*E, 1+Ne, D), positions resized
        q = self.decoder_embed(ctx) + self.decoder_pos_embed                     # (B, 1+Nc, C): context positions only
        q = q.unsqueeze(1).expand(-1, E, -1, -1).flatten(0, 1)                   # (B*E, 1+Nc, C) one copy per exemplar
        x = self.decoder_norm(self.decoder_block(q, self.decoder_embed(ex)))    # (B*E, 1+Nc, C)
        x = x[:, 1:].transpose(1, 2).reshape(B * E, -1, self.grid, self.grid)   # (B*E, C, g, g), cls dropped
        z = F.interpolate(self.decoder_pred(x), size=(Hc, Wc), mode="bilinear", align_corners=True)  # (B*E, 2, Hc, Wc)
        return z.view(B, E, 2, Hc, Wc)

    def loss_on_pairs(self, context, exemplars, target):
        logits = self.correlate(context, exemplars)
        with torch.no_grad():   # IoU of the predicted exemplar region, a readable progress number
            pred = logits.argmax(2).bool()
            iou = ((pred & target).sum((2, 3)) / (pred | target).sum((2, 3)).clamp(min=1)).mean()
        return correlation_loss(logits, target), {"iou": iou}

    def forward(self, images):                                          # (B, 3, H, W) uint8 search images
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):   # geometry in fp32
            context, exemplars, target = sample_pairs(images, self.cfg)
        return self.loss_on_pairs(context, exemplars, target)


# ----------------------------------------------------------------------------- data

def input_transform(cfg):
    """CPU: decode, one random resized crop (bicubic) + flip -> uint8 search image; everything else happens
    batched on the device."""
    return CropFlip(cfg.img_size, (cfg.search_scale_min, 1.0))


# ----------------------------------------------------------------------------- training

def release_no_decay(name, p):
    """Release's decay exemptions (tools/main_pretrain.py:283, timm 0.5.4): 1-D params and biases; cls token decayed."""
    return p.ndim <= 1 or name.endswith(".bias")


@torch.no_grad()
def optimizer_step(raw_model, opt, scaler, clip_grad, momentum):
    """Clip, step, then the EMA target; a step that fp16's GradScaler skips (inf/NaN grads) leaves the target alone.
    The scale is read back (a host sync) only when the scaler is on, i.e. with --amp fp16."""
    if clip_grad > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), clip_grad)
    scale = scaler.get_scale() if scaler.is_enabled() else 0.0
    scaler.step(opt)
    scaler.update()
    if not scaler.is_enabled() or scaler.get_scale() >= scale:
        raw_model.ema_update(momentum)                                 # METHOD: EMA target, from raw_model
    opt.zero_grad(set_to_none=True)


def checkpoint(cfg, raw_model, opt, scaler):
    """What OUT/checkpoint.pth holds besides Run's bookkeeping: everything to resume, plus both encoders in timm
    vit_* keys (ViT) or torchvision resnet50 keys without fc (ResNet-50); the release fine-tunes with global_pool."""
    encoders = {n: (m.net if cfg.arch == "resnet50" else m).state_dict()
                for n, m in (("online", raw_model.online), ("target", raw_model.target))}
    return {"model": raw_model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "encoders": encoders, "encoder_args": raw_model.encoder_args, "default_encoder": "online",
            "pool": "mean"}


def recipe_line(cfg, world, accum, lr, steps_per_epoch, amp_dtype):
    """The one line that says which recipe this run is."""
    G, row = cfg.batch_size * world * accum, Config.PAPER_ROWS.get(cfg.preset)
    prec = str(amp_dtype or "fp32").replace("torch.", "")
    return (f"recipe: {cfg.preset or 'defaults'} | global batch {cfg.batch_size} x {world} GPUs x {accum} accum = {G}"
            f" | peak lr {lr:.2e} = blr {cfg.blr} x {G} / 256 | {steps_per_epoch} steps/epoch | EMA {cfg.ema_momentum}"
            f" -> 1 | {cfg.num_exemplars} exemplars of {cfg.exemplar_size}px, area {cfg.exemplar_scale_min}-"
            f"{cfg.exemplar_scale_max}, rotation +-{cfg.rotation}, box rule {cfg.box_rule} | {prec}"
            f", clip {cfg.clip_grad or 'off'}" + (f" | paper row: {row}" if row else ""))


def main(cfg):
    validate(cfg)
    rank, world, device = setup_dist(cfg.device)
    seed_all(cfg.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = cfg.amp != "off"   # --amp off: full fp32 matmuls (torch >= 1.12 default)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if device.type == "cuda" else None
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)   # re-entered each step
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    accum = accum_steps(cfg, world)
    decode = decode_mode(cfg.decode)   # what the loader workers hand over: decoded pixels or JPEG bytes
    dataset = build_dataset(cfg.data, "pretrain", input_transform(cfg), cfg.img_size, decode=decode)
    loader = build_loader(dataset, cfg.batch_size, world, rank, cfg.seed, cfg.workers, device)
    steps_per_epoch = min(len(loader) // accum, cfg.steps_per_epoch or len(loader))   # optimizer steps
    if steps_per_epoch < 1:
        fail(f"one optimizer step needs {accum} batches per process but the data gives {len(loader)}; "
             "lower --accum-iter / --global-batch")
    total_steps = cfg.epochs * steps_per_epoch
    raw_model = CorrelationalIM(cfg).to(device)                        # METHOD
    if cfg.arch == "resnet50":
        if world > 1:   # keep BN statistics global like the release's SyncBN (tools/main_pretrain.py:278)
            raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
        raw_model = raw_model.to(memory_format=torch.channels_last)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    global_batch = cfg.batch_size * world * accum
    lr = cfg.blr * global_batch / 256
    print0(recipe_line(cfg, world, accum, lr, steps_per_epoch, amp_dtype))
    batch_warning(global_batch, cfg.paper_batch, steps_per_epoch)
    opt = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay, skip_decay=release_no_decay), lr=lr,
                            betas=(0.9, 0.95), fused=device.type == "cuda")
    lr_sched = cosine_schedule(lr, cfg.min_lr, total_steps, cfg.warmup_epochs * steps_per_epoch)
    ema_sched = cosine_schedule(cfg.ema_momentum, 1.0, total_steps)  # METHOD: momentum 0.99 -> 1 (BYOL cosine)
    derived = {"global_batch": global_batch, "steps_per_epoch": steps_per_epoch, "images": len(dataset)}
    run = Run(cfg, __file__, raw_model, opt, scaler, loader, steps_per_epoch, accum, derived)
    run.resume()   # OUT/checkpoint.pth, if any; other settings stop here

    for it, batches in run.steps():
        for g in opt.param_groups:
            g["lr"] = lr_sched[it]
        for last, (images, _) in batches:
            images = images_to(images, device)                           # (B, 3, S, S) uint8
            with no_sync(model, last):
                with autocast:
                    loss, logs = model(images)                         # METHOD: crop, correlate, loss
                scaler.scale(loss / accum).backward()
            run.add(loss=loss, **logs)
        optimizer_step(raw_model, opt, scaler, cfg.clip_grad, ema_sched[it])   # METHOD: + EMA target
        if run.end_step(it, lr_sched[it]):                                     # epoch end or --stop-after
            run.save(checkpoint(cfg, raw_model, opt, scaler), check=lambda: raw_model(images)[0])
            if cfg.viz_every and (run.epoch + 1) % cfg.viz_every == 0 and rank == 0:
                path = os.path.join(cfg.out, f"viz_epoch{run.epoch}.png")
                visualize(raw_model, images, path, run.epoch)             # METHOD


# ----------------------------------------------------------------------------- appendix: ViT (MAE-style)
# timm vit_* parameter names, fixed 2-D sin-cos positions, qkv bias, pre-norm blocks, no layer scale.

VIT_SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),  # name: (width D, depth, heads)
             "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}


def sincos_pos_embed(D, h, w):
    """Fixed 2-D sin-cos positions (MAE): half the channels encode the row, half the column -> (h*w, D)."""
    omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D // 4))       # (D/4,)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    out = [f(c.flatten()[:, None] * omega) for c in (xs, ys) for f in (torch.sin, torch.cos)]  # 4 x (h*w, D/4)
    return torch.cat(out, dim=1).float()                                               # (h*w, D)


def resize_pos_embed(pos_embed, old_grid, new_grid):
    """(1, 1+gh*gw, D) positions for another grid: bicubic on the patch part, the cls position kept. As the release
    (models/cim.py:202-222), the sampling step is set by scale_factor (h + 0.1) / gh, not by the output size."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, *old_grid, -1).permute(0, 3, 1, 2)                # (1, D, gh, gw)
    scale = tuple((n + 0.1) / o for n, o in zip(new_grid, old_grid))
    grid = F.interpolate(grid.float(), scale_factor=scale, mode="bicubic", align_corners=False).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)         # (1, 1+h*w, D)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                              # (B, N, D) -> (B, N, D)
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                          # 3 x (B, nh, N, hd)
        x = F.scaled_dot_product_attention(q, k, v)                    # (B, nh, N, hd)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x):                                              # (B, N, D) -> (B, N, D)
        x = x + stochastic_depth(self.attn(self.norm1(x)), self.drop_path, "row", self.training)
        return x + stochastic_depth(self.mlp(self.norm2(x)), self.drop_path, "row", self.training)


class VisionTransformer(nn.Module):
    """ViT encoder with timm parameter names and fixed sin-cos positions (a buffer, zero for cls, as MAE).
    forward(images) -> (B, 1+N, D) normed tokens, cls first. Other image sizes interpolate the positions."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 drop_path=0.0):
        super().__init__()
        self.patch_size, self.grid = patch_size, (img_size // patch_size,) * 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", F.pad(sincos_pos_embed(embed_dim, *self.grid), (0, 0, 1, 0))[None])
        dpr = [drop_path * i / max(depth - 1, 1) for i in range(depth)]   # linearly increasing stochastic depth
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(self._init_weights)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(embed_dim, -1))  # MAE: patch embed as a linear
        nn.init.normal_(self.cls_token, std=0.02)

    @staticmethod
    def _init_weights(m):   # MAE-style init: xavier-uniform linears, zero biases, unit LayerNorms
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight), nn.init.zeros_(m.bias)

    def forward(self, images):                                         # (B, 3, H, W) -> (B, 1+N, D)
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)   # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        x = x + resize_pos_embed(self.pos_embed, self.grid, (h, w))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# ----------------------------------------------------------------------------- appendix: ResNet-50 tokens

class ResNetTokens(nn.Module):
    """Our ResNet-50 neck (the release is ViT-only): torchvision trunk, tokens at stride 16 like a /16 ViT.
    f = layer3 + upsample(conv1x1(layer4)) (1024 channels, FPN-style, so layer4 is trained too); a global-average
    token stands in for the cls token. 160 px context -> 1 + 10x10 tokens, 64 px exemplar -> 1 + 4x4."""
    dim = 1024

    def __init__(self):
        super().__init__()
        self.net = torchvision.models.resnet50()      # saved as torchvision keys (no fc) for finetune.py
        self.net.fc = nn.Identity()
        self.neck = nn.Conv2d(2048, self.dim, 1)

    def forward(self, x):                                              # (B, 3, H, W) -> (B, 1+N, 1024)
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x.contiguous(memory_format=torch.channels_last)))))
        c3 = n.layer3(n.layer2(n.layer1(x)))                           # (B, 1024, H/16, W/16)
        c4 = n.layer4(c3)                                              # (B, 2048, H/32, W/32)
        f = c3 + F.interpolate(self.neck(c4), size=c3.shape[-2:], mode="nearest")
        t = f.flatten(2).transpose(1, 2)                               # (B, N, 1024)
        return torch.cat([t.mean(1, keepdim=True), t], dim=1)          # (B, 1+N, 1024)


# ----------------------------------------------------------------------------- appendix: visualisation, checks

@torch.no_grad()
def visualize(m, images, path, seed=0):
    """One row per image: context | E exemplars (resized) | E target maps | E predicted maps (red on the context).
    Own generator, so a --viz run keeps the training RNG stream (and exact resume) unchanged."""
    was_training = m.training
    gen = torch.Generator(images.device).manual_seed(seed)
    context, exemplars, target = sample_pairs(images[:4], m.cfg, gen)
    pred = m.eval().correlate(context, exemplars).argmax(2)                   # (B, E, Hc, Wc)
    (B, E), S = exemplars.shape[:2], context.shape[-1]
    ex = F.interpolate(exemplars.flatten(0, 1), size=S, mode="nearest").view(B, E, 3, S, S)
    red = context.new_tensor([1.0, 0.0, 0.0]).view(1, 1, 3, 1, 1)

    def paint(mask):                                                          # (B, E, 3, S, S) red on the context
        return 0.5 * context[:, None] + 0.5 * mask[:, :, None].float() * red

    tiles = torch.cat([context[:, None], ex.float(), paint(target), paint(pred)], dim=1)  # (B, 1+3E, 3, S, S)
    save_image(tiles.flatten(0, 1), path, nrow=1 + 3 * E)
    m.train(was_training)


def validate(cfg):
    """Cross-flag rules (each flag's own range is Config.RANGES, checked by parse_config): one clear error
    before any data or model is built."""
    check_ranges(cfg)
    unit = 32 if cfg.arch == "resnet50" else cfg.patch_size   # ResNet-50: layer4 (stride 32) must tile the input
    for k in ("img_size", "context_size", "exemplar_size"):
        if getattr(cfg, k) % unit:
            fail(f"--{k.replace('_', '-')} {getattr(cfg, k)}: must be a positive multiple of {unit} for {cfg.arch}")
    if cfg.exemplar_size > cfg.context_size:
        fail(f"--exemplar-size {cfg.exemplar_size} is larger than --context-size {cfg.context_size} (release: 64, 160)")
    if cfg.exemplar_scale_min > cfg.exemplar_scale_max:
        fail(f"exemplar scale range [{cfg.exemplar_scale_min}, {cfg.exemplar_scale_max}]: need min <= max")
    if cfg.exemplar_ratio_min > cfg.exemplar_ratio_max:
        fail(f"exemplar aspect range [{cfg.exemplar_ratio_min}, {cfg.exemplar_ratio_max}]: need min <= max")
    if cfg.decoder_dim % cfg.decoder_heads or cfg.decoder_dim % 4:
        fail(f"--decoder-dim {cfg.decoder_dim} must be divisible by 4 and by --decoder-heads {cfg.decoder_heads}")
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs:
        fail(f"--warmup-epochs {cfg.warmup_epochs} >= --epochs {cfg.epochs}: the lr never reaches its peak")


if __name__ == "__main__":
    main(parse_config(Config))
