"""
finetune.py - evaluate any method's pre-trained encoder: full fine-tuning, linear probe, or kNN.
Loads `encoders[--from]` from a checkpoint written by conmim.py, cim_correlate.py or cim_corrupt.py (ViT in timm
key layout, or torchvision ResNet-50), or a randomly initialised encoder (`--pretrained random`) as a baseline.

    python finetune.py --pretrained out/conmim/checkpoint.pth --data /imagenet --mode finetune   # BEiT/MAE recipe
    python finetune.py --pretrained out/conmim/checkpoint.pth --data /imagenet --mode linear     # frozen, linear head
    python finetune.py --pretrained out/conmim/checkpoint.pth --data /imagenet --mode knn        # weighted 20-NN
    torchrun --nproc_per_node 8 finetune.py --pretrained ... --data /imagenet --batch-size 128   # 8 GPUs, batch 1024
    python finetune.py --preset tiny --pretrained random --data synthetic                        # CPU smoke run

Fine-tune recipe (BEiT / ConMIM README, METHODS.md 2.5): AdamW (0.9, 0.999), lr 4e-3 at batch 1024 with layer-wise
decay 0.65, 100 epochs, 20 warmup, drop path 0.1, RandAugment m9, random erasing 0.25, mixup 0.8 / cutmix 1.0,
label smoothing 0.1, mean-pooled tokens + fc_norm. Linear probe (BEiT run_linear_eval): cls + mean-pooled patch
tokens, no BatchNorm, AdamW wd 1e-4. kNN (DINO): L2-normalised features, k = 20, T = 0.07, weighted vote.
Sections: 1 config | 2 backbone | 3 encoder loading | 4 data | 5 train / eval | 6 main."""
import dataclasses, os, re
from itertools import islice

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.data import Subset
from torchvision import transforms as T
from torchvision.transforms import v2

from common import (IMAGENET_MEAN, IMAGENET_STD, Progress, build_dataset, build_loader, cosine_schedule, fail,
                    load_checkpoint, log_json, no_decay, parse_config, prepare_out, print0,
                    resume, rng_state, save_checkpoint, seed_all, setup_dist)

# ----------------------------------------------------------------------------- 1. Config


