"""
cim_correlate.py - Correlational Image Modeling (crop-and-correlate) pre-training in one file.

Paper: Li, Xie, Loy, "Correlational Image Modeling for Self-Supervised Visual Pre-Training",
CVPR 2023, arXiv 2303.12670.
Official code: https://github.com/weivision/Correlational-Image-Modeling (commit f00e35a; line
references: docs/cim_correlate.md).

    torchrun --nproc_per_node 8 cim_correlate.py --preset vit_base_300ep --data /imagenet
    python cim_correlate.py --data /imagenet --epochs 300                        # 1 GPU, bf16
    python cim_correlate.py --preset tiny --data synthetic --out out/corr_tiny   # CPU, seconds

From each search image, E exemplars are cut (random scale, shape and rotation) and a light decoder
must find them: the target encoder (an EMA of the online one) embeds the whole image (the context),
the online encoder embeds each exemplar, one cross-attention block (context queries, exemplar keys
and values) predicts a 2-class map per exemplar. ViT or ResNet-50 (our token neck).
Result: ImageNet not run (official README: ViT-B/16 300 ep + 100 ep fine-tuning -> 83.1 top-1);
small CPU runs beat their init on photos (benchmarks/README.md#does-each-method-learn).

Sections: config | crop-and-correlate sampling | loss | model | data | training | official-code
details (box revision, exemplar augmentation, weight decay, presets) | appendix: ViT, ResNet-50
tokens, visualisation, checks.
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

from common import (IMAGENET_MEAN, IMAGENET_STD, CropFlip, Run, accum_steps, batch_warning,
                    build_dataset, build_loader, check_ranges, cosine_schedule, decode_mode,
                    epoch_steps, fail, images_to, no_sync, param_groups, parse_config, print0,
                    seed_all, setup_dist)

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass
class Config:
    """Correlational Image Modeling pre-training. Defaults: the official ViT-B/16 values, but bf16,
    clipping 1.0 and no accumulation; --preset vit_base_300ep is the official run (docs)."""
    data: str = "/imagenet"          # class folders | cifar10 | cifar100 | stl10 | synthetic
    img_size: int = 224              # search image side
    arch: str = "vit_base"           # a ViT size, or resnet50 with our token neck
    depth: int = 0                   # ViT depth; 0 = the arch's depth
    patch_size: int = 16             # ViT patch side (ResNet-50 tokens are at stride 16)
    # crop-and-correlate sampling
    search_scale_min: float = 0.5    # RandomResizedCrop area range (min, 1) of the search image
    context_size: int = 160          # the search image resized to this side: the target's input
    exemplar_size: int = 64          # exemplar side (4x4 tokens for a /16 ViT)
    num_exemplars: int = 6           # exemplars per image, one online-encoder pass each
    exemplar_scale_min: float = 0.05  # box area / search image area, lower end
    exemplar_scale_max: float = 0.48  # upper end
    exemplar_ratio_min: float = 1 / 3  # box aspect w/h, log-uniform between min and max
    exemplar_ratio_max: float = 3.0  # upper end
    rotation: int = 45               # angle ~ uniform integer in [-rotation, rotation) degrees
    box_tries: int = 10              # box draws before the whole-image fallback
    box_rule: str = "corner"         # keep the exemplar in the image: corner (official) | centre
    exemplar_aug: bool = True        # colour jitter, grey, blur, solarize on exemplars only
    exemplar_flip: bool = True       # flip the exemplar only; its map is not flipped
    # model
    freeze_patch_embed: bool = True  # random, frozen patch projection (MoCo v3)
    ema_momentum: float = 0.99       # target = EMA of online, momentum cosine to 1 per step
    decoder_dim: int = 512           # correlation decoder width
    decoder_heads: int = 16          # its cross-attention heads
    decoder_mlp_ratio: float = 4.0   # its MLP width / decoder_dim
    # optimisation: AdamW betas (0.9, 0.95)
    epochs: int = 300                # pre-training epochs
    batch_size: int = 256            # per GPU and micro-batch
    accum_iter: int = 1              # micro-batches per optimizer step
    global_batch: int = 0            # >0: accumulation = global_batch / (batch_size x GPUs)
    paper_batch: int = 0             # the recipe's global batch (presets): warn when >2x away
    paper_row: str = ""              # the paper result a preset reproduces (recipe line)
    blr: float = 1.5e-4              # lr = blr x global batch / 256
    min_lr: float = 0.0              # cosine floor
    warmup_epochs: int = 40          # linear warmup from 0
    weight_decay: float = 0.05       # AdamW, not on 1-D params and biases
    clip_grad: float = 1.0           # max global gradient norm; 0 = off (the official fp32 run)
    # system
    device: str = "cuda"             # cuda | cpu
    amp: str = "bf16"                # bf16 | fp16 | off (autocast on CUDA; official: fp32)
    compile: bool = False            # torch.compile the model (sampling included)
    workers: int = 10                # data loader processes per GPU
    decode: str = "cpu"              # JPEGs decoded by the loader workers (cpu) or the GPU (device)
    steps_per_epoch: int = 0         # optimizer steps per epoch; 0 = one pass over the data
    stop_after: int = 0              # exit after N steps with a resumable checkpoint; 0 = off
    log_every: int = 50              # progress line every N optimizer steps
    viz_every: int = 0               # OUT/viz_epoch{E}.png every N epochs; 0 = off
    out: str = "out/cim_correlate"   # checkpoint, logs, run record; a checkpoint there is resumed
    seed: int = 0                    # process r uses seed + r
    preset: str = ""                 # vit_base_300ep (the official run) | tiny | small32 (CPU)
    allow_change: str = ""           # resume despite these changed settings: name,name or all

    CHOICES = {"arch": ("vit_tiny", "vit_small", "vit_base", "vit_large", "resnet50"),
               "box_rule": ("corner", "centre"), "amp": ("bf16", "fp16", "off"),
               "decode": ("cpu", "device")}
    RANGES = {"img_size": ">= 1", "depth": ">= 0", "patch_size": ">= 1",
              "search_scale_min": "(0, 1]", "context_size": ">= 1", "exemplar_size": ">= 1",
              "num_exemplars": "[1, 32]", "exemplar_scale_min": "(0, 1]",
              "exemplar_scale_max": "(0, 1]", "exemplar_ratio_min": "> 0",
              "exemplar_ratio_max": "> 0", "rotation": "[0, 180]", "box_tries": ">= 1",
              "ema_momentum": "[0, 1]", "decoder_dim": ">= 4", "decoder_heads": ">= 1",
              "decoder_mlp_ratio": "> 0", "epochs": ">= 1", "batch_size": ">= 1",
              "accum_iter": ">= 1", "global_batch": ">= 0", "paper_batch": ">= 0", "blr": "> 0",
              "min_lr": ">= 0", "warmup_epochs": ">= 0", "weight_decay": ">= 0",
              "clip_grad": ">= 0", "steps_per_epoch": ">= 0", "workers": ">= 0", "seed": ">= 0",
              "log_every": ">= 1", "stop_after": ">= 0", "viz_every": ">= 0"}
    # a flag given on the command line that the chosen arch would ignore is an error
    ONLY_WITH = {k: ("arch", ("vit_tiny", "vit_small", "vit_base", "vit_large"))
                 for k in ("depth", "patch_size", "freeze_patch_embed")}

# ---------------------------------------------------------------------- crop-and-correlate sampling
# Coordinates: grid_sample's normalised ones on the square search image (x right, y down, [-1, 1]
# edge to edge). An exemplar is (angle t, centre c, half sizes (a, b)): the rectangle
# {c + u a e1 + v b e2 : |u|, |v| <= 1}, e1 = (cos t, sin t), e2 = (-sin t, cos t): an axis-aligned
# crop of the image rotated counter-clockwise by t.


def sample_boxes(B, E, cfg, device, gen=None):
    """The official box recipe, vectorised. Per exemplar: an integer angle in [-rot, rot) degrees; a
    box of area s x image, s ~ U[scale_min, scale_max], log-uniform aspect (the first of box_tries
    draws that fits, else the whole image), placed uniformly. In the image rotated by the angle, the
    exemplar is the bounding box of the rotated box, kept inside the rotated image by box_rule:
    "corner" moves each outside corner onto the edge (official, revise_corners), "centre" shrinks it
    about its centre (the largest k <= 1 that fits).
    -> angle (B, E) radians, center (B, E, 2), half (B, E, 2) = (a, b), all normalised."""
    r = cfg.rotation
    K = cfg.box_tries
    degrees = torch.randint(-r, r + (r == 0), (B, E), device=device, generator=gen)
    angle = degrees.float() * (math.pi / 180)
    lo, hi = cfg.exemplar_scale_min, cfg.exemplar_scale_max
    area = torch.rand(B, E, K, device=device, generator=gen) * (hi - lo) + lo       # (B, E, K)
    lo, hi = math.log(cfg.exemplar_ratio_min), math.log(cfg.exemplar_ratio_max)
    ratio = torch.exp(torch.rand(B, E, K, device=device, generator=gen) * (hi - lo) + lo)   # w / h
    # (B, E, K) of the side
    w = (area * ratio).sqrt()
    h = (area / ratio).sqrt()
    fits = (w <= 1) & (h <= 1)
    first = fits.int().argmax(-1, keepdim=True)                                # (B, E, 1)
    found = fits.any(-1)
    # none fits: the whole image; w, h are also the normalised half sizes
    w = torch.where(found, w.gather(-1, first)[..., 0], 1.0)                   # (B, E)
    h = torch.where(found, h.gather(-1, first)[..., 0], 1.0)
    center = 2 * torch.rand(B, E, 2, device=device, generator=gen) - 1
    center = center * (1 - torch.stack([w, h], -1))
    if cfg.box_rule == "corner":
        return angle, *revise_corners(angle, center, w, h)
    cos = angle.cos().abs()
    sin = angle.sin().abs()
    # the bounding box of the rotated box (rotated frame), then its half extent in the image frame
    a = w * cos + h * sin
    b = w * sin + h * cos
    ext_x = a * cos + b * sin
    ext_y = a * sin + b * cos
    kx = (1 - center[..., 0].abs()) / ext_x
    ky = (1 - center[..., 1].abs()) / ext_y
    k = torch.minimum(kx, ky).clamp(max=1.0)
    return angle, center, torch.stack([a * k, b * k], -1)


def crop_exemplars(images, angle, center, half, size, flip=None, supersample=2):
    """images (B, 3, H, W) float -> exemplars (B, E, 3, size, size). Output pixel (u, v) samples the
    image at c + u a e1 + v b e2: one affine grid per exemplar, one grid_sample call for all (grids
    stacked along the height: the image is never copied E times), sampled at supersample x size and
    average-pooled (cheap anti-aliasing). flip (B, E) bool mirrors the exemplar (u -> -u), not its
    target map."""
    B, E = angle.shape
    n = size * supersample
    cos = angle.cos()
    sin = angle.sin()
    a = half[..., 0] * (1 - 2 * flip.float()) if flip is not None else half[..., 0]
    b = half[..., 1]
    cx = center[..., 0]
    cy = center[..., 1]
    theta = torch.stack([a * cos, -b * sin, cx, a * sin, b * cos, cy], -1).view(B * E, 2, 3)
    grid = F.affine_grid(theta, [B * E, 1, n, n], align_corners=False)         # (B*E, n, n, 2)
    grid = grid.view(B, E * n, n, 2).to(images.dtype)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                        align_corners=False)                                   # (B, 3, E*n, n)
    out = F.avg_pool2d(out.view(B, 3 * E, n, n), supersample)                  # (B, 3E, size, size)
    # (B, E, 3, size, size)
    return out.view(B, 3, E, size, size).transpose(1, 2)


def target_maps(angle, center, half, size):
    """Target correlation map: M[i, j] = 1 iff context pixel centre p satisfies |(p - c).e1| <= a
    and |(p - c).e2| <= b: the rotated rectangle the exemplar shows. Exact (the official code
    resizes a label map bicubically). -> (B, E, size, size) bool; the context is the whole search
    image."""
    p = (torch.arange(size, device=angle.device) * 2 + 1) / size - 1         # (size,) pixel centres
    dx = p.view(1, 1, 1, size) - center[..., 0, None, None]                   # (B, E, 1, size)
    dy = p.view(1, 1, size, 1) - center[..., 1, None, None]                   # (B, E, size, 1)
    cos = angle.cos()[..., None, None]
    sin = angle.sin()[..., None, None]
    u = dx * cos + dy * sin                                                    # (B, E, size, size)
    v = dy * cos - dx * sin
    return (u.abs() <= half[..., 0, None, None]) & (v.abs() <= half[..., 1, None, None])


def sample_pairs(images, cfg, gen=None):
    """Search images (B, 3, H, W), uint8 or float in [0, 1] -> context (B, 3, Hc, Wc), exemplars
    (B, E, 3, h, w), both in [0, 1], and target maps (B, E, Hc, Wc) bool; the whole batch at once,
    on the images' device."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    B = x.shape[0]
    E = cfg.num_exemplars
    dev = x.device
    angle, center, half = sample_boxes(B, E, cfg, dev, gen)
    flip = torch.rand(B, E, device=dev, generator=gen) < 0.5 if cfg.exemplar_flip else None
    exemplars = crop_exemplars(x, angle, center, half, cfg.exemplar_size, flip)
    if cfg.exemplar_aug:
        exemplars = augment_exemplars(exemplars.flatten(0, 1), gen).view_as(exemplars)
    # the context has no photometric augmentation
    context = F.interpolate(x, size=cfg.context_size, mode="bicubic", antialias=True).clamp(0, 1)
    return context, exemplars, target_maps(angle, center, half, cfg.context_size)

