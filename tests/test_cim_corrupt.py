"""cim_corrupt.py: dall_e interop and the pickle guard, bad inputs, RevDet labels and ResPix targets against slow
loops, masks, sampling, timm interop of the exported enhancer, dVAE training, a 50-step overfit, gradient accumulation,
what --lam acts on, and CPU smoke runs followed by finetune.py."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pytest
import torch
import torchvision

import cim_corrupt as cc
from common import param_groups, parse_config

ROOT = Path(__file__).resolve().parents[1]


def tiny(**kw):
    return dataclasses.replace(parse_config(cc.Config, ["--preset", "tiny"]), **kw)


def dalle_pair(vocab=512):
    """dall_e's own Encoder / Decoder, small, random weights and biases (so a mis-wired bias can fail the test)."""
    dall_e = pytest.importorskip("dall_e")
    torch.manual_seed(0)
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=vocab)
    dec = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=vocab)   # n_init != 8 n_hid: an id_path
    with torch.no_grad():
        for p in [*enc.parameters(), *dec.parameters()]:
            if p.ndim == 1:
                p.normal_(0, 0.1)
    return enc.eval(), dec.eval()


def ours_from(enc, dec):
    tok = cc.Tokenizer(cc.dvae_args(enc.state_dict(), "encoder", "e"), cc.dvae_args(dec.state_dict(), "decoder", "d"))
    tok.encoder.load_state_dict(enc.state_dict()), tok.decoder.load_state_dict(dec.state_dict())   # strict: same keys
    return tok.eval()


