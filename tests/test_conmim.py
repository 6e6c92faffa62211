"""conmim.py: the loss against its equation, exact masks, EMA math, shared geometry, overfit, bad input, CPU runs."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from common import IMAGENET_MEAN, IMAGENET_STD, parse_config
from conftest import ROOT
from conmim import (Config, ConMIM, block_mask, color_jitter, conmim_loss, ema_update, gaussian_blur, grey,
                    input_transform, main, official_no_decay, optimizer_step, param_groups,
                    random_mps_mask, sample_mask, to_timm_layout, two_views)
from common import jitter_op


def slow_loss(q, k, mask, tau, cross_image):
    """The ConMIM loss term by term: -log exp(<q_j, k_j>/tau) / sum_i exp(<q_j, k_i>/tau), mean over masked j."""
    q, k = q.double(), k.double()
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    B, N, _ = q.shape
    terms, hits = [], []
    for b in range(B):
        for j in range(N):
            if mask[b, j]:
                keys = k.reshape(B * N, -1) if cross_image else k[b]
                pos = b * N + j if cross_image else j
                sims = torch.stack([q[b, j] @ keys[i] / tau for i in range(len(keys))])
                terms.append(-(sims[pos].exp() / sims.exp().sum()).log())
                hits.append(float(sims.argmax() == pos))
    return torch.stack(terms).mean(), sum(hits) / len(hits)


@pytest.mark.parametrize("cross_image", [False, True])
def test_loss_matches_per_patch_loop(cross_image):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 10, 16, generator=g), torch.randn(3, 10, 16, generator=g)
    k[0, :5] = q[0, :5] + 0.1 * torch.randn(5, 16, generator=g)   # some easy positives, so accuracy is not 0
    mask = torch.rand(3, 10, generator=g) < 0.6
    loss, acc = conmim_loss(q, k, mask, tau=0.1, cross_image=cross_image)
    ref, ref_acc = slow_loss(q, k, mask, 0.1, cross_image)
    assert abs(loss.item() - ref.item()) < 1e-5 and abs(acc.item() - ref_acc) < 1e-6
    assert 0 < ref_acc < 1


def test_loss_limits():
    # seeded: with unseeded draws two of 16 random 8-d features are now and then nearly parallel
    q = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 16, dtype=torch.bool)
    assert conmim_loss(q, q, mask, tau=0.01)[0] < 1e-3                              # own key wins by far
    same = conmim_loss(q, torch.ones(2, 16, 8), mask, tau=0.1)[0]                    # all keys equal: uniform
    assert abs(same.item() - math.log(16)) < 1e-5


@pytest.mark.parametrize("grid,cell,ratio,expect", [((14, 14), 2, 0.75, 37 * 4), ((8, 8), 2, 0.75, 12 * 4),
                                                    ((6, 4), 2, 0.5, 3 * 4), ((8, 8), 4, 0.3, 2 * 16)])
def test_random_mps_mask_exact_counts_and_cells(grid, cell, ratio, expect):
    m = random_mps_mask(64, grid, cell, ratio, "cpu")
    assert m.shape == (64, grid[0] * grid[1]) and m.dtype == torch.bool
    assert (m.sum(1) == expect).all()
    cells = m.view(64, grid[0] // cell, cell, grid[1] // cell, cell)
    assert (cells == cells[:, :, :1, :, :1]).all()                                   # whole mask patches only
    C = grid[0] * grid[1] // cell ** 2
    assert len({tuple(r.tolist()) for r in m}) > min(32, math.comb(C, expect // cell ** 2) // 2)   # per-image draws


@pytest.mark.parametrize("grid,n_mask,min_block", [((14, 14), 75, 16), ((8, 8), 24, 5), ((14, 14), 147, 16),
                                                   ((3, 5), 7, 2), ((2, 2), 1, 1)])
def test_block_mask_exact_counts_and_blocks(grid, n_mask, min_block):
    m = block_mask(256, grid, n_mask, min_block, "cpu")
    assert (m.sum(1) == n_mask).all()
    if n_mask >= 4:   # blockwise, not scattered: almost every masked patch has a masked 4-neighbour
        v = F.pad(m.view(-1, 1, *grid).float(), (1, 1, 1, 1))
        nb = F.conv2d(v, torch.tensor([[[[0.0, 1, 0], [1, 0, 1], [0, 1, 0]]]]))
        assert ((nb.flatten(1) > 0) & m).sum() > 0.95 * m.sum()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = block_mask(4, grid, n_mask, min_block, "cpu", g1), block_mask(4, grid, n_mask, min_block, "cpu", g2)
    assert torch.equal(a, b)


def test_sample_mask_defaults_scale_with_grid():
    assert (sample_mask(Config(mask_type="block"), 2, "cpu").sum(1) == 75).all()     # official 75 of 196
    assert (sample_mask(Config(), 2, "cpu").sum(1) == 148).all()                     # mps32: 37 of 49 cells
    tiny = parse_config(Config, ["--preset", "tiny", "--mask-type", "block"])
    assert (sample_mask(tiny, 2, "cpu").sum(1) == round(64 * 75 / 196)).all()


def test_ema_update_math_parameters_only():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    teacher = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    student(torch.randn(8, 4))                                                       # non-trivial running stats
    t0, s0 = [p.clone() for p in teacher.parameters()], [p.clone() for p in student.parameters()]
    tb0 = [b.clone() for b in teacher.buffers()]
    ema_update([teacher], [student], 0.9)
    for t, a, b in zip(teacher.parameters(), t0, s0):
        torch.testing.assert_close(t, 0.9 * a + 0.1 * b, rtol=0, atol=1e-7)
    assert all(torch.equal(b, b0) for b, b0 in zip(teacher.buffers(), tb0))         # BN buffers: the teacher's own
    ema_update([teacher], [student], 1.0)                                            # m = 1 (end of schedule): frozen
    torch.testing.assert_close(list(teacher.parameters())[0], 0.9 * t0[0] + 0.1 * s0[0], rtol=0, atol=1e-7)


def test_model_teacher_is_a_gradient_free_copy():
    model = ConMIM(parse_config(Config, ["--preset", "tiny"]))
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert not any(n.startswith("teacher") for g in param_groups(model, 0.05) for n, p in model.named_parameters()
                   if any(p is q for q in g["params"]))
    assert torch.equal(model.teacher.blocks[0].attn.qkv.weight, model.student.blocks[0].attn.qkv.weight)
    assert "mask_token" not in model.teacher.state_dict() and model.mask_token.shape == (1, 1, 192)


def test_init_xavier_student_and_teacher_projector():
    """--init xavier: student and projector Linear / patch weights xavier-uniform, biases 0, the teacher a copy;
    default beit: cut at +-0.02 (fc2 rescaled per block)."""
    torch.manual_seed(0)
    beit = ConMIM(parse_config(Config, ["--preset", "tiny", "--depth", "2"]))
    xav = ConMIM(parse_config(Config, ["--preset", "tiny", "--depth", "2", "--init", "xavier"]))
    assert beit.student.blocks[0].attn.qkv.weight.abs().max() <= 0.02
    mods = [m for mod in (xav.student, xav.projector) for m in mod.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for m in mods:
        w, bound = m.weight.flatten(1), (6 / sum(m.weight.flatten(1).shape)) ** 0.5
        assert bound >= w.abs().max() > 0.9 * bound and (m.bias is None or not m.bias.any())
    assert torch.equal(xav.teacher.blocks[1].mlp.fc2.weight, xav.student.blocks[1].mlp.fc2.weight)


@pytest.mark.parametrize("teacher_bn", ["batch", "running"])
def test_teacher_bn_statistics_are_its_own(teacher_bn):
    """--teacher-bn running: the teacher's BN normalises with running statistics of the TEACHER's features (updated
    by its own forward), never the student's; the EMA step leaves them alone. batch (official): batch statistics."""
    torch.manual_seed(0)
    model = ConMIM(parse_config(Config, ["--preset", "tiny", "--depth", "2", "--teacher-bn", teacher_bn])).train()
    weak, strong = torch.randn(4, 3, 32, 32), 3 + 2 * torch.randn(4, 3, 32, 32)
    mask = sample_mask(parse_config(Config, ["--preset", "tiny"]), 4, "cpu")
    bn_t, bn_s = model.teacher_projector[1], model.projector[1]
    model.loss_on_views(weak, strong, mask, 0.1)
    model.ema_update(0.9)
    assert not torch.equal(bn_t.running_mean, bn_s.running_mean)
    if teacher_bn == "running":
        h = model.teacher_projector[0](model.teacher(strong).flatten(0, 1))          # first BN's input
        torch.testing.assert_close(bn_t.running_mean, 0.1 * h.mean(0), rtol=0, atol=1e-5)
        _, k = model.features(weak, strong, mask)
        k2 = model.teacher_projector(model.teacher(strong).flatten(0, 1)).view(4, 65, -1)[:, 1:]   # eval-mode BN
        torch.testing.assert_close(k, k2, rtol=0, atol=1e-5)                         # normalised by running stats


