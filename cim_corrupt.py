r"""
cim_corrupt.py - Corrupted Image Modeling (CIM) pre-training in one file: a small BEiT generator and
a frozen dVAE corrupt the image, an enhancer (ViT or ResNet-50) learns from the corruption.

Paper: Fang et al., "Corrupted Image Modeling for Self-Supervised Visual Pre-Training", ICLR 2023,
arXiv 2202.03382. No official code: built from the paper's abstract, Sec. 1 and the start of
Sec. 2.1 (the text this project holds), BEiT and DALL-E's dVAE; what that text leaves open is a
flag (docs/cim_corrupt.md lists them).

    python cim_corrupt.py --data /imagenet --dvae-encoder E.pkl --dvae-decoder D.pkl --trust-pickle
    torchrun --nproc_per_node 8 cim_corrupt.py --preset vit_base_300ep --data /imagenet \
        --tokenizer OUT/tokenizer.pth
    python cim_corrupt.py --preset tiny --data synthetic --out out/cim_tiny     # CPU, random dVAE

Result: ImageNet not run (reported for the paper: ViT-B/16 83.3, ResNet-50 80.6 top-1; not in
the paper text this project holds); small CPU runs beat their init on photos
(benchmarks/README.md#does-each-method-learn).

Sections: config | losses | corruption | model | data | training | presets | appendix: ViT, dVAE
tokenizer, visualisation, checks.
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

from common import (IMAGENET_MEAN, IMAGENET_STD, CropFlip, Run, accum_steps, batch_warning,
                    build_dataset, build_loader, check_ranges, color_jitter, cosine_schedule,
                    decode_mode, epoch_steps, fail, fail_all, images_to, no_sync, param_groups,
                    parse_config, print0, save_checkpoint, seed_all, setup_dist)

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass
class Config:
    """Corrupted Image Modeling pre-training (each default's source and the open choices: docs)."""
    data: str = "/imagenet"          # class folders | cifar10 | cifar100 | stl10 | synthetic
    img_size: int = 224              # crop side; the dVAE sees it at 8 x img_size / patch_size
    crop_min_scale: float = 0.08     # RandomResizedCrop area range (min, 1), pre-training and dVAE
    # model
    arch: str = "vit_base"           # the enhancer (the network you keep): vit_base | resnet50 ...
    depth: int = 0                   # ViT enhancer depth; 0 = the arch's depth
    patch_size: int = 16             # token stride: ViT patch = generator patch = one dVAE cell
    pos_embed: str = "none"          # ViT absolute positions: none (BEiT pre-training) | learned
    init_values: float = 0.1         # ViT layer scale init; 0 = no layer scale
    init: str = "beit"               # ViT enhancer init: beit | xavier (MAE's)
    drop_path: float = 0.1           # stochastic depth of enhancer and generator
    # method (open choices are flags: docs/cim_corrupt.md)
    objective: str = "respix"        # respix: regress all original pixels | revdet: replaced or not
    lam: float = 1.0                 # loss = L_gen + lam x L_enh
    respix_window: int = 8           # side of the window that normalises ResPix targets
    respix_eps: float = 0.01         # variance floor of a ResPix window (bounds flat windows)
    respix_l1: float = 0.5           # ResPix loss = w L1 + (1 - w) L2
    gen_depth: int = 4               # generator ("small BEiT") blocks
    gen_dim: int = 0                 # generator width, heads = dim / 64; 0 = the ViT's, or 768
    gen_share_blocks: int = 0        # share patch embed + K blocks with a same-width ViT enhancer
    mask_ratio: float = 0.5          # share of tokens the generator resamples
    sample_temperature: float = 1.0  # replacements ~ softmax(logits / t)
    # the frozen tokenizer (DALL-E's dVAE interface), or a dVAE trained here
    tokenizer: str = ""              # a tokenizer file (--train-tokenizer made) | random (smoke)
    dvae_encoder: str = ""           # DALL-E's encoder.pkl (--trust-pickle) or a plain state dict
    dvae_decoder: str = ""           # DALL-E's decoder.pkl (--trust-pickle) or a plain state dict
    trust_pickle: bool = False       # allow unpickling: it runs code from the file (DALL-E's .pkl)
    train_tokenizer: bool = False    # train a dVAE on --data into OUT/tokenizer.pth first
    tok_vocab: int = 8192            # dVAE codebook size (DALL-E's)
    tok_hid: int = 256               # dVAE width (DALL-E's n_hid)
    tok_blocks: int = 2              # dVAE residual blocks per group
    tok_epochs: int = 30             # dVAE epochs (Gumbel temperature 1 -> 1/16 over them)
    tok_lr: float = 1e-3             # dVAE AdamW lr (1 epoch warmup, cosine to 1/10)
    tok_kl: float = 0.03             # KL(q || uniform) weight per token vs the per-pixel NLL
    # optimisation: BEiT's ImageNet-1k recipe, but AdamW betas (0.9, 0.999) where BEiT's script has
    # (0.9, 0.98): the paper text held here does not give them (docs)
    epochs: int = 300                # pre-training epochs (0 with --train-tokenizer: the dVAE only)
    batch_size: int = 128            # per GPU and micro-batch
    accum_iter: int = 1              # micro-batches per optimizer step
    global_batch: int = 0            # >0: accumulation = global_batch / (batch_size x GPUs)
    paper_batch: int = 0             # the recipe's global batch (presets): warn when >2x away
    paper_row: str = ""              # the paper result a preset reproduces (recipe line)
    blr: float = 1.875e-4            # lr = blr x global batch / 256: 1.5e-3 at 2048
    min_lr: float = 1e-5             # cosine floor
    warmup_epochs: int = 10          # linear warmup from 0
    weight_decay: float = 0.05       # AdamW, not on 1-D params, positions and the cls token
    clip_grad: float = 3.0           # max gradient norm, each network on its own; 0 = off
    # system
    device: str = "cuda"             # cuda | cpu
    amp: str = "bf16"                # bf16 | fp16 | off (autocast on CUDA; the dVAE always fp32)
    compile: bool = False            # torch.compile the model
    workers: int = 10                # data loader processes per GPU
    decode: str = "cpu"              # JPEGs decoded by the loader workers (cpu) or the GPU (device)
    steps_per_epoch: int = 0         # optimizer steps per epoch; 0 = one pass over the data
    stop_after: int = 0              # exit after N steps with a resumable checkpoint; 0 = off
    log_every: int = 50              # progress line every N optimizer steps
    viz_every: int = 0               # OUT/viz_epoch{E}.png every N epochs; 0 = off
    out: str = "out/cim_corrupt"     # checkpoint, logs, tokenizer.pth; its checkpoint is resumed
    seed: int = 0                    # process r uses seed + r
    preset: str = ""                 # vit_base_300ep | resnet50_300ep (paper rows) | tiny | small32
    allow_change: str = ""           # resume despite these changed settings: name,name or all

    CHOICES = {"arch": ("vit_tiny", "vit_base", "resnet50"), "pos_embed": ("none", "learned"),
               "init": ("beit", "xavier"), "objective": ("respix", "revdet"),
               "amp": ("bf16", "fp16", "off"), "decode": ("cpu", "device")}
    RANGES = {"img_size": ">= 1", "crop_min_scale": "(0, 1]", "depth": ">= 0", "patch_size": ">= 1",
              "init_values": ">= 0", "drop_path": "[0, 1)", "lam": ">= 0", "respix_window": ">= 1",
              "respix_eps": "> 0", "respix_l1": "[0, 1]", "gen_depth": ">= 1", "gen_dim": ">= 0",
              "gen_share_blocks": ">= 0", "mask_ratio": "(0, 1)", "sample_temperature": "> 0",
              "tok_vocab": ">= 2", "tok_hid": ">= 4", "tok_blocks": ">= 1", "tok_epochs": ">= 1",
              "tok_lr": "> 0", "tok_kl": ">= 0", "epochs": ">= 0", "batch_size": ">= 1",
              "accum_iter": ">= 1", "global_batch": ">= 0", "paper_batch": ">= 0", "blr": "> 0",
              "min_lr": ">= 0", "warmup_epochs": ">= 0", "weight_decay": ">= 0",
              "clip_grad": ">= 0", "steps_per_epoch": ">= 0", "workers": ">= 0", "seed": ">= 0",
              "log_every": ">= 1", "stop_after": ">= 0", "viz_every": ">= 0"}
    # a flag given on the command line that the objective, tokenizer or arch ignores is an error
    ONLY_WITH = {**{k: ("objective", ("respix",))
                    for k in ("respix_window", "respix_eps", "respix_l1")},
                 **{k: ("train_tokenizer", (True,))
                    for k in ("tok_vocab", "tok_hid", "tok_blocks", "tok_epochs", "tok_lr",
                              "tok_kl")},
                 **{k: ("arch", ("vit_tiny", "vit_base"))
                    for k in ("depth", "pos_embed", "init_values", "init", "gen_share_blocks")}}

# ----------------------------------------------------------------------------- losses


def mim_loss(logits, ids, mask):
    """L_gen, BEiT's objective: cross-entropy of logits (B, N, V) vs the tokenizer's ids (B, N) at
    the masked positions."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(), reduction="none")
    ce = ce.view_as(mask)
    return (ce * mask).sum() / mask.sum().clamp(min=1)


def respix_loss(pred, target, l1_weight):
    """L_enh of ResPix: regress the (window-normalised) original at ALL pixels (Sec. 1).
    pred, target (B, 3, H, W)."""
    d = pred.float() - target
    return l1_weight * d.abs().mean() + (1 - l1_weight) * (d * d).mean()


def revdet_loss(logits, replaced):
    """L_enh of RevDet: per-token binary cross-entropy, replaced or not (Sec. 1, after ELECTRA).
    Both (B, N)."""
    return F.binary_cross_entropy_with_logits(logits.float(), replaced.float())

# ---------------------------------------------------------------------------- corruption (Sec. 2.1)


def random_mask(B, N, ratio, device):
    """Uniform random masking ("randomly selected", abstract): (B, N) bool, True = masked,
    round(N x ratio) per row."""
    return torch.rand(B, N, device=device).argsort(1).argsort(1) < int(round(N * ratio))


def sample_tokens(logits, temperature):
    """One exact sample per position from softmax(logits / t), the Gumbel-max trick.
    (B, N, V) -> (B, N) long."""
    u = torch.rand(logits.shape, device=logits.device).clamp_(min=1e-20)
    return (logits.float() / temperature - torch.log(-torch.log(u))).argmax(-1)


def corrupt_tokens(ids, mask, sampled):
    """Masked positions take the sample, the others keep the tokenizer's id (Sec. 1); the RevDet
    label: the final id differs from the original."""
    corrupt_ids = torch.where(mask, sampled, ids)                              # (B, N)
    return corrupt_ids, corrupt_ids != ids


def window_norm(x, k, eps=0.01):
    """The ResPix target: x normalised by the mean and std of its k x k window (reflect padding;
    eps: docs) -> target, mean, std."""
    xp = F.pad(x.float(), (k // 2, (k - 1) // 2, k // 2, (k - 1) // 2), mode="reflect")
    mean = F.avg_pool2d(xp, k, stride=1)
    std = (F.avg_pool2d(xp * xp, k, stride=1) - mean * mean).clamp(min=0).add(eps).sqrt()
    return (x - mean) / std, mean, std


def resize(x, size, mode="bicubic"):
    """(B, C, H, W) -> (B, C, size, size), antialiased when shrinking."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, (size, size), mode=mode, antialias=mode != "nearest")


def tok_size(cfg):
    """The tokenizer's view side: its 8x smaller grid is the patch grid (14 tokens -> 112 px)."""
    return 8 * (cfg.img_size // cfg.patch_size)

# ----------------------------------------------------------------------------- model


class CIM(nn.Module):
    """Generator (a small BEiT + lm head) and enhancer (ViT or ResNet-50 + a per-token head).
    forward(images, lam, temperature) -> (loss, logs)."""

    def __init__(self, cfg, tokenizer):
        super().__init__()
        # frozen, not a submodule: out of the state dict, the optimizer and DDP
        object.__setattr__(self, "tokenizer", tokenizer)
        self.cfg = cfg
        self.grid = cfg.img_size // cfg.patch_size
        self.tok_size = tok_size(cfg)
        if cfg.arch == "resnet50":
            # its stride-16 map is the token grid, so it sees 16 x grid px (224 at patch 16)
            self.enhancer = torchvision.models.resnet50()
            D = 512
            self.enh_size = 16 * self.grid
            # the torchvision layout without fc.*: what finetune.py loads
            self.enhancer.fc = nn.Identity()
            lateral = {"lat3": nn.Conv2d(1024, D, 1), "lat4": nn.Conv2d(2048, D, 1)}
            self.enhancer_neck = nn.ModuleDict(lateral)
            self.encoder_args = {"arch": "resnet50"}
        else:
            D, depth, heads = VIT_SIZES[cfg.arch]
            kw = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=D,
                      depth=cfg.depth or depth, num_heads=heads, pos_embed=cfg.pos_embed,
                      init_values=cfg.init_values or None)
            self.enhancer = VisionTransformer(**kw, drop_path=cfg.drop_path)
            self.enh_size = cfg.img_size
            if cfg.init == "xavier":
                # MAE's init replaces BEiT's; the biases stay 0
                for m in self.enhancer.modules():
                    if isinstance(m, (nn.Linear, nn.Conv2d)):
                        nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            # what finetune.py builds
            self.encoder_args = {"arch": "vit", **kw, "rel_pos": "shared"}
        # pixels per token side
        self.P = self.enh_size // self.grid
        out = 3 * self.P ** 2 if cfg.objective == "respix" else 1
        self.enhancer_head = nn.Linear(D, out)                                 # per token
        Dg = cfg.gen_dim or (D if cfg.arch != "resnet50" else 768)
        self.generator = VisionTransformer(cfg.img_size, cfg.patch_size, Dg, cfg.gen_depth,
                                           Dg // 64, cfg.pos_embed, cfg.init_values or None,
                                           cfg.drop_path)
        # weight-decayed, as in BEiT
        self.generator_mask_token = nn.Parameter(torch.zeros(1, 1, Dg))
        self.generator_head = nn.Linear(Dg, tokenizer.vocab_size)             # BEiT's lm_head
        # the small BEiT is initialised as BEiT
        beit_init(self.generator, self.generator_mask_token, self.generator_head)
        # shared blocks are the same module objects: one set of weights, trained by both losses
        for i in range(cfg.gen_share_blocks):
            self.generator.patch_embed = self.enhancer.patch_embed
            self.generator.blocks[i] = self.enhancer.blocks[i]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def param_sets(self):
        """(generator, enhancer) parameters, clipped separately; a shared block counts as the
        enhancer's (named_parameters lists a shared parameter once, under its enhancer name)."""
        named = list(self.named_parameters())
        generator = [p for n, p in named if not n.startswith("enhancer")]
        enhancer = [p for n, p in named if n.startswith("enhancer")]
        return generator, enhancer

    def normalize(self, x01):
        return (x01 - self.mean) / self.std

    def corrupt(self, x01, temperature):
        """Sec. 2.1: tokenize, mask, the generator predicts, sample replacements, decode the mixed
        grid -> dict."""
        B = x01.shape[0]
        g = self.grid
        dev = x01.device
        # the frozen dVAE, in float32; its ids are the "golden" tokens
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):
            view = resize(x01.float(), self.tok_size).clamp(0, 1)
            ids = self.tokenizer.encode(view).flatten(1)                       # (B, N)
        # (B, N) True = masked
        mask = random_mask(B, g * g, self.cfg.mask_ratio, dev)
        x = self.generator.patchify(self.normalize(x01))                      # (B, N, Dg)
        # BEiT's [MASK] input
        x = torch.where(mask[..., None], self.generator_mask_token.to(x.dtype), x)
        logits = self.generator_head(self.generator.forward_tokens(x)[:, 1:])  # (B, N, V)
        # sampling: no gradient reaches the generator
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):
            sampled = sample_tokens(logits, temperature)
            corrupt_ids, replaced = corrupt_tokens(ids, mask, sampled)
            corrupted = self.tokenizer.decode(corrupt_ids.view(B, g, g))      # (B, 3, 8g, 8g)
            corrupted = resize(corrupted, self.enh_size).clamp(0, 1)          # (B, 3, S, S)
        return dict(ids=ids, mask=mask, logits=logits, corrupt_ids=corrupt_ids, replaced=replaced,
                    corrupted=corrupted)

    def enhance(self, corrupted):
        """Enhancer + per-token head: (B, 3, S, S) in [0, 1] -> (B, N, 3 P^2) for ResPix or
        (B, N, 1) for RevDet."""
        x = self.normalize(corrupted)
        if self.cfg.arch != "resnet50":
            return self.enhancer_head(self.enhancer(x)[:, 1:])                # one row per patch
        r = self.enhancer
        neck = self.enhancer_neck
        x = x.contiguous(memory_format=torch.channels_last)
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        c4 = r.layer3(r.layer2(r.layer1(x)))                                  # (B, 1024, g, g)
        c5 = r.layer4(c4)                                                     # (B, 2048, g/2, g/2)
        f = neck.lat3(c4) + F.interpolate(neck.lat4(c5), size=c4.shape[-2:], mode="nearest")
        # layer4 feeds the head too, so it is pre-trained
        return self.enhancer_head(f.flatten(2).transpose(1, 2))               # (B, N, out)

    # (B, N, 3 P^2) -> (B, 3, S, S)
    def unpatchify(self, out):
        B = out.shape[0]
        g = self.grid
        P = self.P
        return out.view(B, g, g, P, P, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, g * P, g * P)

    def forward(self, images, lam, temperature):
        """images: (B, 3, H, W) uint8 crops from the loader, or floats in [0, 1] -> (loss, logs)."""
        x01 = augment(images) if images.dtype == torch.uint8 else images
        c = self.corrupt(x01, temperature)
        loss_gen = mim_loss(c["logits"], c["ids"], c["mask"])
        out = self.enhance(c["corrupted"])
        if self.cfg.objective == "respix":
            with torch.no_grad():
                original = self.normalize(resize(x01, self.enh_size))
                target = window_norm(original, self.cfg.respix_window, self.cfg.respix_eps)[0]
            loss_enh = respix_loss(self.unpatchify(out.float()), target, self.cfg.respix_l1)
        else:
            loss_enh = revdet_loss(out[..., 0], c["replaced"])
        hits = (c["logits"].detach().argmax(-1) == c["ids"]) & c["mask"]
        acc = hits.sum() / c["mask"].sum().clamp(min=1)
        logs = dict(loss_gen=loss_gen.detach(), loss_enh=loss_enh.detach(), gen_acc=acc,
                    replaced=c["replaced"].float().mean())
        if self.cfg.objective == "revdet":
            # RevDet's pretext solved: the share of tokens classified right
            logs["det_acc"] = ((out[..., 0].detach() > 0) == c["replaced"]).float().mean()
        return loss_gen + lam * loss_enh, logs