# ----------------------------------------------------------------------------- loss


def correlation_loss(logits, target):
    """L = sum_e mean_{b, i} CE(z[b, e, :, i], M[b, e, i]): 2-class cross-entropy per context pixel
    i, averaged over pixels and images, summed over the E exemplars (weight sigma_corr = 1).
    logits (B, E, 2, H, W), target (B, E, H, W) bool -> scalar."""
    B, E = target.shape[:2]
    ce = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(0, 1).long(),
                         reduction="none")                                     # (B*E, H, W)
    return ce.view(B, E, -1).mean(dim=(0, 2)).sum()


@torch.no_grad()
def ema_update(target, online, m):
    """theta_t <- m theta_t + (1 - m) theta_o on lists of tensors: one fused multi-tensor kernel."""
    torch._foreach_lerp_(target, online, 1 - m)

# ----------------------------------------------------------------------------- model


class CrossBlock(nn.Module):
    """The official CorrelationBlockV1: x = x + CrossAttn(q = LN1(x), k, v = LN1(y));
    x = x + MLP(LN2(x)). One LayerNorm for both inputs; the context tokens x are the queries, the
    exemplar tokens y the keys and values."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    # x (M, Nq, C), y (M, Nk, C) -> (M, Nq, C)
    def forward(self, x, y):
        M, Nq, C = x.shape
        Nk = y.shape[1]
        nh = self.num_heads
        q = self.q(self.norm1(x)).view(M, Nq, nh, C // nh).transpose(1, 2)    # (M, nh, Nq, hd)
        kv = self.kv(self.norm1(y)).view(M, Nk, 2, nh, C // nh)
        k, v = kv.permute(2, 0, 3, 1, 4)                                      # 2 x (M, nh, Nk, hd)
        a = F.scaled_dot_product_attention(q, k, v)                           # (M, nh, Nq, hd)
        x = x + self.proj(a.transpose(1, 2).reshape(M, Nq, C))
        return x + self.mlp(self.norm2(x))


class CorrelationalIM(nn.Module):
    """forward(search images) -> (loss, logs). Online encoder (trained) on the exemplars, target
    encoder (EMA, no gradient) on the context, a shared decoder_embed, fixed sin-cos positions on
    the context tokens, one CrossBlock, a norm, a 1x1 conv to 2 classes, bilinear upsampling to the
    context size."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        if cfg.arch == "resnet50":
            self.online = ResNetTokens()
            dim = ResNetTokens.dim
            stride = 16
            self.encoder_args = {"arch": "resnet50", "img_size": cfg.img_size}
        else:
            D, depth, heads = VIT_SIZES[cfg.arch]
            kw = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=D,
                      depth=cfg.depth or depth, num_heads=heads, mlp_ratio=4.0)
            self.online = VisionTransformer(**kw)
            dim = D
            stride = cfg.patch_size
            # finetune.py rebuilds the ViT from these (qkv bias, sin-cos positions, no layer scale)
            self.encoder_args = {"arch": "vit", **kw, "qkv_bias": True, "pos_embed": "sincos",
                                 "rel_pos": "none", "init_values": None}
            if cfg.freeze_patch_embed:
                # MoCo v3's random projection, its bias zeroed first (official)
                nn.init.zeros_(self.online.patch_embed.proj.bias)
                self.online.patch_embed.proj.requires_grad_(False)
        # the EMA copy, never in the optimizer
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.grid = cfg.context_size // stride                                 # 160 / 16 = 10
        C = cfg.decoder_dim
        # shared by the context and the exemplars
        self.decoder_embed = nn.Linear(dim, C)
        pos = F.pad(sincos_pos_embed(C, self.grid, self.grid), (0, 0, 1, 0))[None]
        self.register_buffer("decoder_pos_embed", pos)
        self.decoder_block = CrossBlock(C, cfg.decoder_heads, cfg.decoder_mlp_ratio)
        self.decoder_norm = nn.LayerNorm(C, eps=1e-6)
        # background / exemplar
        self.decoder_pred = nn.Conv2d(C, 2, 1)
        for m in (self.decoder_embed, self.decoder_block, self.decoder_norm):
            m.apply(VisionTransformer._init_weights)
        # official: N(0, sqrt(2 / (1 x 1 x 2))) = N(0, 1)
        nn.init.normal_(self.decoder_pred.weight, std=1.0)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def ema_pairs(self):
        """(target, online) tensor lists the EMA covers: every encoder parameter but the ViT cls
        token, which the target takes straight from the online encoder (official)."""
        names = [n for n, _ in self.online.named_parameters() if n != "cls_token"]
        t = dict(self.target.named_parameters())
        o = dict(self.online.named_parameters())
        return [t[n] for n in names], [o[n] for n in names]

    @torch.no_grad()
    def ema_update(self, m):
        ema_update(*self.ema_pairs(), m)
        if hasattr(self.online, "cls_token"):
            self.target.cls_token.copy_(self.online.cls_token)

    def correlate(self, context, exemplars):
        """context (B, 3, Hc, Wc), exemplars (B, E, 3, h, w) in [0, 1]
        -> logits (B, E, 2, Hc, Wc)."""
        B, E = exemplars.shape[:2]
        Hc, Wc = context.shape[-2:]
        with torch.no_grad():
            ctx = self.target((context - self.mean) / self.std)               # (B, 1+Nc, D)
        # positions resized to the exemplar's grid
        ex = self.online((exemplars.flatten(0, 1) - self.mean) / self.std)   # (B*E, 1+Ne, D)
        # only the context tokens get positions
        q = self.decoder_embed(ctx) + self.decoder_pos_embed                  # (B, 1+Nc, C)
        q = q.unsqueeze(1).expand(-1, E, -1, -1).flatten(0, 1)                # (B*E, 1+Nc, C)
        x = self.decoder_norm(self.decoder_block(q, self.decoder_embed(ex)))  # (B*E, 1+Nc, C)
        x = x[:, 1:].transpose(1, 2).reshape(B * E, -1, self.grid, self.grid)  # (B*E, C, g, g)
        z = F.interpolate(self.decoder_pred(x), size=(Hc, Wc), mode="bilinear",
                          align_corners=True)                                  # (B*E, 2, Hc, Wc)
        return z.view(B, E, 2, Hc, Wc)

    def loss_on_pairs(self, context, exemplars, target):
        logits = self.correlate(context, exemplars)
        # the IoU of the predicted exemplar region: a readable progress number
        with torch.no_grad():
            pred = logits.argmax(2).bool()
            inter = (pred & target).sum((2, 3))
            union = (pred | target).sum((2, 3)).clamp(min=1)
            iou = (inter / union).mean()
        return correlation_loss(logits, target), {"iou": iou}

    def forward(self, images):                                 # (B, 3, H, W) uint8 search images
        # the geometry in fp32
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            context, exemplars, target = sample_pairs(images, self.cfg)
        return self.loss_on_pairs(context, exemplars, target)

