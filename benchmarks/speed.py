"""
benchmarks/speed.py - img/s, peak memory, FLOPs and MFU of each method's full training step, beside a plain
image-classifier step of the same backbone; with --loader, img/s per CPU core of each input pipeline on real JPEGs.

    python benchmarks/speed.py --device cuda --arch vit_base --img-size 224 --batch-size 128        # eager
    python benchmarks/speed.py --device cuda --arch vit_base --img-size 224 --batch-size 128 --compile
    python benchmarks/speed.py --device cpu --quick                                         # tiny preset, seconds
    python benchmarks/speed.py --loader --workers 2          # input pipelines on ImageNet-sized JPEGs, per core

A "step" is everything a training iteration does on the device: forward, backward, optimizer, EMA / teacher /
generator / tokenizer work, mask / crop / corruption generation. FLOPs are counted once with
torch.utils.flop_counter (matmuls and convolutions, forward + backward, every network in the step). MFU divides
achieved FLOP/s by a dense matmul measured in the same run (bf16 on GPU, fp32 on CPU).
"""
import argparse, importlib, sys, time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import build_dataset, build_loader, parse_config  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n=4096, reps=20):
    """Dense n x n matmul FLOP/s: the roof the MFU column is measured against."""
    n = n if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def time_step(step, batch, device, warmup, iters):
    """Median-free simple timing: warm up (compile, autotune), then `iters` steps between two syncs."""
    for _ in range(warmup):
        step(batch)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(iters):
        step(batch)
    sync(device)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return (time.perf_counter() - t) / iters, mem


