"""
benchmarks/learning.py - at the same small CPU budget, does each method's encoder learn, and how far does it get
against a standard baseline (a same-budget MAE)?

Every row pre-trains a ViT-Tiny (32x32 input, patch 4) for the same wall-clock budget on one CPU thread, for several
seeds, then is read with frozen features of un-augmented images: finetune.py's DINO weighted 20-NN and a linear probe
on cached features. Rows: raw pixels; a randomly initialised ViT-Tiny (finetune.py --pretrained random); each method's
`--preset small32` (ConMIM teacher, CIM-correlate online encoder, CIM-corrupt enhancer) and its own model before its
first update ("at init"); and MAE (He et al. 2022, arXiv 2111.06377), written below from the paper, on the same
ViT-Tiny as the random row. Budget: a short calibration run measures each row's steady step rate and its fixed cost
(start-up), and the run gets the steps that fill the budget. CIM-corrupt's dVAE is trained before and outside it (the
paper's is DALL-E's, trained elsewhere); its seconds are reported apart. `--device cuda`: the same on one GPU (bf16
autocast, one loader thread per run; features for the probes on the GPU), for many more steps in the same budget.

Data: `digits` (scikit-learn's 8x8 digits, 1,797 images, upsampled to 32x32), `shapes` (ten rendered shapes of random
colour, size and place on grey crops of scikit-learn's two sample photos, 3,000 + 1,000 images: raw pixels do poorly),
`photos` (grey crops of ten of scikit-image's bundled photos, one class each, val crops from a part of each photo no
train crop shows; 3,000 + 1,000 images), or an ImageFolder root with train/ and val/. scikit-learn and scikit-image
are benchmark extras, never runtime dependencies.

    python benchmarks/learning.py --data shapes               # all rows, 3 seeds, 300 s each (~40 min on 2 cores)
    python benchmarks/learning.py --data digits --rows conmim,mae --seeds 0 --extra "conmim:--lr 1e-4"
    python benchmarks/learning.py --data photos               # the same on crops of real photos (~50 min)
    python benchmarks/learning.py --data shapes --reuse       # keep finished runs in --out, run the rest, evaluate
    python benchmarks/learning.py --data shapes --seeds 0 --budget 200 --jobs 4 --device cuda   # more steps, one GPU
    python benchmarks/learning.py --quick                     # ~1 min: keeps the pipeline working (tests)
    python benchmarks/learning.py mae --data DIR --out DIR    # the MAE baseline alone (called by the above)

Prints the table, writes OUT/results.json and OUT/pretext.png (each row's pretext metric against steps).
"""
import argparse, json, math, os, platform, shutil, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import IMAGENET_MEAN, IMAGENET_STD, Progress, build_dataset, cosine_schedule, seed_all  # noqa: E402
from finetune import (Block, Classifier, Config, VisionTransformer, accuracy, build_encoder,  # noqa: E402
                      build_transforms, knn_classify, sincos_pos_embed)

# row -> (command, pretext metrics in OUT/steps.jsonl, extra flags). Every row runs on one thread, no loader workers.
ROWS = {"conmim": (["conmim.py", "--preset", "small32"], ["acc"], []),
        "cim_correlate": (["cim_correlate.py", "--preset", "small32"], ["iou"], []),
        "cim_corrupt": (["cim_corrupt.py", "--preset", "small32"], ["gen_acc", "replaced", "loss_enh"], []),
        "mae": (["benchmarks/learning.py", "mae"], ["loss"], [])}
QUICK = ["--steps-per-epoch", "2", "--epochs", "1", "--warmup-epochs", "0"]