# ----------------------------------------------------------------------------- data


def input_transform(cfg):
    """The loader's work: decode, one random resized crop (bicubic) + flip -> uint8 crop; the colour
    jitter happens batched on the device (augment)."""
    return CropFlip(cfg.img_size, (cfg.crop_min_scale, 1.0))


def augment(images):
    """uint8 crops (B, 3, S, S) -> [0, 1] floats with ColorJitter(0.4, 0.4, 0.4), each image its
    own draws: the jitter of BEiT's first public code as this file uses it, after the crop
    (docs)."""
    return color_jitter(images.float() / 255, 0.4, 0.4, 0.4, 0.0)

# ----------------------------------------------------------------------------- training


def train_tokenizer(cfg, world, rank, device, path):
    """DALL-E's dVAE recipe in small on the pre-training tokenizer view (Gumbel tau 1 -> 1/16), then
    the frozen tokenizer file `path`. Resumable: OUT/tokenizer_checkpoint.pth (Run, prefix
    tokenizer_)."""
    tok = new_tokenizer(cfg, tok_size(cfg)).to(device)
    decode = decode_mode(cfg.decode)
    dataset = build_dataset(cfg.data, "pretrain", input_transform(cfg), cfg.img_size, decode=decode)
    loader = build_loader(dataset, cfg.batch_size, world, rank, cfg.seed, cfg.workers, device)
    spe = epoch_steps(loader, 1, cfg.steps_per_epoch)
    total = cfg.tok_epochs * spe
    model = nn.parallel.DistributedDataParallel(tok) if world > 1 else tok
    opt = torch.optim.AdamW(tok.parameters(), lr=cfg.tok_lr, weight_decay=0.0,
                            fused=device.type == "cuda")
    lrs = cosine_schedule(cfg.tok_lr, cfg.tok_lr / 10, total, spe)
    taus = cosine_schedule(1.0, 1 / 16, total)
    # float32; a disabled scaler keeps Run's checkpoint format
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    derived = {"global_batch": cfg.batch_size * world, "steps_per_epoch": spe,
               "images": len(dataset)}
    run = Run(cfg, __file__, tok, opt, scaler, loader, spe, 1, derived, cfg.tok_epochs,
              prefix="tokenizer_")
    run.resume()
    for it, batches in run.steps():
        opt.param_groups[0]["lr"] = lrs[it]
        for _, (images, _) in batches:
            x = resize(augment(images_to(images, device)), tok_size(cfg)).clamp(0, 1)
            loss, logs = model(x, taus[it], cfg.tok_kl)
            loss.backward()
            run.add(loss=loss, **logs)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if run.end_step(it, lrs[it]):
            state = {"model": tok.state_dict(), "optimizer": opt.state_dict(),
                     "scaler": scaler.state_dict()}
            run.save(state, check=lambda: tok(x, taus[it], cfg.tok_kl)[0])
    if run.stopping:
        raise SystemExit(0)
    error = save_checkpoint(tok.state(), path) if rank == 0 else None
    # the other ranks load the file next
    fail_all(error is None, error)