@dataclasses.dataclass
class Config:
    """Fine-tune / linear-probe / kNN evaluation of a pre-trained encoder (defaults: BEiT ViT-B fine-tuning)."""
    mode: str = "finetune"        # finetune | linear | knn
    pretrained: str = ""          # checkpoint.pth of a method file, or "random" for a randomly initialised baseline
    from_: str = ""               # which saved encoder (--from): "" = the method's default (ConMIM teacher, CIM online)
    data: str = "/imagenet"       # ImageFolder root with train/ and val/ (or a flat class-folder root: 10% held out); "synthetic"
    img_size: int = 0             # 0 = the pre-training size from the checkpoint; other sizes resize positions / bias tables
    arch: str = "vit_base"        # only with --pretrained random: vit_tiny | vit_small | vit_base | vit_large | resnet50
    patch_size: int = 16          # only with --pretrained random
    preset: str = ""              # "tiny": CPU smoke settings
    # fine-tuning (METHODS.md 2.5: BEiT/ConMIM ViT-B; CIM-correlate uses blr 1.2e-3, layer decay 0.8, 5 warmup)
    epochs: int = 100             # BEiT/ConMIM ViT-B: 100; linear probe (BEiT): 100
    batch_size: int = 128         # per GPU; README: 128 x 8 GPUs = 1024
    blr: float = 1e-3             # lr = blr * global batch / 256 (4e-3 at 1024, BEiT/ConMIM). Linear: BEiT uses 1e-3
    min_lr: float = 1e-6          # cosine floor (BEiT)
    warmup_epochs: int = 20       # BEiT/ConMIM ViT-B: 20
    weight_decay: float = 0.05    # BEiT; the linear probe uses linear_wd
    linear_wd: float = 1e-4       # linear probe weight decay (BEiT run_linear_eval)
    layer_decay: float = 0.65     # lr scale 0.65^(L+1-i) for block i (BEiT base); 0.75 large; 1.0 = off
    drop_path: float = 0.1        # stochastic depth while fine-tuning (BEiT base)
    mixup: float = 0.8            # MixUp alpha; 0 = off
    cutmix: float = 1.0           # CutMix alpha; 0 = off (one of the two per batch, each with prob. 0.5)
    smoothing: float = 0.1        # label smoothing, folded into the (mixed) soft targets
    randaug: int = 9              # RandAugment magnitude (2 ops, as timm rand-m9-mstd0.5); 0 = off
    reprob: float = 0.25          # random erasing probability (pixel mode)
    pool: str = "mean"            # fine-tune head input: mean (patch tokens + fc_norm, BEiT default) | cls
    # kNN (DINO)
    knn_k: int = 20               # neighbours
    knn_t: float = 0.07           # temperature of the exp(sim / T) vote weights
    # system
    device: str = "cuda"          # "cpu" works (slowly) - CI uses it
    amp: str = "bf16"             # bf16 | fp16 | off (CUDA only; CPU runs fp32)
    compile: bool = False         # torch.compile the model
    workers: int = 10             # data loader processes per GPU
    steps_per_epoch: int = 0      # 0 = full pass; >0 caps it (smoke tests)
    stop_after: int = 0           # exit after this many steps of this run, leaving a resumable checkpoint; 0 = off
    log_every: int = 50           # progress line every N steps
    out: str = "out/finetune"     # checkpoints, log.jsonl, config.json; an existing checkpoint.pth is resumed
    seed: int = 0

    PRESETS = {"tiny": dict(device="cpu", workers=0, batch_size=8, img_size=32, warmup_epochs=0, log_every=1,
                            arch="vit_tiny", patch_size=4, epochs=1, blr=1e-3)}

# ----------------------------------------------------------------------------- 2. Backbone (shared ViT; ResNet-50 from torchvision)

# >>> shared:vit  (byte-identical in every file that has it; tests/test_shared.py enforces it)
VIT_SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),  # name: (width D, depth, heads)
             "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}


def sincos_pos_embed(D, h, w):
    """Fixed 2-D sin-cos positions (MAE): half the channels encode the row, half the column -> (h*w, D)."""
    omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D // 4))       # (D/4,)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    out = [f(c.flatten()[:, None] * omega) for c in (xs, ys) for f in (torch.sin, torch.cos)]  # 4 x (h*w, D/4)
    return torch.cat(out, dim=1).float()                                               # (h*w, D)