# ----------------------------------------------------------------------------- data
def write_digits(out, per_class=0):
    """sklearn digits -> out/{train,val}/<d>/*.png, 32x32 RGB, fixed 80/20 split per class (per_class > 0: fewer)."""
    from sklearn.datasets import load_digits
    if (out / "done").exists():
        return out
    d, rng = load_digits(), np.random.default_rng(0)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == c))[:per_class or None]
        n_train = int(0.8 * len(idx))
        for split, ids in (("train", idx[:n_train]), ("val", idx[n_train:])):
            (out / split / str(c)).mkdir(parents=True, exist_ok=True)
            for i in ids:
                img = Image.fromarray(np.uint8(d.images[i] / 16 * 255)).resize((32, 32), Image.BICUBIC)
                img.convert("RGB").save(out / split / str(c) / f"{i}.png")
    (out / "done").write_text("ok")
    return out


def shape_polygon(name, rng):
    """Vertices of a unit-size shape (radius ~1 around 0), or None for the round ones drawn as ellipses."""
    ring = lambda k, r=1.0, a0=0.0: [(r * math.cos(a0 + 2 * math.pi * i / k), r * math.sin(a0 + 2 * math.pi * i / k))
                                     for i in range(k)]
    if name == "triangle":
        return ring(3)
    if name == "square":
        return ring(4, 1.0, math.pi / 4)
    if name == "diamond":                                  # a rhombus twice as long as wide
        return [(0, -1), (0.5, 0), (0, 1), (-0.5, 0)]
    if name == "hexagon":
        return ring(6)
    if name == "star":
        return [p for a, b in zip(ring(5, 1.0), ring(5, 0.4, math.pi / 5)) for p in (a, b)]
    if name == "cross":
        w = 0.33
        return [(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w),
                (-w, -1)]
    if name == "arrow":
        return [(-1, -0.3), (0.2, -0.3), (0.2, -0.75), (1, 0), (0.2, 0.75), (0.2, 0.3), (-1, 0.3)]
    if name == "halfdisc":
        return [(math.cos(a), math.sin(a) - 0.4) for a in np.linspace(0, math.pi, 24)]
    return None


CONTRAST, SIZE, ROTATE, COLOR_BG = 0.4, (0.5, 0.85), 15, False   # measured choices: benchmarks/README.md
SHAPES = ["circle", "ring", "triangle", "square", "diamond", "hexagon", "star", "cross", "arrow", "halfdisc"]


def write_shapes(out, train_per_class=300, val_per_class=100, size=32):
    """Ten rendered shapes, one per class, each of random colour, size (SIZE of the side), place and rotation (up to
    ROTATE degrees), on a random crop (random scale) of one of scikit-learn's two sample photos, grey, at CONTRAST of
    its contrast; drawn at 4x and downsampled. Deterministic (seed 0). -> out/{train,val}/<shape>/*.png."""
    from sklearn.datasets import load_sample_images
    if (out / "done").exists():
        return out
    photos, rng, S = [Image.fromarray(p) for p in load_sample_images().images], np.random.default_rng(0), 4 * size
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for name in SHAPES:
            (out / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                photo = photos[rng.integers(2)]
                side = int(rng.integers(64, 400))
                x0, y0 = rng.integers(0, photo.width - side), rng.integers(0, photo.height - side)
                bg = np.asarray(photo.crop((x0, y0, x0 + side, y0 + side)).resize((S, S), Image.BILINEAR), np.float32)
                bg = bg[..., rng.permutation(3)] if COLOR_BG else bg.mean(-1, keepdims=True).repeat(3, -1)
                bg = np.clip(bg.mean() + CONTRAST * (bg - bg.mean()), 0, 255)   # a textured but quieter background
                img = Image.fromarray(np.uint8(bg))
                r = S * rng.uniform(SIZE[0], SIZE[1]) / 2
                cx, cy = rng.uniform(r, S - r, size=2)
                color = tuple(int(v) for v in rng.integers(0, 256, 3))
                draw, poly = ImageDraw.Draw(img), shape_polygon(name, rng)
                if poly is None:                           # circle, ring: an ellipse of random aspect
                    ry = r * rng.uniform(0.8, 1.0)
                    draw.ellipse((cx - r, cy - ry, cx + r, cy + ry), fill=color)
                    if name == "ring":
                        draw.ellipse((cx - r / 2, cy - ry / 2, cx + r / 2, cy + ry / 2), fill=tuple(
                            int(v) for v in bg[int(cy), int(cx)]))
                else:
                    a = math.radians(rng.uniform(-ROTATE, ROTATE))
                    ca, sa = math.cos(a), math.sin(a)
                    draw.polygon([(cx + r * (px * ca - py * sa), cy + r * (px * sa + py * ca)) for px, py in poly],
                                 fill=color)
                img.resize((size, size), Image.LANCZOS).save(out / split / name / f"{i}.png")
    (out / "done").write_text("ok")
    return out


PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field",
          "immunohistochemistry", "retina", "camera", "coins"]   # scikit-image's bundled photos, one per class