def checkpoint(cfg, raw_model, opt, scaler):
    """What OUT/checkpoint.pth holds besides Run's bookkeeping: everything to resume, and the
    enhancer as finetune.py loads it (torchvision keys without fc.*, or timm's beit_* keys); BEiT's
    fine-tuning pools by mean."""
    layout = dict if cfg.arch == "resnet50" else to_timm_layout
    encoders = {"enhancer": layout(raw_model.enhancer.state_dict())}
    return {"model": raw_model.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(), "encoders": encoders, "default_encoder": "enhancer",
            "encoder_args": raw_model.encoder_args, "pool": "mean"}


@torch.no_grad()
def optimizer_step(raw_model, opt, scaler, clip_grad):
    """Clip the generator and the enhancer each on its own, step; fp16's GradScaler skips a step
    with inf/NaN gradients. There is no EMA network: the generator is trained, not averaged."""
    if clip_grad > 0:
        scaler.unscale_(opt)
        for params in raw_model.param_sets():
            nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def main(cfg):
    validate(cfg)
    rank, world, device = setup_dist(cfg.device)
    seed_all(cfg.seed + rank)
    # TF32 also for the fp32 dVAE
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    amp_dtype = amp_dtype if device.type == "cuda" else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    accum = accum_steps(cfg, world)
    global_batch = cfg.batch_size * world * accum
    if cfg.train_tokenizer:
        # METHOD: our own dVAE where DALL-E's is not available
        path = os.path.join(cfg.out, "tokenizer.pth")
        if not os.path.isfile(path):
            train_tokenizer(cfg, world, rank, device, path)
        cfg.tokenizer = path
        if cfg.epochs == 0:
            return
    # METHOD: the frozen tokenizer; file errors stop the run here
    tokenizer = load_tokenizer(cfg).to(device)
    # the loader workers hand over decoded crops, or JPEG bytes to decode on the device
    decode = decode_mode(cfg.decode)
    dataset = build_dataset(cfg.data, "pretrain", input_transform(cfg), cfg.img_size, decode=decode)
    loader = build_loader(dataset, cfg.batch_size, world, rank, cfg.seed, cfg.workers, device)
    steps_per_epoch = epoch_steps(loader, accum, cfg.steps_per_epoch)
    total_steps = cfg.epochs * steps_per_epoch

    # raw_model: saved and checked; model: maybe compiled and DDP-wrapped
    memory_format = torch.channels_last if cfg.arch == "resnet50" else None
    raw_model = CIM(cfg, tokenizer).to(device, memory_format=memory_format)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    lr = cfg.blr * global_batch / 256
    print0(recipe_line(cfg, world, accum, lr, steps_per_epoch, amp_dtype, raw_model.grid))
    batch_warning(global_batch, cfg.paper_batch, steps_per_epoch)
    opt = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=lr, betas=(0.9, 0.999),
                            fused=device.type == "cuda")
    # BEiT's scheduler: the warmup ends exactly at the peak
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    lr_sched = cosine_schedule(lr, cfg.min_lr, total_steps, warmup_steps, warmup_endpoint=True)
    derived = {"global_batch": global_batch, "steps_per_epoch": steps_per_epoch,
               "images": len(dataset)}
    run = Run(cfg, __file__, raw_model, opt, scaler, loader, steps_per_epoch, accum, derived)
    run.resume()
    if cfg.trust_pickle and not cfg.tokenizer and rank == 0:
        # later runs can pass --tokenizer OUT/tokenizer.pth: no pickle
        error = save_checkpoint(tokenizer.state(), os.path.join(cfg.out, "tokenizer.pth"))
        if error:
            fail(error)

    for it, batches in run.steps():
        for g in opt.param_groups:
            g["lr"] = lr_sched[it]
        for last, (images, _) in batches:
            images = images_to(images, device)                                # (B, 3, S, S) uint8
            with no_sync(model, last):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    # METHOD: corrupt, enhance, L_gen + lam L_enh
                    loss, logs = model(images, cfg.lam, cfg.sample_temperature)
                scaler.scale(loss / accum).backward()
            run.add(loss=loss, **logs)
        # METHOD: clip generator and enhancer each on its own, step
        optimizer_step(raw_model, opt, scaler, cfg.clip_grad)
        if run.end_step(it, lr_sched[it]):
            run.save(checkpoint(cfg, raw_model, opt, scaler),
                     check=lambda: raw_model(images, cfg.lam, cfg.sample_temperature)[0])
            if cfg.viz_every and (run.epoch + 1) % cfg.viz_every == 0 and rank == 0:
                path = os.path.join(cfg.out, f"viz_epoch{run.epoch}.png")
                visualize(raw_model, images, path)

