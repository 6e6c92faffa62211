"""cim_correlate.py: geometry vs slow references, loss vs a loop, EMA, timm interop, overfit, smoke runs, bad input."""
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cim_correlate  # noqa: E402
from cim_correlate import (Config, CorrelationalIM, augment_exemplars, correlation_loss, crop_exemplars,  # noqa: E402
                           checkpoint, main, optimizer_step, official_no_decay, sample_boxes, sample_pairs, target_maps,
                           validate)

ROOT = Path(__file__).resolve().parents[1]
TINY = Config(**Config.PRESETS["tiny"])


def smooth_images(B, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(B, 3, 6, 6, generator=g), size=size, mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)                        # (B, 3, size, size)


def pil_reference(img, angle, center, half, ctx, ex, up=4):
    """The official steps for one exemplar, with PIL: rotate the image counter-clockwise (expand=True), crop the
    axis-aligned box there and resize it; rotate a label map the same way, mark the box, rotate it back, crop to the
    image, resize to the context; target = marked pixels. Label maps at `up` x resolution (less nearest-rounding)."""
    W, t = img.width, math.radians(angle)

    def box_in_rotated(size, rot_size):   # box centre and half sizes, in pixels of a rotated canvas
        px, py = (center * size / 2).tolist()                                  # offset from the image centre
        qx = rot_size[0] / 2 + math.cos(t) * px + math.sin(t) * py
        qy = rot_size[1] / 2 - math.sin(t) * px + math.cos(t) * py
        return qx, qy, half[0].item() * size / 2, half[1].item() * size / 2
    rot = img.rotate(angle, resample=Image.BILINEAR, expand=True)
    qx, qy, a, b = box_in_rotated(W, rot.size)
    exemplar = rot.resize((ex, ex), Image.BILINEAR, box=(qx - a, qy - b, qx + a, qy + b))
    lab = np.array(Image.new("L", (W * up, W * up), 1).rotate(angle, Image.NEAREST, expand=True))
    qx, qy, a, b = box_in_rotated(W * up, lab.shape[::-1])
    assert lab[int(qy - b + 1):int(qy + b - 1), int(qx - a + 1):int(qx + a - 1)].min() == 1   # box inside the image
    yy, xx = np.mgrid[:lab.shape[0], :lab.shape[1]] + 0.5
    lab[(np.abs(xx - qx) <= a) & (np.abs(yy - qy) <= b)] = 3
    back = Image.fromarray(lab).rotate(-angle, Image.NEAREST)
    back = back.crop(back.getbbox()).resize((ctx, ctx), Image.NEAREST)
    return torch.from_numpy(np.array(exemplar)).permute(2, 0, 1).float() / 255, torch.from_numpy(np.array(back) == 3)


def test_batched_geometry_matches_pil_reference():
    cfg, B = Config(), 3                                                      # official sizes: 224 / 160 / 64, 6 each
    images = smooth_images(B, cfg.img_size)
    angle, center, half = sample_boxes(B, cfg.num_exemplars, cfg, "cpu", torch.Generator().manual_seed(1))
    exemplars = crop_exemplars(images.float() / 255, angle, center, half, cfg.exemplar_size)
    maps = target_maps(angle, center, half, cfg.context_size)
    assert exemplars.shape == (B, 6, 3, 64, 64) and maps.shape == (B, 6, 160, 160)
    for i in range(B):
        img = Image.fromarray(images[i].permute(1, 2, 0).numpy())
        for e in range(cfg.num_exemplars):
            deg = round(math.degrees(angle[i, e].item()))
            ex_ref, map_ref = pil_reference(img, deg, center[i, e], half[i, e], cfg.context_size, cfg.exemplar_size)
            iou = (map_ref & maps[i, e]).sum() / (map_ref | maps[i, e]).sum()
            assert iou >= 0.95, (i, e, deg, iou)
            assert (ex_ref - exemplars[i, e]).abs().mean() < 0.01, (i, e, deg)
    flipped = crop_exemplars(images.float() / 255, angle, center, half, 64, flip=torch.ones(B, 6, dtype=torch.bool))
    torch.testing.assert_close(flipped, exemplars.flip(-1))                  # exemplar-only flip: the map is untouched