def assert_same_outputs(tok, enc, dec):
    import dall_e
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(cc.map_pixels(x), dall_e.map_pixels(x))
    assert torch.equal(cc.unmap_pixels(x), dall_e.unmap_pixels(x))
    with torch.no_grad():
        logits = enc(dall_e.map_pixels(x))                                   # (2, 512, 4, 4)
        torch.testing.assert_close(tok.encoder(cc.map_pixels(x)), logits, atol=1e-4, rtol=0)
        ids = logits.argmax(1)
        assert torch.equal(tok.encode(x), ids)
        onehot = torch.nn.functional.one_hot(ids, 512).permute(0, 3, 1, 2).float()
        ref = dec(onehot)                                                    # (2, 6, 32, 32)
        torch.testing.assert_close(tok.decoder(onehot), ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(tok.decoder(ids), ref, atol=1e-4, rtol=0)   # the column-lookup path
        probs = torch.softmax(torch.randn(2, 512, 4, 4), 1)                  # soft probabilities (BEiT's forward)
        torch.testing.assert_close(tok.decoder(probs), dec(probs), atol=1e-4, rtol=0)
        torch.testing.assert_close(tok.decode(ids), dall_e.unmap_pixels(torch.sigmoid(ref[:, :3])), atol=1e-4, rtol=0)


def test_dalle_interop():
    enc, dec = dalle_pair()
    tok = ours_from(enc, dec)
    assert set(tok.encoder.state_dict()) == set(enc.state_dict())
    assert set(tok.decoder.state_dict()) == set(dec.state_dict())
    assert_same_outputs(tok, enc, dec)


def test_pickles_need_trust_and_bad_files_fail(tmp_path):
    enc, dec = dalle_pair()
    torch.save(enc, tmp_path / "encoder.pkl"), torch.save(dec, tmp_path / "decoder.pkl")   # whole modules, as DALL-E
    e, d = str(tmp_path / "encoder.pkl"), str(tmp_path / "decoder.pkl")
    with pytest.raises(SystemExit, match="--trust-pickle"):
        cc.load_tokenizer(tiny(tokenizer="", dvae_encoder=e, dvae_decoder=d))
    tok = cc.load_tokenizer(tiny(tokenizer="", dvae_encoder=e, dvae_decoder=d, trust_pickle=True))
    assert_same_outputs(tok, enc, dec)
    with pytest.raises(SystemExit, match="other half"):
        cc.load_tokenizer(tiny(tokenizer="", dvae_encoder=d, dvae_decoder=e, trust_pickle=True))
    torch.save(dalle_pair(vocab=1024)[1], tmp_path / "dec1024.pkl")
    with pytest.raises(SystemExit, match="mismatch"):
        cc.load_tokenizer(tiny(tokenizer="", dvae_encoder=e, dvae_decoder=str(tmp_path / "dec1024.pkl"),
                               trust_pickle=True))
    # the plain format round-trips without pickles; a file made for another grid fails
    plain = tmp_path / "tokenizer.pth"
    torch.save(cc.Tokenizer(tok.args["encoder"], tok.args["decoder"], size=64).state(), plain)
    cc.load_tokenizer(tiny(tokenizer=str(plain)))
    with pytest.raises(SystemExit, match="grid"):
        cc.load_tokenizer(tiny(tokenizer=str(plain), patch_size=8))   # 32 / 8 = 4x4 patches vs an 8x8 tokenizer grid
    for bad, msg in ((dict(tokenizer=str(tmp_path / "nope.pth")), "does not exist"),
                     (dict(tokenizer=""), "exactly one"),
                     (dict(tokenizer="", trust_pickle=True), "exactly one"),
                     (dict(dvae_encoder=e), "exactly one"), (dict(tokenizer="", dvae_encoder=e), "exactly one"),
                     (dict(img_size=30), "multiple"),
                     (dict(gen_share_blocks=3), "gen-share-blocks"),
                     (dict(arch="resnet50", gen_share_blocks=1), "ViT")):
        with pytest.raises(SystemExit, match=msg):
            cc.validate(tiny(**bad))


@pytest.mark.parametrize("flags", [["--arch", "vit_huge"], ["--objective", "mse"], ["--amp", "fp8"]])
def test_enumerated_flags_are_argparse_choices(capsys, flags):
    with pytest.raises(SystemExit) as e:
        parse_config(cc.Config, ["--preset", "tiny", *flags])
    err = str(e.value.code)   # one line: error: argument --x: invalid choice ... (see --help)
    assert err.startswith(f"error: argument {flags[0]}") and "invalid choice" in err and "\n" not in err, err


def test_revdet_labels_against_loop():
    torch.manual_seed(0)
    ids, sampled = torch.randint(0, 3, (4, 50)), torch.randint(0, 3, (4, 50))   # 3 codes: many samples = the original
    mask = cc.random_mask(4, 50, 0.5, "cpu")
    corrupt, replaced = cc.corrupt_tokens(ids, mask, sampled)
    for b in range(4):
        for n in range(50):
            want = sampled[b, n] if mask[b, n] else ids[b, n]
            assert corrupt[b, n] == want and replaced[b, n] == bool(want != ids[b, n])
    assert (mask & (sampled == ids)).any() and not replaced[mask & (sampled == ids)].any() and not replaced[~mask].any()


@pytest.mark.parametrize("k", [3, 4])
def test_window_norm_against_loop(k):
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    target, mean, std = cc.window_norm(x, k)

    def refl(i, n):
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    for b, c, i, j in [(b, c, i, j) for b in range(2) for c in range(3) for i in range(7) for j in range(9)]:
        win = torch.stack([x[b, c, refl(i + di, 7), refl(j + dj, 9)]
                           for di in range(-(k // 2), (k - 1) // 2 + 1) for dj in range(-(k // 2), (k - 1) // 2 + 1)])
        want = (x[b, c, i, j] - win.mean()) / (win.var(unbiased=False) + 0.01).sqrt()   # default eps
        assert abs(target[b, c, i, j] - want) < 1e-4


def test_masks_and_sampling():
    m = cc.random_mask(16, 196, 0.5, "cpu")
    assert m.shape == (16, 196) and (m.sum(1) == 98).all()
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1])).expand(1, 20000, 3)
    freq = torch.bincount(cc.sample_tokens(logits, 1.0).flatten(), minlength=3) / 20000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.02)
    assert (cc.sample_tokens(logits, 1e-3) == 0).all()                       # T -> 0: argmax


def smooth_images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bilinear")


def test_tokenizer_training_reduces_reconstruction_loss():
    torch.manual_seed(0)
    tok, x = cc.new_tokenizer(tiny(tok_hid=32, tok_vocab=128), 32), smooth_images(4)
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    hist = []
    for _ in range(25):
        loss, logs = tok(x, 1.0, 0.03)   # Gumbel-softmax relaxation, logit-Laplace NLL + KL to uniform
        opt.zero_grad(), loss.backward(), opt.step()
        hist.append((logs["nll"].item(), logs["mse"].item()))
    assert hist[-1][0] < hist[0][0] - 0.15 and hist[-1][1] < 0.9 * hist[0][1], hist[::5]


def test_overfit_50_steps_lowers_enhancer_loss():
    """One image, 50 steps: the enhancer (learned positions, so it can memorise) and the generator both fit it."""
    torch.manual_seed(0)
    cfg = tiny(patch_size=8, depth=2, drop_path=0.0, pos_embed="learned", tok_hid=32, tok_vocab=128)  # 4x4 tokens
    model = cc.CIM(cfg, cc.load_tokenizer(cfg))
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-3)
    x, enh, gen = (torch.rand(1, 3, 32, 32) * 255).to(torch.uint8).expand(4, -1, -1, -1), [], []
    for _ in range(50):
        loss, logs = model(x, cfg.lam, cfg.sample_temperature)
        opt.zero_grad(), loss.backward(), opt.step()
        enh.append(logs["loss_enh"].item()), gen.append(logs["loss_gen"].item())
    assert sum(enh[-5:]) < 0.5 * sum(enh[:5]) and sum(gen[-5:]) < 0.5 * sum(gen[:5]), (enh[::5], gen[::5])


