"""
benchmarks/learning.py - does a short CPU pre-training run learn features that beat random weights?

Pre-trains each method with its `small32` preset (ViT-Tiny, 32x32, patch 4) on real images, then evaluates the
encoder with finetune.py's kNN and linear probe on a held-out split, beside a randomly initialised ViT-Tiny and
raw pixels. Default data: scikit-learn's bundled 8x8 handwritten digits (1,797 images, offline) upsampled to 32x32
(scikit-learn is a test/benchmark extra, never a runtime dependency); or any ImageFolder with --data.

    python benchmarks/learning.py                              # all methods, default budgets (tens of CPU minutes)
    python benchmarks/learning.py --methods conmim --epochs 30 # one method, another budget
    python benchmarks/learning.py --quick                      # seconds: keeps the script working (tests)

Prints a table and writes OUT/results.json.
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from finetune import accuracy, knn_classify  # noqa: E402

# per method: pre-training epochs for the default budget, and extra flags (chosen by measurement, see README)
METHODS = {
    "conmim": dict(epochs=40, args=[]),
    "cim_correlate": dict(epochs=40, args=[]),
    "cim_corrupt": dict(epochs=40, args=[]),
}


def write_digits(out):
    """sklearn digits -> out/train/<d>/*.png and out/val/<d>/*.png (32x32 RGB, fixed 80/20 split per class)."""
    from sklearn.datasets import load_digits
    if (out / "done").exists():
        return out
    d = load_digits()
    rng = np.random.default_rng(0)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == c))
        n_train = int(0.8 * len(idx))
        for split, ids in (("train", idx[:n_train]), ("val", idx[n_train:])):
            (out / split / str(c)).mkdir(parents=True, exist_ok=True)
            for i in ids:
                img = Image.fromarray(np.uint8(d.images[i] / 16 * 255)).resize((32, 32), Image.BICUBIC)
                img.convert("RGB").save(out / split / str(c) / f"{i}.png")
    (out / "done").write_text("ok")
    return out


def run(cmd, log):
    t = time.time()
    r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    log.write_text(r.stdout + r.stderr)
    if r.returncode:
        raise SystemExit(f"failed ({log}):\n{r.stderr[-2000:]}")
    return time.time() - t, r.stdout


def evaluate(pretrained, data, out, args, extra=()):
    """kNN and linear probe top-1 of one encoder with finetune.py."""
    res = {}
    for mode, flags in (("knn", []), ("linear", ["--epochs", str(args.linear_epochs), "--blr", "4e-3",
                                                 "--batch-size", "64", "--warmup-epochs", "0"])):
        o = out / mode
        cmd = ["finetune.py", "--preset", "tiny", "--pretrained", str(pretrained), "--data", str(data), "--mode", mode,
               "--out", str(o), "--img-size", "32", *flags, *extra]
        if args.quick:
            cmd += ["--steps-per-epoch", "2"]
        run(cmd, out / f"{mode}.log")
        res[mode] = json.loads((o / "log.jsonl").read_text().splitlines()[-1])["top1"]
    return res


def raw_pixels(data):
    """kNN and a linear classifier (full-batch, 300 Adam steps) on normalised raw pixels."""
    def load(split):
        xs, ys = [], []
        for c in sorted(os.listdir(data / split)):
            for f in sorted(os.listdir(data / split / c)):
                xs.append(np.asarray(Image.open(data / split / c / f).convert("RGB"), dtype=np.float32).ravel() / 255)
                ys.append(int(c) if c.isdigit() else sorted(os.listdir(data / split)).index(c))
        return torch.tensor(np.stack(xs)), torch.tensor(ys)
    (xtr, ytr), (xva, yva) = load("train"), load("val")
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mean) / std, (xva - mean) / std
    C = int(ytr.max()) + 1
    knn = accuracy(knn_classify(xtr, ytr, xva, C), yva)[0]
    torch.manual_seed(0)
    lin = torch.nn.Linear(xtr.shape[1], C)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(lin(xtr), ytr).backward()
        opt.step()
    return {"knn": knn, "linear": accuracy(lin(xva).detach(), yva)[0]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="'digits' (sklearn, offline) or an ImageFolder root with train/ val/")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--epochs", type=int, default=0, help="pre-training epochs for every method (0 = per-method default)")
    p.add_argument("--linear-epochs", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="seconds-long run that only checks the pipeline")
    p.add_argument("--out", default="out/learning")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = write_digits(out / "digits32") if args.data == "digits" else Path(args.data).resolve()
    if args.quick:
        args.linear_epochs = 1
    results = {"data": str(data), "quick": args.quick, "rows": {}}
    results["rows"]["raw pixels"] = raw_pixels(data)
    results["rows"]["random ViT-Tiny"] = evaluate("random", data, out / "random", args,
                                                  ["--arch", "vit_tiny", "--patch-size", "4"])
    for m in args.methods.split(","):
        spec, o = METHODS[m], out / m
        epochs = 1 if args.quick else (args.epochs or spec["epochs"])
        cmd = [f"{m}.py", "--preset", "small32", "--data", str(data), "--out", str(o / "pretrain"), "--epochs", str(epochs),
               *spec["args"]] + (["--steps-per-epoch", "2"] if args.quick else [])
        secs, _ = run(cmd, o / "pretrain.log") if not (o / "pretrain" / "checkpoint.pth").exists() or args.quick else (0.0, "")
        row = evaluate(o / "pretrain" / "checkpoint.pth", data, o, args)
        row.update(pretrain_epochs=epochs, pretrain_seconds=round(secs, 1))
        results["rows"][m] = row
        print(f"{m}: {row}", flush=True)
    print(f"\n{'encoder':<20} {'kNN top-1':>10} {'linear top-1':>13} {'pre-train':>12}")
    for name, r in results["rows"].items():
        pt = f"{r['pretrain_epochs']} ep {r['pretrain_seconds']:.0f}s" if "pretrain_epochs" in r else "-"
        print(f"{name:<20} {r['knn']:>10.1f} {r['linear']:>13.1f} {pt:>12}")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