def resize_pos_embed(pos_embed, old_grid, new_grid):
    """(1, 1+gh*gw, D) positions for another grid: bicubic on the patch part, the cls position kept."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, *old_grid, -1).permute(0, 3, 1, 2)                # (1, D, gh, gw)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)         # (1, 1+h*w, D)


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
    """Learned bias per head for each relative offset (BEiT), gathered into a (heads, 1+N, 1+N) attention bias."""
    def __init__(self, grid, num_heads):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, num_heads))
        self.register_buffer("relative_position_index", rel_pos_index(*grid), persistent=False)

    def forward(self):
        return self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)  # (heads, 1+N, 1+N)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, grid=None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if grid:   # a table of its own (BEiT fine-tuning layout, timm key attn.relative_position_bias_table)
            self.relative_position_bias_table = RelPosBias(grid, num_heads).relative_position_bias_table
            self.register_buffer("relative_position_index", rel_pos_index(*grid), persistent=False)

    def forward(self, x, bias=None):                                   # (B, T, D), bias: (heads, T, T) or None
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        if hasattr(self, "relative_position_index"):
            bias = RelPosBias.forward(self)
        if bias is not None:
            bias = bias.to(q.dtype).unsqueeze(0)                       # (1, nh, T, T) broadcast over the batch
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)    # (B, nh, T, hd)
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
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch per sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, init_values=None, drop_path=0.0, grid=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, grid)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x, bias=None):                                   # (B, T, D) -> (B, T, D)
        x = x + drop_path(self.ls1(self.attn(self.norm1(x), bias)), self.drop_path, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)


class VisionTransformer(nn.Module):
    """ViT encoder with timm parameter names. pos_embed: "learned" | "sincos" (fixed buffer) | "none".
    rel_pos: "none" | "shared" (one BEiT table for all blocks, pre-training) | "block" (one per block, fine-tuning).
    forward(images) -> (B, 1+N, D) normed tokens, cls first. Other image sizes interpolate the absolute positions."""
    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 qkv_bias=True, pos_embed="learned", rel_pos="none", init_values=None, drop_path=0.0, in_chans=3):
        super().__init__()
        self.patch_size, self.embed_dim, self.grid = patch_size, embed_dim, (img_size // patch_size,) * 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:   # "sincos": fixed, zero for cls (MAE); a buffer so timm still finds it in the state dict
            self.register_buffer("pos_embed", F.pad(sincos_pos_embed(embed_dim, *self.grid), (0, 0, 1, 0))[None]
                                 if pos_embed == "sincos" else None)
        self.rel_pos_bias = RelPosBias(self.grid, num_heads) if rel_pos == "shared" else None
        dpr = [drop_path * i / max(depth - 1, 1) for i in range(depth)]   # linearly increasing stochastic depth
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values, dpr[i],
                                           self.grid if rel_pos == "block" else None) for i in range(depth)])
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

    def patchify(self, images):                                        # (B, C, H, W) -> (B, N, D)
        return self.patch_embed.proj(images).flatten(2).transpose(1, 2)

    def pos_embed_for(self, h, w):   # absolute positions for an h x w grid (B, 1+h*w, D)
        return resize_pos_embed(self.pos_embed, self.grid, (h, w))

    def forward_tokens(self, x, grid):
        """x: (B, N, D) patch embeddings (possibly with mask tokens swapped in), grid = (h, w). -> (B, 1+N, D)"""
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed_for(*grid)
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None  # (heads, 1+N, 1+N)
        for blk in self.blocks:
            x = blk(x, bias)
        return self.norm(x)

    def forward(self, images):                                         # (B, C, H, W) -> (B, 1+N, D)
        return self.forward_tokens(self.patchify(images), (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size))


def to_timm_layout(sd):
    """Our ViT keys -> timm's. vit_* keys already match; with a BEiT relative bias, the beit_* layout: the shared
    table copied into every block (as BEiT fine-tuning does), qkv.bias split into q_bias/v_bias (the k bias is
    dropped: softmax ignores a per-query constant), ls{1,2}.gamma -> gamma_{1,2}."""
    sd, table = dict(sd), sd.get("rel_pos_bias.relative_position_bias_table")
    if table is None and not any(k.endswith("attn.relative_position_bias_table") for k in sd):
        return sd
    sd.pop("rel_pos_bias.relative_position_bias_table", None)
    for k in [k for k in sd if k.startswith("blocks.")]:
        b, v = k[:k.index(".", 7) + 1], sd.pop(k)   # b = "blocks.{i}."
        if k.endswith("attn.qkv.bias"):
            sd[b + "attn.q_bias"], _, sd[b + "attn.v_bias"] = v.chunk(3)
        else:
            sd[re.sub(r"ls(\d)\.gamma$", r"gamma_\1", k)] = v
        if table is not None and k.endswith("norm1.weight"):
            sd[b + "attn.relative_position_bias_table"] = table.clone()
    return sd
# <<< shared:vit

# ----------------------------------------------------------------------------- 3. Encoder loading


def resize_rel_pos_table(table, old_grid, new_grid):
    """BEiT table ((2h-1)(2w-1) + 3, heads) for another grid: bicubic on the offset grid, the 3 cls rows kept."""
    if old_grid == new_grid:
        return table
    nh = table.shape[1]
    grid = table[:-3].T.reshape(1, nh, 2 * old_grid[0] - 1, 2 * old_grid[1] - 1)
    grid = F.interpolate(grid, size=(2 * new_grid[0] - 1, 2 * new_grid[1] - 1), mode="bicubic", align_corners=False)
    return torch.cat([grid.reshape(nh, -1).T, table[-3:]])


def build_encoder(cfg):
    """-> (encoder, feature width, encoder args). A ViT gets its own relative-bias table per block (BEiT fine-tuning),
    positions resized to cfg.img_size; a ResNet-50 comes from torchvision with its fc removed."""
    if cfg.pretrained and cfg.pretrained != "random":
        ck = load_checkpoint(cfg.pretrained)
        if "encoders" not in ck or "encoder_args" not in ck:
            fail(f"{cfg.pretrained} has no 'encoders'/'encoder_args': not a checkpoint of this project's method files")
        name = cfg.from_ or ck.get("default_encoder", next(iter(ck["encoders"])))
        if name not in ck["encoders"]:
            fail(f"--from {name}: {cfg.pretrained} holds encoders {', '.join(ck['encoders'])}")
        args, sd = dict(ck["encoder_args"]), ck["encoders"][name]
        print0(f"loading encoder '{name}' ({args['arch']}) from {cfg.pretrained}")
    elif cfg.pretrained == "random":
        if cfg.arch != "resnet50" and cfg.arch not in VIT_SIZES:
            fail(f"--arch {cfg.arch}: choose from resnet50, {', '.join(VIT_SIZES)}")
        D, depth, heads = VIT_SIZES.get(cfg.arch, (0, 0, 0))
        args = {"arch": "resnet50"} if cfg.arch == "resnet50" else dict(
            arch="vit", img_size=cfg.img_size or 224, patch_size=cfg.patch_size, embed_dim=D, depth=depth,
            num_heads=heads, pos_embed="sincos", rel_pos="none", init_values=None)
        sd = None
    else:
        fail("--pretrained is required: a method checkpoint, or 'random' for a randomly initialised baseline")
    if args["arch"] == "resnet50":
        enc = torchvision.models.resnet50()
        enc.fc = nn.Identity()
        if sd is not None:
            enc.load_state_dict(sd)
        return enc.to(memory_format=torch.channels_last), 2048, args
    kw = {k: v for k, v in args.items() if k != "arch"}
    old_grid = (kw["img_size"] // kw["patch_size"],) * 2
    kw["img_size"] = cfg.img_size or kw["img_size"]
    kw["rel_pos"] = "block" if kw.get("rel_pos", "none") != "none" else "none"
    if kw["img_size"] % kw["patch_size"]:
        fail(f"--img-size {kw['img_size']} is not a multiple of the patch size {kw['patch_size']}")
    enc = VisionTransformer(**kw, drop_path=cfg.drop_path if cfg.mode == "finetune" else 0.0)
    if sd is not None:
        sd = from_timm_layout(sd)
        if isinstance(enc.pos_embed, nn.Parameter) and "pos_embed" in sd:   # learned: bicubic to the new grid
            sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], old_grid, enc.grid)
        elif "pos_embed" in sd:   # fixed sin-cos buffer: recompute for the new grid
            sd["pos_embed"] = enc.pos_embed
        for k in [k for k in sd if k.endswith("relative_position_bias_table")]:
            sd[k] = resize_rel_pos_table(sd[k], old_grid, enc.grid)
        enc.load_state_dict(sd, strict=True)
    return enc, kw["embed_dim"], args


def from_timm_layout(sd):
    """timm vit_* / beit_* keys -> ours (per-block relative bias tables, as after to_timm_layout)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("attn.q_bias"):
            out[k[:-6] + "qkv.bias"] = torch.cat([v, torch.zeros_like(v), sd[k[:-6] + "v_bias"]])
        elif not k.endswith("attn.v_bias"):
            out[re.sub(r"gamma_(\d)$", r"ls\1.gamma", k)] = v
    return out