def write_photos(out, train_per_class=300, val_per_class=100, size=32):
    """Ten of scikit-image's bundled photos, one per class, cut into grey square crops (side 10-30% of the photo's
    short side, random brightness and contrast) resized to SIZE: train crops from the left 70% of each photo, val crops
    from the right 30%, so a val crop shows a part of the scene no train crop shows. Deterministic (seed 0)."""
    if (out / "done").exists():
        return out
    import skimage.data
    rng = np.random.default_rng(0)
    for name in PHOTOS:
        a = getattr(skimage.data, name)()
        photo = Image.fromarray(a[0] if isinstance(a, tuple) else a).convert("L")   # stereo_motorcycle: left view
        W, H = photo.size
        regions = {"train": (0, int(0.7 * W), train_per_class), "val": (int(0.7 * W), W, val_per_class)}
        for split, (lo, hi, n) in regions.items():
            (out / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                side = min(int(rng.uniform(0.1, 0.3) * min(W, H)), hi - lo)
                x0, y0 = rng.integers(lo, hi - side + 1), rng.integers(0, H - side + 1)
                g = np.asarray(photo.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.LANCZOS),
                               np.float32)
                g = g.mean() + rng.uniform(0.6, 1.2) * (g - g.mean()) + rng.uniform(-30, 30)
                Image.fromarray(np.uint8(np.clip(g, 0, 255))).convert("RGB").save(out / split / name / f"{i}.png")
    (out / "done").write_text("ok")
    return out


def load_split(data, split):
    """An ImageFolder split as float images (N, 3, H, W) in [0, 1] and labels (N,), classes in sorted order."""
    classes, xs, ys = sorted(os.listdir(data / split)), [], []
    for y, c in enumerate(classes):
        for f in sorted(os.listdir(data / split / c)):
            xs.append(np.asarray(Image.open(data / split / c / f).convert("RGB"), dtype=np.float32) / 255)
            ys.append(y)
    return torch.tensor(np.stack(xs)).permute(0, 3, 1, 2), torch.tensor(ys)


