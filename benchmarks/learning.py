"""
benchmarks/learning.py - does a short CPU pre-training run learn features that beat random weights?

Pre-trains each method with its `small32` preset (ViT-Tiny, 32x32, patch 4) on real images, then evaluates the
encoder on a held-out split beside raw pixels, a randomly initialised ViT-Tiny (finetune.py --pretrained random) and
each method's own model before its first update ("at init"). Evaluation uses finetune.py's encoder loading and
features ([cls, mean patch token], frozen, un-augmented): its DINO kNN, and a linear probe trained full-batch on the
cached features (finetune.py --mode linear is the ImageNet protocol: its 8%-area crops erase a 32 px digit, so a
random encoder whose features reach 96% scored 35% with it). The same probes also run on every block's output.
cim_corrupt trains its own dVAE tokenizer inside the run; its held-out reconstruction error is reported.
Default data: scikit-learn's bundled 8x8 handwritten digits (1,797 images, offline) upsampled to 32x32 RGB, fixed
80/20 split per class (scikit-learn is a test/benchmark extra, never a runtime dependency); or any ImageFolder with
train/ and val/ given with --data.

    python benchmarks/learning.py                              # all methods, default budgets (~25 min on 1 CPU thread)
    python benchmarks/learning.py --methods conmim --epochs 8  # one method, another budget
    python benchmarks/learning.py --reuse                      # re-assemble the table from finished runs in --out
    python benchmarks/learning.py --quick                      # ~1 min: keeps the pipeline working (tests)

Prints a table and writes OUT/results.json. Run with OMP_NUM_THREADS=1 on a shared CPU.
"""
import argparse, json, os, shutil, subprocess, sys, time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import build_dataset, seed_all  # noqa: E402
from finetune import Classifier, Config, accuracy, build_encoder, build_transforms, knn_classify  # noqa: E402

# per method: extra flags, extra flags for --quick. The budget (epochs) is each file's small32 preset unless --epochs
METHODS = {"conmim": dict(args=[]), "cim_correlate": dict(args=[]),
           "cim_corrupt": dict(args=[], quick=["--tok-epochs", "1"])}


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


def features(pretrained, data, extra=None):
    """Frozen-encoder features of the train and val splits with finetune.py's own encoder loading and feature
    function (ViT: [final-norm cls, mean of raw patch tokens] as its --pool both; each probe normalises them), on
    un-augmented images (its val transform). Also the same features after every block (LayerNorm without affine),
    to show where a pre-trained encoder keeps what it learned. -> {split: ([final, block 1..L], labels)}"""
    cfg = Config(mode="knn", pretrained=str(pretrained), data=str(data), img_size=32, device="cpu", **(extra or {}))
    seed_all(0)                                # the random baseline is the same encoder every run
    enc, dim, args = build_encoder(cfg)
    model = Classifier(enc, dim, 1, "knn", "both", args["arch"] == "vit").eval()   # only .pooled is used
    tf = build_transforms(cfg, 32)[1]
    out = {}
    for split in ("train", "val"):
        ds = build_dataset(str(data), split, tf, 32)
        x, y = torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([ds[i][1] for i in range(len(ds))])
        acts = []
        hooks = [b.register_forward_hook(lambda m, i, o: acts.append(o)) for b in enc.blocks]
        with torch.no_grad():
            fs = [torch.cat([torch.cat(list(model.pooled(b).values()), -1) for b in x.split(256)])]
        for h in hooks:
            h.remove()
        for a in (torch.cat(acts[i::len(enc.blocks)]) for i in range(len(enc.blocks))):
            a = F.layer_norm(a, a.shape[-1:])
            fs.append(torch.cat([a[:, 0], a[:, 1:].mean(1)], dim=-1))
        out[split] = (fs, y)
    return out


def probes(xtr, ytr, xva, yva, steps):
    """kNN top-1 (finetune.py's DINO 20-NN on L2-normalised features) and linear-probe top-1: one linear layer on
    standardised frozen features, full-batch AdamW (lr 1e-2, wd 1e-4) for `steps` steps - the same for raw pixels."""
    C = int(ytr.max()) + 1
    knn = accuracy(knn_classify(xtr, ytr, xva, C), yva)[0]
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mean) / std, (xva - mean) / std
    torch.manual_seed(0)
    lin = torch.nn.Linear(xtr.shape[1], C)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(lin(xtr), ytr).backward()
        opt.step()
    with torch.no_grad():
        return {"knn": round(knn, 1), "linear": round(accuracy(lin(xva), yva)[0], 1)}


def evaluate(pretrained, data, args, extra=None):
    """Final-output kNN / linear top-1, and the best block for each (a MIM encoder's last blocks serve its
    pre-training head; BEiT probes an intermediate block)."""
    f = features(pretrained, data, extra)
    (ftr, ytr), (fva, yva) = f["train"], f["val"]
    per = [probes(a, ytr, b, yva, args.linear_steps) for a, b in zip(ftr, fva)]
    best = {m: max(range(1, len(per)), key=lambda i: per[i][m]) for m in ("knn", "linear")}
    return {**per[0], "best_block_knn": [best["knn"], per[best["knn"]]["knn"]],
            "best_block_linear": [best["linear"], per[best["linear"]]["linear"]], "per_block": per[1:]}