# ----------------------------------------------------------------------------- data


def input_transform(cfg):
    """The loader's work: decode, one random resized crop (bicubic) + flip -> uint8 search image;
    everything else happens batched on the device."""
    return CropFlip(cfg.img_size, (cfg.search_scale_min, 1.0))

# ----------------------------------------------------------------------------- training


@torch.no_grad()
def optimizer_step(raw_model, opt, scaler, clip_grad, momentum):
    """Clip, step, then target <- EMA(online); a step fp16's GradScaler skips (inf/NaN gradients)
    leaves the target alone. The scale is read back (a host sync) only with --amp fp16."""
    if clip_grad > 0:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(raw_model.parameters(), clip_grad)
    scale = scaler.get_scale() if scaler.is_enabled() else 0.0
    scaler.step(opt)
    scaler.update()
    if not scaler.is_enabled() or scaler.get_scale() >= scale:
        raw_model.ema_update(momentum)
    opt.zero_grad(set_to_none=True)


def checkpoint(cfg, raw_model, opt, scaler):
    """What OUT/checkpoint.pth holds besides Run's bookkeeping: everything to resume, and both
    encoders in timm's vit_* keys (ViT) or torchvision's resnet50 keys without fc (ResNet-50);
    finetune.py pools by mean, as the official fine-tuning (global_pool)."""
    models = (("online", raw_model.online), ("target", raw_model.target))
    encoders = {n: (m.net if cfg.arch == "resnet50" else m).state_dict() for n, m in models}
    return {"model": raw_model.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(), "encoders": encoders, "default_encoder": "online",
            "encoder_args": raw_model.encoder_args, "pool": "mean"}