def run(*args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("arch,objective,extra", [
    ("vit_tiny", "respix", ["--train-tokenizer", "--tok-epochs", "1", "--viz-every", "1"]),
    ("vit_tiny", "revdet", ["--gen-share-blocks", "1", "--viz-every", "1"]),
    ("resnet50", "respix", ["--batch-size", "4"]),
    ("resnet50", "revdet", ["--batch-size", "4"])])
def test_cpu_smoke_then_finetune(tmp_path, arch, objective, extra):
    out = tmp_path / "pre"
    run("cim_corrupt.py", "--preset", "tiny", "--data", "synthetic", "--device", "cpu", "--epochs", "1",
        "--steps-per-epoch", "2", "--arch", arch, "--objective", objective, "--out", str(out), *extra)
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    sd, args = ck["encoders"][ck["default_encoder"]], ck["encoder_args"]
    if arch == "resnet50":
        assert args == {"arch": "resnet50"}
        assert set(sd) == {k for k in torchvision.models.resnet50().state_dict() if not k.startswith("fc.")}
    else:
        assert args["arch"] == "vit" and "blocks.0.attn.q_bias" in sd
        assert "blocks.0.attn.relative_position_bias_table" in sd
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert all(k in last for k in ("loss", "loss_gen", "loss_enh"))
    if "--viz-every" in extra:
        assert (out / "viz_epoch0.png").stat().st_size > 0
    if "--train-tokenizer" in extra:
        assert (out / "tokenizer.pth").exists()
    run("finetune.py", "--preset", "tiny", "--pretrained", str(out / "checkpoint.pth"), "--data", "synthetic",
        "--device", "cpu", "--mode", "finetune", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4",
        "--out", str(tmp_path / "ft"))


@pytest.mark.parametrize("pos_embed", ["none", "learned"])
def test_exported_vit_loads_strict_into_timm_and_finetune(tmp_path, pos_embed):
    """The enhancer export (timm beit_* layout) loads strictly into timm's Beit and gives the same tokens (1e-4);
    finetune.py's loader reads the same checkpoint entry."""
    timm = pytest.importorskip("timm")
    import finetune
    torch.manual_seed(0)
    cfg = tiny(depth=2, pos_embed=pos_embed)
    model = cc.CIM(cfg, cc.load_tokenizer(cfg)).eval()
    with torch.no_grad():
        for p in model.enhancer.parameters():   # non-trivial biases, layer scale and relative-bias table
            p.add_(0.05 * torch.randn_like(p))
    sd = cc.to_timm_layout(model.enhancer.state_dict())
    kw = dict(img_size=32, patch_size=4, embed_dim=192, depth=2, num_heads=3, init_values=0.1, num_classes=0)
    ref = timm.models.beit.Beit(**kw, use_abs_pos_emb=pos_embed == "learned", use_rel_pos_bias=True,
                                global_pool="token")
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref.eval().forward_features(x), model.enhancer(x), atol=1e-4, rtol=0)
    ck = tmp_path / "ck.pth"
    torch.save({"encoders": {"enhancer": sd}, "encoder_args": model.encoder_args, "default_encoder": "enhancer"}, ck)
    ft = parse_config(finetune.Config, ["--preset", "tiny", "--pretrained", str(ck), "--data", "synthetic"])
    enc = finetune.build_encoder(ft)[0].eval()
    with torch.no_grad():
        torch.testing.assert_close(enc(x), model.enhancer(x), atol=1e-4, rtol=0)


