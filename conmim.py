"""
conmim.py - ConMIM pre-training in one file: masked image modeling as patch-level denoising
contrast.

Paper: Yi et al., "Masked Image Modeling with Denoising Contrast", ICLR 2023, arXiv 2205.09616.
Official code: https://github.com/TencentARC/ConMIM (commit 4263955; line references: docs).

    python conmim.py --data /imagenet --epochs 300                                 # ViT-B/16, 1 GPU
    torchrun --nproc_per_node 8 conmim.py --preset vit_base_300ep --data /imagenet # batch 2048
    python conmim.py --preset tiny --data synthetic --out out/conmim_tiny          # CPU, seconds

A student ViT sees the weak view (the crop) with masked patches replaced by a mask token; a momentum
teacher sees the full, strongly perturbed view. Each masked student patch feature must find the
teacher feature at its own position among all patches of its image (InfoNCE, tau 0.1). No tokenizer,
no pixel target. finetune.py fine-tunes the teacher.
Result: ImageNet not run (paper Table 1: ViT-B/16 300 ep -> 83.5 top-1); small CPU runs beat their
init on photos (benchmarks/README.md#does-each-method-learn).

Sections: config | masking | loss | model | views | training | official-code details (init, weight
decay, presets) | appendix: BEiT-style ViT, visualisation, checks.
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

from common import (IMAGENET_MEAN, IMAGENET_STD, CropFlip, Run, accum_steps, batch_warning,
                    build_dataset, build_loader, check_ranges, color_jitter, cosine_schedule,
                    decode_mode, epoch_steps, fail, grey, images_to, no_sync, param_groups,
                    parse_config, print0, seed_all, setup_dist)

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass
class Config:
    """ConMIM pre-training. Defaults: ViT-B/16 with the official code's values (docs/conmim.md)."""
    data: str = "/imagenet"          # class folders | cifar10 | cifar100 | stl10 | synthetic
    img_size: int = 224              # crop side
    crop_min_scale: float = 0.08     # RandomResizedCrop area range (min, 1); one crop, both views
    # model
    arch: str = "vit_base"           # vit_tiny | vit_small | vit_base | vit_large
    depth: int = 0                   # ViT depth; 0 = the arch's depth
    patch_size: int = 16             # ViT patch side in pixels
    init_values: float = 0.1         # layer scale init (ViT-L: 1e-5); 0 = no layer scale
    rel_pos_init: float = 0.0        # std of the initial relative-position table; 0 = zeros
    init: str = "beit"               # weight init: beit (official) | xavier (MAE's)
    drop_path: float = 0.0           # stochastic depth of student and teacher
    proj_hidden: int = 4096          # projector hidden width (Linear-BN-ReLU x2)
    proj_dim: int = 256              # projector output width (last BN without affine)
    # method
    mask_type: str = "random_mps32"  # random_mps32 (official README) | block (BEiT's blockwise)
    mask_ratio: float = 0.75         # random_mps32: share of mask cells hidden (rounded up)
    mask_patch: int = 32             # random_mps32: mask cell side in pixels (the 32 of mps32)
    mask_patches: int = 0            # block: patches hidden; 0 = 75/196 of the grid
    min_block: int = 0               # block: smallest block in patches; 0 = 16/196 of the grid
    tau: float = 0.1                 # InfoNCE temperature
    negatives: str = "image"         # image: each image its own keys (paper) | local_batch (docs)
    ema_momentum: float = 0.996      # teacher momentum, cosine per step to 1
    teacher_bn: str = "batch"        # teacher BatchNorm: batch statistics (official) | running
    # optimisation: AdamW betas (0.9, 0.98), eps 1e-8
    epochs: int = 300                # paper Table 1: ViT-B 300 ep -> 83.5
    batch_size: int = 64             # per GPU and micro-batch
    accum_iter: int = 1              # micro-batches per optimizer step
    global_batch: int = 0            # >0: accumulation = global_batch / (batch_size x GPUs)
    paper_batch: int = 0             # the recipe's global batch (presets): warn when >2x away
    paper_row: str = ""              # the paper result a preset reproduces (recipe line)
    lr: float = 5e-4                 # absolute peak lr: not scaled with the batch (official)
    min_lr: float = 1e-5             # cosine floor
    warmup_epochs: int = 10          # linear warmup from 0
    weight_decay: float = 0.05       # AdamW, not on 1-D params and the cls token
    clip_grad: float = 1.0           # max global gradient norm; 0 = off
    # system
    device: str = "cuda"             # cuda | cpu
    amp: str = "bf16"                # bf16 | fp16 | off (autocast on CUDA; the CPU runs fp32)
    compile: bool = False            # torch.compile the model
    workers: int = 10                # data loader processes per GPU
    decode: str = "cpu"              # JPEGs decoded by the loader workers (cpu) or the GPU (device)
    steps_per_epoch: int = 0         # optimizer steps per epoch; 0 = one pass over the data
    stop_after: int = 0              # exit after N steps with a resumable checkpoint; 0 = off
    log_every: int = 50              # progress line every N optimizer steps
    viz_every: int = 0               # OUT/viz_epoch{E}.png every N epochs; 0 = off
    out: str = "out/conmim"          # checkpoint, logs, run record; a checkpoint there is resumed
    seed: int = 0                    # process r uses seed + r
    preset: str = ""                 # a paper row (PRESETS below) | tiny | small32 (CPU)
    allow_change: str = ""           # resume despite these changed settings: name,name or all

    CHOICES = {"arch": ("vit_tiny", "vit_small", "vit_base", "vit_large"),
               "init": ("beit", "xavier"), "mask_type": ("random_mps32", "block"),
               "negatives": ("image", "local_batch"), "teacher_bn": ("batch", "running"),
               "amp": ("bf16", "fp16", "off"), "decode": ("cpu", "device")}
    RANGES = {"img_size": ">= 1", "crop_min_scale": "(0, 1]", "depth": ">= 0", "patch_size": ">= 1",
              "init_values": ">= 0", "rel_pos_init": ">= 0", "drop_path": "[0, 1)",
              "proj_hidden": ">= 1", "proj_dim": ">= 1", "mask_ratio": "(0, 1)",
              "mask_patch": ">= 1", "mask_patches": ">= 0", "min_block": ">= 0", "tau": "> 0",
              "ema_momentum": "[0, 1]", "epochs": ">= 1", "batch_size": ">= 1",
              "accum_iter": ">= 1", "global_batch": ">= 0", "paper_batch": ">= 0", "lr": "> 0",
              "min_lr": ">= 0",
              "warmup_epochs": ">= 0", "weight_decay": ">= 0", "clip_grad": ">= 0",
              "workers": ">= 0", "steps_per_epoch": ">= 0", "stop_after": ">= 0",
              "log_every": ">= 1", "viz_every": ">= 0", "seed": ">= 0"}
    # a flag given on the command line that the chosen mask type would ignore is an error
    ONLY_WITH = {"mask_ratio": ("mask_type", ("random_mps32",)),
                 "mask_patch": ("mask_type", ("random_mps32",)),
                 "mask_patches": ("mask_type", ("block",)),
                 "min_block": ("mask_type", ("block",))}

