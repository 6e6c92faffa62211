"""
cim_corrupt.py - Corrupted Image Modeling (CIM) pre-training in one file: BEiT generator, frozen dVAE, enhancer.
Paper: Fang et al., "Corrupted Image Modeling for Self-Supervised Visual Pre-Training", arXiv 2202.03382 (ICLR 2023).
No official code: built from the paper's abstract, Sec. 1 and start of Sec. 2.1 (the text we hold), BEiT and DALL-E's
dVAE; what that text leaves open is a flag (docs/cim_corrupt.md).

    python cim_corrupt.py --data /imagenet --dvae-encoder encoder.pkl --dvae-decoder decoder.pkl --trust-pickle
    torchrun --nproc_per_node 8 cim_corrupt.py --preset vit_base_300ep --data /imagenet --tokenizer OUT/tokenizer.pth
    python cim_corrupt.py --preset tiny --data synthetic --out out/cim_tiny      # CPU smoke test, random dVAE

Result: not measured on ImageNet; H200 step rate, small-image runs and pictures: docs/cim_corrupt.md.
Sections: config | corruption | losses | model | data | training | appendix: ViT, dVAE, visualisation, checks.
"""
import dataclasses
import math
import os
import pickle
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.ops import stochastic_depth
from torchvision.utils import save_image