def main(cfg):
    validate(cfg)
    rank, world, device = setup_dist(cfg.device)
    seed_all(cfg.seed + rank)
    # --amp off: full fp32 matmuls, as the official run
    torch.backends.cuda.matmul.allow_tf32 = cfg.amp != "off"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    amp_dtype = amp_dtype if device.type == "cuda" else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    accum = accum_steps(cfg, world)
    global_batch = cfg.batch_size * world * accum

    # the loader workers hand over decoded crops, or JPEG bytes to decode on the device
    decode = decode_mode(cfg.decode)
    dataset = build_dataset(cfg.data, "pretrain", input_transform(cfg), cfg.img_size, decode=decode)
    loader = build_loader(dataset, cfg.batch_size, world, rank, cfg.seed, cfg.workers, device)
    steps_per_epoch = epoch_steps(loader, accum, cfg.steps_per_epoch)
    total_steps = cfg.epochs * steps_per_epoch

    # raw_model: saved, EMA-updated and checked; model: maybe compiled and DDP-wrapped
    raw_model = CorrelationalIM(cfg).to(device)
    if cfg.arch == "resnet50":
        if world > 1:
            # BatchNorm statistics over all GPUs, as the official SyncBN
            raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
        raw_model = raw_model.to(memory_format=torch.channels_last)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    lr = cfg.blr * global_batch / 256
    print0(recipe_line(cfg, world, accum, lr, steps_per_epoch, amp_dtype))
    batch_warning(global_batch, cfg.paper_batch, steps_per_epoch)
    groups = param_groups(raw_model, cfg.weight_decay, skip_decay=official_no_decay)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    lr_sched = cosine_schedule(lr, cfg.min_lr, total_steps, cfg.warmup_epochs * steps_per_epoch)
    # BYOL's cosine momentum schedule, 0.99 -> 1
    ema_sched = cosine_schedule(cfg.ema_momentum, 1.0, total_steps)
    derived = {"global_batch": global_batch, "steps_per_epoch": steps_per_epoch,
               "images": len(dataset)}
    run = Run(cfg, __file__, raw_model, opt, scaler, loader, steps_per_epoch, accum, derived)
    run.resume()

    for it, batches in run.steps():
        for g in opt.param_groups:
            g["lr"] = lr_sched[it]
        for last, (images, _) in batches:
            images = images_to(images, device)                                # (B, 3, S, S) uint8
            with no_sync(model, last):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    # METHOD: crop exemplars, correlate them with the context, the map loss
                    loss, logs = model(images)
                scaler.scale(loss / accum).backward()
            run.add(loss=loss, **logs)
        # METHOD: clip, step, then the target's EMA
        optimizer_step(raw_model, opt, scaler, cfg.clip_grad, ema_sched[it])
        if run.end_step(it, lr_sched[it]):
            run.save(checkpoint(cfg, raw_model, opt, scaler), check=lambda: raw_model(images)[0])
            if cfg.viz_every and (run.epoch + 1) % cfg.viz_every == 0 and rank == 0:
                path = os.path.join(cfg.out, f"viz_epoch{run.epoch}.png")
                visualize(raw_model, images, path, run.epoch)

