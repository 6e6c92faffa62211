"""finetune.py: the three modes from a saved random encoder, resolution change, NaN stop, kNN and layer decay."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from common import save_checkpoint
from conftest import ROOT
from finetune import Classifier, VisionTransformer, to_timm_layout, knn_classify, layer_decay_groups, resize_rel_pos_table


def run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "finetune.py", "--preset", "tiny", "--data", "synthetic", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)


def random_checkpoint(path, arch="vit", **kw):
    """What a method file writes, with untrained weights: the 'randomly initialised encoder' baseline."""
    if arch == "resnet50":
        sd = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
        args = {"arch": "resnet50"}
    else:
        args = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, pos_embed="sincos",
                    rel_pos="none", init_values=None, **kw)
        sd = to_timm_layout(VisionTransformer(**args).state_dict())
        args["arch"] = "vit"
    save_checkpoint({"encoders": {"online": sd, "target": sd}, "encoder_args": args, "default_encoder": "online"}, str(path))
    return str(path)


@pytest.mark.parametrize("mode", ["finetune", "linear", "knn"])
def test_modes_from_random_encoder_checkpoint(tmp_path, mode):
    ck = random_checkpoint(tmp_path / "ck.pth")
    r = run("--pretrained", ck, "--mode", mode, "--steps-per-epoch", "2", "--batch-size", "4", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    log = [json.loads(l) for l in open(tmp_path / "o" / "log.jsonl")]
    assert 0.0 <= log[-1]["top1"] <= 100.0 and log[-1]["top5"] >= log[-1]["top1"]
    if mode != "knn":
        assert (tmp_path / "o" / "best.pth").exists() and (tmp_path / "o" / "checkpoint.pth").exists()


def test_beit_layout_at_new_resolution_and_from_flag(tmp_path):
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, pos_embed="none", rel_pos="shared", init_values=0.1)
    sd = to_timm_layout(VisionTransformer(**args).state_dict())
    save_checkpoint({"encoders": {"student": sd, "teacher": sd}, "encoder_args": {"arch": "vit", **args},
                     "default_encoder": "teacher"}, str(tmp_path / "ck.pth"))
    r = run("--pretrained", str(tmp_path / "ck.pth"), "--from", "student", "--img-size", "48", "--steps-per-epoch", "1",
            "--batch-size", "4", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "loading encoder 'student'" in r.stdout
    bad = run("--pretrained", str(tmp_path / "ck.pth"), "--from", "nope", "--out", str(tmp_path / "o2"))
    assert bad.returncode == 1 and "holds encoders student, teacher" in bad.stderr


def test_resnet50_linear_probe(tmp_path):
    ck = random_checkpoint(tmp_path / "ck.pth", arch="resnet50")
    r = run("--pretrained", ck, "--mode", "linear", "--steps-per-epoch", "1", "--batch-size", "4", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    base = ["--pretrained", "random", "--epochs", "3", "--steps-per-epoch", "2", "--batch-size", "4", "--out", str(tmp_path / "o")]
    assert run(*base, "--stop-after", "2").returncode == 0
    good = torch.load(tmp_path / "o" / "checkpoint.pth", weights_only=True)
    r = run(*base, "--blr", "1e30")   # resumes, then the weights explode
    assert r.returncode == 1 and "NaN/inf" in r.stderr and "Traceback" not in r.stderr
    kept = torch.load(tmp_path / "o" / "checkpoint.pth", weights_only=True)
    assert kept["step"] == good["step"] == 2
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_knn_matches_slow_loop():
    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(50, 8, generator=g), torch.randn(7, 8, generator=g)
    train_y = torch.randint(0, 4, (50,), generator=g)
    fast = knn_classify(train_f, train_y, test_f, 4, k=5, T=0.07, chunk=3)
    for i in range(7):
        sims = [torch.cosine_similarity(test_f[i], train_f[j], dim=0) for j in range(50)]
        order = sorted(range(50), key=lambda j: -sims[j])[:5]
        slow = torch.zeros(4)
        for j in order:
            slow[train_y[j]] += torch.exp(sims[j] / 0.07)
        torch.testing.assert_close(fast[i], slow, rtol=1e-4, atol=1e-4)


def test_layer_decay_scales():
    enc = VisionTransformer(32, 4, 48, 3, 3, pos_embed="learned")
    groups = layer_decay_groups(Classifier(enc, 48, 10, "finetune", "mean", True), 0.05, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(enc.patch_embed.proj.weight)] == 0.5 ** 4 and scale[id(enc.blocks[0].mlp.fc1.weight)] == 0.5 ** 3
    assert scale[id(enc.blocks[2].attn.qkv.weight)] == 0.5 and scale[id(enc.norm.weight)] == 1.0


def test_rel_pos_table_resize_keeps_cls_rows():
    t = torch.randn(7 * 7 + 3, 2)
    r = resize_rel_pos_table(t, (4, 4), (6, 6))
    assert r.shape == (11 * 11 + 3, 2) and torch.equal(r[-3:], t[-3:])
    assert torch.equal(resize_rel_pos_table(t, (4, 4), (4, 4)), t)