from common import (IMAGENET_MEAN, IMAGENET_STD, CropFlip, Run, accum_steps, batch_warning, build_dataset,
                    build_loader, check_ranges, cosine_schedule, decode_mode, fail, fail_all, images_to, no_sync,
                    param_groups, parse_config, print0, save_checkpoint, seed_all, setup_dist)


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass
class Config:
    """Corrupted Image Modeling pre-training; sources of the defaults and open choices: docs/cim_corrupt.md."""
    data: str = "/imagenet"       # ImageFolder (train/ or flat), cifar10, cifar100, stl10 (unlabeled), synthetic
    img_size: int = 224           # crop side; the dVAE sees the crop resized to 8 * img_size / patch_size (BEiT: 112)
    crop_min_scale: float = 0.08  # RandomResizedCrop area scale (min, 1) of pre-training and dVAE training (BEiT)
    arch: str = "vit_base"        # enhancer, the network you keep: vit_base | resnet50 (paper) | vit_tiny (small runs)
    depth: int = 0                # ViT enhancer depth override; 0 = the arch's depth
    patch_size: int = 16          # token stride: ViT patch = generator patch = one dVAE cell; ResNet sees 16 px/token
    pos_embed: str = "none"       # ViT absolute positions: none (BEiT pre-training) | learned
    init_values: float = 0.1      # ViT layer scale (BEiT base); 0 = off
    init: str = "beit"            # ViT enhancer weight init: beit (BEiT) | xavier (MAE-style; docs/cim_corrupt.md)
    drop_path: float = 0.1        # stochastic depth of the enhancer and generator ViTs (BEiT base)
    objective: str = "respix"     # respix: regress all original pixels | revdet: replaced-or-not per token (Sec. 1)
    lam: float = 1.0              # L_gen + lam * L_enh (open choice); matters only with --gen-share-blocks or clipping
    respix_window: int = 8        # side of the sliding window that normalises ResPix targets (open choice)
    respix_eps: float = 0.01      # variance floor of a ResPix window, normalised units (bounds flat-window targets)
    respix_l1: float = 0.5        # ResPix loss = w * L1 + (1 - w) * L2 (open choice: between SimMIM's L1, MAE's L2)
    gen_depth: int = 4            # generator ("small BEiT", abstract) blocks (open choice)
    gen_dim: int = 0              # 0 = enhancer width (ViT) or 768 (ResNet-50); heads = dim / 64
    gen_share_blocks: int = 0     # share patch embed + first K blocks with a same-width ViT enhancer (open choice)
    mask_ratio: float = 0.5       # fraction of tokens the generator resamples (open choice)
    sample_temperature: float = 1.0   # replacements ~ softmax(logits / t); 1 = "the BEiT output distribution"
    # frozen tokenizer (DALL-E dVAE interface); built-in dVAE training where DALL-E weights are not available
    tokenizer: str = ""           # plain file {"encoder","decoder","args"} (from --train-tokenizer) | "random" (smoke)
    dvae_encoder: str = ""        # DALL-E encoder.pkl (needs --trust-pickle) or a plain encoder state dict
    dvae_decoder: str = ""        # DALL-E decoder.pkl (needs --trust-pickle) or a plain decoder state dict
    trust_pickle: bool = False    # allow unpickling, which runs code from the file: DALL-E's .pkl modules need it
    train_tokenizer: bool = False  # train a dVAE on --data into OUT/tokenizer.pth (reused if present), then pre-train
    tok_vocab: int = 8192         # codebook size V (DALL-E); 512-1024 is easier to fill on small data
    tok_hid: int = 256            # dVAE width n_hid (DALL-E)
    tok_blocks: int = 2           # residual blocks per group (DALL-E)
    tok_epochs: int = 30          # dVAE epochs (Gumbel temperature 1 -> 1/16 over them, as DALL-E)
    tok_lr: float = 1e-3          # absolute AdamW lr of dVAE training (1 epoch warmup, cosine to 1/10)
    tok_kl: float = 0.03          # KL(q || uniform) weight per token vs mean per-pixel NLL (DALL-E 6.6 / (3*8*8))
    # optimisation (BEiT ImageNet-1k pre-training command, microsoft/unilm/beit/README.md@9a6a8a1)
    epochs: int = 300             # the paper rows' 300 (as given to us; not in the paper text we hold)
    batch_size: int = 128         # per GPU (BEiT: 128 x 16 GPUs = 2048)
    accum_iter: int = 1           # micro-batches per optimizer step (ResNet-50: BatchNorm sees micro-batches, inexact)
    global_batch: int = 0         # 0 = batch_size x GPUs x accum_iter; else accum_iter = global / (batch_size x GPUs)
    paper_batch: int = 0          # the recipe's global batch (presets set it): warn when >2x away
    blr: float = 1.875e-4         # lr = blr * global batch / 256: 1.5e-3 at 2048 (BEiT)
    min_lr: float = 1e-5          # cosine floor (BEiT)
    warmup_epochs: int = 10       # BEiT
    weight_decay: float = 0.05    # BEiT
    clip_grad: float = 3.0        # max gradient norm (BEiT); 0 = off
    steps_per_epoch: int = 0      # 0 = full pass; >0 caps it (smoke tests)
    device: str = "cuda"          # "cpu" works (slowly)
    amp: str = "bf16"             # bf16 | fp16 | off (CUDA only; the tokenizer always runs in float32)
    compile: bool = False         # torch.compile the model
    workers: int = 10             # data loader processes per GPU
    out: str = "out/cim_corrupt"  # checkpoints, logs, tokenizer.pth; an existing checkpoint.pth is resumed
    seed: int = 0
    log_every: int = 50           # progress line every N steps
    stop_after: int = 0           # exit after N steps of this run with a resumable checkpoint; 0 = off
    viz_every: int = 0            # PNG every N epochs: original | dVAE recon | corrupted | replaced | output; 0 = off
    preset: str = ""              # vit_base_300ep | resnet50_300ep (paper rows) | tiny | small32 (docs/cim_corrupt.md)
    paper_row: str = ""           # the paper row a preset reproduces, printed in the recipe line
    allow_change: str = ""        # resume although these settings differ from the checkpoint's: a,b or all
    decode: str = "cpu"           # cpu: loader workers decode JPEGs | device: workers read bytes, the GPU decodes

    CHOICES = {"arch": ("vit_tiny", "vit_base", "resnet50"), "objective": ("respix", "revdet"),
               "amp": ("bf16", "fp16", "off"), "pos_embed": ("none", "learned"), "init": ("beit", "xavier"),
               "decode": ("cpu", "device")}
    RANGES = {"img_size": ">= 1", "crop_min_scale": "(0, 1]", "depth": ">= 0", "patch_size": ">= 1",
              "init_values": ">= 0", "drop_path": "[0, 1)", "lam": ">= 0", "respix_window": ">= 1",
              "respix_eps": "> 0", "respix_l1": "[0, 1]", "gen_depth": ">= 1", "gen_dim": ">= 0",
              "gen_share_blocks": ">= 0", "mask_ratio": "(0, 1)", "sample_temperature": "> 0", "tok_vocab": ">= 2",
              "tok_hid": ">= 4", "tok_blocks": ">= 1", "tok_epochs": ">= 1", "tok_lr": "> 0", "tok_kl": ">= 0",
              "epochs": ">= 0", "batch_size": ">= 1", "accum_iter": ">= 1", "global_batch": ">= 0",
              "paper_batch": ">= 0", "blr": "> 0", "min_lr": ">= 0", "warmup_epochs": ">= 0",
              "weight_decay": ">= 0", "clip_grad": ">= 0", "steps_per_epoch": ">= 0", "workers": ">= 0",
              "seed": ">= 0", "log_every": ">= 1", "stop_after": ">= 0", "viz_every": ">= 0"}
    # a flag given on the command line that the objective, tokenizer or arch would ignore is an error
    ONLY_WITH = {**{k: ("objective", ("respix",)) for k in ("respix_window", "respix_eps", "respix_l1")},
                 **{k: ("train_tokenizer", (True,))
                    for k in ("tok_vocab", "tok_hid", "tok_blocks", "tok_epochs", "tok_lr", "tok_kl")},
                 **{k: ("arch", ("vit_tiny", "vit_base"))
                    for k in ("depth", "pos_embed", "init_values", "init", "gen_share_blocks")}}
    _TINY = dict(arch="vit_tiny", img_size=32, patch_size=4, batch_size=8, device="cpu", workers=0, epochs=1,
                 log_every=1, warmup_epochs=0, drop_path=0.0, blr=1.5e-2, gen_depth=2, gen_dim=192, tokenizer="random",
                 tok_vocab=512, tok_hid=64, tok_blocks=1, respix_window=4)
    _PAPER = dict(epochs=300, global_batch=2048, paper_batch=2048)
    PRESETS = {
        "vit_base_300ep": dict(_PAPER, arch="vit_base", paper_row="ViT-B/16 300 ep -> 83.3 top-1 (not in our text)"),
        "resnet50_300ep": dict(_PAPER, arch="resnet50", paper_row="ResNet-50 300 ep -> 80.6 top-1 (not in our text)"),
        "tiny": _TINY,
        "small32": dict(_TINY, tokenizer="", train_tokenizer=True, tok_hid=16, tok_epochs=4, tok_lr=3e-3,
                        crop_min_scale=0.5, respix_window=16, batch_size=32, epochs=12, warmup_epochs=1, log_every=10,
                        workers=2, blr=8e-3, init="xavier", init_values=0.0),
    }


# ----------------------------------------------------------------------------- corruption (Sec. 2.1)
def random_mask(B, N, ratio, device):
    """Uniform random masking ("randomly selected", abstract): (B, N) bool, True = masked, round(N * ratio) per row."""
    return torch.rand(B, N, device=device).argsort(1).argsort(1) < int(round(N * ratio))


def sample_tokens(logits, temperature):
    """One exact sample per position from softmax(logits / t) (Gumbel-max trick). (B, N, V) -> (B, N) long."""
    u = torch.rand(logits.shape, device=logits.device).clamp_(min=1e-20)
    return (logits.float() / temperature - torch.log(-torch.log(u))).argmax(-1)


def corrupt_tokens(ids, mask, sampled):
    """Masked positions take the sample, others keep the tokenizer id (Sec. 1); RevDet label: final id != original."""
    corrupt_ids = torch.where(mask, sampled, ids)                                          # (B, N)
    return corrupt_ids, corrupt_ids != ids