# ----------------------------------------------------------------------------- the MAE baseline (He et al. 2022)
class MAE(nn.Module):
    """Encode a random 25% of the patches (no mask tokens in the encoder); a light decoder fills in mask tokens and
    predicts every patch's pixels, normalised per patch; MSE on the masked patches only (MAE Sec. 3)."""

    def __init__(self, encoder, dec_dim=128, dec_depth=2, dec_heads=4, mask_ratio=0.75):
        super().__init__()
        self.encoder, self.mask_ratio, P = encoder, mask_ratio, encoder.patch_size
        D, (gh, gw) = encoder.cls_token.shape[-1], encoder.grid
        self.dec_embed = nn.Linear(D, dec_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dec_dim) * 0.02)
        self.register_buffer("dec_pos", F.pad(sincos_pos_embed(dec_dim, gh, gw), (0, 0, 1, 0))[None])
        self.dec_blocks = nn.ModuleList([Block(dec_dim, dec_heads, 4.0, True, None, 0.0, None)
                                         for _ in range(dec_depth)])
        self.dec_norm, self.dec_pred = nn.LayerNorm(dec_dim, eps=1e-6), nn.Linear(dec_dim, P * P * 3)
        for m in [self.dec_embed, self.dec_pred, *self.dec_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight), nn.init.zeros_(m.bias)

    def forward(self, x):                                              # (B, 3, H, W) normalised -> loss
        enc, P = self.encoder, self.encoder.patch_size
        tokens = enc.patch_embed.proj(x).flatten(2).transpose(1, 2) + enc.pos_embed[:, 1:]   # (B, N, D)
        B, N, D = tokens.shape
        keep = int(N * (1 - self.mask_ratio))
        order = torch.rand(B, N, device=x.device).argsort(1)          # per-image random shuffle of the patches
        restore = order.argsort(1)
        h = torch.gather(tokens, 1, order[:, :keep, None].expand(-1, -1, D))           # (B, keep, D) visible
        h = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(B, -1, -1), h], 1)
        for blk in enc.blocks:
            h = blk(h)
        d = self.dec_embed(enc.norm(h))                                # (B, 1+keep, C)
        d_patches = torch.cat([d[:, 1:], self.mask_token.expand(B, N - keep, -1)], 1)
        d_patches = torch.gather(d_patches, 1, restore[..., None].expand(-1, -1, d.shape[-1]))   # original order
        d = torch.cat([d[:, :1], d_patches], 1) + self.dec_pos
        for blk in self.dec_blocks:
            d = blk(d)
        pred = self.dec_pred(self.dec_norm(d))[:, 1:]                  # (B, N, P*P*3)
        target = F.unfold(x, P, stride=P).transpose(1, 2)              # (B, N, 3*P*P), same order for every patch
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        masked = (restore >= keep).float()                             # (B, N) 1 = hidden from the encoder
        return (((pred - target) ** 2).mean(-1) * masked).sum() / masked.sum()