# ----------------------------------------------------------------------------- masking


def random_mps_mask(B, grid, cell, ratio, device, generator=None):
    """`random_mps32` (SimMIM-style, the official README's masking): hide ceil(ratio * C) of the C
    cells of cell x cell patches, each image its own draw (224 px: 37 of 49 cells of 2x2 patches).
    -> (B, h*w) bool, True = masked."""
    gh = grid[0] // cell
    gw = grid[1] // cell
    # the official np.ceil
    n_hide = math.ceil(ratio * gh * gw - 1e-9)
    ranks = torch.rand(B, gh * gw, device=device, generator=generator).argsort(1).argsort(1)
    coarse = (ranks < n_hide).view(B, gh, gw)                                  # (B, gh, gw)
    return coarse.repeat_interleave(cell, 1).repeat_interleave(cell, 2).flatten(1)   # (B, h*w)


def sample_mask(cfg, B, device, generator=None):
    """(B, N) bool, True = masked, for the config's patch grid and mask type, on the device."""
    g = cfg.img_size // cfg.patch_size
    if cfg.mask_type == "block":
        n_mask, min_block = block_sizes(cfg, g * g)
        return block_mask(B, (g, g), n_mask, min_block, device=device, generator=generator)
    cell = cfg.mask_patch // cfg.patch_size
    return random_mps_mask(B, (g, g), cell, cfg.mask_ratio, device, generator)