def window_norm(x, k, eps=0.01):
    """ResPix target: x normalised by mean / std of its k x k window (reflect pad; eps: docs) -> target, mean, std"""
    xp = F.pad(x.float(), (k // 2, (k - 1) // 2, k // 2, (k - 1) // 2), mode="reflect")
    mean = F.avg_pool2d(xp, k, stride=1)
    std = (F.avg_pool2d(xp * xp, k, stride=1) - mean * mean).clamp(min=0).add(eps).sqrt()
    return (x - mean) / std, mean, std


def resize(x, size, mode="bicubic"):   # (B, C, H, W) -> (B, C, size, size), antialiased when shrinking
    return x if x.shape[-2:] == (size, size) else F.interpolate(x, (size, size), mode=mode, antialias=mode != "nearest")


def tok_size(cfg):   # tokenizer view side: its x8-smaller grid is the patch grid (14 tokens -> 112 px, BEiT)
    return 8 * (cfg.img_size // cfg.patch_size)


# ----------------------------------------------------------------------------- losses
def mim_loss(logits, ids, mask):
    """L_gen, BEiT's objective: cross-entropy of logits (B, N, V) vs tokenizer ids (B, N) at masked positions."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(), reduction="none").view_as(mask)
    return (ce * mask).sum() / mask.sum().clamp(min=1)


def respix_loss(pred, target, l1_weight):
    """L_enh of ResPix: regress the (window-normalised) original at ALL pixels (Sec. 1). pred, target (B, 3, H, W)."""
    d = pred.float() - target
    return l1_weight * d.abs().mean() + (1 - l1_weight) * (d * d).mean()


def revdet_loss(logits, replaced):
    """L_enh of RevDet: per-token binary cross-entropy, replaced or not (Sec. 1, after ELECTRA). Both (B, N)."""
    return F.binary_cross_entropy_with_logits(logits.float(), replaced.float())


# ----------------------------------------------------------------------------- model
class CIM(nn.Module):
    """Generator (small BEiT + lm head) and enhancer (ViT or ResNet-50 + per-token head); forward -> (loss, logs)."""
    def __init__(self, cfg, tokenizer):
        super().__init__()
        object.__setattr__(self, "tokenizer", tokenizer)   # frozen, no submodule: out of state_dict, optimizer, DDP
        self.cfg, self.grid, self.tok_size = cfg, cfg.img_size // cfg.patch_size, tok_size(cfg)
        if cfg.arch == "resnet50":   # its stride-16 map is the token grid, so it sees 16 * grid px (224 at patch 16)
            self.enhancer, D, self.enh_size = torchvision.models.resnet50(), 512, 16 * self.grid
            self.enhancer.fc = nn.Identity()   # torchvision layout without fc.*: what finetune.py loads
            self.enhancer_neck = nn.ModuleDict({"lat3": nn.Conv2d(1024, D, 1), "lat4": nn.Conv2d(2048, D, 1)})
            self.encoder_args = {"arch": "resnet50"}
        else:
            D, depth, heads = VIT_SIZES[cfg.arch]
            kw = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=D, depth=cfg.depth or depth,
                      num_heads=heads, pos_embed=cfg.pos_embed, init_values=cfg.init_values or None)
            self.enhancer, self.enh_size = VisionTransformer(**kw, drop_path=cfg.drop_path), cfg.img_size
            for m in self.enhancer.modules() if cfg.init == "xavier" else []:   # MAE's init replaces BEiT's
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))   # biases stay 0
            self.encoder_args = {"arch": "vit", **kw, "rel_pos": "shared"}   # what finetune.py builds
        self.P = self.enh_size // self.grid                                # enhancer pixels per token side
        self.enhancer_head = nn.Linear(D, 3 * self.P ** 2 if cfg.objective == "respix" else 1)   # per token
        Dg = cfg.gen_dim or (D if cfg.arch != "resnet50" else 768)
        self.generator = VisionTransformer(cfg.img_size, cfg.patch_size, Dg, cfg.gen_depth, Dg // 64, cfg.pos_embed,
                                           cfg.init_values or None, cfg.drop_path)
        self.generator_mask_token = nn.Parameter(torch.zeros(1, 1, Dg))   # weight-decayed, as in BEiT
        self.generator_head = nn.Linear(Dg, tokenizer.vocab_size)         # BEiT's lm_head
        beit_init(self.generator, self.generator_mask_token, self.generator_head)   # init the small BEiT as BEiT
        for i in range(cfg.gen_share_blocks):   # the same module objects: one set of weights, trained by both losses
            self.generator.patch_embed, self.generator.blocks[i] = self.enhancer.patch_embed, self.enhancer.blocks[i]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def param_sets(self):   # (generator, enhancer) parameters, clipped separately; shared blocks count as enhancer
        named = list(self.named_parameters())   # a shared parameter appears once, under its enhancer name
        return [p for n, p in named if not n.startswith("enhancer")], [p for n, p in named if n.startswith("enhancer")]

    def normalize(self, x01):
        return (x01 - self.mean) / self.std

    def corrupt(self, x01):
        """Sec. 2.1: tokenize, mask, generator predicts, sample replacements, decode the mixed grid -> dict"""
        cfg, B, g, dev = self.cfg, x01.shape[0], self.grid, x01.device
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):   # frozen dVAE, float32
            ids = self.tokenizer.encode(resize(x01.float(), self.tok_size).clamp(0, 1)).flatten(1)   # (B, N) "golden"
        mask = random_mask(B, g * g, cfg.mask_ratio, dev)                                # (B, N) True = masked
        x = self.generator.patchify(self.normalize(x01))                                 # (B, N, Dg)
        x = torch.where(mask[..., None], self.generator_mask_token.to(x.dtype), x)       # BEiT's [MASK] input
        logits = self.generator_head(self.generator.forward_tokens(x)[:, 1:])            # (B, N, V)
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):   # sampling: no gradient reaches the generator
            corrupt_ids, replaced = corrupt_tokens(ids, mask, sample_tokens(logits, cfg.sample_temperature))
            corrupted = self.tokenizer.decode(corrupt_ids.view(B, g, g))                 # (B, 3, 8g, 8g)
            corrupted = resize(corrupted, self.enh_size).clamp(0, 1)                     # (B, 3, S, S)
        return dict(ids=ids, mask=mask, logits=logits, corrupt_ids=corrupt_ids, replaced=replaced, corrupted=corrupted)

    def enhance(self, corrupted):
        """Enhancer + per-token head: (B, 3, S, S) in [0, 1] -> (B, N, 3 P^2) for ResPix or (B, N, 1) for RevDet."""
        x = self.normalize(corrupted)
        if self.cfg.arch != "resnet50":
            return self.enhancer_head(self.enhancer(x)[:, 1:])                           # ViT: one row per patch
        r, neck = self.enhancer, self.enhancer_neck
        x = r.maxpool(r.relu(r.bn1(r.conv1(x.contiguous(memory_format=torch.channels_last)))))
        c4 = r.layer3(r.layer2(r.layer1(x)))                                             # (B, 1024, g, g), stride 16
        c5 = r.layer4(c4)                                                                # (B, 2048, g/2, g/2)
        f = neck.lat3(c4) + F.interpolate(neck.lat4(c5), size=c4.shape[-2:], mode="nearest")   # (B, D, g, g)
        return self.enhancer_head(f.flatten(2).transpose(1, 2))   # layer4 feeds the head too, so it is pre-trained

    def unpatchify(self, out):   # (B, N, 3 P^2) -> (B, 3, S, S)
        B, g, P = out.shape[0], self.grid, self.P
        return out.view(B, g, g, P, P, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, g * P, g * P)

    def forward(self, images):   # (B, 3, H, W) uint8 crops from the loader, or float in [0, 1] -> (loss, logs)
        x01 = augment(images) if images.dtype == torch.uint8 else images
        c = self.corrupt(x01)
        loss_gen, out = mim_loss(c["logits"], c["ids"], c["mask"]), self.enhance(c["corrupted"])
        if self.cfg.objective == "respix":
            with torch.no_grad():
                target = window_norm(self.normalize(resize(x01, self.enh_size)), self.cfg.respix_window,
                                     self.cfg.respix_eps)[0]
            loss_enh = respix_loss(self.unpatchify(out.float()), target, self.cfg.respix_l1)
        else:
            loss_enh = revdet_loss(out[..., 0], c["replaced"])
        acc = ((c["logits"].detach().argmax(-1) == c["ids"]) & c["mask"]).sum() / c["mask"].sum().clamp(min=1)
        logs = dict(loss_gen=loss_gen.detach(), loss_enh=loss_enh.detach(), gen_acc=acc,
                    replaced=c["replaced"].float().mean())
        if self.cfg.objective == "revdet":   # RevDet's pretext solved: share of tokens classified right
            logs["det_acc"] = ((out[..., 0].detach() > 0) == c["replaced"]).float().mean()
        return loss_gen + self.cfg.lam * loss_enh, logs


# ----------------------------------------------------------------------------- data
def input_transform(cfg):
    """CPU: decode, one random resized crop (bicubic, scale crop_min_scale-1) + flip -> uint8 crop; BEiT's colour
    jitter happens batched on the device (augment)."""
    return CropFlip(cfg.img_size, (cfg.crop_min_scale, 1.0))


def augment(images):
    """uint8 crops (B, 3, S, S) -> [0, 1] floats with ColorJitter(0.4, 0.4, 0.4), each image its own draws: the
    jitter of BEiT's pre-training transform as this file has always used it (docs/cim_corrupt.md: the current
    microsoft/unilm/beit/datasets.py@03380c8 has none), after the crop."""
    return color_jitter(images.float() / 255, 0.4, 0.4, 0.4, 0.0)


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


# ----------------------------------------------------------------------------- training
def train_tokenizer(cfg, world, rank, device, path):
    """DALL-E's dVAE recipe in small on the pre-training tokenizer view (Gumbel tau 1 -> 1/16), then the frozen
    tokenizer file `path`. Resumable: OUT/tokenizer_checkpoint.pth every epoch (Run, prefix tokenizer_)."""
    tok = new_tokenizer(cfg, tok_size(cfg)).to(device)
    decode = decode_mode(cfg.decode)   # what the loader workers hand over: decoded pixels or JPEG bytes
    dataset = build_dataset(cfg.data, "pretrain", input_transform(cfg), cfg.img_size, decode=decode)
    loader = build_loader(dataset, cfg.batch_size, world, rank, cfg.seed, cfg.workers, device)
    spe = min(len(loader), cfg.steps_per_epoch or len(loader))
    total = cfg.tok_epochs * spe
    model = nn.parallel.DistributedDataParallel(tok) if world > 1 else tok
    opt = torch.optim.AdamW(tok.parameters(), lr=cfg.tok_lr, weight_decay=0.0, fused=device.type == "cuda")
    lrs = cosine_schedule(cfg.tok_lr, cfg.tok_lr / 10, total, spe)
    taus = cosine_schedule(1.0, 1 / 16, total)
    scaler = torch.amp.GradScaler(device.type, enabled=False)   # float32; kept for Run's checkpoint format
    derived = {"global_batch": cfg.batch_size * world, "steps_per_epoch": spe, "images": len(dataset)}
    run = Run(cfg, __file__, tok, opt, scaler, loader, spe, 1, derived, cfg.tok_epochs, prefix="tokenizer_")
    run.resume()
    for it, batches in run.steps():
        opt.param_groups[0]["lr"] = lrs[it]
        for _, (images, _) in batches:
            x = resize(augment(images_to(images, device)), tok_size(cfg)).clamp(0, 1)
            loss, logs = model(x, taus[it], cfg.tok_kl)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run.add(loss=loss, **logs)
        if run.end_step(it, lrs[it]):
            state = {"model": tok.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict()}
            run.save(state, check=lambda: tok(x, taus[it], cfg.tok_kl)[0])
    if run.stopping:
        raise SystemExit(0)
    error = save_checkpoint(tok.state(), path) if rank == 0 else None
    fail_all(error is None, error)   # the other ranks load the file next


def checkpoint(cfg, raw_model, opt, scaler):
    """What OUT/checkpoint.pth holds besides Run's bookkeeping: everything to resume, plus the enhancer as
    finetune.py loads it (torchvision keys without fc.* or timm beit_* keys; BEiT fine-tuning pools by mean)."""
    layout = dict if cfg.arch == "resnet50" else to_timm_layout
    return {"model": raw_model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "default_encoder": "enhancer", "encoders": {"enhancer": layout(raw_model.enhancer.state_dict())},
            "encoder_args": raw_model.encoder_args, "pool": "mean"}


def main(cfg):
    validate(cfg)
    rank, world, device = setup_dist(cfg.device)
    seed_all(cfg.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # also for the fp32 dVAE
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    accum = accum_steps(cfg, world)
    global_batch = cfg.batch_size * world * accum
    if cfg.train_tokenizer:                                            # METHOD: own dVAE where DALL-E's is unavailable
        path = os.path.join(cfg.out, "tokenizer.pth")
        if not os.path.isfile(path):
            train_tokenizer(cfg, world, rank, device, path)
        cfg.tokenizer = path
        if cfg.epochs == 0:
            return   # tokenizer only
    tokenizer = load_tokenizer(cfg).to(device)                         # METHOD: file errors stop the run here
    decode = decode_mode(cfg.decode)   # what the loader workers hand over: decoded pixels or JPEG bytes
    dataset = build_dataset(cfg.data, "pretrain", input_transform(cfg), cfg.img_size, decode=decode)
    loader = build_loader(dataset, cfg.batch_size, world, rank, cfg.seed, cfg.workers, device)
    steps_per_epoch = min(len(loader) // accum, cfg.steps_per_epoch or len(loader))   # optimizer steps
    if steps_per_epoch == 0:   # one error line instead of a division by zero below
        fail(f"one epoch has {len(loader)} micro-batches per GPU, fewer than --accum-iter {accum}")
    total_steps = cfg.epochs * steps_per_epoch
    raw_model = CIM(cfg, tokenizer).to(device, memory_format=torch.channels_last if cfg.arch == "resnet50" else None)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    lr = cfg.blr * global_batch / 256
    print0(f"recipe: {cfg.preset or 'defaults'} | global batch {global_batch} = {cfg.batch_size} x {world} GPUs x "
           f"{accum} accum | peak lr {lr:.2e} = blr {cfg.blr} x {global_batch} / 256 | {steps_per_epoch} steps/epoch | "
           f"no EMA | mask {cfg.mask_ratio:g} random of {raw_model.grid}^2 tokens | {cfg.objective}, lam {cfg.lam:g} | "
           f"{cfg.amp if amp_dtype else 'fp32'}" + (f" | paper row: {cfg.paper_row}" if cfg.paper_row else ""))
    batch_warning(global_batch, cfg.paper_batch, steps_per_epoch)
    opt = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=lr, betas=(0.9, 0.999),
                            fused=device.type == "cuda")
    lr_sched = cosine_schedule(lr, cfg.min_lr, total_steps, cfg.warmup_epochs * steps_per_epoch,
                               warmup_endpoint=True)   # BEiT utils.cosine_scheduler
    derived = {"global_batch": global_batch, "steps_per_epoch": steps_per_epoch, "images": len(dataset)}
    run = Run(cfg, __file__, raw_model, opt, scaler, loader, steps_per_epoch, accum, derived)
    run.resume()   # OUT/checkpoint.pth, if any; other settings stop here
    if cfg.trust_pickle and not cfg.tokenizer and rank == 0:   # later runs: --tokenizer OUT/tokenizer.pth, no pickle
        error = save_checkpoint(tokenizer.state(), os.path.join(cfg.out, "tokenizer.pth"))
        if error:
            fail(error)

    for it, batches in run.steps():
        for g in opt.param_groups:
            g["lr"] = lr_sched[it]
        opt.zero_grad(set_to_none=True)
        for last, (images, _) in batches:
            images = images_to(images, device)                           # (B, 3, S, S) uint8
            with no_sync(model, last):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss, logs = model(images)                         # METHOD: corrupt, enhance, L_gen + lam * L_enh
                scaler.scale(loss / accum).backward()
            run.add(loss=loss, **logs)
        if cfg.clip_grad > 0:                                          # METHOD: each network clipped on its own
            scaler.unscale_(opt)
            for params in raw_model.param_sets():
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        scaler.step(opt)                                               # skipped on inf/NaN grads (fp16); no EMA here
        scaler.update()
        if run.end_step(it, lr_sched[it]):                             # epoch end or --stop-after
            run.save(checkpoint(cfg, raw_model, opt, scaler), check=lambda: raw_model(images)[0])
            if cfg.viz_every and (run.epoch + 1) % cfg.viz_every == 0 and rank == 0:
                visualize(raw_model, images, os.path.join(cfg.out, f"viz_epoch{run.epoch}.png"))   # METHOD


# ----------------------------------------------------------------------------- appendix: ViT (generator, enhancer)
VIT_SIZES = {"vit_tiny": (192, 12, 3), "vit_base": (768, 12, 12)}   # (width, depth, heads)


class RelPosBias(nn.Module):
    """BEiT's shared relative position bias: a value per head and 2-D offset (+3 rows: cls->tok, tok->cls, cls->cls)."""
    def __init__(self, grid, num_heads):
        super().__init__()
        h, w, num = *grid, (2 * grid[0] - 1) * (2 * grid[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num + 3, num_heads))
        yx = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # (2, N)
        rel = (yx[:, :, None] - yx[:, None, :]).permute(1, 2, 0)                          # (N, N, 2) offsets
        idx = torch.full((h * w + 1, h * w + 1), num + 2, dtype=torch.long)              # (1+N, 1+N)
        idx[1:, 1:] = (rel[..., 0] + h - 1) * (2 * w - 1) + rel[..., 1] + w - 1
        idx[0, 1:], idx[1:, 0] = num, num + 1
        self.register_buffer("relative_position_index", idx, persistent=False)

    def forward(self):
        return self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)  # (nh, 1+N, 1+N)


class Block(nn.Module):
    """Pre-norm transformer block: attention with the shared relative bias, MLP, BEiT's layer scale, drop path."""
    def __init__(self, dim, num_heads, init_values=None, drop_path=0.0):
        super().__init__()
        self.num_heads, self.drop_path = num_heads, drop_path
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim)))   # timm's attn.* keys
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, 4 * dim), act=nn.GELU(), fc2=nn.Linear(4 * dim, dim)))
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim)) if init_values else 1.0   # BEiT's layer scale
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim)) if init_values else 1.0

    def attend(self, x, bias):   # x (B, L, D), bias (nh, L, L) -> (B, L, D)
        B, L, D = x.shape
        q, k, v = self.attn.qkv(x).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)   # 3 x (B, nh, L, hd)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))             # (B, nh, L, hd)
        return self.attn.proj(x.transpose(1, 2).reshape(B, L, D))

    def forward(self, x, bias):   # (B, L, D) -> (B, L, D); drop path removes a sample's residual branch
        x = x + stochastic_depth(self.gamma_1 * self.attend(self.norm1(x), bias), self.drop_path, "row", self.training)
        return x + stochastic_depth(self.gamma_2 * self.mlp(self.norm2(x)), self.drop_path, "row", self.training)