def test_weight_decay_groups_follow_the_official_code():
    model = ConMIM(parse_config(Config, ["--preset", "tiny"]))
    decay, skip = param_groups(model, 0.05, skip_decay=official_no_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, skipped = {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in skip["params"]}
    assert {"mask_token", "student.rel_pos_bias.relative_position_bias_table", "projector.0.weight"} <= decayed
    assert {"student.cls_token", "student.blocks.0.ls1.gamma", "student.blocks.0.attn.qkv.bias",
            "projector.1.weight", "student.norm.weight"} <= skipped
    assert not any(n.startswith("teacher") for n in decayed | skipped) and decay["weight_decay"] == 0.05


def test_fp16_skipped_step_leaves_student_and_teacher_alone():
    torch.manual_seed(0)
    model = ConMIM(parse_config(Config, ["--preset", "tiny", "--depth", "2"])).train()
    opt = torch.optim.AdamW(param_groups(model, 0.05, skip_decay=official_no_decay), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    weak = torch.randn(4, 3, 32, 32)
    mask = sample_mask(parse_config(Config, ["--preset", "tiny"]), 4, "cpu")
    with torch.no_grad():
        model.teacher.blocks[0].attn.qkv.weight.add_(1.0)                            # teacher != student
    for poison in (True, False):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        scaler.scale(model.loss_on_views(weak, weak, mask, 0.1)[0]).backward()
        if poison:
            model.student.blocks[0].mlp.fc1.weight.grad[0, 0] = float("inf")
        optimizer_step(model, opt, scaler, 1.0, 0.5)
        after = model.state_dict()
        changed = {k for k in before if "running" not in k and "num_batches" not in k
                   and not torch.equal(before[k], after[k])}
        if poison:
            assert not changed and scaler.get_scale() == 2.0 ** 9                   # skipped: nothing moves
        else:
            assert "teacher.blocks.0.attn.qkv.weight" in changed and "student.blocks.0.attn.qkv.weight" in changed
        assert all(p.grad is None for p in model.parameters())


def test_accumulation_equals_one_big_batch(tmp_path, monkeypatch):
    """2 micro-batches of 4 with --accum-iter 2 (and with --global-batch 8) == 1 batch of 8: weights to 1e-5, AdamW
    moments to 1e-4 (relative norm). The projector's BatchNorm makes the real model inexact (statistics per
    micro-batch), so a BN-free MLP replaces it here; every image gets the same mask, so both runs see the same work."""
    import conmim
    monkeypatch.setattr(conmim, "projector", lambda d, h, o: nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, o)))
    row = sample_mask(parse_config(Config, ["--preset", "tiny"]), 1, "cpu")
    monkeypatch.setattr(conmim, "sample_mask", lambda cfg, B, device, generator=None: row.expand(B, -1))
    real_views = conmim.two_views

    def per_image(images, gen=None):   # photometric draws per image: batching can't change them
        views = [real_views(x[None], torch.Generator().manual_seed(int(x.sum()))) for x in images]
        return tuple(torch.cat(v) for v in zip(*views))

    monkeypatch.setattr(conmim, "two_views", per_image)
    base = ["--preset", "tiny", "--depth", "2", "--data", "synthetic", "--steps-per-epoch", "2", "--epochs", "2",
            "--warmup-epochs", "1", "--clip-grad", "100"]   # clipping on but inactive: it would hide a 2x gradient
    runs = {"big": ["--batch-size", "8"], "accum": ["--batch-size", "4", "--accum-iter", "2"],
            "global": ["--batch-size", "4", "--global-batch", "8"]}
    ck = {}
    for name, flags in runs.items():
        torch.manual_seed(0)
        main(parse_config(Config, [*base, *flags, "--out", str(tmp_path / name)]))
        ck[name] = torch.load(tmp_path / name / "checkpoint.pth", weights_only=True)
    for name in ("accum", "global"):
        assert ck[name]["step"] == ck["big"]["step"] == 4
        for k, v in ck["big"]["model"].items():
            torch.testing.assert_close(ck[name]["model"][k], v, rtol=0, atol=1e-5, msg=k)
        for i, st in ck["big"]["optimizer"]["state"].items():
            for m in ("exp_avg", "exp_avg_sq"):
                assert (ck[name]["optimizer"]["state"][i][m] - st[m]).norm() <= 1e-4 * st[m].norm(), (i, m)