def mae_main(argv):
    """`python benchmarks/learning.py mae ...`: pre-train the MAE baseline; writes OUT/checkpoint.pth in the layout
    finetune.py loads (encoders / encoder_args / pool), OUT/config.json and OUT/steps.jsonl."""
    from torchvision import transforms
    p = argparse.ArgumentParser(prog="learning.py mae")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)         # peak AdamW lr; measured: benchmarks/README.md
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--crop-min-scale", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-per-epoch", type=int, default=0)
    p.add_argument("--stop-after", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")                # cuda: bf16 autocast, like the method files
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    seed_all(a.seed)
    enc_args = dict(arch="vit", img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, pos_embed="sincos",
                    rel_pos="none", init_values=None)
    enc = VisionTransformer(**{k: v for k, v in enc_args.items() if k not in ("arch", "rel_pos")})
    model = MAE(enc, mask_ratio=a.mask_ratio).to(a.device)
    tf = transforms.Compose([transforms.RandomResizedCrop(32, (a.crop_min_scale, 1.0),
                                                          interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = build_dataset(a.data, "train", tf, 32)
    loader = torch.utils.data.DataLoader(ds, a.batch_size, shuffle=True, drop_last=True, num_workers=a.workers,
                                         generator=torch.Generator().manual_seed(a.seed))
    spe = min(len(loader), a.steps_per_epoch or len(loader))
    total = a.epochs * spe
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "token" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=a.lr, betas=(0.9, 0.95), fused=a.device.startswith("cuda"))
    lrs = cosine_schedule(a.lr, 0.0, total, a.warmup_epochs * spe)
    progress, it = Progress(total, a.batch_size, a.log_every, a.out), 0
    for epoch in range(a.epochs):
        for x, _ in loader:
            if it == total or (a.stop_after and it == a.stop_after) or it == (epoch + 1) * spe:
                break
            for g in opt.param_groups:
                g["lr"] = lrs[it]
            with torch.autocast("cuda", torch.bfloat16, enabled=a.device.startswith("cuda")):
                loss = model(x.to(a.device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            progress.step(it, epoch, {"loss": loss.detach()}, lrs[it])
            it += 1
    torch.save({"encoders": {"encoder": enc.state_dict()}, "encoder_args": enc_args, "default_encoder": "encoder",
                "pool": "mean"}, os.path.join(a.out, "checkpoint.pth"))
    Path(a.out, "config.json").write_text(json.dumps({**vars(a), "steps": it}))


# ----------------------------------------------------------------------------- runs: calibrate, pre-train
def run(cmd, log):
    """One single-threaded subprocess from the repository root; -> seconds. Fails loudly, with its log."""
    t = time.time()
    r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    Path(log).parent.mkdir(parents=True, exist_ok=True)   # a run that fails at its argument checks makes no --out
    Path(log).write_text(r.stdout + r.stderr)
    if r.returncode:
        raise SystemExit(f"failed ({log}):\n{r.stderr[-2000:]}")
    return time.time() - t


def steps_log(out):
    path = Path(out) / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def calibrate(name, data, out, extra):
    """Run `name` for 30 steps -> {rate, fixed cost, batch}. Fixed cost: the run's wall time minus its 30 steps at the
    steady rate (start-up, data)."""
    cal = out / "calibration.json"
    if cal.exists():
        return json.loads(cal.read_text())
    shutil.rmtree(out / "cal", ignore_errors=True)
    cmd, _, flags = ROWS[name]
    if name == "cim_corrupt":
        (out / "cal").mkdir(parents=True)
        shutil.copy(tokenizer(data, out, 0, extra) / "tokenizer.pth", out / "cal" / "tokenizer.pth")
    secs = run([*cmd, *flags, *extra, "--data", str(data), "--out", str(out / "cal"), "--epochs", "100",
                "--stop-after", "30", "--log-every", "10", "--workers", "0"], out / "cal.log")
    logs = steps_log(out / "cal")
    batch = json.loads((out / "cal" / "config.json").read_text()).get("batch_size", 64)
    rate = float(np.mean([r["img_s"] for r in logs[1:]]))        # steady img/s: the first log holds start-up
    m = dict(rate_img_s=round(rate, 1), fixed_seconds=round(secs - 30 * batch / rate, 1), batch=batch)
    cal.write_text(json.dumps(m))
    shutil.rmtree(out / "cal", ignore_errors=True)
    return m


def schedule(cal, budget, n_train, min_epochs=10):
    """Steps that fill the budget, as at least `min_epochs` epochs of equal length (an epoch is then a part of a pass
    when the budget holds fewer passes), so that a 1-epoch warmup is at most a tenth of any run. -> method flags."""
    steps = max(min_epochs, int((budget - max(cal["fixed_seconds"], 0)) * cal["rate_img_s"] / cal["batch"]))
    epochs = max(min_epochs, math.ceil(steps / (n_train // cal["batch"])))
    return ["--epochs", str(epochs), "--steps-per-epoch", str(steps // epochs)]


def tokenizer(data, out, seed, extra):
    """CIM-corrupt's dVAE, trained before and outside the timed run (`--epochs 0`: tokenizer only; its full passes,
    not the benchmark's short epochs): the paper's dVAE is DALL-E's, trained elsewhere and frozen. -> its folder."""
    o = out / f"tok_seed{seed}"
    if not (o / "done").exists():
        shutil.rmtree(o, ignore_errors=True)
        o.mkdir(parents=True)
        cmd, _, flags = ROWS["cim_corrupt"]
        secs = run([*cmd, *flags, *extra, "--data", str(data), "--out", str(o), "--seed", str(seed), "--workers", "0",
                    "--epochs", "0"], o / "run.log")
        (o / "done").write_text(json.dumps({"seconds": round(secs, 1)}))
    return o


def pretrain(name, data, out, seed, flags, extra, init=False):
    """One pre-training run (or with init=True its first step only, at lr 0) -> its OUT folder."""
    o = out / (f"init_seed{seed}" if init else f"seed{seed}")
    if (o / "checkpoint.pth").exists() and (o / "done").exists():
        return o
    shutil.rmtree(o, ignore_errors=True)
    o.mkdir(parents=True)
    cmd, _, row_flags = ROWS[name]
    if name == "cim_corrupt":   # the same dVAE for the trained run and its init
        shutil.copy(tokenizer(data, out, seed, extra) / "tokenizer.pth", o / "tokenizer.pth")
    secs = run([*cmd, *row_flags, *extra, "--data", str(data), "--out", str(o), "--seed", str(seed), "--workers", "0",
                *flags, *(["--stop-after", "1"] if init else [])], o / "run.log")
    (o / "done").write_text(json.dumps({"seconds": round(secs, 1)}))
    return o


# ----------------------------------------------------------------------------- evaluation
def features(pretrained, data, seed=0, device="cpu"):
    """Frozen features of the train and val splits through finetune.py's encoder loading and pooling (cls: final norm;
    mean: mean patch token, fresh fc_norm), un-augmented (its val transform). -> {split: ({pool: (N, D)}, labels)}."""
    cfg = Config(mode="knn", pretrained=str(pretrained), data=str(data), img_size=32, device=device,
                 **(dict(arch="vit_tiny", patch_size=4) if pretrained == "random" else {}))
    seed_all(seed)                                                     # the random rows: one init per seed
    enc, dim, args = build_encoder(cfg)
    model = Classifier(enc, dim, 1, "knn", "both", args["arch"] == "vit").to(device).eval()   # only .pooled is used
    tf, out = build_transforms(cfg, 32)[1], {}
    for split in ("train", "val"):
        ds = build_dataset(str(data), split, tf, 32)
        x, y = torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([ds[i][1] for i in range(len(ds))])
        with torch.no_grad():
            parts = [{k: v.float().cpu() for k, v in model.pooled(b.to(device)).items()} for b in x.split(256)]
        out[split] = ({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, y)
    return out


def probes(xtr, ytr, xva, yva, steps):
    """kNN top-1 (finetune.py's DINO 20-NN, T 0.07, L2-normalised) and linear-probe top-1: one linear layer on
    standardised features, full-batch AdamW (lr 1e-2, wd 1e-4) for `steps` steps; the same for raw pixels."""
    C = int(ytr.max()) + 1
    knn = accuracy(knn_classify(xtr, ytr, xva, C), yva)[0]
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mean) / std, (xva - mean) / std
    torch.manual_seed(0)
    lin = nn.Linear(xtr.shape[1], C)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(lin(xtr), ytr).backward()
        opt.step()
    with torch.no_grad():
        return {"knn": round(knn, 1), "linear": round(accuracy(lin(xva), yva)[0], 1)}


def evaluate(pretrained, data, steps, seed=0, device="cpu"):
    """-> {pool: {"knn", "linear"}} for cls and mean pooling."""
    (ftr, ytr), (fva, yva) = features(pretrained, data, seed, device).values()
    return {k: probes(ftr[k], ytr, fva[k], yva, steps) for k in ftr}


@torch.no_grad()
def tokenizer_stats(path, data):
    """CIM-corrupt's own dVAE on the val split: per-pixel MSE of encode -> decode and codebook entries used."""
    from cim_corrupt import Tokenizer, resize
    ck = torch.load(path, map_location="cpu", weights_only=True)
    tok = Tokenizer(ck["args"]["encoder"], ck["args"]["decoder"], ck["args"]["size"]).eval()
    tok.encoder.load_state_dict(ck["encoder"]), tok.decoder.load_state_dict(ck["decoder"])
    x = resize(load_split(data, "val")[0], ck["args"]["size"]).clamp(0, 1)
    ids = torch.cat([tok.encode(b) for b in x.split(64)])
    rec = torch.cat([tok.decode(b) for b in ids.split(64)])
    return {"tok_mse": round(((rec - x) ** 2).mean().item(), 4), "tok_codes": int(ids.unique().numel())}


def machine(device):
    """The CPU model (Linux: /proc/cpuinfo) and, with --device cuda, the GPU's name, for results.json."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return cpu + (f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else "")   # main() checked CUDA


def summary(runs):
    """Per (pool, probe): mean and spread (max - min) over the seeds' results."""
    out = {}
    for pool in runs[0]:
        for probe in runs[0][pool]:
            v = [r[pool][probe] for r in runs]
            out[f"{pool}_{probe}"] = [round(float(np.mean(v)), 1), round(float(np.ptp(v)), 1), v]
    return out


def plot_pretext(rows, out, title):
    try:
        import matplotlib
    except ImportError:
        return print("no matplotlib: pretext.png not drawn (the steps are in each run's steps.jsonl)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in ROWS if n in rows]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for key in ROWS[name][1]:
            for i, logs in enumerate(rows[name]["steps_logs"]):
                pts = [(r["step"], r[key]) for r in logs if key in r]
                if pts:
                    ax.plot(*zip(*pts), color=f"C{ROWS[name][1].index(key)}", alpha=0.8,
                            label=key if i == 0 else None)
        ax.set_title(name, fontsize=9), ax.set_xlabel("optimizer step", fontsize=8), ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="'digits', 'shapes', 'photos' (offline) or an ImageFolder root")
    p.add_argument("--rows", default=",".join(ROWS), help="pre-trained rows, from " + ", ".join(ROWS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", type=float, default=300, help="wall-clock seconds per pre-training run, one thread")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    p.add_argument("--device", default="cpu", help="cuda: every run and the probes' features on the GPU")
    p.add_argument("--linear-steps", type=int, default=300, help="full-batch steps of the linear probe")
    p.add_argument("--extra", action="append", default=[], metavar="ROW:FLAGS",
                   help="extra flags for one row, e.g. 'cim_correlate:--blr 1e-2' (recipe experiments)")
    p.add_argument("--reuse", action="store_true", help="keep finished runs found in --out")
    p.add_argument("--quick", action="store_true", help="seconds-long runs on 20 digits per class (tests)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    out = Path(args.out or f"out/learning_{Path(args.data).name}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = ROOT / "out" / "learning_data"
    try:
        data = {"digits": lambda: write_digits(cache / ("digits32_quick" if args.quick else "digits32"),
                                               20 if args.quick else 0),
                "shapes": lambda: write_shapes(cache / "shapes32"),
                "photos": lambda: write_photos(cache / "photos32")}.get(args.data, lambda: Path(args.data).resolve())()
    except ImportError as e:   # sklearn / skimage: benchmark extras
        raise SystemExit(f"error: --data {args.data} needs {e.name}: pip install -r requirements-test.txt")
    seeds, names = [int(s) for s in args.seeds.split(",")], args.rows.split(",")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: torch sees no CUDA device here")
    if unknown := set(names) - set(ROWS):
        raise SystemExit(f"--rows: unknown {', '.join(sorted(unknown))} (choose from {', '.join(ROWS)})")
    for n in names if not args.reuse else []:   # fresh runs: only this benchmark's own folders are removed
        shutil.rmtree(out / n, ignore_errors=True)
    extra = {n: [] if args.device == "cpu" else ["--device", args.device] for n in names}
    for e in args.extra:
        n, flags = e.split(":", 1) if ":" in e else (e, "")
        if n not in extra:
            raise SystemExit(f"--extra {e}: expected ROW:FLAGS with ROW one of {', '.join(names)}")
        extra[n] += flags.split()
    steps = 20 if args.quick else args.linear_steps
    n_train = len(build_dataset(str(data), "train", None, 32))
    res = {"data": str(data), "n_train": n_train, "budget_s": args.budget, "seeds": seeds, "quick": args.quick,
           "command": " ".join(sys.argv), "cpus": os.cpu_count(), "machine": machine(args.device), "jobs": args.jobs,
           "device": args.device, "date": time.strftime("%Y-%m-%d"), "rows": {}}
    (xtr, ytr), (xva, yva) = load_split(data, "train"), load_split(data, "val")
    res["rows"]["raw pixels"] = summary([{"pixels": probes(xtr.flatten(1), ytr, xva.flatten(1), yva, steps)}])
    pool = ThreadPoolExecutor(args.jobs)
    cal = {n: {} for n in names} if args.quick else dict(zip(names, pool.map(
        lambda n: calibrate(n, data, out / n, extra[n]), names)))
    flags = {n: QUICK if args.quick else schedule(cal[n], args.budget, n_train) for n in names}
    jobs = [(n, s) for s in seeds for n in names]
    list(pool.map(lambda j: pretrain(j[0], data, out / j[0], j[1], flags[j[0]], extra[j[0]]), jobs))
    if not args.quick:   # each method's own model before its first update (MAE's is the random ViT-Tiny row)
        list(pool.map(lambda j: pretrain(j[0], data, out / j[0], j[1], flags[j[0]], extra[j[0]], init=True),
                      [j for j in jobs if j[0] != "mae"]))
    torch.set_num_threads(args.jobs if args.device == "cpu" else os.cpu_count())
    ev = lambda path, s=0: evaluate(path, data, steps, s, args.device)
    res["rows"]["random ViT-Tiny"] = summary([ev("random", s) for s in seeds])
    for n in names:
        row = res["rows"][n] = summary([ev(out / n / f"seed{s}" / "checkpoint.pth") for s in seeds])
        logs = [steps_log(out / n / f"seed{s}") for s in seeds]
        row.update(calibration=cal[n], flags=flags[n], extra=extra[n],
                   steps=[lg[-1]["step"] if lg else 0 for lg in logs],
                   seconds=[json.loads((out / n / f"seed{s}" / "done").read_text())["seconds"] for s in seeds],
                   final_pretext={k: [lg[-1].get(k) for lg in logs] for k in ROWS[n][1]}, steps_logs=logs)
        batch = json.loads((out / n / f"seed{seeds[0]}" / "config.json").read_text())["batch_size"]
        row["images_seen"] = [st * batch for st in row["steps"]]
        if (out / n / f"seed{seeds[0]}" / "tokenizer.pth").exists():
            row["tokenizer"] = [{**tokenizer_stats(out / n / f"seed{s}" / "tokenizer.pth", data), "seconds": json.loads(
                (out / n / f"tok_seed{s}" / "done").read_text())["seconds"]} for s in seeds]
        if not args.quick and n != "mae":
            inits = [out / n / f"init_seed{s}" / "checkpoint.pth" for s in seeds]
            res["rows"][f"{n} at init"] = summary([ev(path) for path in inits])
    plot_pretext(res["rows"], out / "pretext.png", f"{args.data}: pretext metrics, {len(seeds)} seeds")
    print(f"\n{Path(args.data).name}, budget {args.budget:.0f} s/run, seeds {args.seeds}, {res['machine']}: "
          "mean (spread max-min)")
    print(f"{'encoder':<24} {'kNN mean':>12} {'linear mean':>12} {'kNN cls':>12} {'linear cls':>12}  pre-training")
    for name, r in res["rows"].items():
        cell = lambda k: f"{r[k][0]:.1f} ({r[k][1]:.1f})" if k in r else "-"
        keys = ["pixels_knn", "pixels_linear"] if name == "raw pixels" else ["mean_knn", "mean_linear"]
        info = (f"{np.mean(r['steps']):.0f} steps, {np.mean(r['images_seen']):.0f} img, {np.mean(r['seconds']):.0f} s"
                if "steps" in r else "")
        print(f"{name:<24} {cell(keys[0]):>12} {cell(keys[1]):>12} {cell('cls_knn'):>12} "
              f"{cell('cls_linear'):>12}  {info}")
    for r in res["rows"].values():
        r.pop("steps_logs", None)
    (out / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["mae"]:
        mae_main(sys.argv[2:])
    else:
        main()