def test_box_ranges():
    cfg = Config()
    angle, center, half = sample_boxes(512, 6, cfg, "cpu", torch.Generator().manual_seed(0))
    deg = torch.round(torch.rad2deg(angle))
    assert deg.min() == -45 and deg.max() == 44                              # integers in [-45, 45)
    c, s = angle.cos(), angle.sin()
    for su in (-1, 1):                                                       # every corner inside the image
        for sv in (-1, 1):
            x = center[..., 0] + su * half[..., 0] * c - sv * half[..., 1] * s
            y = center[..., 1] + su * half[..., 0] * s + sv * half[..., 1] * c
            assert x.abs().max() <= 1 + 1e-5 and y.abs().max() <= 1 + 1e-5
    area = half.prod(-1)                                                     # (2a)(2b) / 4 = fraction of the image
    assert 0.02 < area.min() and area.max() <= 1 and 0.1 < area.mean() < 0.5
    context, exemplars, maps = sample_pairs(smooth_images(4, 32), TINY, torch.Generator().manual_seed(0))
    assert context.shape == (4, 3, 24, 24) and exemplars.shape == (4, 2, 3, 16, 16) and maps.dtype == torch.bool
    aug = augment_exemplars(exemplars.flatten(0, 1), torch.Generator().manual_seed(0))
    assert aug.shape == (8, 3, 16, 16) and 0 <= aug.min() and aug.max() <= 1


def official_box(size, cfg, g):
    """Slow per-sample transcription of the official exemplar box on a pixel grid (util/datasets.py:148-178,
    211-290, 330-353): draw the box, rotate a label map with expand, take the rotated box's bounding box and move
    each corner that falls outside the rotated image along one side, in the official order.
    -> (area / image area, log(width / height)) of the exemplar."""
    deg = int(torch.randint(-cfg.rotation, cfg.rotation, (1,), generator=g))
    lo, hi = math.log(cfg.exemplar_ratio_min), math.log(cfg.exemplar_ratio_max)
    i, j, h, w = 0, 0, size, size                                            # fallback: the whole image
    for _ in range(cfg.box_tries):
        area = size * size * float(torch.empty(1).uniform_(cfg.exemplar_scale_min, cfg.exemplar_scale_max, generator=g))
        aspect = math.exp(float(torch.empty(1).uniform_(lo, hi, generator=g)))
        bw, bh = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < bw <= size and 0 < bh <= size:
            i = int(torch.randint(0, size - bh + 1, (1,), generator=g))
            j = int(torch.randint(0, size - bw + 1, (1,), generator=g))
            h, w = bh, bw
            break
    lab = torch.ones(1, size, size, dtype=torch.uint8)
    lab[:, i:i + h, j:j + w] = 2
    rot = torchvision.transforms.functional.rotate(lab, deg, expand=True)[0]   # nearest, 0 outside the image
    img = rot > 0
    ys, xs = (rot == 2).nonzero(as_tuple=True)
    r1, r2, c1, c2 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())

    def first(v):
        return int(v.nonzero().min())

    def last(v):
        return int(v.nonzero().max())

    if deg > 0:
        r1n = r1 if img[r1, c1] else first(img[:, c1])                       # top-left: down its column
        c2n = c2 if img[r1, c2] else last(img[r1n])                          # top-right: left along the new top row
        c1n = c1 if img[r2, c1] else first(img[r2])                          # bottom-left: right along its row
        r2n = r2 if img[r2, c2n] else last(img[:, c2n])                      # bottom-right: up its column
    else:
        c1n = c1 if img[r1, c1] else first(img[r1])                          # top-left: right along its row
        r1n = r1 if img[r1, c2] else first(img[:, c2])                       # top-right: down its column
        r2n = r2 if img[r2, c1] else last(img[:, c1n])                       # bottom-left: up the new left column
        c2n = c2 if img[r2n, c2] else last(img[r2n])                         # bottom-right: left along the new row
    eh, ew = r2n - r1n + 1, c2n - c1n + 1
    return eh * ew / size ** 2, math.log(ew / eh)


def test_box_shape_distribution_matches_official_rule():
    cfg, q = Config(), torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    g = torch.Generator().manual_seed(0)
    ref = torch.tensor([official_box(224, cfg, g) for _ in range(1500)])    # (n, 2): area, log aspect
    ref_area, ref_aspect = ref[:, 0].quantile(q), ref[:, 1].abs().quantile(q)
    for rule in ("corner", "centre"):
        _, _, half = sample_boxes(20000, 1, dataclasses.replace(cfg, box_rule=rule), "cpu",
                                  torch.Generator().manual_seed(1))
        area = half.prod(-1).flatten().quantile(q)                           # (2a)(2b) / 4 = area fraction
        aspect = (half[..., 0] / half[..., 1]).log().abs().flatten().quantile(q)
        ok = (area - ref_area).abs().max() < 0.025 and (aspect - ref_aspect).abs().max() < 0.05
        assert ok == (rule == "corner"), (rule, area, ref_area, aspect, ref_aspect)   # centre: smaller, squarer