def profile(step, batch, device, top):
    """Top ops of 3 steps by self time on the device (CUDA kernels on a GPU, CPU ops on a CPU)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step(batch)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60), flush=True)


def count_flops(step, batch):
    """Counted FLOPs of one step. CPU SDPA kernels are not in torch's table: count them like the GPU ones."""
    aten, flop = torch.ops.aten, torch.utils.flop_counter
    cpu_sdpa = {aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: flop.sdpa_flop(q, k, v),
                aten._scaled_dot_product_flash_attention_for_cpu_backward:
                    lambda g, q, k, v, *a, **kw: flop.sdpa_backward_flop(g, q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as fc:
        step(batch)
    return fc.get_total_flops()


def method_setup(name, cfg, device):
    """-> (raw_model, forward(batch) -> loss, after_step(), a batch on the device, loader transform), the same calls
    each method's main() makes per step."""
    m = importlib.import_module(name)
    if name == "conmim":
        raw = m.ConMIM(cfg).to(device)
        tf = m.input_transform(cfg)
        fwd = lambda b: raw(b, m.sample_mask(cfg, b.shape[0], device), cfg.tau)[0]
    elif name == "cim_correlate":
        raw, tf = m.CorrelationalIM(cfg).to(device), m.input_transform(cfg)
        fwd = lambda b: raw(b)[0]
    else:
        raw = m.CIM(cfg, m.load_tokenizer(cfg).to(device)).to(device)
        tf = m.input_transform(cfg)
        fwd = lambda b: raw(b, cfg.lam, cfg.sample_temperature)[0]
    if cfg.arch == "resnet50":
        raw = raw.to(memory_format=torch.channels_last)
    after = (lambda: raw.ema_update(0.999)) if hasattr(raw, "ema_update") else (lambda: None)
    return raw, fwd, after, tf


def make_step(raw, fwd, after, opt, amp_dtype, device, clip, compiled):
    model_fwd = torch.compile(fwd) if compiled else fwd
    def step(batch):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = model_fwd(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), clip)
        opt.step()
        after()
    return step


def classifier_setup(arch, cfg, device):
    """Reference: a plain supervised step of the same backbone (timm's ViT if installed, else the shared ViT + head)."""
    if arch == "resnet50":
        import torchvision
        net = torchvision.models.resnet50().to(device, memory_format=torch.channels_last)
        name = "torchvision resnet50 classifier"
    else:
        try:
            import timm
            net = timm.create_model(f"{arch}_patch16_224", img_size=cfg.img_size, patch_size=cfg.patch_size,
                                    num_classes=1000).to(device)
            name = f"timm {arch} classifier"
        except ImportError:
            from finetune import VIT_SIZES, VisionTransformer
            D, depth, heads = VIT_SIZES[arch]
            vit = VisionTransformer(cfg.img_size, cfg.patch_size, D, depth, heads)
            net = nn.Sequential(vit, nn.Flatten(1)).to(device)
            name = f"shared {arch} + linear"
    y = torch.randint(0, 1000, (cfg.batch_size,), device=device)
    fwd = lambda b: F.cross_entropy(net(b).flatten(1)[:, :1000], y)
    return net, fwd, name


def loader_rate(tf, cfg, device, workers, n_batches):
    """img/s of the data loader alone with the method's real CPU transform."""
    ds = build_dataset(cfg.data, "train", tf, cfg.img_size, synthetic_size=cfg.batch_size * (n_batches + 2))
    loader = build_loader(ds, cfg.batch_size, 1, 0, 0, workers, device)
    it = iter(loader)
    next(it)   # worker start-up
    t = time.perf_counter()
    n = sum(1 for _ in zip(range(n_batches), it))
    return n * cfg.batch_size / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="conmim,cim_correlate,cim_corrupt")
    p.add_argument("--archs", default="vit,resnet50", help="vit (every method) and/or resnet50 (the two CIM files)")
    p.add_argument("--arch", default="vit_base", help="ViT size for the vit rows")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--workers", type=int, default=16, help="loader workers for the loader-alone row")
    p.add_argument("--data", default="synthetic", help="ImageFolder root for the loader row (JPEG decoding)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="CPU: each file's tiny preset, 2 timed steps (seconds)")
    p.add_argument("--loader", action="store_true", help="input pipelines on JPEGs instead of training steps")
    p.add_argument("--profile", type=int, default=0, help="after each row: its top N ops by device time")
    p.add_argument("--jpegs", type=int, default=256, help="--loader without --data: JPEGs to write into --out")
    p.add_argument("--seconds", type=float, default=6.0, help="--loader: timing per row (split over the rounds)")
    p.add_argument("--rounds", type=int, default=3, help="--loader: interleaved rounds, the best one is kept")
    p.add_argument("--out", default="out/speed", help="--loader: where the generated JPEGs go")
    args = p.parse_args()
    if args.loader:
        return loader_main(args)
    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    peak = matmul_peak(device, amp_dtype or torch.float32)
    warmup, iters = (1, 2) if args.quick else (3 if not args.compile else 10, args.iters)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"device {device} ({name}), "
          f"dense {'bf16' if amp_dtype else 'fp32'} matmul {peak / 1e12:.2f} TFLOP/s, compile={args.compile}")
    print(f"{'row':<42} {'batch':>5} {'img/s':>9} {'GFLOP/img':>10} {'MFU':>6} {'peak GiB':>9}")
    def report(label, step, batch, bs):
        flops = count_flops(step, batch)
        sec, mem = time_step(step, batch, device, warmup, iters)
        print(f"{label:<42} {bs:>5} {bs / sec:>9.1f} {flops / bs / 1e9:>10.2f} {flops / sec / peak:>6.1%} {mem:>9.2f}",
              flush=True)
        if args.profile:
            profile(step, batch, device, args.profile)
    for arch in args.archs.split(","):
        for name in args.methods.split(","):
            if arch == "resnet50" and name == "conmim":
                continue
            m = importlib.import_module(name)
            flags = ["--preset", "tiny"] if args.quick else \
                ["--img-size", str(args.img_size), "--batch-size", str(args.batch_size)]
            flags += ["--device", args.device, "--data", args.data] + (["--arch", "resnet50"] if arch == "resnet50" else
                                                                    [] if args.quick else ["--arch", args.arch])
            if name == "cim_corrupt":
                flags += ["--tokenizer", "random"]
            if name == "cim_correlate" and arch == "resnet50" and args.quick:   # stride 16/32 needs >= 64 px contexts
                flags += ["--img-size", "64", "--context-size", "64", "--exemplar-size", "32", "--batch-size", "4"]
            cfg = parse_config(m.Config, flags)
            m.validate(cfg)
            raw, fwd, after, tf = method_setup(name, cfg, device)
            ds = build_dataset("synthetic", "train", tf, cfg.img_size, synthetic_size=cfg.batch_size)
            batch = torch.utils.data.default_collate([ds[i] for i in range(cfg.batch_size)])[0]
            batch = [b.to(device) for b in batch] if isinstance(batch, (list, tuple)) else batch.to(device)
            opt = torch.optim.AdamW([q for q in raw.parameters() if q.requires_grad], lr=1e-4,
                                    fused=device.type == "cuda")
            step = make_step(raw, fwd, after, opt, amp_dtype, device, cfg.clip_grad, args.compile)
            report(f"{name} {cfg.arch} {cfg.img_size}px", step, batch, cfg.batch_size)
            if not args.quick:
                print(f"{'  loader alone (' + str(args.workers) + ' workers)':<42} {cfg.batch_size:>5} "
                      f"{loader_rate(tf, cfg, device, args.workers, 10):>9.1f}", flush=True)
            del raw, opt, step
        ref_arch = "resnet50" if arch == "resnet50" else cfg.arch
        net, fwd, label = classifier_setup(ref_arch, cfg, device)
        x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device)
        if ref_arch == "resnet50":
            x = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
        step = make_step(net, fwd, lambda: None, opt, amp_dtype, device, 0, args.compile)
        report(f"{label} {cfg.img_size}px (reference)", step, x, cfg.batch_size)



