"""finetune.py: the protocols (RandAugment strength, pooling, LARS probe, kNN), every exported layout loading into
finetune's ViT exactly as timm runs it, and the guards that keep reruns from going wrong."""
import fcntl
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torchvision
from PIL import Image

from common import save_checkpoint
from conftest import ROOT
from finetune import (LARS, RA_OPS, Classifier, VisionTransformer, from_timm_layout, knn_classify, layer_decay_groups,
                      rel_pos_index, resize_grid, resize_pos_embed, sincos_pos_embed)

ARGS = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3)


def run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "finetune.py", "--preset", "tiny", "--data", "synthetic", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)


def beit_layout(sd):
    """Our per-block-bias ViT keys -> timm beit_*: qkv.bias -> q_bias / v_bias, ls{i}.gamma -> gamma_{i}."""
    out = {}
    for k, v in sd.items():
        if k.endswith("attn.qkv.bias"):
            out[k[:-8] + "q_bias"], _, out[k[:-8] + "v_bias"] = v.chunk(3)
        else:
            out[k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2")] = v
    return out


def random_checkpoint(path, arch="vit", pool=None, **kw):
    """What a method file writes, with untrained weights: the 'randomly initialised encoder' baseline."""
    if arch == "resnet50":
        sd = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
        args = {"arch": "resnet50"}
    else:
        args = {**ARGS, "pos_embed": "sincos", "rel_pos": "none", "init_values": None, **kw}
        sd = VisionTransformer(**{**args, "rel_pos": False}).state_dict()   # vit_* keys: already timm's
        args["arch"] = "vit"
    ck = {"encoders": {"online": sd, "target": sd}, "encoder_args": args, "default_encoder": "online"}
    save_checkpoint({**ck, **({"pool": pool} if pool else {})}, str(path))
    return str(path)


@pytest.mark.parametrize("mode", ["finetune", "linear", "knn"])
def test_modes_from_random_encoder_checkpoint(tmp_path, mode):
    ck = random_checkpoint(tmp_path / "ck.pth")
    steps = ["--steps-per-epoch", "2"] if mode != "knn" else []   # kNN trains nothing
    r = run("--pretrained", ck, "--mode", mode, *steps, "--batch-size", "4", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in open(tmp_path / "o" / "log.jsonl")]
    assert 0.0 <= log[-1]["top1"] <= 100.0 and log[-1]["top5"] >= log[-1]["top1"] and "mean" in str(log[-1]["pool"])
    assert "pool mean" in r.stdout
    with open(tmp_path / "o" / "run.lock") as f:   # the run's flock died with it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if mode != "knn":
        assert (tmp_path / "o" / "best.pth").exists() and (tmp_path / "o" / "checkpoint.pth").exists()


def test_pool_recorded_with_the_encoder_and_both(tmp_path):
    ck = random_checkpoint(tmp_path / "ck.pth", pool="cls")
    r = run("--pretrained", ck, "--mode", "knn", "--batch-size", "4", "--out", str(tmp_path / "o"))
    assert r.returncode == 0 and "pool cls" in r.stdout and "pool mean" not in r.stdout, r.stderr
    r = run("--pretrained", ck, "--mode", "knn", "--pool", "both", "--batch-size", "4", "--out", str(tmp_path / "o"))
    assert r.returncode == 0 and "pool cls" in r.stdout and "pool mean" in r.stdout, r.stderr
    r = run("--pretrained", ck, "--pool", "both", "--out", str(tmp_path / "o2"))
    assert r.returncode == 1 and "--pool both" in r.stderr


def test_beit_layout_at_new_resolution_and_from_flag(tmp_path):
    args = dict(ARGS, pos_embed="none", rel_pos="shared", init_values=0.1)
    sd = beit_layout(VisionTransformer(**{**args, "rel_pos": True}).state_dict())
    save_checkpoint({"encoders": {"student": sd, "teacher": sd}, "encoder_args": {"arch": "vit", **args},
                     "default_encoder": "teacher"}, str(tmp_path / "ck.pth"))
    r = run("--pretrained", str(tmp_path / "ck.pth"), "--from", "student", "--img-size", "48", "--steps-per-epoch", "1",
            "--batch-size", "4", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "loading encoder 'student'" in r.stdout
    bad = run("--pretrained", str(tmp_path / "ck.pth"), "--from", "nope", "--out", str(tmp_path / "o2"))
    assert bad.returncode == 1 and "holds encoders student, teacher" in bad.stderr


def test_resnet50_linear_probe_and_block_probe(tmp_path):
    ck = random_checkpoint(tmp_path / "ck.pth", arch="resnet50")
    r = run("--pretrained", ck, "--mode", "linear", "--steps-per-epoch", "1", "--batch-size", "4",
            "--out", str(tmp_path / "o"))
    assert r.returncode == 0 and "pool avg" in r.stdout, r.stderr
    r = run("--pretrained", "random", "--mode", "linear", "--probe", "blocks", "--steps-per-epoch", "1", "--batch-size",
            "4", "--out", str(tmp_path / "b"))
    assert r.returncode == 0 and "block12" in r.stdout and "BEiT per-block probe" in r.stdout, r.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    base = ["--pretrained", "random", "--epochs", "3", "--steps-per-epoch", "2", "--batch-size", "4",
            "--out", str(tmp_path / "o")]
    assert run(*base, "--stop-after", "2").returncode == 0
    good = torch.load(tmp_path / "o" / "checkpoint.pth", weights_only=True)
    r = run(*base, "--blr", "1e30", "--allow-change", "blr")   # resumes, then the weights explode
    assert r.returncode == 1 and "NaN/inf" in r.stderr and "Traceback" not in r.stderr
    kept = torch.load(tmp_path / "o" / "checkpoint.pth", weights_only=True)
    assert kept["step"] == good["step"] == 2
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_rerun_guards(tmp_path):
    """Another mode / encoder into a used --out, a live lock, warmup past the run: one error line each."""
    a, b = random_checkpoint(tmp_path / "a.pth"), random_checkpoint(tmp_path / "b.pth", pos_embed="learned")
    out = ["--steps-per-epoch", "1", "--batch-size", "4", "--out", str(tmp_path / "o")]
    assert run("--pretrained", a, *out).returncode == 0
    for args, keys in [(("--pretrained", a, "--mode", "linear"), "mode: finetune -> linear"),
                       (("--pretrained", b), "pretrained_hash")]:
        r = run(*args, "--epochs", "2", *out)
        assert r.returncode == 1 and keys in r.stderr and str(tmp_path / "o") in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    with open(tmp_path / "o" / "run.lock") as f:   # a live run holds --out
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run("--pretrained", a, *out)
        assert r.returncode == 1 and "is in use" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert run("--pretrained", a, *out).returncode == 0   # released: the next run goes on
    r = run("--pretrained", a, "--epochs", "2", "--warmup-epochs", "2", "--out", str(tmp_path / "w"))
    assert r.returncode == 1 and "never reaches its peak" in r.stderr
    r = run("--pretrained", a, "--mode", "knn", "--compile", "--out", str(tmp_path / "c"))
    assert r.returncode == 1 and "--compile applies only with --mode finetune" in r.stderr


def test_val_classes_must_match_train(tmp_path):
    for split, names in (("train", ("cat", "dog")), ("val", ("cat", "cow"))):
        for c in names:
            os.makedirs(tmp_path / "d" / split / c)
            for i in range(4):
                Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "d" / split / c / f"{i}.png")
    r = subprocess.run([sys.executable, "finetune.py", "--preset", "tiny", "--pretrained", "random", "--data",
                        str(tmp_path / "d"), "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "val classes differ" in r.stderr and "cow" in r.stderr


def test_randaugment_magnitudes_match_timm():
    aa = pytest.importorskip("timm.data.auto_augment")
    assert set(RA_OPS) == set(aa._RAND_INCREASING_TRANSFORMS)
    for name, (level, signed, _) in RA_OPS.items():
        if level is None:
            assert aa.LEVEL_TO_ARG[name] is None
            continue
        for m in (0, 4.5, 9, 10):
            theirs = aa.LEVEL_TO_ARG[name](m, {"translate_pct": 0.45})[0]
            if name.startswith(("Color", "Contrast", "Brightness", "Sharpness")):
                theirs -= 1   # an enhance factor 1 +- level
            assert abs(abs(theirs) - level(m)) < 1e-9, (name, m, theirs, level(m))
    assert RA_OPS["Rotate"][0](9) == 27 and abs(RA_OPS["ColorIncreasing"][0](9) - 0.81) < 1e-9   # not 9 deg / 0.27
    img = Image.new("RGB", (20, 16), (200, 100, 50))
    for name, (level, signed, op) in RA_OPS.items():   # every op runs at both ends of the magnitude range
        for m in (0, 10):
            out = op(img, level(m) if level else None)
            assert out.size == img.size and out.mode == "RGB", name


def test_mean_pooling_drops_final_norm_as_beit():
    enc = VisionTransformer(**ARGS).eval()
    x = torch.randn(2, 3, 32, 32)
    raw = enc.forward_blocks(x)[-1]
    ft = Classifier(enc, 48, 10, "finetune", "mean", True).eval()
    assert isinstance(ft.encoder.norm, torch.nn.Identity)
    torch.testing.assert_close(ft.pooled(x)["mean"], ft.fc_norm(raw[:, 1:].mean(1)))
    probe = Classifier(VisionTransformer(**ARGS).eval(), 48, 10, "linear", "both", True).eval()
    assert isinstance(probe.heads["cls"][0], torch.nn.BatchNorm1d) and not probe.heads["cls"][0].affine


def test_lars_matches_mae_update():
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(4))
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = torch.randn(4, 3), torch.randn(4)
    LARS([w, b], lr=0.5, weight_decay=0.1).step()
    d = w.grad + 0.1 * w0
    torch.testing.assert_close(w.detach(), w0 - 0.5 * 0.001 * w0.norm() / d.norm() * d)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * b.grad)


def test_knn_matches_slow_loop():
    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(50, 8, generator=g), torch.randn(7, 8, generator=g)
    train_y = torch.randint(0, 4, (50,), generator=g)
    fast = knn_classify(train_f, train_y, test_f, 4, k=5, t=0.07, chunk=3)
    for i in range(7):
        sims = [torch.cosine_similarity(test_f[i], train_f[j], dim=0) for j in range(50)]
        slow = torch.zeros(4)
        for j in sorted(range(50), key=lambda j: -sims[j])[:5]:
            slow[train_y[j]] += torch.exp(sims[j] / 0.07)
        torch.testing.assert_close(fast[i], slow, rtol=1e-4, atol=1e-4)


def test_layer_decay_scales():
    enc = VisionTransformer(32, 4, 48, 3, 3, pos_embed="learned")
    groups = layer_decay_groups(Classifier(enc, 48, 10, "finetune", "cls", True), 0.05, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(enc.patch_embed.proj.weight)] == 0.5 ** 4 and scale[id(enc.blocks[0].mlp.fc1.weight)] == 0.5 ** 3
    assert scale[id(enc.blocks[2].attn.qkv.weight)] == 0.5 and scale[id(enc.norm.weight)] == 1.0


def test_grid_resize_keeps_cls_position():
    t = torch.randn(7 * 7, 2)
    assert resize_grid(t, (7, 7), (11, 11)).shape == (11 * 11, 2) and torch.equal(resize_grid(t, (7, 7), (7, 7)), t)
    pe = torch.randn(1, 1 + 4 * 4, 8)
    r = resize_pos_embed(pe, (4, 4), (6, 6))
    assert r.shape == (1, 1 + 6 * 6, 8) and torch.equal(r[:, 0], pe[:, 0])
    assert torch.equal(resize_pos_embed(pe, (4, 4), (4, 4)), pe)


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
@pytest.mark.parametrize("init_values", [None, 0.1])
def test_timm_vit_layout_loads_and_matches(pos_embed, init_values):
    timm = pytest.importorskip("timm")   # test extra (requirements-test.txt)
    theirs = timm.models.vision_transformer.VisionTransformer(num_classes=0, global_pool="token", **ARGS,
                                                              init_values=init_values).eval()
    ours = VisionTransformer(**ARGS, pos_embed=pos_embed, init_values=init_values).eval()
    if pos_embed == "sincos":   # what cim_correlate exports: the fixed table in timm's pos_embed
        theirs.pos_embed.data.copy_(ours.pos_embed)
    ours.load_state_dict(from_timm_layout(theirs.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), theirs.forward_features(x), atol=1e-4, rtol=0)


def test_timm_beit_layout_loads_and_matches():
    timm = pytest.importorskip("timm")
    theirs = timm.models.beit.Beit(num_classes=0, global_pool="token", use_abs_pos_emb=False, use_rel_pos_bias=True,
                                   init_values=0.1, **ARGS).eval()
    with torch.no_grad():   # non-trivial tables and biases, so the test can fail
        for n, p in theirs.named_parameters():
            if "relative_position" in n or n.endswith(("q_bias", "v_bias")):
                p.normal_()
    ours = VisionTransformer(**ARGS, pos_embed="none", rel_pos=True, init_values=0.1).eval()
    ours.load_state_dict(from_timm_layout(theirs.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), theirs.forward_features(x), atol=1e-4, rtol=0)


def test_sincos_rel_index_other_grids_and_drop_path():
    pe = sincos_pos_embed(16, 3, 5)
    assert pe.shape == (15, 16) and torch.equal(pe[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    idx, num = rel_pos_index(3, 5), 5 * 9
    assert idx.shape == (16, 16) and idx[0, 0] == num + 2 and idx[0, 1] == num and idx[1, 0] == num + 1
    assert idx[1:, 1:].diagonal().unique().numel() == 1 and idx[1:, 1:].max() == num - 1 and idx[1:, 1:].min() == 0
    m = VisionTransformer(**ARGS, pos_embed="learned", drop_path=0.5)
    assert m(torch.randn(1, 3, 16, 24)).shape == (1, 1 + 4 * 6, 48)   # positions interpolated on the fly
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m(x), m(x))   # no stochastic depth in eval


def test_compile_gives_the_eager_losses(tmp_path):
    """--compile (torch.compile, then DDP) trains the same model: the logged losses match the eager run's."""
    losses = []
    for flags in ((), ("--compile",)):
        r = run("--pretrained", "random", "--steps-per-epoch", "2", "--batch-size", "4", *flags,
                "--out", str(tmp_path / str(len(flags))))
        assert r.returncode == 0, r.stderr[-2000:]
        losses.append([float(s) for s in re.findall(r"loss (\d+\.\d+)", r.stdout)])
    assert len(losses[0]) == 2 and losses[0] == losses[1]