def test_loss_matches_slow_loop():
    logits, target = torch.randn(2, 3, 2, 5, 4), torch.rand(2, 3, 5, 4) < 0.3
    ref = 0.0
    for e in range(3):                                                       # sum over exemplars of the batch mean
        total = 0.0
        for b in range(2):
            for i in range(5):
                for j in range(4):
                    z = logits[b, e, :, i, j]
                    total += -(z[int(target[b, e, i, j])] - torch.logsumexp(z, 0))
        ref += total / (2 * 5 * 4)
    torch.testing.assert_close(correlation_loss(logits, target), ref)


def test_ema_math_and_frozen_parts():
    torch.manual_seed(0)
    model = CorrelationalIM(dataclasses.replace(TINY, depth=1))
    assert not model.online.patch_embed.proj.weight.requires_grad               # frozen random projection
    assert not any(p.requires_grad for p in model.target.parameters())
    assert model.online.patch_embed.proj.bias.abs().max() == 0                    # zeroed before freezing
    assert 0.9 < model.decoder_pred.weight.std() < 1.1                            # official N(0, 1) head
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in model.target.named_parameters()}
    model.ema_update(0.9)
    for n, p in model.online.named_parameters():
        want = p if n == "cls_token" else 0.9 * before[n] + 0.1 * p             # cls token: the online one
        torch.testing.assert_close(dict(model.target.named_parameters())[n], want)
    from common import cosine_schedule, param_groups
    sched = cosine_schedule(0.99, 1.0, 100)
    assert sched[0] == 0.99 and 0.99999 < sched[-1] <= 1.0
    decay, skip = ({id(p) for p in g["params"]} for g in param_groups(model, 0.05, skip_decay=official_no_decay))
    assert not (decay | skip) & {id(p) for p in model.target.parameters()}
    assert id(model.online.cls_token) in decay and id(model.online.blocks[0].norm1.weight) in skip   # as the official code


def test_fp16_skipped_step_leaves_ema_alone():
    torch.manual_seed(0)
    model = CorrelationalIM(dataclasses.replace(TINY, depth=1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)                     # what --amp fp16 builds on CUDA
    scaler.scale(torch.ones(()))
    target = [p.clone() for p in model.target.parameters()]
    for bad in (True, False):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.full_like(p, float("inf") if bad else 1.0)
        optimizer_step(model, opt, scaler, 1.0, 0.5)
        moved = any(not torch.equal(a, b) for a, b in zip(target, model.target.parameters()))
        assert moved != bad, bad                                                  # skipped step: target untouched
    assert scaler.get_scale() == 512.0


def test_overfit_one_batch():
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, depth=2, exemplar_aug=False)
    model = CorrelationalIM(cfg)
    context, exemplars, maps = sample_pairs(smooth_images(4, 32), cfg, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    losses = []
    for _ in range(50):
        loss, logs = model.loss_on_pairs(context, exemplars, maps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and logs["iou"] > 0.3, (losses, logs)   # found, not just the background prior


def test_exported_vit_loads_into_timm_and_finetune(tmp_path):
    timm = pytest.importorskip("timm")
    import finetune
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, depth=2, out=str(tmp_path))
    model = CorrelationalIM(cfg)
    with torch.no_grad():   # non-trivial weights everywhere, so the comparison can fail
        for p in model.online.parameters():
            p.add_(0.1 * torch.randn_like(p))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ck = checkpoint(cfg, model, opt, torch.amp.GradScaler("cpu", enabled=False))
    torch.save(ck, tmp_path / "checkpoint.pth")
    x = torch.randn(2, 3, 32, 32)
    ours = model.online.eval()(x)
    ref = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=2,
                                                           num_heads=3, num_classes=0, global_pool="token").eval()
    ref.load_state_dict(ck["encoders"]["online"], strict=True)
    torch.testing.assert_close(ref.forward_features(x), ours, atol=1e-4, rtol=0)
    enc, dim, _ = finetune.build_encoder(finetune.Config(pretrained=str(tmp_path / "checkpoint.pth"), mode="linear"))
    torch.testing.assert_close(enc.eval()(x), ours, atol=1e-4, rtol=0)
    assert dim == 192