# ----------------------------------------------------------------------------- loss


def conmim_loss(q, k, mask, tau, cross_image=False):
    """Denoising patch-level InfoNCE, the ConMIM objective:
        L = -1/|M| sum_{j in M} log exp(<q_j, sg[k_j]> / tau) / sum_{i<=K} exp(<q_j, sg[k_i]> / tau)
    q: student features of the masked view, k: teacher features of the full view, both (B, N, d),
    L2-normalised here. K = N: each image is its own dictionary, the positive is the key at the
    query's own position. cross_image=True (--negatives local_batch, not in the paper): the keys are
    all B*N patches of this process's micro-batch. mask (B, N) bool, True = masked.
    -> (loss, top-1 look-up accuracy at the masked positions)."""
    B, N, _ = q.shape
    q = F.normalize(q.float(), dim=-1)
    k = F.normalize(k.float(), dim=-1)
    if cross_image:
        logits = q @ k.flatten(0, 1).T / tau                                   # (B, N, B*N)
        # same image and position
        target = torch.arange(B * N, device=q.device).view(B, N)
    else:
        logits = q @ k.transpose(1, 2) / tau                                   # (B, N, N)
        target = torch.arange(N, device=q.device).expand(B, N)                 # same position
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(B, N)
    # weights instead of boolean indexing: no host sync
    w = mask.float()
    n = w.sum().clamp(min=1)
    acc = ((logits.argmax(-1) == target).float() * w).sum() / n
    return (ce * w).sum() / n, acc.detach()

# ----------------------------------------------------------------------------- model


def projector(dim, hidden, out):
    """A 3-layer MLP on every token (SimCLR style): 2 Linear-BN-ReLU, then Linear-BN (no affine)."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden),
                         nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden),
                         nn.ReLU(inplace=True),
                         nn.Linear(hidden, out, bias=False), nn.BatchNorm1d(out, affine=False))


def project(mlp, tokens, track=False):
    """(B, T, D) -> (B, T, d); BatchNorm statistics over all B*T tokens, cls included (official).
    track=True (the teacher with --teacher-bn running, BN in eval mode): each BN first updates its
    own running statistics from these tokens, then normalises with them."""
    B, T, _ = tokens.shape
    x = tokens.flatten(0, 1)                                                   # (B*T, D)
    for layer in mlp:
        if track and isinstance(layer, nn.BatchNorm1d) and not layer.training:
            F.batch_norm(x.detach(), layer.running_mean, layer.running_var, training=True,
                         momentum=layer.momentum)
        x = layer(x)
    return x.view(B, T, -1)


@torch.no_grad()
def ema_update(teachers, students, m):
    """Momentum teacher: xi <- m xi + (1 - m) theta for every parameter, projector included, after
    each optimizer step. Parameters only: the BatchNorm buffers stay the teacher's (official)."""
    t = [p for mod in teachers for p in mod.parameters()]
    s = [p for mod in students for p in mod.parameters()]
    # one fused multi-tensor kernel: t + (1 - m) (s - t)
    torch._foreach_lerp_(t, s, 1.0 - m)