def photo(size):
    import skimage.data
    return Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.BICUBIC)


def test_views_share_one_crop():
    """The loader makes one crop (uint8); the weak view is exactly that crop normalised, and the strong view is
    computed from the same pixels, so patch i is the same region in both."""
    crop = input_transform(parse_config(Config, ["--preset", "tiny"]))(photo(64))
    assert crop.shape == (3, 32, 32) and crop.dtype == torch.uint8
    weak, strong = two_views(crop[None].expand(64, -1, -1, -1))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(weak[0], (crop / 255 - mean) / std)
    assert weak.shape == strong.shape and not torch.equal(weak, strong)


def test_jitter_ops_equal_torchvision():
    x = torch.rand(5, 3, 9, 9)
    f = torch.tensor([0.6, 0.8, 1.0, 1.2, 1.4]).view(5, 1, 1, 1)
    h = torch.tensor([-0.1, -0.05, 0.0, 0.05, 0.1]).view(5, 1, 1, 1)
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op, fn in enumerate(fns):
        factors = h if op == 3 else f
        ours = jitter_op(x, op, factors)
        for i in range(5):
            torch.testing.assert_close(ours[i], fn(x[i], factors[i].item()), rtol=0, atol=2e-6)


def stats(y):
    """Per-image summaries of (N, 3, H, W) in [0, 1]: channel means, channel stds, mean chroma (max - min)."""
    chroma = (y.amax(1) - y.amin(1)).mean((1, 2))
    return torch.cat([y.mean((2, 3)), y.std((2, 3)), chroma[:, None]], 1)