def test_explicit_tokenizer_wins_over_preset_random_and_missing_dall_e_is_one_line(tmp_path, monkeypatch):
    enc, dec = dalle_pair()
    e, d = str(tmp_path / "encoder.pkl"), str(tmp_path / "decoder.pkl")
    torch.save(enc, e), torch.save(dec, d)
    cfg = parse_config(cc.Config, ["--preset", "tiny", "--dvae-encoder", e, "--dvae-decoder", d, "--trust-pickle"])
    cc.validate(cfg)                                     # the preset's tokenizer="random" gives way
    assert cfg.tokenizer == "" and cc.load_tokenizer(cfg).vocab_size == 512
    for name in [m for m in sys.modules if m == "dall_e" or m.startswith("dall_e.")]:
        monkeypatch.setitem(sys.modules, name, None)    # as if the dall_e package were not installed
    with pytest.raises(SystemExit, match="needs the Python package 'dall_e"):
        cc.load_tokenizer(cfg)


def run_main(out, monkeypatch, **kw):
    """One optimizer step of main() on the tiny preset with fixed masks (a row pattern that repeats every 2 images) and
    argmax "samples", so micro-batches see exactly the work of the full batch."""
    monkeypatch.setattr(cc, "random_mask", lambda B, N, r, dev: (torch.arange(N) + torch.arange(B)[:, None]) % 2 == 0)
    monkeypatch.setattr(cc, "sample_tokens", lambda logits, t: logits.argmax(-1))
    monkeypatch.setattr(cc, "augment", lambda images: images.float() / 255)   # jitter draws follow the batch
    cfg = tiny(data="synthetic", out=str(out), steps_per_epoch=1, log_every=1, **kw)
    cc.main(cfg)
    return torch.load(out / "checkpoint.pth", weights_only=True)


def test_accumulation_2x4_equals_8(tmp_path, monkeypatch):
    full = run_main(tmp_path / "full", monkeypatch, batch_size=8)
    acc = run_main(tmp_path / "acc", monkeypatch, batch_size=4, accum_iter=2)
    assert full["step"] == acc["step"] == 1 and acc["derived"]["global_batch"] == 8
    worst = max((full["model"][k] - acc["model"][k]).abs().max().item() for k in full["model"])
    assert worst < 1e-5, worst
    gb = run_main(tmp_path / "gb", monkeypatch, batch_size=4, global_batch=8)   # --global-batch derives accum 2
    assert max((gb["model"][k] - acc["model"][k]).abs().max().item() for k in gb["model"]) == 0