# ----------------------------------------------------------------------------- presets
# The paper rows as given to this project (the text it holds does not state them: docs), and the
# CPU presets.


_TINY = dict(arch="vit_tiny", img_size=32, patch_size=4, batch_size=8, device="cpu", workers=0,
             epochs=1, log_every=1, warmup_epochs=0, drop_path=0.0, blr=1.5e-2, gen_depth=2,
             gen_dim=192, tokenizer="random", tok_vocab=512, tok_hid=64, tok_blocks=1,
             respix_window=4)
_PAPER = dict(epochs=300, global_batch=2048, paper_batch=2048)
Config.PRESETS = {
    "vit_base_300ep": dict(_PAPER, arch="vit_base",
                           paper_row="ViT-B/16 300 ep -> 83.3 top-1 (not in our text)"),
    "resnet50_300ep": dict(_PAPER, arch="resnet50",
                           paper_row="ResNet-50 300 ep -> 80.6 top-1 (not in our text)"),
    # CPU smoke run: a random dVAE, corrupted images are noise
    "tiny": _TINY,
    # CPU learning runs (benchmarks/learning.py): trains its own small dVAE first
    "small32": dict(_TINY, tokenizer="", train_tokenizer=True, tok_hid=16, tok_epochs=4,
                    tok_lr=3e-3, crop_min_scale=0.5, respix_window=16, batch_size=32, epochs=12,
                    warmup_epochs=1, log_every=10, workers=2, blr=8e-3, init="xavier",
                    init_values=0.0),
}