class Classifier(nn.Module):
    """Encoder + head. finetune: mean-pooled patch tokens + fc_norm (or cls); linear: frozen encoder, one linear
    layer on [cls, mean(patch tokens)] with no BatchNorm (BEiT linear probe); ResNet: global-average features."""
    def __init__(self, encoder, dim, num_classes, mode, pool, is_vit):
        super().__init__()
        self.encoder, self.mode, self.pool, self.is_vit = encoder, mode, pool, is_vit
        in_dim = 2 * dim if mode == "linear" and is_vit else dim
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if mode == "finetune" and is_vit and pool == "mean" else nn.Identity()
        self.head = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if mode == "finetune":
            self.head.weight.data.mul_(0.001)   # BEiT head_init_scale
        if mode == "linear":
            self.encoder.requires_grad_(False)

    def features(self, x):                     # (B, C, H, W) -> (B, dim) or (B, 2*dim)
        if not self.is_vit:
            return self.encoder(x.contiguous(memory_format=torch.channels_last))
        t = self.encoder(x)                    # (B, 1+N, D)
        if self.mode == "finetune":
            return self.fc_norm(t[:, 1:].mean(1)) if self.pool == "mean" else t[:, 0]
        return torch.cat([t[:, 0], t[:, 1:].mean(1)], dim=-1)

    def forward(self, x):
        if self.mode == "linear":
            self.encoder.eval()                # frozen: no dropout / drop path / BN updates
            with torch.no_grad():
                f = self.features(x)
            return self.head(f.float())
        return self.head(self.features(x))