# ---------------------------------------------------------------------------- official-code details
# What exists to match the official code rather than the paper's text: its per-corner box revision,
# its exemplar augmentation, its weight-decay exemptions, and the preset of its official run.


def revise_corners(angle, center, w, h):
    """The official per-corner rule, in closed form. In the rotated frame q = (p.e1, p.e2), each
    corner of the bounding box [x1, x2] x [y1, y2] of the rotated box that lies outside the rotated
    image moves along one side onto its edge, in the official order (t > 0: top-left down, top-right
    left, bottom-left right, bottom-right up; t <= 0: top-left right, top-right down, bottom-left
    up, bottom-right left). -> center (B, E, 2) in the image frame, half (B, E, 2) rotated frame."""
    c = angle.cos()
    s = angle.sin()

    def span(alpha, beta):   # {z : |alpha + beta z| <= 1} as (low, high)
        beta = torch.where(beta.abs() < 1e-9, torch.full_like(beta, 1e-9), beta)
        lo = (-1 - alpha) / beta
        hi = (1 - alpha) / beta
        return torch.minimum(lo, hi), torch.maximum(lo, hi)

    def rows(x):   # (top, bottom) of the rotated image in column x: p = x e1 + y e2
        l1, h1 = span(x * c, -s)
        l2, h2 = span(x * s, c)
        return torch.maximum(l1, l2), torch.minimum(h1, h2)

    def cols(y):   # (left, right) of the rotated image in row y
        l1, h1 = span(-y * s, c)
        l2, h2 = span(y * c, s)
        return torch.maximum(l1, l2), torch.minimum(h1, h2)

    def out(x, y):   # the corner lies outside the rotated image
        return ((x * c - y * s).abs() > 1 + 1e-6) | ((x * s + y * c).abs() > 1 + 1e-6)

    qx = center[..., 0] * c + center[..., 1] * s
    qy = center[..., 1] * c - center[..., 0] * s
    # half extents of the bounding box
    A = w * c.abs() + h * s.abs()
    B = w * s.abs() + h * c.abs()
    x1 = qx - A
    x2 = qx + A
    y1 = qy - B
    y2 = qy + B
    pos = angle > 0
    # the official code tests the original corners
    tl = out(x1, y1)
    tr = out(x2, y1)
    bl = out(x1, y2)
    y1n = torch.where(pos & tl, rows(x1)[0], y1)
    x1n = torch.where(~pos & tl, cols(y1)[0], x1)
    x2n = torch.where(pos & tr, cols(y1n)[1], x2)
    y1n = torch.where(~pos & tr, rows(x2)[0], y1n)
    x1n = torch.where(pos & bl, cols(y2)[0], x1n)
    y2n = torch.where(~pos & bl, rows(x1n)[1], y2)
    br = out(x2n, y2n)
    y2n = torch.where(pos & br, rows(x2n)[1], y2n)
    x2n = torch.where(~pos & br, cols(y2n)[1], x2n)
    # the new centre, back from the rotated frame
    mx = (x1n + x2n) / 2
    my = (y1n + y2n) / 2
    half = torch.stack([(x2n - x1n) / 2, (y2n - y1n) / 2], -1).clamp(min=1e-3)
    return torch.stack([mx * c - my * s, mx * s + my * c], -1), half


