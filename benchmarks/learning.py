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
import argparse, json, os, shutil, subprocess, sys, time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from finetune import accuracy, knn_classify  # noqa: E402

# per method: pre-training epochs of the default budget (~4 CPU minutes each at OMP_NUM_THREADS=1 on digits),
# extra flags, and extra flags for --quick; chosen by measurement, see README "Learning evidence"
METHODS = {
    "conmim": dict(epochs=5, args=[]),
    "cim_correlate": dict(epochs=10, args=[]),
    "cim_corrupt": dict(epochs=5, args=[], quick=["--tok-epochs", "1"]),
}
# linear probe (finetune.py --mode linear): few epochs at a high lr, so that one probe takes about a minute on CPU
LINEAR = dict(epochs=4, blr=4e-2)


def write_digits(out, per_class=0):
    """sklearn digits -> out/train/<d>/*.png and out/val/<d>/*.png (32x32 RGB, fixed 80/20 split per class).
    per_class > 0 keeps only that many images of each class (--quick)."""
    from sklearn.datasets import load_digits
    if (out / "done").exists():
        return out
    d = load_digits()
    rng = np.random.default_rng(0)
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
    for mode, flags in (("knn", []), ("linear", ["--epochs", str(args.linear_epochs), "--blr", str(LINEAR["blr"]),
                                                 "--batch-size", "64", "--warmup-epochs", "0"])):
        o = out / mode
        cmd = ["finetune.py", "--preset", "tiny", "--pretrained", str(pretrained), "--data", str(data), "--mode", mode,
               "--out", str(o), "--img-size", "32", *flags, *extra]
        if args.quick:
            cmd += ["--steps-per-epoch", "2"]
        run(cmd, out / f"{mode}.log")
        res[mode] = json.loads((o / "log.jsonl").read_text().splitlines()[-1])["top1"]
    return res


def load_split(data, split):
    """An ImageFolder split as float images (N, 3, H, W) in [0, 1] and labels (N,), classes in sorted order."""
    classes, xs, ys = sorted(os.listdir(data / split)), [], []
    for y, c in enumerate(classes):
        for f in sorted(os.listdir(data / split / c)):
            xs.append(np.asarray(Image.open(data / split / c / f).convert("RGB"), dtype=np.float32) / 255)
            ys.append(y)
    return torch.tensor(np.stack(xs)).permute(0, 3, 1, 2), torch.tensor(ys)


def raw_pixels(data):
    """kNN and a linear classifier (full-batch, 300 Adam steps) on standardised raw pixels."""
    (xtr, ytr), (xva, yva) = load_split(data, "train"), load_split(data, "val")
    xtr, xva = xtr.flatten(1), xva.flatten(1)
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


@torch.no_grad()
def tokenizer_recon(path, data):
    """cim_corrupt's own dVAE on the held-out split: per-pixel MSE of encode -> decode (images in [0, 1], at the
    tokenizer's view size) and how many codebook entries those images use."""
    from cim_corrupt import Tokenizer, resize
    ck = torch.load(path, map_location="cpu", weights_only=True)
    tok = Tokenizer(ck["args"]["encoder"], ck["args"]["decoder"], ck["args"]["size"]).eval()
    tok.encoder.load_state_dict(ck["encoder"]), tok.decoder.load_state_dict(ck["decoder"])
    x = resize(load_split(data, "val")[0], ck["args"]["size"]).clamp(0, 1)
    ids = torch.cat([tok.encode(b) for b in x.split(64)])
    rec = torch.cat([tok.decode(b) for b in ids.split(64)])
    return {"tok_mse": ((rec - x) ** 2).mean().item(), "tok_codes_used": int(ids.unique().numel()),
            "tok_vocab": tok.vocab_size}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="'digits' (sklearn, offline) or an ImageFolder root with train/ val/")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--epochs", type=int, default=0, help="pre-training epochs for every method (0 = per-method default)")
    p.add_argument("--linear-epochs", type=int, default=LINEAR["epochs"])
    p.add_argument("--reuse", action="store_true", help="keep an existing pre-training checkpoint instead of retraining")
    p.add_argument("--quick", action="store_true", help="seconds-long run on 20 digits per class: checks the pipeline only")
    p.add_argument("--out", default="out/learning")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.data == "digits":
        data = write_digits(out / "digits32_quick", 20) if args.quick else write_digits(out / "digits32")
    else:
        data = Path(args.data).resolve()
    if args.quick:
        args.linear_epochs = 1
    results = {"data": str(data), "quick": args.quick, "command": " ".join(sys.argv),
               "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "rows": {}}
    results["rows"]["raw pixels"] = raw_pixels(data)
    results["rows"]["random ViT-Tiny"] = evaluate("random", data, out / "random", args,
                                                  ["--arch", "vit_tiny", "--patch-size", "4"])
    print(f"raw pixels / random ViT-Tiny: {results['rows']['raw pixels']} / {results['rows']['random ViT-Tiny']}", flush=True)
    for m in args.methods.split(","):
        spec, o = METHODS[m], out / m
        epochs = 1 if args.quick else (args.epochs or spec["epochs"])
        cmd = [f"{m}.py", "--preset", "small32", "--data", str(data), "--out", str(o / "pretrain"), "--epochs", str(epochs),
               *spec["args"], *(spec.get("quick", []) + ["--steps-per-epoch", "2"] if args.quick else [])]
        timing = o / "pretrain_seconds.json"
        if args.reuse and timing.exists():
            secs = json.loads(timing.read_text())["seconds"]
        else:
            if (o / "pretrain").exists():   # a fresh run, not a resume of an older checkpoint
                shutil.rmtree(o / "pretrain")
            secs = run(cmd, o / "pretrain.log")[0]
            timing.write_text(json.dumps({"seconds": secs, "command": "python " + " ".join(cmd)}))
        row = evaluate(o / "pretrain" / "checkpoint.pth", data, o, args)
        row.update(pretrain_epochs=epochs, pretrain_seconds=round(secs, 1), pretrain_command="python " + " ".join(cmd))
        last = json.loads((o / "pretrain" / "log.jsonl").read_text().splitlines()[-1])
        row["pretrain_last_log"] = {k: v for k, v in last.items() if isinstance(v, (int, float))}
        if (o / "pretrain" / "tokenizer.pth").exists():   # cim_corrupt: its own dVAE, trained inside the same run
            row.update(tokenizer_recon(o / "pretrain" / "tokenizer.pth", data))
        results["rows"][m] = row
        print(f"{m}: {row}", flush=True)
    print(f"\n{'encoder':<16} {'kNN top-1':>10} {'linear top-1':>13} {'pre-train':>14}  notes")
    for name, r in results["rows"].items():
        pt = f"{r['pretrain_epochs']} ep {r['pretrain_seconds']:.0f}s" if "pretrain_epochs" in r else "-"
        note = (f"dVAE val MSE {r['tok_mse']:.4f}, {r['tok_codes_used']}/{r['tok_vocab']} codes used"
                if "tok_mse" in r else "")
        print(f"{name:<16} {r['knn']:>10.1f} {r['linear']:>13.1f} {pt:>14}  {note}")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