# ----------------------------------------------------------------------------- --loader: input pipelines on JPEGs
# Device step rates (img/s) each pipeline has to feed: benchmarks/README.md#how-fast-is-it, one H200,
# bf16, eager, ViT-B/16, per-GPU batch 64, measured 2026-11-27. The fine-tuning rows feed a classifier step
# (timm ViT-B/16's rate).
STEP_RATES = {"conmim": 798.6, "cim_correlate": 1400.9, "cim_corrupt": 467.6, "classifier": 2390.5}


def write_jpegs(out, n=256, quality=90, seed=0):
    """n ImageNet-sized JPEGs (500x375 or 375x500, quality 90) in 2 class folders: random crops of the photos that
    scikit-image and scikit-learn bundle (benchmark extras), resized; made offline, the same every time."""
    import skimage.data
    from sklearn.datasets import load_sample_images
    names = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")
    photos = [getattr(skimage.data, k)() for k in names] + list(load_sample_images().images)
    rng = np.random.default_rng(seed)
    for i in range(n):
        src = Image.fromarray(photos[i % len(photos)])
        w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
        s = rng.uniform(0.6, 1.0)
        cw, ch = int(src.width * s), int(src.height * s)
        x, y = int(rng.integers(0, src.width - cw + 1)), int(rng.integers(0, src.height - ch + 1))
        folder = Path(out) / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC).save(folder / f"{i:05d}.JPEG",
                                                                             quality=quality)
    return out


def pipelines(data):
    """row -> (dataset of the real CPU pipeline over `data`, step-rate key, what the CPU does). The method rows
    build exactly what their main() builds (ViT-B/16 defaults, 224 px, --decode cpu)."""
    from torchvision import transforms as T
    import conmim, cim_correlate, cim_corrupt, finetune
    norm = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    reference = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), *norm])
    rows = {"reference: RandomResizedCrop + flip": (build_dataset(data, "train", reference), "classifier",
                                                   "PIL decode, crop (bilinear), flip, float normalise")}
    for name, m in (("conmim", conmim), ("cim_correlate", cim_correlate), ("cim_corrupt", cim_corrupt)):
        cfg = parse_config(m.Config, ["--data", data])
        ds = build_dataset(data, "pretrain", m.input_transform(cfg), 224, decode=m.decode_mode(cfg.decode))
        rows[name] = (ds, name, "decode, crop (bicubic), flip -> uint8; the rest on the GPU")
    for mode in ("finetune", "linear"):
        cfg = parse_config(finetune.Config, ["--data", data, "--pretrained", "random", "--mode", mode])
        train_tf, val_tf = finetune.build_transforms(cfg, 224)
        work = "PIL: crop, flip" + (", RandAugment, erasing" if mode == "finetune" else "") + ", normalise"
        rows[f"finetune.py --mode {mode} (train)"] = (build_dataset(data, "train", train_tf), "classifier", work)
    val = build_dataset(data, "val", val_tf) or build_dataset(data, "train", val_tf)
    rows["finetune.py val / kNN"] = (val, "classifier", "PIL: resize, centre crop, normalise")
    return rows