def augment_exemplars(x, gen=None, jitter=(0.4, 0.4, 0.2, 0.1), p_jitter=0.8, p_gray=0.2,
                      p_blur=0.5, sigma=(0.1, 2.0), p_solarize=0.2):
    """The official exemplar augmentation, batched, one draw per exemplar. x (N, 3, h, w) in [0, 1].
    ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8 (in a fixed order b, c, s, h; hue as a rotation about the
    grey axis), grayscale p 0.2, Gaussian blur sigma ~ U[0.1, 2] p 0.5 (13 taps, separable),
    solarize p 0.2."""
    N = x.shape[0]
    dev = x.device

    def draw(lo, hi):   # (N, 1, 1, 1), one draw per exemplar
        return torch.rand(N, 1, 1, 1, device=dev, generator=gen) * (hi - lo) + lo

    def grey(z):   # (N, 1, h, w) luma
        return (z * z.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)

    bri, con, sat, hue = jitter
    y = (x * draw(1 - bri, 1 + bri)).clamp(0, 1)
    m = grey(y).mean((2, 3), keepdim=True)
    y = ((y - m) * draw(1 - con, 1 + con) + m).clamp(0, 1)
    g = grey(y)
    y = ((y - g) * draw(1 - sat, 1 + sat) + g).clamp(0, 1)
    t = draw(-hue, hue).view(N, 1, 1) * 2 * math.pi                            # the hue turn
    cross = x.new_tensor([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / math.sqrt(3)
    # Rodrigues' rotation about the grey axis, (N, 3, 3)
    rot = t.cos() * torch.eye(3, device=dev) + (1 - t.cos()) / 3 + t.sin() * cross
    y = torch.einsum("nij,njhw->nihw", rot, y).clamp(0, 1)
    x = torch.where(draw(0, 1) < p_jitter, y, x)
    x = torch.where(draw(0, 1) < p_gray, grey(x).expand_as(x), x)
    s = draw(*sigma).view(N, 1)
    k = torch.exp(-torch.arange(-6, 7, device=dev).float() ** 2 / (2 * s ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)                  # (3N, 13)
    z = x.reshape(1, 3 * N, *x.shape[2:])
    z = F.conv2d(F.pad(z, (6, 6, 0, 0), mode="replicate"), k.view(3 * N, 1, 1, 13), groups=3 * N)
    z = F.conv2d(F.pad(z, (0, 0, 6, 6), mode="replicate"), k.view(3 * N, 1, 13, 1), groups=3 * N)
    x = torch.where(draw(0, 1) < p_blur, z.view_as(x), x)
    solarized = torch.where(x >= 128 / 255, 1 - x, x)
    return torch.where(draw(0, 1) < p_solarize, solarized, x)


def official_no_decay(name, p):
    """The official weight-decay exemptions (timm 0.5.4's rule): 1-D params and biases; the cls
    token is decayed."""
    return p.ndim <= 1 or name.endswith(".bias")


_TINY = dict(arch="vit_tiny", img_size=32, patch_size=4, context_size=24, exemplar_size=16,
             num_exemplars=2, decoder_dim=128, decoder_heads=4, batch_size=8, device="cpu",
             workers=0, epochs=1, warmup_epochs=0, log_every=1, blr=1e-2)
# The official run (docs/cim_correlate.md gives each value's source in the official scripts).
Config.PRESETS = {
    "vit_base_300ep": dict(
        arch="vit_base", patch_size=16, epochs=300, warmup_epochs=40, search_scale_min=0.5,
        rotation=45, img_size=224, context_size=160, exemplar_size=64, num_exemplars=6,
        exemplar_aug=True, exemplar_flip=True, exemplar_scale_min=0.05, exemplar_scale_max=0.48,
        blr=1.5e-4, weight_decay=0.05, batch_size=256, global_batch=4096, paper_batch=4096,
        exemplar_ratio_min=1 / 3, exemplar_ratio_max=3.0, min_lr=0.0, box_tries=10,
        box_rule="corner", amp="off", clip_grad=0.0, ema_momentum=0.99, freeze_patch_embed=True,
        decoder_dim=512, decoder_heads=16, decoder_mlp_ratio=4.0,
        paper_row="ViT-B/16 300 ep -> 83.1 top-1 after 100 ep fine-tuning (official README)"),
    # CPU smoke run: the official geometry scaled to 32 px
    "tiny": _TINY,
    # CPU learning runs on 32 px real images (benchmarks/learning.py; docs/cim_correlate.md)
    "small32": {**_TINY, "batch_size": 64, "epochs": 16, "warmup_epochs": 1, "log_every": 10,
                "workers": 2, "blr": 4e-4, "exemplar_scale_min": 0.15},
}

# ------------------------------------------------------------------------ appendix: ViT (MAE-style)
# timm's vit_* parameter names, fixed 2-D sin-cos positions, qkv bias, pre-norm, no layer scale.

VIT_SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),   # name: (width, depth, heads)
             "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}


def sincos_pos_embed(D, h, w):
    """Fixed 2-D sin-cos positions (MAE): half the channels encode the row, half the column
    -> (h*w, D)."""
    omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D // 4))   # (D/4,)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                            torch.arange(w, dtype=torch.float64), indexing="ij")
    out = [f(c.flatten()[:, None] * omega) for c in (xs, ys) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1).float()                                       # (h*w, D)


def resize_pos_embed(pos_embed, old_grid, new_grid):
    """(1, 1+gh*gw, D) positions for another grid: bicubic on the patch part, the cls position kept.
    As the official code, the sampling step is set by scale_factor (h + 0.1) / gh, not by the output
    size."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, *old_grid, -1).permute(0, 3, 1, 2)      # (1, D, gh, gw)
    scale = tuple((n + 0.1) / o for n, o in zip(new_grid, old_grid))
    grid = F.interpolate(grid.float(), scale_factor=scale, mode="bicubic", align_corners=False)
    grid = grid.to(pos_embed.dtype).flatten(2).transpose(1, 2)                # (1, h*w, D)
    return torch.cat([pos_embed[:, :1], grid], dim=1)                          # (1, 1+h*w, D)


class Attention(nn.Module):

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                              # (B, N, D) -> (B, N, D)
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                          # 3 x (B, heads, N, hd)
        x = F.scaled_dot_product_attention(q, k, v)                    # (B, heads, N, hd)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

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
        a = self.attn(self.norm1(x))
        x = x + stochastic_depth(a, self.drop_path, "row", self.training)
        m = self.mlp(self.norm2(x))
        return x + stochastic_depth(m, self.drop_path, "row", self.training)


class VisionTransformer(nn.Module):
    """ViT encoder with timm parameter names and fixed sin-cos positions (a buffer, zero for cls, as
    MAE). forward(images) -> (B, 1+N, D) normed tokens, cls first; other image sizes interpolate the
    positions."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.patch_size = patch_size
        self.grid = (img_size // patch_size,) * 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = F.pad(sincos_pos_embed(embed_dim, *self.grid), (0, 0, 1, 0))[None]
        self.register_buffer("pos_embed", pos)
        # stochastic depth rate grows linearly with depth
        dpr = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, dpr[i])
                                     for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(self._init_weights)
        # MAE: the patch embedding initialised as a Linear
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(embed_dim, -1))
        nn.init.normal_(self.cls_token, std=0.02)

    @staticmethod
    def _init_weights(m):
        """MAE-style init: xavier-uniform Linears, zero biases, unit LayerNorms."""
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, images):                                         # (B, 3, H, W) -> (B, 1+N, D)
        h = images.shape[-2] // self.patch_size
        w = images.shape[-1] // self.patch_size
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)   # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)   # (B, 1+N, D)
        x = x + resize_pos_embed(self.pos_embed, self.grid, (h, w))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