def load_split(data, split):
    """An ImageFolder split as float images (N, 3, H, W) in [0, 1] and labels (N,), classes in sorted order."""
    classes, xs, ys = sorted(os.listdir(data / split)), [], []
    for y, c in enumerate(classes):
        for f in sorted(os.listdir(data / split / c)):
            xs.append(np.asarray(Image.open(data / split / c / f).convert("RGB"), dtype=np.float32) / 255)
            ys.append(y)
    return torch.tensor(np.stack(xs)).permute(0, 3, 1, 2), torch.tensor(ys)


def raw_pixels(data, args):
    """The same kNN and linear probe on the raw pixels (32x32x3, un-augmented)."""
    (xtr, ytr), (xva, yva) = load_split(data, "train"), load_split(data, "val")
    return probes(xtr.flatten(1), ytr, xva.flatten(1), yva, args.linear_steps)


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
    p.add_argument("--data", default="digits",
                   help="'digits' (sklearn, offline) or an ImageFolder root with train/ val/")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--epochs", type=int, default=0,
                   help="pre-training epochs for every method (0 = its small32 preset)")
    p.add_argument("--linear-steps", type=int, default=300, help="full-batch steps of the linear probe")
    p.add_argument("--reuse", action="store_true",
                   help="reuse finished pre-training runs found in --out (evaluation always reruns: seconds)")
    p.add_argument("--quick", action="store_true",
                   help="seconds-long run on 20 digits per class: checks the pipeline only")
    p.add_argument("--out", default="out/learning")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.data == "digits":
        data = write_digits(out / "digits32_quick", 20) if args.quick else write_digits(out / "digits32")
    else:
        data = Path(args.data).resolve()
    if args.quick:
        args.linear_steps = 20
    results = {"data": str(data), "quick": args.quick, "command": " ".join(sys.argv),
               "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "rows": {}}
    results["rows"]["raw pixels"] = raw_pixels(data, args)
    results["rows"]["random ViT-Tiny"] = evaluate("random", data, args, dict(arch="vit_tiny", patch_size=4))
    short = lambda r: {k: v for k, v in r.items() if k != "per_block"}
    rows = results["rows"]
    print(f"raw pixels / random ViT-Tiny: {rows['raw pixels']} / {short(rows['random ViT-Tiny'])}", flush=True)
    for m in args.methods.split(","):
        spec, o = METHODS[m], out / m
        epochs = 1 if args.quick else args.epochs
        cmd = [f"{m}.py", "--preset", "small32", "--data", str(data), "--out", str(o / "pretrain"),
               *(["--epochs", str(epochs)] if epochs else []), *spec["args"],
               *(spec.get("quick", []) + ["--steps-per-epoch", "2"] if args.quick else [])]
        timing = o / "pretrain_seconds.json"
        if args.reuse and timing.exists():
            secs = json.loads(timing.read_text())["seconds"]
        else:
            shutil.rmtree(o / "pretrain", ignore_errors=True)   # a fresh run, not a resume of an older one
            secs = run(cmd, o / "pretrain.log")[0]
            timing.write_text(json.dumps({"seconds": secs, "command": "python " + " ".join(cmd)}))
        row = evaluate(o / "pretrain" / "checkpoint.pth", data, args)
        epochs = json.loads((o / "pretrain" / "config.json").read_text())["epochs"]
        row.update(pretrain_epochs=epochs, pretrain_seconds=round(secs, 1), pretrain_command="python " + " ".join(cmd))
        last = json.loads((o / "pretrain" / "log.jsonl").read_text().splitlines()[-1])
        row["pretrain_last_log"] = {k: v for k, v in last.items() if isinstance(v, (int, float))}
        if (o / "pretrain" / "tokenizer.pth").exists():   # cim_corrupt: its own dVAE, trained inside the same run
            row.update(tokenizer_recon(o / "pretrain" / "tokenizer.pth", data))
        results["rows"][m] = row
        print(f"{m}: {short(row)}", flush=True)
        if not args.quick:   # the same model before its first update: step 0 runs at lr 0 (warmup), EMA of equals
            init = o / "init"
            if not (args.reuse and (init / "pretrain" / "checkpoint.pth").exists()):
                shutil.rmtree(init, ignore_errors=True)
                (init / "pretrain").mkdir(parents=True)
                if (o / "pretrain" / "tokenizer.pth").exists():   # cim_corrupt: the same dVAE, not trained again
                    shutil.copy(o / "pretrain" / "tokenizer.pth", init / "pretrain" / "tokenizer.pth")
                run([*cmd[:6], str(init / "pretrain"), *cmd[7:], "--stop-after", "1"], o / "init.log")
            results["rows"][f"{m} at init"] = evaluate(init / "pretrain" / "checkpoint.pth", data, args)
    print(f"\n{'encoder':<22} {'kNN':>6} {'linear':>7} {'best block kNN':>15} {'best block linear':>18} "
          f"{'pre-train':>12}  notes")
    for name, r in results["rows"].items():
        pt = f"{r['pretrain_epochs']} ep {r['pretrain_seconds']:.0f}s" if "pretrain_epochs" in r else "-"
        bk, bl = (f"{r[k][1]:.1f} (#{r[k][0]})" if k in r else "-" for k in ("best_block_knn", "best_block_linear"))
        note = (f"dVAE val MSE {r['tok_mse']:.4f}, {r['tok_codes_used']}/{r['tok_vocab']} codes used"
                if "tok_mse" in r else "")
        print(f"{name:<22} {r['knn']:>6.1f} {r['linear']:>7.1f} {bk:>15} {bl:>18} {pt:>12}  {note}")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