class ConMIM(nn.Module):
    """Student ViT + mask token + projector, and the momentum teacher: a copy of encoder and
    projector without gradients. forward(images, mask, tau) -> (loss, logs); mask (B, N) bool,
    True = masked."""

    def __init__(self, cfg):
        super().__init__()
        D, depth, heads = VIT_SIZES[cfg.arch]
        # what finetune.py rebuilds the encoder from
        self.vit_args = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=D,
                             depth=cfg.depth or depth, num_heads=heads, mlp_ratio=4.0,
                             qkv_bias=True, pos_embed="none", rel_pos="shared",
                             init_values=cfg.init_values or None)
        vit_kw = {k: v for k, v in self.vit_args.items() if k not in ("pos_embed", "rel_pos")}
        self.student = VisionTransformer(**vit_kw, drop_path=cfg.drop_path)
        self.projector = projector(D, cfg.proj_hidden, cfg.proj_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        init = beit_init if cfg.init == "beit" else xavier_init
        init(self.student, self.projector)
        if cfg.rel_pos_init:
            # not official: a zero table makes every mask token identical through the encoder
            table = self.student.rel_pos_bias.relative_position_bias_table
            nn.init.trunc_normal_(table, std=cfg.rel_pos_init)
        # the teacher starts as the student (official)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.teacher_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.cross_image = cfg.negatives == "local_batch"
        self.teacher_bn = cfg.teacher_bn

    def train(self, mode=True):
        super().train(mode)
        # "batch" (official): the teacher stays in train mode; "running": its BN uses running stats
        if self.teacher_bn == "running":
            self.teacher.eval()
            self.teacher_projector.eval()
        return self

    def features(self, weak, strong, mask):
        """Student on the masked weak view, teacher on the full strong view -> q, k (B, N, d)."""
        p = self.student.patch_size
        grid = (weak.shape[-2] // p, weak.shape[-1] // p)
        x = self.student.patchify(weak)                                        # (B, N, D)
        # the mask token replaces the patch embedding before the encoder
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        q = project(self.projector, self.student.forward_tokens(x, grid))[:, 1:]   # (B, N, d)
        # sg[.]: no gradient reaches the keys
        with torch.no_grad():
            running = self.teacher_bn == "running"
            k = project(self.teacher_projector, self.teacher(strong), running)[:, 1:]
        return q, k

    def forward(self, images, mask, tau):
        """images (B, 3, S, S) uint8 crops -> (loss, logs): the two views, then the loss."""
        weak, strong = two_views(images)
        return self.loss_on_views(weak, strong, mask, tau)

    def loss_on_views(self, weak, strong, mask, tau):
        q, k = self.features(weak, strong, mask)
        loss, acc = conmim_loss(q, k, mask, tau, self.cross_image)
        return loss, {"acc": acc}

    def ema_update(self, m):
        ema_update([self.teacher, self.teacher_projector], [self.student, self.projector], m)

# ----------------------------------------------------------------------------- views


def input_transform(cfg):
    """The loader's work: decode, one random resized crop (bicubic) + flip -> uint8 crop. Both views
    are made from it on the device (two_views), so patch i is the same region in both."""
    return CropFlip(cfg.img_size, (cfg.crop_min_scale, 1.0))


def two_views(images, gen=None):
    """uint8 crops (B, 3, S, S) -> (weak, strong), each (B, 3, S, S) normalised. The student's weak
    view is the crop; the teacher's strong view adds the official photometric perturbations in the
    official order, batched, each image its own draws: ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8,
    grayscale p 0.2, Gaussian blur radius U(0.1, 2) p 0.1, solarize at 128 p 0.2. Same
    distributions as the torchvision / PIL transforms they replace (tests/test_conmim.py)."""
    x = images.float() / 255
    B = x.shape[0]

    def coin(p):   # (B, 1, 1, 1) bool, True with probability p, one draw per image
        return torch.rand(B, 1, 1, 1, device=x.device, generator=gen) < p

    y = torch.where(coin(0.8), color_jitter(x, 0.4, 0.4, 0.2, 0.1, gen), x)
    y = torch.where(coin(0.2), grey(y).expand_as(y), y)
    sigma = 0.1 + 1.9 * torch.rand(B, device=x.device, generator=gen)
    y = torch.where(coin(0.1), gaussian_blur(y, sigma), y)
    # solarize: invert the pixels at or above 128
    y = torch.where(coin(0.2) & (y >= 128 / 255), 1 - y, y)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std, (y - mean) / std


def gaussian_blur(x, sigma, taps=13):
    """PIL's GaussianBlur(radius = sigma) on a batch, one sigma per image (B,): a separable 13-tap
    Gaussian (enough for sigma <= 2), edges replicated as PIL does."""
    B, C, H, W = x.shape
    offsets = torch.arange(taps, device=x.device) - taps // 2
    k = torch.exp(-offsets.float() ** 2 / (2 * sigma.view(B, 1) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)                  # (B*C, taps)
    z = x.reshape(1, B * C, H, W)
    pad = taps // 2
    z = F.pad(z, (pad, pad, 0, 0), mode="replicate")
    z = F.conv2d(z, k.view(B * C, 1, 1, taps), groups=B * C)
    z = F.pad(z, (0, 0, pad, pad), mode="replicate")
    z = F.conv2d(z, k.view(B * C, 1, taps, 1), groups=B * C)
    return z.view(B, C, H, W)

# ----------------------------------------------------------------------------- training


def checkpoint(raw_model, opt, scaler):
    """What OUT/checkpoint.pth holds besides Run's bookkeeping: everything to resume, and both
    encoders in timm's beit_* layout (finetune.py loads the teacher and pools by mean, official)."""
    names = ("teacher", "student")
    encoders = {n: to_timm_layout(getattr(raw_model, n).state_dict()) for n in names}
    return {"model": raw_model.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(), "encoders": encoders, "default_encoder": "teacher",
            "encoder_args": {"arch": "vit", **raw_model.vit_args}, "pool": "mean"}


@torch.no_grad()
def optimizer_step(raw_model, opt, scaler, clip_grad, momentum):
    """Clip, step, then teacher <- EMA(student); a step fp16's GradScaler skips (inf/NaN
    gradients) leaves the teacher alone. The scale is read back (a host sync) only with --amp
    fp16."""
    if clip_grad > 0:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(raw_model.parameters(), clip_grad)
    scale = scaler.get_scale() if scaler.is_enabled() else 0.0
    scaler.step(opt)
    scaler.update()
    if not scaler.is_enabled() or scaler.get_scale() >= scale:
        raw_model.ema_update(momentum)
    opt.zero_grad(set_to_none=True)


def main(cfg):
    validate(cfg)
    rank, world, device = setup_dist(cfg.device)
    seed_all(cfg.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
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
    raw_model = ConMIM(cfg).to(device)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    print0(recipe_line(cfg, world, accum, steps_per_epoch))
    batch_warning(global_batch, cfg.paper_batch, steps_per_epoch)
    # the teacher has no gradient and is not in the optimizer
    groups = param_groups(raw_model, cfg.weight_decay, skip_decay=official_no_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8,
                            fused=device.type == "cuda")
    # BEiT's scheduler: the warmup ends exactly at the peak
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    lr_sched = cosine_schedule(cfg.lr, cfg.min_lr, total_steps, warmup_steps, warmup_endpoint=True)
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
            mask = sample_mask(cfg, images.shape[0], device)                  # (B, N) bool
            with no_sync(model, last):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    # METHOD: the two views, the student, the teacher, the InfoNCE loss
                    loss, logs = model(images, mask, cfg.tau)
                scaler.scale(loss / accum).backward()
            run.add(loss=loss, **logs)
        # METHOD: clip, step, then the teacher's EMA
        optimizer_step(raw_model, opt, scaler, cfg.clip_grad, ema_sched[it])
        if run.end_step(it, lr_sched[it]):
            run.save(checkpoint(raw_model, opt, scaler),
                     check=lambda: raw_model(images, mask, cfg.tau)[0])
            if cfg.viz_every and (run.epoch + 1) % cfg.viz_every == 0 and rank == 0:
                path = os.path.join(cfg.out, f"viz_epoch{run.epoch}.png")
                visualize(raw_model, images[:8], cfg, run.epoch, path)

# ---------------------------------------------------------------------------- official-code details
# What exists to match the official code rather than the paper's method: its init, its weight-decay
# exemptions, its blockwise masking (an option), and the presets of its paper rows.


def official_no_decay(name, p):
    """No weight decay on 1-D params and biases and on cls_token / pos_embed only: the mask token
    and the relative-position table are decayed (official optim_factory.py)."""
    exempt = ("cls_token", "pos_embed")
    return p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in exempt


def beit_init(vit, *modules):
    """The official (BEiT) init: Linear / patch-conv weights ~ N(0, 0.02) truncated at +-1 std, zero
    biases; attn.proj and mlp.fc2 of block l divided by sqrt(2 l). `modules` (the projector) get the
    same Linear init."""
    for m in itertools.chain(vit.modules(), *(mod.modules() for mod in modules)):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    with torch.no_grad():
        for layer, blk in enumerate(vit.blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))
    nn.init.trunc_normal_(vit.cls_token, std=0.02, a=-0.02, b=0.02)


def xavier_init(vit, *modules):
    """MAE's init (not official): xavier-uniform Linear weights, the patch conv as a Linear, zero
    biases, cls token ~ N(0, 0.02); at 32 px a stronger random encoder than BEiT's (docs:
    Presets)."""
    for m in itertools.chain(vit.modules(), *(mod.modules() for mod in modules)):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(vit.cls_token, std=0.02)


def block_mask(B, grid, n_mask, min_block, device, generator=None, rounds=0, min_aspect=0.3):
    """BEiT's blockwise masking (the official code's default), batched: each round every image
    proposes one rectangle of area U(min_block, remaining) and aspect ratio log-U(0.3, 1/0.3) and
    records the patches it newly covers. Exactly n_mask patches are kept: earlier blocks first (the
    last block cut in raster order), random patches fill a row the rounds left short.
    -> (B, h*w) bool, True = masked."""
    h, w = grid
    N = h * w
    rounds = rounds or 4 * math.ceil(n_mask / min_block)
    ys = torch.arange(h, device=device).view(1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, w)
    # the round that first covered a patch
    first = torch.full((B, N), rounds, device=device)
    covered = torch.zeros(B, N, dtype=torch.bool, device=device)
    for r in range(rounds):
        u = torch.rand(B, 4, 1, 1, device=device, generator=generator).unbind(1)   # 4 x (B, 1, 1)
        remaining = (n_mask - covered.sum(1)).view(B, 1, 1)
        area = min_block + u[0] * (remaining - min_block)                      # U(min, remaining)
        aspect = torch.exp(math.log(min_aspect) + u[1] * 2 * math.log(1 / min_aspect))
        # BEiT keeps every block smaller than the grid
        bh = (area * aspect).sqrt().round().clamp(1, h - 1)
        bw = (area / aspect).sqrt().round().clamp(1, w - 1)
        top = (u[2] * (h - bh + 1)).floor()
        left = (u[3] * (w - bw + 1)).floor()
        inside = (ys >= top) & (ys < top + bh) & (xs >= left) & (xs < left + bw)
        new = inside.flatten(1) & ~covered                                     # (B, N)
        first.masked_fill_(new, r)
        covered |= new
    noise = torch.rand(B, N, device=device, generator=generator)
    tie = torch.where(covered, torch.arange(N, device=device) / N, noise)
    # (B, n_mask) patch ids
    keep = (first + tie).argsort(1)[:, :n_mask]
    return torch.zeros(B, N, dtype=torch.bool, device=device).scatter_(1, keep, True)


def block_sizes(cfg, N):
    """(patches hidden, smallest block): the official 75 and 16 at 14x14, scaled with the grid."""
    n_mask = cfg.mask_patches or max(1, round(N * 75 / 196))
    min_block = cfg.min_block or max(1, round(N * 16 / 196))
    return n_mask, min_block


# The paper rows (docs/conmim.md gives each value's source). The S/B global batch is not published:
# the ViT-L command's 2048 is assumed.
Config.PRESETS = {
    "vit_small_300ep": dict(arch="vit_small", epochs=300, global_batch=2048, paper_batch=2048,
                            paper_row="ViT-S/16 300 ep -> 82.0"),
    "vit_base_300ep": dict(arch="vit_base", epochs=300, global_batch=2048, paper_batch=2048,
                           paper_row="ViT-B/16 300 ep -> 83.5"),
    "vit_base_800ep": dict(arch="vit_base", epochs=800, global_batch=2048, paper_batch=2048,
                           paper_row="ViT-B/16 800 ep -> 83.7"),
    "vit_large_800ep": dict(arch="vit_large", epochs=800, lr=7.5e-4, init_values=1e-5,
                            global_batch=2048, paper_batch=2048,
                            paper_row="ViT-L/16 800 ep -> 85.2"),
    "vit_large_1600ep": dict(arch="vit_large", epochs=1600, lr=7.5e-4, init_values=1e-5,
                             global_batch=2048, paper_batch=2048,
                             paper_row="ViT-L/16 1600 ep -> 85.5"),
    # CPU smoke run: 32x32, patch 4, 4 blocks, a narrow projector
    "tiny": dict(arch="vit_tiny", depth=4, img_size=32, patch_size=4, mask_patch=8, proj_hidden=256,
                 proj_dim=64, batch_size=8, epochs=1, warmup_epochs=0, device="cpu", workers=0,
                 log_every=1),
    # CPU learning runs (benchmarks/learning.py); each change from the recipe: docs/conmim.md
    "small32": dict(arch="vit_tiny", img_size=32, patch_size=4, mask_patch=8, proj_hidden=1024,
                    proj_dim=128, crop_min_scale=0.5, rel_pos_init=1.0, init_values=0.0,
                    init="xavier", ema_momentum=0.99, batch_size=32, lr=3e-4, warmup_epochs=1,
                    epochs=8, device="cpu", workers=2, log_every=10),
}

# ------------------------------------------------------------------------- appendix: BEiT-style ViT
# No absolute positions, one relative-position bias shared by all blocks, layer scale, qkv bias;
# parameter names follow timm's vit_*, to_timm_layout gives timm's beit_*.

VIT_SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),   # name: (width, depth, heads)
             "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}


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


class RelPosBias(nn.Module):
    """One learned bias per head and relative offset (BEiT), shared by all blocks
    -> (heads, T, T)."""

    def __init__(self, grid, num_heads):
        super().__init__()
        rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        self.register_buffer("relative_position_index", rel_pos_index(*grid), persistent=False)

    def forward(self):
        table = self.relative_position_bias_table[self.relative_position_index]   # (T, T, heads)
        return table.permute(2, 0, 1)


class Attention(nn.Module):

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    # x (B, T, D), bias (heads, T, T)
    def forward(self, x, bias):
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                           # 3 x (B, heads, T, hd)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype).unsqueeze(0))
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class LayerScale(nn.Module):

    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

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
        a = self.ls1(self.attn(self.norm1(x), bias))
        x = x + stochastic_depth(a, self.drop_path, "row", self.training)
        m = self.ls2(self.mlp(self.norm2(x)))
        return x + stochastic_depth(m, self.drop_path, "row", self.training)


class VisionTransformer(nn.Module):
    """The ViT ConMIM pre-trains. forward(images) -> (B, 1+N, D) normed tokens, cls first."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, init_values=None, drop_path=0.0, in_chans=3):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.grid = (img_size // patch_size,) * 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.rel_pos_bias = RelPosBias(self.grid, num_heads)
        # stochastic depth rate grows linearly with depth
        dpr = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values,
                                           dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def patchify(self, images):                                        # (B, C, H, W) -> (B, N, D)
        return self.patch_embed.proj(images).flatten(2).transpose(1, 2)

    def forward_tokens(self, x, grid):
        """x (B, N, D) patch embeddings (mask tokens swapped in), grid = (h, w) -> (B, 1+N, D)."""
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)   # (B, 1+N, D)
        bias = self.rel_pos_bias()                                             # (heads, 1+N, 1+N)
        for blk in self.blocks:
            x = blk(x, bias)
        return self.norm(x)

    def forward(self, images):                                         # (B, C, H, W) -> (B, 1+N, D)
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        return self.forward_tokens(self.patchify(images), grid)


def to_timm_layout(sd):
    """Our encoder keys -> timm's beit_* layout: the shared table copied into every block (as BEiT
    fine-tuning does), qkv.bias split into q_bias / v_bias (the k bias is dropped: softmax ignores a
    per-query constant), ls{1,2}.gamma -> gamma_{1,2}."""
    sd = dict(sd)
    table = sd.pop("rel_pos_bias.relative_position_bias_table")
    for k in [k for k in sd if k.startswith("blocks.")]:
        b = k[:k.index(".", 7) + 1]                                            # "blocks.{i}."
        v = sd.pop(k)
        if k.endswith("attn.qkv.bias"):
            sd[b + "attn.q_bias"], _, sd[b + "attn.v_bias"] = v.chunk(3)
        else:
            sd[re.sub(r"ls(\d)\.gamma$", r"gamma_\1", k)] = v
        if k.endswith("norm1.weight"):
            sd[b + "attn.relative_position_bias_table"] = table.clone()
    return sd

# ------------------------------------------------------------------ appendix: visualisation, checks


@torch.no_grad()
def visualize(raw_model, images, cfg, epoch, path):
    """Rows: student input | the same with the mask in grey | teacher input | cosine similarity of
    student and teacher features per position (red 1, white 0, blue -1). Own generator, train-mode
    BatchNorm as in the loss; buffers and RNG restored, so --viz-every does not change the run."""
    gen = torch.Generator(images.device).manual_seed(epoch)
    weak, strong = two_views(images, gen)
    mask = sample_mask(cfg, len(images), images.device, gen)
    buffers = [b.clone() for b in raw_model.buffers()]
    with torch.random.fork_rng(devices=[weak.device] if weak.is_cuda else []):
        q, k = raw_model.features(weak, strong, mask)
    for b, saved in zip(raw_model.buffers(), buffers):
        b.copy_(saved)
    B, _, H, W = weak.shape
    g = (H // raw_model.student.patch_size, W // raw_model.student.patch_size)
    mean = torch.tensor(IMAGENET_MEAN, device=weak.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=weak.device).view(1, 3, 1, 1)
    img = (weak * std + mean).clamp(0, 1)
    aug = (strong * std + mean).clamp(0, 1)
    m = F.interpolate(mask.float().view(B, 1, *g), size=(H, W), mode="nearest")
    sim = F.cosine_similarity(q.float(), k.float(), dim=-1).view(B, 1, *g)
    s = F.interpolate(sim, size=(H, W), mode="nearest")
    heat = torch.cat([(1 + s).clamp(max=1), 1 - s.abs(), (1 - s).clamp(max=1)], 1)
    rows = torch.cat([img, img * (1 - 0.7 * m) + 0.35 * m, aug, heat])
    save_image(rows.float().cpu(), path, nrow=B)


def recipe_line(cfg, world, accum, steps_per_epoch):
    """The one line that says which recipe this run is."""
    g = cfg.img_size // cfg.patch_size
    if cfg.mask_type == "block":
        n_mask, min_block = block_sizes(cfg, g * g)
        masking = f"block ({n_mask} of {g * g} patches, blocks >= {min_block})"
    else:
        cells = (cfg.img_size // cfg.mask_patch) ** 2
        cell = (cfg.mask_patch // cfg.patch_size) ** 2
        hide = math.ceil(cfg.mask_ratio * cells - 1e-9)
        masking = (f"random_mps32 ({hide} of {cells} {cfg.mask_patch}px cells = {hide * cell} of "
                   f"{g * g} patches)")
    precision = cfg.amp if cfg.device.startswith("cuda") and cfg.amp != "off" else "fp32"
    row = f" | paper row: {cfg.paper_row}" if cfg.paper_row else ""
    return (f"recipe: {cfg.preset or 'defaults'} | global batch {cfg.batch_size * world * accum} = "
            f"{cfg.batch_size} per GPU x {world} GPUs x {accum} accum | peak lr {cfg.lr:.2e} "
            f"(absolute, not scaled with the batch: official) | {steps_per_epoch} steps/epoch x "
            f"{cfg.epochs} epochs | EMA {cfg.ema_momentum} -> 1 cosine per step | {masking} | "
            f"{precision}{row}")


def validate(cfg):
    """Cross-flag rules (each flag's own range is Config.RANGES): one clear error before any data or
    model is built."""
    check_ranges(cfg)
    if cfg.img_size % cfg.patch_size:
        fail(f"--img-size {cfg.img_size} must be a multiple of --patch-size {cfg.patch_size}")
    g = cfg.img_size // cfg.patch_size
    if g < 2:
        fail(f"--img-size {cfg.img_size} / --patch-size {cfg.patch_size} gives a {g}x{g} grid; "
             "need at least 2x2")
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs:
        fail(f"--warmup-epochs {cfg.warmup_epochs} >= --epochs {cfg.epochs}: the lr never reaches "
             "its peak")
    if cfg.min_lr > cfg.lr:
        fail(f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}")
    if cfg.mask_type == "random_mps32":
        if cfg.mask_patch % cfg.patch_size or cfg.img_size % cfg.mask_patch:
            fail(f"--mask-patch {cfg.mask_patch} must be a multiple of --patch-size "
                 f"{cfg.patch_size} that divides --img-size {cfg.img_size}")
        cells = (cfg.img_size // cfg.mask_patch) ** 2
        if math.ceil(cfg.mask_ratio * cells - 1e-9) >= cells:
            fail(f"--mask-ratio {cfg.mask_ratio} hides all {cells} mask patches; "
                 "lower it or use a smaller --mask-patch")
    else:
        n_mask, min_block = block_sizes(cfg, g * g)
        if not 0 < n_mask < g * g or not 0 < min_block <= n_mask:
            fail(f"block masking: need 0 < --min-block ({min_block}) <= --mask-patches ({n_mask}) "
                 f"< {g * g} patches")


if __name__ == "__main__":
    main(parse_config(Config))