# ----------------------------------------------------------------------- appendix: ResNet-50 tokens


class ResNetTokens(nn.Module):
    """Our ResNet-50 neck (the official code is ViT-only): the torchvision trunk, tokens at stride
    16 like a /16 ViT. f = layer3 + upsample(conv1x1(layer4)) (1024 channels, FPN-style, so layer4
    is trained too); a global-average token stands in for the cls token. A 160 px context gives
    1 + 10x10 tokens, a 64 px exemplar 1 + 4x4."""
    dim = 1024

    def __init__(self):
        super().__init__()
        # saved as torchvision keys without fc, for finetune.py
        self.net = torchvision.models.resnet50()
        self.net.fc = nn.Identity()
        self.neck = nn.Conv2d(2048, self.dim, 1)

    # (B, 3, H, W) -> (B, 1+N, 1024)
    def forward(self, x):
        n = self.net
        x = x.contiguous(memory_format=torch.channels_last)
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        c3 = n.layer3(n.layer2(n.layer1(x)))                           # (B, 1024, H/16, W/16)
        c4 = n.layer4(c3)                                              # (B, 2048, H/32, W/32)
        f = c3 + F.interpolate(self.neck(c4), size=c3.shape[-2:], mode="nearest")
        t = f.flatten(2).transpose(1, 2)                               # (B, N, 1024)
        return torch.cat([t.mean(1, keepdim=True), t], dim=1)          # (B, 1+N, 1024)