def test_accumulation_2x4_equals_8(tmp_path, monkeypatch):
    real = cim_correlate.sample_pairs

    def per_image(images, cfg, gen=None):   # boxes, flips, augmentation drawn per image: batching can't change them
        pairs = [real(x[None], cfg, torch.Generator().manual_seed(int(x.sum()))) for x in images]
        return tuple(torch.cat(t) for t in zip(*pairs))

    monkeypatch.setattr(cim_correlate, "sample_pairs", per_image)

    def sgd(params, lr, **kw):   # AdamW would hide a wrong loss scale; SGD does not
        return torch.optim.SGD(params, lr=lr, momentum=0.9)

    monkeypatch.setattr(torch.optim, "AdamW", sgd)
    base = dataclasses.replace(TINY, depth=1, data="synthetic", steps_per_epoch=2, log_every=100, clip_grad=0.0)
    main(dataclasses.replace(base, batch_size=8, out=str(tmp_path / "a")))
    main(dataclasses.replace(base, batch_size=4, global_batch=8, out=str(tmp_path / "b")))   # accum 2
    a, b = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 2 and a["derived"] == b["derived"]
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=1e-5, rtol=0, msg=k)
    with pytest.raises(SystemExit, match="global_batch: 8 -> 16"):                 # resume refuses another recipe
        main(dataclasses.replace(base, batch_size=4, accum_iter=4, out=str(tmp_path / "b")))


def test_resume_with_accumulation_is_exact(tmp_path):
    base = dataclasses.replace(TINY, depth=1, data="synthetic", steps_per_epoch=3, batch_size=4, accum_iter=2,
                               log_every=100)
    main(dataclasses.replace(base, out=str(tmp_path / "a")))
    main(dataclasses.replace(base, out=str(tmp_path / "b"), stop_after=1))   # stops after optimizer step 1 of 3
    main(dataclasses.replace(base, out=str(tmp_path / "b")))                 # resumes 2 micro-batches into the epoch
    a, b = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 3
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


def run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.mark.parametrize("arch", ["vit", "resnet50"])
def test_smoke_then_finetune(tmp_path, arch):
    extra = ["--arch", "resnet50", "--img-size", "64", "--context-size", "64", "--exemplar-size", "32",
             "--batch-size", "4"] if arch == "resnet50" else ["--viz-every", "1"]
    run("cim_correlate.py", "--preset", "tiny", "--data", "synthetic", "--device", "cpu", "--epochs", "1",
        "--steps-per-epoch", "2", "--out", str(tmp_path / "pre"), *extra)
    ck = torch.load(tmp_path / "pre" / "checkpoint.pth", weights_only=True)
    assert ck["default_encoder"] == "online" and set(ck["encoders"]) == {"online", "target"}
    if arch == "vit":
        assert (tmp_path / "pre" / "viz_epoch0.png").exists()
    else:
        enc = torchvision.models.resnet50()
        enc.fc = torch.nn.Identity()
        for name in ("online", "target"):
            enc.load_state_dict(ck["encoders"][name], strict=True)
    src = "online" if arch == "vit" else "target"                           # finetune.py's default, and --from target
    r = run("finetune.py", "--pretrained", str(tmp_path / "pre" / "checkpoint.pth"), "--data", "synthetic", "--device",
            "cpu", "--mode", "finetune", "--epochs", "1", "--warmup-epochs", "0", "--steps-per-epoch", "2",
            "--batch-size", "4", "--out", str(tmp_path / "ft"), *(["--from", src] if src == "target" else []))
    assert f"loading encoder '{src}'" in r.stdout


@pytest.mark.parametrize("flags, msg", [
    (dict(exemplar_size=32, context_size=24), "larger than --context-size"),
    (dict(exemplar_scale_min=0.5, exemplar_scale_max=0.2), "scale range"),
    (dict(num_exemplars=1000), "--num-exemplars 1000"),
    (dict(context_size=30), "multiple of 4"),
])
def test_bad_input_fails_before_training(tmp_path, flags, msg):
    cfg = dataclasses.replace(TINY, data="synthetic", out=str(tmp_path / "o"), **flags)
    with pytest.raises(SystemExit, match=msg):
        main(cfg)
    assert not (tmp_path / "o").exists()
    validate(TINY)                                                           # the preset itself is fine