def per_core(ds, seconds):
    """img/s of one process running the pipeline in a loop (what each loader worker does)."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ds[n % len(ds)]
        n += 1
    return n / (time.perf_counter() - t0)


def with_workers(ds, workers, seconds, batch=32):
    """img/s of a DataLoader with `workers` processes (collate included), after their start-up."""
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10 ** 7)
    loader = torch.utils.data.DataLoader(ds, batch, sampler=sampler, num_workers=workers)
    it = iter(loader)
    for _ in range(workers * 2):
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += len(next(it)[1])
    return n / (time.perf_counter() - t0)


def loader_main(args):
    """Rows measured in `--rounds` interleaved rounds, best round kept (a shared machine only ever slows a row)."""
    torch.set_num_threads(1)
    data = args.data if args.data != "synthetic" else write_jpegs(Path(args.out) / "jpegs", args.jpegs)
    rows = pipelines(str(data))
    rate = {row: 0.0 for row in rows}
    for _ in range(args.rounds):
        for row, (ds, _, _) in rows.items():
            rate[row] = max(rate[row], per_core(ds, args.seconds / args.rounds))
    print(f"input pipelines on {data} ({len(rows['conmim'][0])} JPEGs), 1 thread per process, best of "
          f"{args.rounds} rounds; GPU img/s: the H200 step rates of benchmarks/README.md#how-fast-is-it")
    print(f"{'row':<38} {'img/s/core':>10} {'ms/img':>7} {'x ref':>6} {'img/s, ' + str(args.workers) + ' workers':>17} "
          f"{'GPU img/s':>9} {'cores/GPU':>9}  CPU work")
    ref = rate["reference: RandomResizedCrop + flip"]
    for row, (ds, key, work) in rows.items():
        multi = with_workers(ds, args.workers, args.seconds / args.rounds) if args.workers > 1 else rate[row]
        gpu = STEP_RATES[key]
        print(f"{row:<38} {rate[row]:>10.1f} {1e3 / rate[row]:>7.2f} {ref / rate[row]:>6.2f} {multi:>17.1f} "
              f"{gpu:>9.1f} {gpu / rate[row]:>9.1f}  {work}", flush=True)
    device_decode(str(data), torch.device(args.device if torch.cuda.is_available() else "cpu"), args.seconds)


def device_decode(data, device, seconds, batch=64):
    """--decode device: the loader workers only read bytes and draw the crop (img/s per core), images_to()
    decodes and crops a batch on `device` (img/s; nvjpeg on a GPU, libjpeg-turbo in this process on a CPU)."""
    import conmim
    from common import collate, images_to
    cfg = parse_config(conmim.Config, ["--data", data, "--decode", "device"])
    ds = build_dataset(data, "pretrain", conmim.input_transform(cfg), 224, decode="bytes")
    cpu = per_core(ds, seconds / 2)
    items, _ = collate([ds[i % len(ds)] for i in range(batch)])
    images_to(items, device)
    sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
        images_to(items, device)
        sync(device)
        n += batch
    rate = n / (time.perf_counter() - t0)
    print(f"--decode device (conmim): workers read bytes and draw crops at {cpu:.1f} img/s per core; "
          f"decode + crop of a batch of {batch} on {device}: {rate:.1f} img/s", flush=True)


if __name__ == "__main__":
    main()