class VisionTransformer(nn.Module):
    """BEiT-style ViT (timm names) for the enhancer and the generator. forward(images) -> (B, 1+N, D), cls first."""
    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, pos_embed="none",
                 init_values=None, drop_path=0.0):
        super().__init__()
        self.patch_size, self.grid = patch_size, (img_size // patch_size,) * 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = None
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        self.rel_pos_bias = RelPosBias(self.grid, num_heads)   # BEiT pre-training: one table for all blocks
        dpr = [drop_path * i / max(depth - 1, 1) for i in range(depth)]   # linearly increasing stochastic depth
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, init_values, dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        beit_init(self)   # BEiT's pre-training ViT, BEiT's init

    def patchify(self, images):   # (B, 3, H, W) -> (B, N, D)
        return self.patch_embed.proj(images).flatten(2).transpose(1, 2)

    def forward_tokens(self, x):   # x (B, N, D) patch embeddings, maybe with mask tokens -> (B, 1+N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)   # (B, 1+N, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        bias = self.rel_pos_bias()                                              # (nh, 1+N, 1+N)
        for blk in self.blocks:
            x = blk(x, bias)
        return self.norm(x)

    def forward(self, images):
        return self.forward_tokens(self.patchify(images))


def beit_init(vit, mask_token=None, head=None):
    """BEiT: trunc-normal(0.02, cut at +-0.02) weights, zero biases, unit LayerNorms, then attn.proj and mlp.fc2 of
    block l divided by sqrt(2 l) (microsoft/unilm/beit/modeling_pretrain.py:70-84@cb36605)."""
    for m in [*vit.modules(), *([head] if head is not None else [])]:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02), nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
    for t in [t for t in (vit.cls_token, vit.pos_embed, mask_token) if t is not None]:
        nn.init.trunc_normal_(t, std=0.02, a=-0.02, b=0.02)
    for layer, blk in enumerate(vit.blocks, start=1):
        blk.attn.proj.weight.data.div_(math.sqrt(2 * layer)), blk.mlp.fc2.weight.data.div_(math.sqrt(2 * layer))