def layer_decay_groups(model, weight_decay, layer_decay):
    """BEiT layer-wise lr decay: patch embed / cls / positions are layer 0, block i is layer i+1, the rest (norms,
    head; all of a ResNet) layer L+1; group lr scale = layer_decay^(L+1-layer). No weight decay where common.no_decay says so."""
    L = len(model.encoder.blocks) if model.is_vit else 0
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        n = name.removeprefix("encoder.")
        layer = int(n.split(".")[1]) + 1 if n.startswith("blocks.") else 0 if n.startswith(
            ("cls_token", "pos_embed", "patch_embed", "rel_pos_bias")) else L + 1
        wd = 0.0 if no_decay(n, p) else weight_decay
        g = groups.setdefault((layer, wd), {"params": [], "weight_decay": wd, "lr_scale": layer_decay ** (L + 1 - layer)})
        g["params"].append(p)
    return list(groups.values())

# ----------------------------------------------------------------------------- 4. Data


def build_transforms(cfg, img_size):
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    bicubic = T.InterpolationMode.BICUBIC
    val = T.Compose([T.Resize(int(img_size / 0.875), interpolation=bicubic), T.CenterCrop(img_size), *norm])
    if cfg.mode == "knn":
        return val, val
    if cfg.mode == "linear":   # BEiT linear probe: crop + flip only
        return T.Compose([T.RandomResizedCrop(img_size, interpolation=bicubic), T.RandomHorizontalFlip(), *norm]), val
    train = [T.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=bicubic), T.RandomHorizontalFlip()]
    if cfg.randaug:
        train.append(T.RandAugment(num_ops=2, magnitude=cfg.randaug, interpolation=bicubic))
    train += norm + ([T.RandomErasing(cfg.reprob, value="random")] if cfg.reprob else [])
    return T.Compose(train), val