# ------------------------------------------------------------------ appendix: visualisation, checks


@torch.no_grad()
def visualize(m, images, path, seed=0):
    """One row per image: context | E exemplars (resized) | E target maps | E predicted maps (red
    on the context). Its own generator: a --viz-every run keeps the training RNG stream (and exact
    resume) unchanged."""
    was_training = m.training
    gen = torch.Generator(images.device).manual_seed(seed)
    context, exemplars, target = sample_pairs(images[:4], m.cfg, gen)
    pred = m.eval().correlate(context, exemplars).argmax(2)                    # (B, E, Hc, Wc)
    B, E = exemplars.shape[:2]
    S = context.shape[-1]
    ex = F.interpolate(exemplars.flatten(0, 1), size=S, mode="nearest").view(B, E, 3, S, S)
    red = context.new_tensor([1.0, 0.0, 0.0]).view(1, 1, 3, 1, 1)

    def paint(mask):   # (B, E, 3, S, S): the mask in red over the context
        return 0.5 * context[:, None] + 0.5 * mask[:, :, None].float() * red

    tiles = torch.cat([context[:, None], ex.float(), paint(target), paint(pred)], dim=1)
    save_image(tiles.flatten(0, 1), path, nrow=1 + 3 * E)
    m.train(was_training)


def recipe_line(cfg, world, accum, lr, steps_per_epoch, amp_dtype):
    """The one line that says which recipe this run is."""
    G = cfg.batch_size * world * accum
    precision = cfg.amp if amp_dtype else "fp32"
    row = f" | paper row: {cfg.paper_row}" if cfg.paper_row else ""
    return (f"recipe: {cfg.preset or 'defaults'} | global batch {G} = {cfg.batch_size} per GPU x "
            f"{world} GPUs x {accum} accum | peak lr {lr:.2e} = blr {cfg.blr} x {G} / 256 | "
            f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs | EMA {cfg.ema_momentum} -> 1 "
            f"cosine per step | {cfg.num_exemplars} exemplars of {cfg.exemplar_size}px, area "
            f"{cfg.exemplar_scale_min}-{cfg.exemplar_scale_max}, rotation +-{cfg.rotation}, "
            f"box rule {cfg.box_rule} | {precision}, clip {cfg.clip_grad or 'off'}{row}")


def validate(cfg):
    """Cross-flag rules (each flag's own range is Config.RANGES): one clear error before any data or
    model is built."""
    check_ranges(cfg)
    # ResNet-50: layer4 (stride 32) must tile the input
    unit = 32 if cfg.arch == "resnet50" else cfg.patch_size
    for k in ("img_size", "context_size", "exemplar_size"):
        if getattr(cfg, k) % unit:
            flag = "--" + k.replace("_", "-")
            fail(f"{flag} {getattr(cfg, k)}: must be a positive multiple of {unit} for {cfg.arch}")
    if cfg.exemplar_size > cfg.context_size:
        fail(f"--exemplar-size {cfg.exemplar_size} is larger than --context-size "
             f"{cfg.context_size} (official: 64, 160)")
    if cfg.exemplar_scale_min > cfg.exemplar_scale_max:
        fail(f"exemplar scale range [{cfg.exemplar_scale_min}, {cfg.exemplar_scale_max}]: need "
             "min <= max")
    if cfg.exemplar_ratio_min > cfg.exemplar_ratio_max:
        fail(f"exemplar aspect range [{cfg.exemplar_ratio_min}, {cfg.exemplar_ratio_max}]: need "
             "min <= max")
    if cfg.decoder_dim % cfg.decoder_heads or cfg.decoder_dim % 4:
        fail(f"--decoder-dim {cfg.decoder_dim} must be divisible by 4 and by --decoder-heads "
             f"{cfg.decoder_heads}")
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs:
        fail(f"--warmup-epochs {cfg.warmup_epochs} >= --epochs {cfg.epochs}: the lr never reaches "
             "its peak")


if __name__ == "__main__":
    main(parse_config(Config))