def to_timm_layout(sd):
    """Enhancer keys -> timm's beit_*: shared table copied into every block, qkv.bias -> q_bias / v_bias (docs)."""
    sd = dict(sd)
    table = sd.pop("rel_pos_bias.relative_position_bias_table")
    for k in [k for k in sd if k.startswith("blocks.")]:
        b, v = k[:k.index(".", 7) + 1], sd.pop(k)   # b = "blocks.{i}."
        if k.endswith("attn.qkv.bias"):
            sd[b + "attn.q_bias"], _, sd[b + "attn.v_bias"] = v.chunk(3)
        else:
            sd[k] = v
        if k.endswith("norm1.weight"):
            sd[b + "attn.relative_position_bias_table"] = table.clone()
    return sd


# ----------------------------------------------------------------------------- appendix: dVAE tokenizer (DALL-E layout)
EPS = 0.1   # DALL-E's logit_laplace_eps: pixels live in [0.1, 0.9] so the logit-Laplace likelihood stays finite


def map_pixels(x):   # [0, 1] -> [0.1, 0.9] (dall_e.map_pixels)
    return (1 - 2 * EPS) * x + EPS


def unmap_pixels(x):   # the inverse, clamped to [0, 1] (dall_e.unmap_pixels)
    return ((x - EPS) / (1 - 2 * EPS)).clamp(0, 1)