# -------------------------------------------------------------- appendix: ViT (generator, enhancer)
# BEiT's pre-training ViT: one relative-position bias shared by all blocks, layer scale, qkv bias;
# parameter names follow timm's vit_*, to_timm_layout gives timm's beit_*.

VIT_SIZES = {"vit_tiny": (192, 12, 3), "vit_base": (768, 12, 12)}     # name: (width, depth, heads)


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

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    # x (B, T, D), bias (heads, T, T)
    def forward(self, x, bias):
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                           # 3 x (B, heads, T, hd)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class LayerScale(nn.Module):

    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: attention with the shared relative bias, MLP, layer scale, drop
    path (a sample's residual branch dropped)."""

    def __init__(self, dim, num_heads, init_values=None, drop_path=0.0):
        super().__init__()
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, 4 * dim), act=nn.GELU(),
                                             fc2=nn.Linear(4 * dim, dim)))
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x, bias):                                        # (B, T, D) -> (B, T, D)
        a = self.ls1(self.attn(self.norm1(x), bias))
        x = x + stochastic_depth(a, self.drop_path, "row", self.training)
        m = self.ls2(self.mlp(self.norm2(x)))
        return x + stochastic_depth(m, self.drop_path, "row", self.training)


class VisionTransformer(nn.Module):
    """The enhancer's and the generator's ViT. forward(images) -> (B, 1+N, D), cls first."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 pos_embed="none", init_values=None, drop_path=0.0):
        super().__init__()
        self.patch_size = patch_size
        self.grid = (img_size // patch_size,) * 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = None
        if pos_embed == "learned":
            tokens = 1 + self.grid[0] * self.grid[1]
            self.pos_embed = nn.Parameter(torch.zeros(1, tokens, embed_dim))
        # BEiT's pre-training: one table for all blocks
        self.rel_pos_bias = RelPosBias(self.grid, num_heads)
        # stochastic depth rate grows linearly with depth
        dpr = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, init_values, dpr[i])
                                     for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        beit_init(self)

    def patchify(self, images):                                        # (B, 3, H, W) -> (B, N, D)
        return self.patch_embed.proj(images).flatten(2).transpose(1, 2)

    def forward_tokens(self, x):
        """x (B, N, D) patch embeddings, maybe with mask tokens -> (B, 1+N, D)."""
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)   # (B, 1+N, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        bias = self.rel_pos_bias()                                             # (heads, 1+N, 1+N)
        for blk in self.blocks:
            x = blk(x, bias)
        return self.norm(x)

    def forward(self, images):
        return self.forward_tokens(self.patchify(images))


def beit_init(vit, mask_token=None, head=None):
    """BEiT's init: truncated-normal weights (std 0.02, cut at +-0.02), zero biases, unit
    LayerNorms, then attn.proj and mlp.fc2 of block l divided by sqrt(2 l)."""
    for m in [*vit.modules(), *([head] if head is not None else [])]:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for t in [t for t in (vit.cls_token, vit.pos_embed, mask_token) if t is not None]:
        nn.init.trunc_normal_(t, std=0.02, a=-0.02, b=0.02)
    for layer, blk in enumerate(vit.blocks, start=1):
        blk.attn.proj.weight.data.div_(math.sqrt(2 * layer))
        blk.mlp.fc2.weight.data.div_(math.sqrt(2 * layer))


def to_timm_layout(sd):
    """Enhancer keys -> timm's beit_* layout: the shared table copied into every block, qkv.bias
    split into q_bias / v_bias (the k bias dropped: softmax ignores a per-query constant),
    ls{1,2}.gamma -> gamma_{1,2}."""
    sd = dict(sd)
    table = sd.pop("rel_pos_bias.relative_position_bias_table")
    for k in [k for k in sd if k.startswith("blocks.")]:
        b = k[:k.index(".", 7) + 1]                                            # "blocks.{i}."
        v = sd.pop(k)
        if k.endswith("attn.qkv.bias"):
            sd[b + "attn.q_bias"], _, sd[b + "attn.v_bias"] = v.chunk(3)
        else:
            sd[k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2")] = v
        if k.endswith("norm1.weight"):
            sd[b + "attn.relative_position_bias_table"] = table.clone()
    return sd

# --------------------------------------------------------- appendix: dVAE tokenizer (DALL-E layout)


# DALL-E's logit_laplace_eps: pixels live in [0.1, 0.9], so the logit-Laplace likelihood is finite
EPS = 0.1


def map_pixels(x):
    """[0, 1] -> [0.1, 0.9] (dall_e.map_pixels)."""
    return (1 - 2 * EPS) * x + EPS


def unmap_pixels(x):
    """The inverse, clamped to [0, 1] (dall_e.unmap_pixels)."""
    return ((x - EPS) / (1 - 2 * EPS)).clamp(0, 1)


class Conv(nn.Module):
    """dall_e.utils.Conv2d: .w (out, in, k, k), .b, 'same' padding; always float32 (dall_e runs
    fp16 on CUDA)."""

    def __init__(self, n_in, n_out, k):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, k, k) / math.sqrt(n_in * k * k))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=(self.w.shape[-1] - 1) // 2)


class DVAEBlock(nn.Module):
    """dall_e's EncoderBlock (kernels 3, 3, 3, 1) / DecoderBlock (1, 3, 3, 3):
    id_path + post_gain x res_path (relu-conv x 4)."""

    def __init__(self, n_in, n_out, n_layers, kernels):
        super().__init__()
        ch = [n_in, n_out // 4, n_out // 4, n_out // 4, n_out]
        self.id_path = Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        layers = []
        for i, k in enumerate(kernels):
            layers.append((f"relu_{i + 1}", nn.ReLU()))
            layers.append((f"conv_{i + 1}", Conv(ch[i], ch[i + 1], k)))
        self.res_path = nn.Sequential(OrderedDict(layers))
        self.post_gain = 1 / n_layers ** 2

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


def dvae_blocks(c_in, c_first, k_in, widths, n_blk, kernels, resample, c_out):
    """DALL-E's keys: blocks.input, blocks.group_{1..4}.block_{i} (+ pool / upsample after groups
    1-3), blocks.output."""
    layers = [("input", Conv(c_in, c_first, k_in))]
    prev = c_first
    for g, width in enumerate(widths):
        group = [(f"block_{i + 1}", DVAEBlock(prev if i == 0 else width, width, 4 * n_blk, kernels))
                 for i in range(n_blk)]
        if g < 3:
            group.append(resample())
        layers.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        prev = width
    out = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv(prev, c_out, 1)))
    return nn.Sequential(OrderedDict(layers + [("output", out)]))


def dvae_encoder(n_hid=256, n_blk_per_group=2, vocab_size=8192, input_channels=3):
    """dall_e.Encoder: map_pixels'd (B, 3, H, W) float32 -> logits (B, V, H/8, W/8)."""
    widths = [n_hid * m for m in (1, 2, 4, 8)]
    blocks = dvae_blocks(input_channels, n_hid, 7, widths, n_blk_per_group, (3, 3, 3, 1),
                         lambda: ("pool", nn.MaxPool2d(2)), vocab_size)
    return nn.Sequential(OrderedDict(blocks=blocks))


