"""
benchmarks/speed.py - img/s, peak memory, FLOPs and MFU of each method's full training step, beside a plain
classifier step of the same backbone and the data loader alone.

    python benchmarks/speed.py --device cuda --arch vit_base --img-size 224 --batch-size 128        # eager
    python benchmarks/speed.py --device cuda --arch vit_base --img-size 224 --batch-size 128 --compile
    python benchmarks/speed.py --device cpu --quick                                                 # tiny preset, seconds

A "step" is everything a training iteration does on the device: forward, backward, optimizer, EMA / teacher /
generator / tokenizer work, mask / crop / corruption generation. FLOPs are counted once with
torch.utils.flop_counter (matmuls and convolutions, forward + backward, every network in the step). MFU divides
achieved FLOP/s by a dense matmul measured in the same run (bf16 on GPU, fp32 on CPU).
"""
import argparse, importlib, sys, time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
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


def count_flops(step, batch):
    with FlopCounterMode(display=False) as fc:
        step(batch)
    return fc.get_total_flops()