class Conv(nn.Module):
    """dall_e.utils.Conv2d: .w (out, in, k, k), .b, 'same' padding. Always float32 (dall_e uses fp16 on CUDA)."""
    def __init__(self, n_in, n_out, k):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, k, k) / math.sqrt(n_in * k * k))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=(self.w.shape[-1] - 1) // 2)


class DVAEBlock(nn.Module):
    """dall_e EncoderBlock (kernels 3,3,3,1) / DecoderBlock (1,3,3,3): id_path + post_gain * res_path(relu-conv x4)."""
    def __init__(self, n_in, n_out, n_layers, kernels):
        super().__init__()
        ch = [n_in, n_out // 4, n_out // 4, n_out // 4, n_out]
        self.id_path = Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict(kv for i, k in enumerate(kernels) for kv in (
            (f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv(ch[i], ch[i + 1], k)))))
        self.post_gain = 1 / n_layers ** 2

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


def dvae_blocks(c_in, c_first, k_in, widths, n_blk, kernels, resample, c_out):
    """DALL-E keys: blocks.input, blocks.group_{1..4}.block_{i} (+ pool / upsample after groups 1-3), blocks.output."""
    layers, prev = [("input", Conv(c_in, c_first, k_in))], c_first
    for g, width in enumerate(widths):
        group = [(f"block_{i + 1}", DVAEBlock(prev if i == 0 else width, width, 4 * n_blk, kernels))
                 for i in range(n_blk)]
        layers.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group + ([resample()] if g < 3 else [])))))
        prev = width
    out = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv(prev, c_out, 1)))
    return nn.Sequential(OrderedDict(layers + [("output", out)]))