class DVAEDecoder(nn.Module):
    """dall_e.Decoder: one-hot / probabilities (B, V, h, w) or ids (B, h, w) -> (B, 6, 8h, 8w)."""

    def __init__(self, n_init=128, n_hid=256, n_blk_per_group=2, vocab_size=8192,
                 output_channels=3):
        super().__init__()
        widths = [n_hid * m for m in (8, 4, 2, 1)]
        self.blocks = dvae_blocks(vocab_size, n_init, 1, widths, n_blk_per_group, (1, 3, 3, 3),
                                  lambda: ("upsample", nn.Upsample(scale_factor=2, mode="nearest")),
                                  2 * output_channels)

    def forward(self, z):
        if z.dtype == torch.long:
            # a 1x1 conv of a one-hot is a column lookup: no (B, V, h, w) tensor is built
            w = self.blocks.input.w[:, :, 0, 0].t()
            x = (w[z] + self.blocks.input.b).permute(0, 3, 1, 2)              # (B, n_init, h, w)
        else:
            x = self.blocks.input(z.float())
        # channels 0-2: logit-Laplace means, 3-5: log-scales
        return self.blocks[1:](x)


class Tokenizer(nn.Module):
    """Frozen dVAE: encode [0, 1] images -> ids (argmax, 8x smaller); decode ids or probabilities
    -> [0, 1] (as BEiT does)."""

    def __init__(self, enc_args, dec_args, size=0):
        super().__init__()
        self.encoder = dvae_encoder(**enc_args)
        self.decoder = DVAEDecoder(**dec_args)
        self.args = {"encoder": enc_args, "decoder": dec_args, "size": size}
        self.vocab_size = dec_args["vocab_size"]

    # (B, 3, S, S) -> (B, S/8, S/8)
    def encode(self, x01):
        return self.encoder(map_pixels(x01)).argmax(1)

    # ids (B, h, w) or (B, V, h, w) -> (B, 3, 8h, 8w)
    def decode(self, z):
        return unmap_pixels(torch.sigmoid(self.decoder(z)[:, :3]))

    def forward(self, x01, tau, kl_weight):
        """dVAE training (DALL-E): a Gumbel-softmax code; the logit-Laplace NLL of map_pixels(x)
        plus kl_weight x KL(q || uniform)."""
        logits = self.encoder(map_pixels(x01))                                # (B, V, h, w)
        stats = self.decoder(F.gumbel_softmax(logits, tau=tau, dim=1))        # (B, 6, 8h, 8w)
        y = map_pixels(x01)
        mu = stats[:, :3]
        log_b = stats[:, 3:].clamp(-7, 7)
        nll = math.log(2) + log_b + torch.log(y * (1 - y))
        nll = (nll + (torch.logit(y) - mu).abs() / log_b.exp()).mean()
        logq = F.log_softmax(logits, dim=1)
        kl = (logq.exp() * (logq + math.log(logits.shape[1]))).sum(1).mean()
        mse = ((unmap_pixels(torch.sigmoid(mu)) - x01) ** 2).mean().detach()
        return nll + kl_weight * kl, {"nll": nll.detach(), "kl": kl.detach(), "mse": mse}

    def state(self):
        """The plain, pickle-free tokenizer file."""
        return {"encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict(),
                "args": self.args}