def same_distribution(a, b, z=4.0, rel=0.05):
    """Means within z standard errors and standard deviations within rel, per summary."""
    se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() <= z * se + 1e-4).all(), ((a.mean(0) - b.mean(0)) / se)
    assert ((a.std(0) / b.std(0) - 1).abs() <= rel).all(), a.std(0) / b.std(0)


def test_color_jitter_draws_like_torchvision():
    """Factors and the random order per image: the same output distribution as torchvision's ColorJitter
    applied image by image."""
    x = TF.to_dtype(TF.pil_to_tensor(photo(12)), torch.float32, scale=True)
    torch.manual_seed(0)
    ours = color_jitter(x.expand(3000, -1, -1, -1), 0.4, 0.4, 0.2, 0.1)
    ref = torch.stack([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)(x) for _ in range(3000)])
    same_distribution(stats(ours), stats(ref))


def test_grey_blur_solarize_match_pil():
    img = photo(48)
    x = TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)[None]
    assert (grey(x)[0, 0] * 255 - torch.from_numpy(np.array(img.convert("L"))).float()).abs().max() < 0.6
    for r in (0.1, 0.5, 1.0, 2.0):   # PIL approximates the Gaussian with box blurs: about 1 level apart
        pil = TF.pil_to_tensor(img.filter(ImageFilter.GaussianBlur(r))).float()
        diff = (gaussian_blur(x, torch.tensor([r]))[0] * 255 - pil).abs()[:, 6:-6, 6:-6]
        assert diff.mean() < 1.5 and diff.max() < 6, (r, diff.mean(), diff.max())
    solar = TF.pil_to_tensor(ImageOps.solarize(img, 128)).float() / 255
    torch.testing.assert_close(torch.where(x[0] >= 128 / 255, 1 - x[0], x[0]), solar, rtol=0, atol=1e-6)