def build_data(cfg, img_size):
    """(train set, val set). A flat class-folder root gets a fixed 10% hold-out as its val split."""
    train_tf, val_tf = build_transforms(cfg, img_size)
    train = build_dataset(cfg.data, "train", train_tf, img_size)
    val = build_dataset(cfg.data, "val", val_tf, img_size)
    if val is None:
        if os.path.isdir(os.path.join(cfg.data, "train")):
            fail(f"--data {cfg.data} has train/ but no val/ (or validate/) folder")
        full_val = build_dataset(cfg.data, "train", val_tf, img_size)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
        n_val = max(1, len(order) // 10)
        print0(f"no val/ split in {cfg.data}: holding out {n_val} of {len(order)} images (fixed seed)")
        train, val = Subset(train, order[n_val:]), Subset(full_val, order[:n_val])
        train.skipped, train.classes = train.dataset.skipped, train.dataset.classes
    return train, val

# ----------------------------------------------------------------------------- 5. Train / eval


def all_gather_cat(t):   # concatenate a tensor across ranks (the val sampler pads shards to equal sizes)
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


@torch.no_grad()
def extract(fn, loader, device, autocast):
    """fn(images) for the whole split, gathered from every rank. -> (M, F) float, (M,) labels"""
    outs, labels = [], []
    for x, y in loader:
        with autocast():
            outs.append(fn(x.to(device, non_blocking=True)).float())
        labels.append(y.to(device))
    return all_gather_cat(torch.cat(outs)), all_gather_cat(torch.cat(labels))


def knn_classify(train_f, train_y, test_f, num_classes, k=20, T=0.07, chunk=256):
    """DINO weighted kNN: cosine similarity on L2-normalised features, top-k neighbours vote with exp(sim / T).
    -> predicted class scores (M_test, num_classes)."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, train_f.shape[0])
    scores = []
    for q in test_f.split(chunk):
        sim, idx = (q @ train_f.T).topk(k, dim=1)                              # (m, k)
        votes = F.one_hot(train_y[idx], num_classes).float()                  # (m, k, C)
        scores.append((votes * (sim / T).exp()[..., None]).sum(1))            # (m, C)
    return torch.cat(scores)


def accuracy(scores, y, topk=(1, 5)):
    top = scores.topk(min(max(topk), scores.shape[1]), dim=1).indices          # (M, k)
    return [100.0 * (top[:, :k] == y[:, None]).any(1).float().mean().item() for k in topk]


# ----------------------------------------------------------------------------- 6. main


def main(cfg):
    if cfg.mode not in ("finetune", "linear", "knn"):
        fail(f"--mode {cfg.mode}: choose finetune, linear or knn")
    rank, world, device = setup_dist(cfg.device)
    seed_all(cfg.seed + rank)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if device.type == "cuda" else None
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    encoder, dim, args = build_encoder(cfg)
    img_size = cfg.img_size or args.get("img_size", 224)
    train_set, val_set = build_data(cfg, img_size)
    num_classes = len(train_set.classes)
    loader = build_loader(train_set, cfg.batch_size, world, rank, cfg.seed, cfg.workers, device, cfg.mode != "knn")
    val_loader = build_loader(val_set, cfg.batch_size, world, rank, cfg.seed, cfg.workers, device, shuffle=False)
    raw_model = Classifier(encoder, dim, num_classes, cfg.mode, cfg.pool, args["arch"] == "vit").to(device)
    prepare_out(cfg.out, cfg, __file__)

    if cfg.mode == "knn":
        train_f, train_y = extract(raw_model.eval().features, loader, device, autocast)
        val_f, val_y = extract(raw_model.features, val_loader, device, autocast)
        top1, top5 = accuracy(knn_classify(train_f, train_y, val_f, num_classes, cfg.knn_k, cfg.knn_t), val_y)
        print0(f"kNN (k={cfg.knn_k}, T={cfg.knn_t}) on {len(val_f)} images: top-1 {top1:.2f} top-5 {top5:.2f}")
        log_json(cfg.out, {"mode": "knn", "top1": top1, "top5": top5, "n_train": len(train_f), "n_val": len(val_f)})
        return {"top1": top1, "top5": top5}

    model = torch.compile(raw_model) if cfg.compile else raw_model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    steps_per_epoch = min(len(loader), cfg.steps_per_epoch or len(loader))
    total_steps = cfg.epochs * steps_per_epoch
    lr = cfg.blr * cfg.batch_size * world / 256
    print0(f"{cfg.mode}: lr = {cfg.blr} * {cfg.batch_size} * {world} / 256 = {lr:.2e}, {total_steps} steps")
    wd, ld = (cfg.linear_wd, 1.0) if cfg.mode == "linear" else (cfg.weight_decay, cfg.layer_decay)
    opt = torch.optim.AdamW(layer_decay_groups(raw_model, wd, ld), lr=lr, betas=(0.9, 0.999), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    lr_sched = cosine_schedule(lr, cfg.min_lr, total_steps, cfg.warmup_epochs * steps_per_epoch)
    mixers = [m(alpha=a, num_classes=num_classes) for m, a in ((v2.MixUp, cfg.mixup), (v2.CutMix, cfg.cutmix))
              if a > 0 and cfg.mode == "finetune"]
    mix = v2.RandomChoice(mixers) if mixers else None   # one of MixUp / CutMix per batch, p = 0.5 each
    start = resume(cfg.out, raw_model, opt, scaler, rank, cfg.seed)
    best = load_checkpoint(os.path.join(cfg.out, "checkpoint.pth")).get("best", 0.0) if start else 0.0
    progress = Progress(total_steps, cfg.batch_size * world, cfg.log_every)
    top1 = top5 = 0.0
    for epoch in range(start // steps_per_epoch, cfg.epochs):
        loader.sampler.set_epoch(epoch)
        loader.sampler.start_step = start % steps_per_epoch if epoch == start // steps_per_epoch else 0
        model.train()
        finite, first = torch.ones((), dtype=torch.bool, device=device), loader.sampler.start_step
        for i, (x, y) in enumerate(islice(loader, steps_per_epoch - first), start=first):   # islice: no extra fetch
            it = epoch * steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = lr_sched[it] * g["lr_scale"]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x, target = mix(x, y) if mix is not None else (x, F.one_hot(y, num_classes).float())
            target = target * (1 - cfg.smoothing) + cfg.smoothing / num_classes   # label smoothing
            with autocast():
                loss = torch.sum(-target * F.log_softmax(model(x).float(), dim=-1), dim=-1).mean()
            finite &= torch.isfinite(loss)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            vals = progress.step(it, epoch, {"loss": loss}, lr_sched[it])
            if (vals is not None or i + 1 == steps_per_epoch) and not finite.item():   # syncs on log steps only
                fail(f"loss became NaN/inf at step {it + 1}; stopped, last good checkpoint kept in {cfg.out}")
            if cfg.stop_after and it + 1 - start >= cfg.stop_after:
                break
        stopping = cfg.stop_after and it + 1 - start >= cfg.stop_after and it + 1 < total_steps
        if not stopping:
            top1, top5 = accuracy(*extract(raw_model.eval(), val_loader, device, autocast))
            print0(f"epoch {epoch}: val top-1 {top1:.2f} top-5 {top5:.2f} (best {max(best, top1):.2f})")
            log_json(cfg.out, {"epoch": epoch, "step": it + 1, "loss": vals["loss"] if vals else None,
                               "top1": top1, "top5": top5})
        if rank == 0:
            if not stopping and top1 >= best:
                best = top1
                save_checkpoint({"model": raw_model.state_dict(), "epoch": epoch, "top1": top1,
                                 "config": dataclasses.asdict(cfg)}, os.path.join(cfg.out, "best.pth"))
            save_checkpoint({"model": raw_model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                             "step": it + 1, "epoch": epoch, "rng": rng_state(), "best": best,
                             "config": dataclasses.asdict(cfg)}, os.path.join(cfg.out, "checkpoint.pth"))
        if stopping:
            print0(f"stopping after {cfg.stop_after} steps; run the same command again to resume")
            return {"top1": top1, "top5": top5, "best": best}
    if train_set.skipped.item():
        print0(f"skipped {train_set.skipped.item()} unreadable training images")
    return {"top1": top1, "top5": top5, "best": best}


if __name__ == "__main__":
    main(parse_config(Config))