def new_tokenizer(cfg, size=0):
    a = dict(n_hid=cfg.tok_hid, n_blk_per_group=cfg.tok_blocks, vocab_size=cfg.tok_vocab)
    return Tokenizer(a, dict(a, n_init=128), size)


def read_dvae_file(path, trust_pickle):
    """A plain state dict or tokenizer file (weights_only), or with --trust-pickle a pickled
    dall_e module."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError:
        fail(f"{path} is not a plain weights file (a pickled module such as DALL-E's encoder.pkl, "
             "or not a checkpoint at all). Unpickling runs code from the file: pass --trust-pickle "
             "if you trust its source")
    except ModuleNotFoundError as e:
        # DALL-E's .pkl files are dall_e modules
        fail(f"{path} is a pickled module that needs the Python package '{e.name}' (DALL-E's "
             "files: pip install --no-deps DALL-E attrs)")
    except Exception as e:
        # empty, truncated, not a torch file
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        fail(f"cannot read tokenizer file {path} ({reason}); pass a complete file")
    return obj.state_dict() if isinstance(obj, nn.Module) else obj


def dvae_args(sd, kind, path):
    """The architecture of a DALL-E-layout state dict, read from its shapes (the encoder's input
    conv is 7x7, the decoder's 1x1)."""
    if not isinstance(sd, dict) or "blocks.input.w" not in sd or "blocks.output.conv.w" not in sd:
        fail(f"{path}: not a DALL-E-layout dVAE {kind} (no blocks.input.w / blocks.output.conv.w)")
    w_in = sd["blocks.input.w"]
    w_out = sd["blocks.output.conv.w"]
    if w_in.shape[-1] != (7 if kind == "encoder" else 1):
        fail(f"{path}: expected a dVAE {kind} but found the other half (input conv "
             f"{tuple(w_in.shape)})")
    n_blk = len({k.split(".")[2] for k in sd if k.startswith("blocks.group_1.block_")})
    if kind == "encoder":
        return dict(n_hid=w_in.shape[0], n_blk_per_group=n_blk, vocab_size=w_out.shape[0],
                    input_channels=w_in.shape[1])
    return dict(n_init=w_in.shape[0], n_hid=w_out.shape[1], n_blk_per_group=n_blk,
                vocab_size=w_in.shape[1], output_channels=w_out.shape[0] // 2)


def load_tokenizer(cfg):
    """--tokenizer random | PATH, or --dvae-encoder + --dvae-decoder -> the frozen Tokenizer; any
    mismatch is one error line."""
    if cfg.tokenizer == "random":
        print0("WARNING: --tokenizer random: an untrained dVAE, corrupted images are noise. "
               "Smoke tests only!")
        return new_tokenizer(cfg).eval().requires_grad_(False)
    if cfg.tokenizer:
        ck = read_dvae_file(cfg.tokenizer, cfg.trust_pickle)
        if not isinstance(ck, dict) or not {"encoder", "decoder"} <= set(ck):
            fail(f"--tokenizer {cfg.tokenizer}: expected a dict with 'encoder' and 'decoder' state "
                 "dicts")
        sds = (ck["encoder"], ck["decoder"])
        paths = (cfg.tokenizer,) * 2
        size = ck.get("args", {}).get("size", 0)
    else:
        paths = (cfg.dvae_encoder, cfg.dvae_decoder)
        size = 0
        sds = [read_dvae_file(p, cfg.trust_pickle) for p in paths]
    ea = dvae_args(sds[0], "encoder", paths[0])
    da = dvae_args(sds[1], "decoder", paths[1])
    channels = (ea["input_channels"], da["output_channels"])
    if ea["vocab_size"] != da["vocab_size"] or channels != (3, 3):
        fail(f"tokenizer mismatch: encoder {ea} vs decoder {da} (need one vocabulary, 3 -> 6 "
             "channels)")
    tok = Tokenizer(ea, da, size)
    for part, sd, p in ((tok.encoder, sds[0], paths[0]), (tok.decoder, sds[1], paths[1])):
        try:
            part.load_state_dict(sd)
        except RuntimeError as e:
            fail(f"{p} does not match the DALL-E dVAE layout: {' '.join(str(e).split())[:400]}")
    # our own dVAEs record their view size; DALL-E's (trained at 256 px) do not
    if size and size != tok_size(cfg):
        side = tok_size(cfg) // 8
        fail(f"tokenizer grid {size // 8}x{size // 8} (trained on {size}px views) does not match "
             f"the patch grid {side}x{side} (--img-size / --patch-size): retrain it or change the "
             "sizes")
    return tok.eval().requires_grad_(False)

# ------------------------------------------------------------------ appendix: visualisation, checks


@torch.no_grad()
def visualize(m, images, path):
    """Columns: original | dVAE reconstruction | corrupted | replaced | ResPix output (window
    statistics undone) or RevDet probability. Eval mode here; the next epoch calls train() again."""
    x01 = images[:8].float() / 255
    g = m.grid
    B = x01.shape[0]
    c = m.eval().corrupt(x01, m.cfg.sample_temperature)
    out = m.enhance(c["corrupted"]).float()
    if m.cfg.objective == "respix":
        original = m.normalize(resize(x01, m.enh_size))
        _, mean, std = window_norm(original, m.cfg.respix_window, m.cfg.respix_eps)
        pred = (m.unpatchify(out) * std + mean) * m.std + m.mean
    else:
        pred = torch.sigmoid(out[..., 0]).view(B, 1, g, g).expand(-1, 3, -1, -1)
    recon = m.tokenizer.decode(c["ids"].view(B, g, g))
    replaced = c["replaced"].float().view(B, 1, g, g).expand(-1, 3, -1, -1)
    panels = []
    for p in (x01, recon, c["corrupted"], replaced, pred):
        mode = "nearest" if p.shape[-1] == g else "bicubic"
        panels.append(resize(p.float(), m.cfg.img_size, mode).clamp(0, 1))
    save_image(torch.stack(panels, 1).flatten(0, 1), path, nrow=5)


def recipe_line(cfg, world, accum, lr, steps_per_epoch, amp_dtype, grid):
    """The one line that says which recipe this run is."""
    G = cfg.batch_size * world * accum
    precision = cfg.amp if amp_dtype else "fp32"
    row = f" | paper row: {cfg.paper_row}" if cfg.paper_row else ""
    return (f"recipe: {cfg.preset or 'defaults'} | global batch {G} = {cfg.batch_size} per GPU x "
            f"{world} GPUs x {accum} accum | peak lr {lr:.2e} = blr {cfg.blr} x {G} / 256 | "
            f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs | no EMA | mask "
            f"{cfg.mask_ratio:g} random of {grid}^2 tokens | {cfg.objective}, lam {cfg.lam:g} | "
            f"{precision}{row}")


def validate(cfg):
    """Cross-flag rules and missing files (each flag's own range is Config.RANGES): one clear error
    before any data, model or tokenizer is loaded."""
    check_ranges(cfg)
    if cfg.img_size % cfg.patch_size:
        fail(f"--img-size {cfg.img_size} is not a multiple of --patch-size {cfg.patch_size}")
    if cfg.respix_window > min(cfg.img_size, 16 * (cfg.img_size // cfg.patch_size)) // 2:
        fail(f"--respix-window {cfg.respix_window}: must be between 1 and half the image side")
    if cfg.epochs == 0 and not cfg.train_tokenizer:
        fail("--epochs 0 trains nothing; it is for --train-tokenizer (train the dVAE only)")
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs > 0:
        fail(f"--warmup-epochs {cfg.warmup_epochs} >= --epochs {cfg.epochs}: the lr never reaches "
             "its peak")
    D, depth = VIT_SIZES.get(cfg.arch, (768, 0))[:2]
    Dg = cfg.gen_dim or D
    K = cfg.gen_share_blocks
    if Dg % 64 or K and (not depth or Dg != D or K > min(cfg.gen_depth, cfg.depth or depth)):
        fail("--gen-dim must be a multiple of 64 (heads of width 64); --gen-share-blocks K needs a "
             "ViT enhancer of the generator's width and K <= both depths")
    if cfg.tokenizer == "random" and (cfg.train_tokenizer or cfg.dvae_encoder or cfg.dvae_decoder):
        # a preset's smoke-test default gives way to a real tokenizer
        cfg.tokenizer = ""
    given = [bool(cfg.tokenizer), bool(cfg.dvae_encoder and cfg.dvae_decoder), cfg.train_tokenizer]
    if sum(given) != 1 or bool(cfg.dvae_encoder) != bool(cfg.dvae_decoder):
        fail("give exactly one tokenizer: --tokenizer PATH (from --train-tokenizer), "
             "--dvae-encoder E --dvae-decoder D (both; DALL-E's need --trust-pickle), "
             "--train-tokenizer, or --tokenizer random (smoke tests only)")
    tokenizer_file = "" if cfg.tokenizer == "random" else cfg.tokenizer
    for p in (cfg.dvae_encoder, cfg.dvae_decoder, tokenizer_file):
        if p and not os.path.isfile(p):
            fail(f"tokenizer file {p} does not exist")


if __name__ == "__main__":
    main(parse_config(Config))