def lam_grads(monkeypatch, lam, **kw):
    monkeypatch.setattr(cc, "sample_tokens", lambda logits, t: logits.argmax(-1))
    torch.manual_seed(0)
    cfg = tiny(lam=lam, depth=2, **kw)
    model, x = cc.CIM(cfg, cc.load_tokenizer(cfg)), smooth_images(4)
    torch.manual_seed(1)                                 # the same mask for both lam values
    model(x, cfg.lam, cfg.sample_temperature)[0].backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_lam_acts_only_through_shared_blocks(monkeypatch):
    """lam scales the enhancer's gradient by a constant (AdamW cancels it up to its eps; only the enhancer's own clip
    sees it) and leaves the generator's alone, unless blocks are shared: there it sets the mix of the two losses."""
    a, b = lam_grads(monkeypatch, 1.0), lam_grads(monkeypatch, 4.0)
    for n in a:
        torch.testing.assert_close(b[n], (4 if n.startswith("enhancer") else 1) * a[n], rtol=1e-4, atol=1e-9)
    a, b = lam_grads(monkeypatch, 1.0, gen_share_blocks=1), lam_grads(monkeypatch, 4.0, gen_share_blocks=1)
    g, h = a["enhancer.blocks.0.attn.qkv.weight"], b["enhancer.blocks.0.attn.qkv.weight"]
    assert not torch.allclose(h, 4 * g, rtol=1e-2) and not torch.allclose(h, g, rtol=1e-2)


def test_respix_targets_bounded_on_flat_windows():
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 8, 8] = 1 / 255 / 0.225                       # one grey level in normalised units
    assert cc.window_norm(x, 8, 1e-6)[0].abs().max() > 5 and cc.window_norm(x, 8)[0].abs().max() < 0.5


def test_generator_has_beit_init():
    torch.manual_seed(0)
    m = cc.CIM(tiny(gen_depth=2), cc.load_tokenizer(tiny()))
    w = [m.generator.blocks[i].mlp.fc2.weight for i in range(2)]
    assert all(x.abs().max() <= 0.02 / (2 * (i + 1)) ** 0.5 + 1e-7 for i, x in enumerate(w))   # cut at +-std, rescaled
    assert abs(w[0].std().item() * 2 ** 0.5 - w[1].std().item() * 4 ** 0.5) < 2e-3


def test_init_xavier_replaces_only_the_enhancer_init():
    """--init xavier: every enhancer Linear / patch conv is xavier-uniform (bound sqrt(6 / (fan_in + fan_out))), its
    biases stay 0; the generator keeps BEiT's init. Default (beit): the enhancer is cut at +-0.02."""
    torch.manual_seed(0)
    beit, xav = (cc.CIM(tiny(gen_depth=2, init=i), cc.load_tokenizer(tiny())) for i in ("beit", "xavier"))
    assert beit.enhancer.blocks[0].mlp.fc1.weight.abs().max() <= 0.02
    for m in [m for m in xav.enhancer.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]:
        w = m.weight.flatten(1)
        bound = (6 / sum(w.shape)) ** 0.5
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound and not m.bias.any()
    assert xav.generator.blocks[0].mlp.fc1.weight.abs().max() <= 0.02


def test_accumulation_resume_is_exact(tmp_path):
    """--stop-after mid-epoch with 2 micro-batches per step, then the same command: the uninterrupted weights."""
    kw = dict(data="synthetic", batch_size=4, accum_iter=2, steps_per_epoch=3, epochs=2, log_every=1)
    cc.main(tiny(out=str(tmp_path / "full"), **kw))
    cc.main(tiny(out=str(tmp_path / "cut"), stop_after=4, **kw))
    cc.main(tiny(out=str(tmp_path / "cut"), **kw))
    a, b = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=True) for d in ("full", "cut"))
    assert a["step"] == b["step"] == 6 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_colour_jitter_is_conmims():
    """The jitter is common.py's, the one tests/test_conmim.py compares with torchvision's ColorJitter."""
    import common
    import conmim
    assert cc.color_jitter is conmim.color_jitter is common.color_jitter


def test_augment_jitters_each_image_on_its_own():
    crop = torch.full((64, 3, 8, 8), 100, dtype=torch.uint8)
    out = cc.augment(crop)
    assert out.shape == (64, 3, 8, 8) and out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
    assert out.mean((1, 2, 3)).unique().numel() > 32   # its own brightness / contrast / saturation per image