def dvae_encoder(n_hid=256, n_blk_per_group=2, vocab_size=8192, input_channels=3):
    """dall_e.Encoder: map_pixels'd (B, 3, H, W) float32 -> logits (B, V, H/8, W/8)"""
    blocks = dvae_blocks(input_channels, n_hid, 7, [n_hid * m for m in (1, 2, 4, 8)], n_blk_per_group, (3, 3, 3, 1),
                         lambda: ("pool", nn.MaxPool2d(2)), vocab_size)
    return nn.Sequential(OrderedDict(blocks=blocks))


class DVAEDecoder(nn.Module):   # dall_e.Decoder: one-hot / probs (B, V, h, w) or ids (B, h, w) -> (B, 6, 8h, 8w)
    def __init__(self, n_init=128, n_hid=256, n_blk_per_group=2, vocab_size=8192, output_channels=3):
        super().__init__()
        self.blocks = dvae_blocks(vocab_size, n_init, 1, [n_hid * m for m in (8, 4, 2, 1)], n_blk_per_group,
                                  (1, 3, 3, 3), lambda: ("upsample", nn.Upsample(scale_factor=2, mode="nearest")),
                                  2 * output_channels)

    def forward(self, z):
        if z.dtype == torch.long:   # a 1x1 conv of a one-hot is a column lookup: no (B, V, h, w) tensor is built
            x = (self.blocks.input.w[:, :, 0, 0].t()[z] + self.blocks.input.b).permute(0, 3, 1, 2)  # (B, n_init, h, w)
        else:
            x = self.blocks.input(z.float())
        return self.blocks[1:](x)   # channels 0-2: logit-Laplace means, 3-5: log-scales