def test_strong_view_draws_like_the_official_pil_pipeline():
    """The whole strong view against the PIL pipeline it replaces (ColorJitter p 0.8, grayscale 0.2, blur 0.1,
    solarize 0.2), applied image by image: same summary distributions, same share of grey images."""
    img = photo(16)
    blur = T.Lambda(lambda im: im.filter(ImageFilter.GaussianBlur(random.uniform(0.1, 2.0))))
    official = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                          T.RandomApply([blur], p=0.1), T.RandomSolarize(128, p=0.2), T.ToTensor()])
    torch.manual_seed(0)
    random.seed(0)
    ref = torch.stack([official(img) for _ in range(3000)])
    crop = TF.pil_to_tensor(img)[None].expand(3000, -1, -1, -1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ours = two_views(crop)[1] * std + mean
    same_distribution(stats(ours), stats(ref), rel=0.08)
    grey_share = [((y.amax(1) - y.amin(1)) < 1.5 / 255).all((1, 2)).float().mean() for y in (ours, ref)]
    assert abs(grey_share[0] - grey_share[1]) < 0.03 and abs(grey_share[0] - 0.2) < 0.03, grey_share


def test_overfit_one_batch():
    """50 steps on one fixed batch and mask drive the loss far below log N. The relative position table starts
    random (as after some training): with BEiT's zero init every mask token of an image is identical until the
    table has learned, which takes far more than 50 steps (docs/conmim.md, Presets)."""
    torch.manual_seed(0)
    cfg = parse_config(Config, ["--preset", "tiny", "--depth", "2"])
    model = ConMIM(cfg).train()
    with torch.no_grad():
        model.student.rel_pos_bias.relative_position_bias_table.normal_(0, 3.0)
        model.ema_update(0.0)                                                        # teacher = student again
    weak = F.interpolate(torch.randn(8, 3, 8, 8), size=32, mode="bilinear") + 0.1 * torch.randn(8, 3, 32, 32)
    strong = weak + 0.3 * torch.randn_like(weak)
    mask = sample_mask(cfg, 8, "cpu")
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.98))
    for _ in range(50):
        loss, logs = model.loss_on_views(weak, strong, mask, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.ema_update(0.996)
    assert loss.item() < 0.25 * math.log(64) and logs["acc"] > 0.9


@pytest.mark.parametrize("flags,msg", [(["--img-size", "30"], "multiple of --patch-size"),
                                       (["--mask-ratio", "1.0"], "--mask-ratio 1.0: must be (0, 1)"),
                                       (["--mask-ratio", "0"], "must be (0, 1)"),
                                       (["--mask-patch", "6"], "--mask-patch 6 must be a multiple"),
                                       (["--mask-patch", "12"], "that divides --img-size 32"),
                                       (["--mask-type", "block", "--mask-patches", "64"], "< 64 patches"),
                                       (["--tau", "0"], "--tau 0.0"),
                                       (["--accum-iter", "0"], "--accum-iter 0: must be >= 1"),
                                       (["--global-batch", "12"], "--global-batch 12 is not a multiple")])
def test_bad_input_fails_before_anything_is_built(tmp_path, capsys, flags, msg):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        main(parse_config(Config, ["--preset", "tiny", "--data", "synthetic", "--out", str(out), *flags]))
    assert str(e.value).startswith("error: ") and msg in str(e.value), str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("flags", [["--mask-type", "grid"], ["--arch", "vit_huge"], ["--amp", "fp8"]])
def test_enumerated_flags_are_argparse_choices(capsys, flags):
    with pytest.raises(SystemExit) as e:
        parse_config(Config, ["--preset", "tiny", *flags])
    err = str(e.value.code)   # one line: error: argument --x: invalid choice ... (see --help)
    assert err.startswith(f"error: argument {flags[0]}") and "invalid choice" in err and "\n" not in err, err


@pytest.mark.parametrize("preset,extra", [("tiny", []), ("small32", ["--depth", "2"])])
def test_exported_encoders_load_strict_into_timm_beit_and_finetune(tmp_path, preset, extra):
    """The checkpoint's encoders (teacher and student, beit_* layout) load with strict=True into timm's Beit and give
    the same tokens (1e-4); finetune.py's loader rebuilds them from "encoder_args" with the same output."""
    timm = pytest.importorskip("timm")
    import finetune
    torch.manual_seed(0)
    cfg = parse_config(Config, ["--preset", preset, *extra])
    model = ConMIM(cfg).eval()
    with torch.no_grad():   # non-trivial tables, k/q/v biases and a teacher != student, so the test can fail
        for n, p in model.named_parameters():
            if "relative_position" in n or n.endswith("bias"):
                p.normal_(0, 0.5)
        model.ema_update(0.5)
    args = {"arch": "vit", **model.vit_args}
    x = torch.randn(2, 3, 32, 32)
    for name in ("teacher", "student"):
        enc = getattr(model, name)
        sd = to_timm_layout(enc.state_dict())
        theirs = timm.models.beit.Beit(img_size=32, patch_size=4, embed_dim=192, depth=len(enc.blocks),
                                       num_heads=3, num_classes=0, global_pool="token", use_abs_pos_emb=False,
                                       use_rel_pos_bias=True, init_values=cfg.init_values or None).eval()
        theirs.load_state_dict(sd, strict=True)
        torch.testing.assert_close(theirs.forward_features(x), enc(x), atol=1e-4, rtol=0)
        torch.save({"encoders": {name: sd}, "encoder_args": args, "default_encoder": name}, tmp_path / "ck.pth")
        ours, dim, _ = finetune.build_encoder(parse_config(finetune.Config, ["--pretrained", str(tmp_path / "ck.pth")]))
        assert dim == 192
        torch.testing.assert_close(ours.eval()(x), enc(x), atol=1e-4, rtol=0)


def test_paper_presets_and_recipe_line():
    from conmim import recipe_line
    rows = {"vit_small_300ep": "82.0", "vit_base_300ep": "83.5", "vit_base_800ep": "83.7", "vit_large_800ep": "85.2",
            "vit_large_1600ep": "85.5"}
    for preset, acc in rows.items():
        cfg = parse_config(Config, ["--preset", preset, "--data", "/imagenet"])
        assert cfg.global_batch == 2048                                               # accumulation derived in main
        line = recipe_line(cfg, 8, 4, 625)
        assert line.startswith(f"recipe: {preset} | global batch 2048 = 64 per GPU x 8 GPUs x 4 accum") and acc in line
        assert cfg.paper_batch == 2048 and "148 of 196 patches" in line
    large = parse_config(Config, ["--preset", "vit_large_1600ep"])
    assert (large.lr, large.init_values, large.epochs, large.batch_size) == (7.5e-4, 1e-5, 1600, 64)
    plain = parse_config(Config, ["--data", "/imagenet", "--epochs", "300"])          # the README's plain command
    assert "recipe: defaults | global batch 64 = 64 per GPU x 1 GPUs x 1 accum" in recipe_line(plain, 1, 1, 20018)


def run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_cpu_smoke_exact_resume_viz_then_finetune(tmp_path):
    base = ["conmim.py", "--preset", "tiny", "--data", "synthetic", "--device", "cpu", "--epochs", "2",
            "--steps-per-epoch", "2", "--viz-every", "1", "--batch-size", "4", "--accum-iter", "2"]
    a = run(*base, "--out", str(tmp_path / "a"))
    b1 = run(*base, "--out", str(tmp_path / "b"), "--stop-after", "3")   # mid-epoch: sampler offset in micro-batches
    b2 = run(*base, "--out", str(tmp_path / "b"))
    assert "resumed from" in b2.stdout
    assert "recipe: tiny | global batch 8 = 4 per GPU x 1 GPUs x 2 accum" in a.stdout and "2 steps/epoch" in a.stdout
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    other = subprocess.run([sys.executable, *base, "--accum-iter", "4", "--out", str(tmp_path / "b")], cwd=ROOT,
                           capture_output=True, text=True, timeout=600, env=env)   # global batch 16: another run
    assert other.returncode == 1 and "global_batch: 8 -> 16" in other.stderr, other.stderr

    def losses(out):
        return [line.split("|")[1] for line in out.splitlines() if line.startswith("ep ")]

    assert losses(a.stdout) == losses(b1.stdout) + losses(b2.stdout) and len(losses(a.stdout)) == 4
    ck = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)
    ckb = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)
    assert all(torch.equal(v, ckb["model"][k]) for k, v in ck["model"].items())   # viz does not disturb training
    assert ck["default_encoder"] == "teacher" and set(ck["encoders"]) == {"teacher", "student"}
    assert ck["encoder_args"]["rel_pos"] == "shared" and ck["encoder_args"]["pos_embed"] == "none"
    teacher = ck["encoders"]["teacher"]
    assert "blocks.0.attn.relative_position_bias_table" in teacher and "blocks.3.gamma_2" in teacher   # beit_* layout
    assert not any("mask_token" in k or "projector" in k for k in teacher)
    assert not torch.equal(teacher["blocks.0.attn.qkv.weight"], ck["encoders"]["student"]["blocks.0.attn.qkv.weight"])
    assert (tmp_path / "a" / "viz_epoch0.png").exists() and (tmp_path / "a" / "viz_epoch1.png").exists()
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "a" / "log.jsonl")] == [0, 1]
    ft = run("finetune.py", "--pretrained", str(tmp_path / "a" / "checkpoint.pth"), "--data", "synthetic", "--device",
             "cpu", "--mode", "finetune", "--epochs", "1", "--warmup-epochs", "0", "--steps-per-epoch", "2",
             "--batch-size", "4", "--workers", "0", "--out", str(tmp_path / "ft"))
    assert "loading encoder 'teacher'" in ft.stdout
    knn = run("finetune.py", "--preset", "tiny", "--pretrained", str(tmp_path / "a" / "checkpoint.pth"), "--from",
              "student", "--data", "synthetic", "--mode", "knn", "--out", str(tmp_path / "knn"))
    assert "loading encoder 'student'" in knn.stdout