class Tokenizer(nn.Module):
    """Frozen dVAE: encode [0, 1] images -> ids (argmax, x8 smaller); decode ids / probs -> [0, 1] (as BEiT does)."""
    def __init__(self, enc_args, dec_args, size=0):
        super().__init__()
        self.encoder, self.decoder = dvae_encoder(**enc_args), DVAEDecoder(**dec_args)
        self.args, self.vocab_size = {"encoder": enc_args, "decoder": dec_args, "size": size}, dec_args["vocab_size"]

    def encode(self, x01):   # (B, 3, S, S) -> (B, S/8, S/8) long
        return self.encoder(map_pixels(x01)).argmax(1)

    def decode(self, z):   # ids (B, h, w) or probs (B, V, h, w) -> (B, 3, 8h, 8w) in [0, 1]
        return unmap_pixels(torch.sigmoid(self.decoder(z)[:, :3]))

    def forward(self, x01, tau, kl_weight):
        """dVAE training (DALL-E): Gumbel-softmax code; logit-Laplace NLL of map_pixels(x) + kl_weight * KL(q || U)."""
        logits = self.encoder(map_pixels(x01))                                           # (B, V, h, w)
        stats = self.decoder(F.gumbel_softmax(logits, tau=tau, dim=1))                   # (B, 6, 8h, 8w)
        y, mu, log_b = map_pixels(x01), stats[:, :3], stats[:, 3:].clamp(-7, 7)
        nll = (math.log(2) + log_b + torch.log(y * (1 - y)) + (torch.logit(y) - mu).abs() / log_b.exp()).mean()
        logq = F.log_softmax(logits, dim=1)
        kl = (logq.exp() * (logq + math.log(logits.shape[1]))).sum(1).mean()
        mse = ((unmap_pixels(torch.sigmoid(mu)) - x01) ** 2).mean().detach()
        return nll + kl_weight * kl, {"nll": nll.detach(), "kl": kl.detach(), "mse": mse}

    def state(self):   # the plain, pickle-free tokenizer file
        return {"encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict(), "args": self.args}


def new_tokenizer(cfg, size=0):
    a = dict(n_hid=cfg.tok_hid, n_blk_per_group=cfg.tok_blocks, vocab_size=cfg.tok_vocab)
    return Tokenizer(a, dict(a, n_init=128), size)


def read_dvae_file(path, trust_pickle):
    """A plain state dict or tokenizer file (weights_only), or with --trust-pickle a pickled dall_e module."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError:
        fail(f"{path} is not a plain weights file (a pickled module such as DALL-E's encoder.pkl, or not a "
             "checkpoint at all). Unpickling runs code from the file: pass --trust-pickle if you trust its source")
    except ModuleNotFoundError as e:   # DALL-E's .pkl files are dall_e modules
        fail(f"{path} is a pickled module that needs the Python package '{e.name}' (DALL-E's files: "
             "pip install --no-deps DALL-E attrs)")
    except Exception as e:   # empty, truncated, not a torch file
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        fail(f"cannot read tokenizer file {path} ({reason}); pass a complete file")
    return obj.state_dict() if isinstance(obj, nn.Module) else obj


def dvae_args(sd, kind, path):
    """Architecture of a DALL-E-layout state dict, read from its shapes (encoder input conv 7x7, decoder 1x1)."""
    if not isinstance(sd, dict) or "blocks.input.w" not in sd or "blocks.output.conv.w" not in sd:
        fail(f"{path}: not a DALL-E-layout dVAE {kind} (no blocks.input.w / blocks.output.conv.w)")
    w_in, w_out = sd["blocks.input.w"], sd["blocks.output.conv.w"]
    if w_in.shape[-1] != (7 if kind == "encoder" else 1):
        fail(f"{path}: expected a dVAE {kind} but found the other half (input conv {tuple(w_in.shape)})")
    n_blk = len({k.split(".")[2] for k in sd if k.startswith("blocks.group_1.block_")})
    if kind == "encoder":
        return dict(n_hid=w_in.shape[0], n_blk_per_group=n_blk, vocab_size=w_out.shape[0], input_channels=w_in.shape[1])
    return dict(n_init=w_in.shape[0], n_hid=w_out.shape[1], n_blk_per_group=n_blk, vocab_size=w_in.shape[1],
                output_channels=w_out.shape[0] // 2)


def load_tokenizer(cfg):
    """--tokenizer random | PATH, or --dvae-encoder + --dvae-decoder -> frozen Tokenizer. Fails on any mismatch."""
    if cfg.tokenizer == "random":
        print0("WARNING: --tokenizer random: an untrained dVAE, corrupted images are noise. Smoke tests only!")
        return new_tokenizer(cfg).eval().requires_grad_(False)
    if cfg.tokenizer:
        ck = read_dvae_file(cfg.tokenizer, cfg.trust_pickle)
        if not isinstance(ck, dict) or not {"encoder", "decoder"} <= set(ck):
            fail(f"--tokenizer {cfg.tokenizer}: expected a dict with 'encoder' and 'decoder' state dicts")
        sds, paths, size = (ck["encoder"], ck["decoder"]), (cfg.tokenizer,) * 2, ck.get("args", {}).get("size", 0)
    else:
        paths, size = (cfg.dvae_encoder, cfg.dvae_decoder), 0
        sds = [read_dvae_file(p, cfg.trust_pickle) for p in paths]
    ea, da = dvae_args(sds[0], "encoder", paths[0]), dvae_args(sds[1], "decoder", paths[1])
    if ea["vocab_size"] != da["vocab_size"] or ea["input_channels"] != 3 or da["output_channels"] != 3:
        fail(f"tokenizer mismatch: encoder {ea} vs decoder {da} (need one vocabulary, 3 -> 6 channels)")
    tok = Tokenizer(ea, da, size)
    for part, sd, p in ((tok.encoder, sds[0], paths[0]), (tok.decoder, sds[1], paths[1])):
        try:
            part.load_state_dict(sd)
        except RuntimeError as e:
            fail(f"{p} does not match the DALL-E dVAE layout: {' '.join(str(e).split())[:400]}")
    if size and size != tok_size(cfg):   # our own dVAEs record their view size; DALL-E's (trained at 256) do not
        fail(f"tokenizer grid {size // 8}x{size // 8} (trained on {size}px views) does not match the patch grid "
             f"{tok_size(cfg) // 8}x{tok_size(cfg) // 8} (--img-size / --patch-size): retrain it or change the sizes")
    return tok.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- appendix: visualisation, checks
@torch.no_grad()
def visualize(m, images, path):
    """Columns: original | dVAE recon | corrupted | replaced | ResPix output (window stats undone) or RevDet prob."""
    x01, g = images[:8].float() / 255, m.grid   # eval mode here; the next epoch calls train() again
    B, c = x01.shape[0], m.eval().corrupt(x01)
    out = m.enhance(c["corrupted"]).float()
    if m.cfg.objective == "respix":
        _, mean, std = window_norm(m.normalize(resize(x01, m.enh_size)), m.cfg.respix_window, m.cfg.respix_eps)
        pred = (m.unpatchify(out) * std + mean) * m.std + m.mean
    else:
        pred = torch.sigmoid(out[..., 0]).view(B, 1, g, g).expand(-1, 3, -1, -1)
    panels = (x01, m.tokenizer.decode(c["ids"].view(B, g, g)), c["corrupted"],
              c["replaced"].float().view(B, 1, g, g).expand(-1, 3, -1, -1), pred)
    panels = [resize(p.float(), m.cfg.img_size, "nearest" if p.shape[-1] == g else "bicubic").clamp(0, 1)
              for p in panels]
    save_image(torch.stack(panels, 1).flatten(0, 1), path, nrow=5)


def validate(cfg):
    """Cross-flag rules and missing files (each flag's own range is Config.RANGES, checked by parse_config): one
    clear error before any data, model or tokenizer is loaded."""
    check_ranges(cfg)
    if cfg.img_size % cfg.patch_size:
        fail(f"--img-size {cfg.img_size} is not a multiple of --patch-size {cfg.patch_size}")
    if cfg.respix_window > min(cfg.img_size, 16 * (cfg.img_size // cfg.patch_size)) // 2:
        fail(f"--respix-window {cfg.respix_window}: must be between 1 and half the image side")
    if cfg.epochs == 0 and not cfg.train_tokenizer:
        fail("--epochs 0 trains nothing; it is for --train-tokenizer (train the dVAE only)")
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs > 0:
        fail(f"--warmup-epochs {cfg.warmup_epochs} >= --epochs {cfg.epochs}: the lr never reaches its peak")
    D, depth = VIT_SIZES.get(cfg.arch, (768, 0))[:2]
    Dg, K = cfg.gen_dim or D, cfg.gen_share_blocks
    if Dg % 64 or K and (not depth or Dg != D or K > min(cfg.gen_depth, cfg.depth or depth)):
        fail("--gen-dim must be a multiple of 64 (heads of width 64); --gen-share-blocks K needs a ViT enhancer of the "
             "generator's width and K <= both depths")
    if cfg.tokenizer == "random" and (cfg.train_tokenizer or cfg.dvae_encoder or cfg.dvae_decoder):
        cfg.tokenizer = ""   # a preset's smoke-test default gives way to a real tokenizer
    if sum([bool(cfg.tokenizer), bool(cfg.dvae_encoder and cfg.dvae_decoder), cfg.train_tokenizer]) != 1 or \
            bool(cfg.dvae_encoder) != bool(cfg.dvae_decoder):
        fail("give exactly one tokenizer: --tokenizer PATH (from --train-tokenizer), --dvae-encoder E --dvae-decoder D "
             "(both; DALL-E's need --trust-pickle), --train-tokenizer, or --tokenizer random (smoke tests only)")
    for p in (cfg.dvae_encoder, cfg.dvae_decoder, "" if cfg.tokenizer == "random" else cfg.tokenizer):
        if p and not os.path.isfile(p):
            fail(f"tokenizer file {p} does not exist")


if __name__ == "__main__":
    main(parse_config(Config))
