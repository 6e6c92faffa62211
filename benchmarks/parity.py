"""
benchmarks/parity.py - check our method files against the official code: same weights, same inputs, fp32 on CPU.

    git clone https://github.com/TencentARC/ConMIM /tmp/ConMIM
    python benchmarks/parity.py --official /tmp/ConMIM
    git clone https://github.com/weivision/Correlational-Image-Modeling /tmp/CIM
    python benchmarks/parity.py --official /tmp/CIM [--accum-iter 2]

The official model code is imported from --official (nothing of it is copied into this repository). Both models are
built at a small size (ViT-Tiny width, 2 blocks, 56 px images, patch 4 -> a 14x14 grid like ViT-B/16 at 224), our
weights are perturbed (so no init symmetry hides a wrong mapping) and copied into the official model by one small
function per method (`conmim_to_official`, `correlate_to_official`). Printed: max |diff| of the forward outputs, the
loss, every matched gradient (max abs and max relative to the tensor's largest gradient), one EMA/momentum update,
and the official lr and EMA-momentum schedules against ours (common.cosine_schedule as the method file calls it) at
the paper recipe's epochs / warmup / min lr. Exit status 1 when a difference exceeds its tolerance flag.
"""
import argparse
import contextlib
import importlib
import io
import math
import os
import sys
import types
import warnings
from functools import partial

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import cosine_schedule  # noqa: E402

# Top-level module names the official repositories use; cleared before importing from --official.
OFFICIAL_MODULES = ("utils", "modeling_pretrain", "modeling_finetune", "engine_for_pretraining", "models", "util",
                    "engines")


# ----------------------------------------------------------------------------- compatibility shims


def install_shims():
    """Stub modules that old official code imports at module level but the compared paths never use.
    Each is installed only when the real module cannot be imported."""
    def missing(name):
        try:
            importlib.import_module(name)
            return False
        except ImportError:
            return True

    if missing("torch._six"):   # removed in torch 2.0; the official utils import `inf` from it
        sys.modules["torch._six"] = types.SimpleNamespace(inf=math.inf, string_classes=(str, bytes))
    if missing("tensorboardX"):   # ConMIM utils.py imports SummaryWriter for its logger only
        sys.modules["tensorboardX"] = types.SimpleNamespace(SummaryWriter=None)
    if missing("timm.models.layers"):   # timm >= 1.x moved these; the 0.3-0.6 era paths are what the code imports
        import timm.layers
        sys.modules["timm.models.layers"] = timm.layers
    if missing("timm.models.registry"):
        import timm.models
        sys.modules["timm.models.registry"] = timm.models
    import numpy as np
    for alias, builtin in (("float", float), ("int", int), ("bool", bool)):   # numpy >= 1.24 removed these aliases
        if alias not in np.__dict__:
            setattr(np, alias, builtin)
    for name in ("apex", "deepspeed"):   # optional speed-ups some forks import; never called here
        if missing(name):
            sys.modules[name] = types.ModuleType(name)


@contextlib.contextmanager
def cpu_run():
    """Lets CUDA-only calls inside the official training code run on CPU tensors: torch.cuda.synchronize() becomes a
    no-op and Tensor.cuda() returns the tensor, only while no GPU is present. Also silences its prints."""
    saved = torch.cuda.synchronize, torch.Tensor.cuda
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
        torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.cuda.synchronize, torch.Tensor.cuda = saved


def import_official(path, names):
    """Import `names` from the user's clone at `path` (put first on sys.path; earlier same-named modules dropped)."""
    for mod in [m for m in sys.modules if m.split(".")[0] in OFFICIAL_MODULES]:
        del sys.modules[mod]
    sys.path.insert(0, os.path.abspath(path))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        install_shims()
        return [importlib.import_module(n) for n in names]


def detect(path):
    if os.path.isfile(os.path.join(path, "modeling_pretrain.py")):
        return "conmim"
    if os.path.isfile(os.path.join(path, "models", "cim.py")):
        return "correlate"
    sys.exit(f"error: {path} has neither modeling_pretrain.py (ConMIM) nor models/cim.py (correlational); "
             "pass --method or the repository root")


# ----------------------------------------------------------------------------- comparison helpers


def max_diff(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item()


def perturb_(model, scale, generator):
    """Add N(0, scale^2) noise to every parameter and floating buffer: no zero bias or identical copy hides a swap."""
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.add_(scale * torch.randn(t.shape, generator=generator))


def load_mapped(module, sd, allowed_missing=()):
    """Copy a mapped state dict into an official module; every key must land, and only `allowed_missing` official
    keys (unused here) may stay unset. Returns the unset keys."""
    res = module.load_state_dict(sd, strict=False)
    if res.unexpected_keys:
        sys.exit(f"error: the weight mapping made keys the official model lacks: {res.unexpected_keys[:6]}")
    unset = [k for k in res.missing_keys if not k.endswith("relative_position_index")]
    bad = [k for k in unset if not any(k.startswith(p) for p in allowed_missing)]
    if bad:
        sys.exit(f"error: official weights the mapping does not set: {bad[:6]}")
    return unset


def grad_diffs(ours_grads, official_module):
    """ours_grads: our gradients already mapped to official names. -> (matched, max abs diff, max diff relative to
    the tensor's largest official gradient (tensors with all gradients < 1e-6 only in the abs figure), official
    params with a gradient that ours lacks)."""
    theirs = {n: p.grad for n, p in official_module.named_parameters() if p.grad is not None}
    common = sorted(set(theirs) & set(ours_grads))
    absd = [max_diff(ours_grads[n], theirs[n]) for n in common]
    scale = [theirs[n].abs().max().item() for n in common]   # below 1e-6: a zero gradient (e.g. a bias BN cancels)
    rel = [d / s for d, s in zip(absd, scale) if s >= 1e-6]
    return len(common), max(absd), max(rel), sorted(set(theirs) - set(ours_grads))


class Report:
    def __init__(self):
        self.failed = []

    def line(self, what, value, tol, extra=""):
        ok = value <= tol
        if not ok:
            self.failed.append(what)
        print(f"  {what:<34} {value:10.2e}  (tol {tol:.0e}) {'ok' if ok else 'FAIL'}{extra}")


# ----------------------------------------------------------------------------- ConMIM


def conmim_to_official(sd):
    """WEIGHT MAPPING, ConMIM (adapt here if conmim.py renames its modules). Our ConMIM state dict (or gradients in
    its names) -> (student, teacher) state dicts of the official VisionTransformerForMaskedImageModeling.
    qkv.bias is split into q_bias / v_bias (the official attention has no key bias: ours must be 0 there),
    ls{1,2}.gamma -> gamma_{1,2}, the projector -> projectors; the mask token belongs to the student."""
    out = {"student": {}, "teacher": {}}
    prefixes = [("student.", "student", ""), ("projector.", "student", "projectors."),
                ("teacher.", "teacher", ""), ("teacher_projector.", "teacher", "projectors.")]
    for k, v in sd.items():
        if k == "mask_token":
            out["student"][k] = v
            continue
        side, rest = next(((s, o + k[len(p):]) for p, s, o in prefixes if k.startswith(p)), (None, None))
        if side is None:
            raise KeyError(f"conmim_to_official: no rule for {k}")
        if rest.endswith("attn.qkv.bias"):
            q, _, v_ = v.chunk(3)
            out[side][rest.replace("qkv.bias", "q_bias")], out[side][rest.replace("qkv.bias", "v_bias")] = q, v_
            continue
        rest = rest.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        out[side][rest] = v
    return out["student"], out["teacher"]


def conmim_build(conmim, modeling_pretrain, depth):
    """Ours and two official models (student, teacher) at the same small size; our weights perturbed."""
    cfg = conmim.Config(arch="vit_tiny", depth=depth, img_size=56, patch_size=4, mask_patch=8, proj_hidden=256,
                        proj_dim=64, device="cpu")
    ours = conmim.ConMIM(cfg)
    perturb_(ours, 0.02, torch.Generator().manual_seed(1))
    with torch.no_grad():   # the official attention has no key bias
        for n, p in ours.named_parameters():
            if n.endswith("attn.qkv.bias"):
                p.view(3, -1)[1].zero_()
    kw = dict(img_size=56, patch_size=4, embed_dim=192, depth=depth, num_heads=3, mlp_ratio=4, qkv_bias=True,
              norm_layer=partial(nn.LayerNorm, eps=1e-6), vocab_size=16, dim=64, mlp_dim=256, init_values=0.1,
              use_abs_pos_emb=False, use_shared_rel_pos_bias=True, use_mlp_projectors=True)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        student, teacher = (modeling_pretrain.VisionTransformerForMaskedImageModeling(**kw) for _ in range(2))
    s_sd, t_sd = conmim_to_official(ours.state_dict())
    unset = load_mapped(student, s_sd, ("lm_head.",)) + load_mapped(teacher, t_sd, ("lm_head.", "mask_token"))
    unset = sorted(set(unset))
    teacher.requires_grad_(False)
    return cfg, ours, student, teacher, unset


class _Wrapped(nn.Module):   # what the official engine expects of a DDP model: `.module`, forward passes through
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *a, **k):
        return self.module(*a, **k)


class _CaptureScaler:
    """Stands in for the official loss scaler: backward only (no optimizer step), keeps the loss it was given."""
    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, create_graph=False, update_grad=True):
        self.loss = loss.detach().clone()
        loss.backward(create_graph=create_graph)
        return 0.0

    def state_dict(self):
        return {"scale": 1.0}


def conmim_parity(path, args, rep):
    import conmim
    modeling_pretrain, engine = import_official(path, ["modeling_pretrain", "engine_for_pretraining"])
    torch.manual_seed(args.seed)
    cfg, ours, student, teacher, unset = conmim_build(conmim, modeling_pretrain, args.depth)
    print(f"  official tensors left unset (unused by the loss): {', '.join(unset) or 'none'}")
    g = torch.Generator().manual_seed(args.seed)
    weak, strong = torch.randn(2, args.batch, 3, 56, 56, generator=g)
    mask = conmim.sample_mask(cfg, args.batch, "cpu", g)                           # (B, 196) bool
    ours.train(), student.train(), teacher.train()   # official: BatchNorm of both in training mode

    # forward: projected patch features of student (masked weak view) and teacher (full strong view)
    flags = dict(return_all_tokens=True, only_return_before_head=True, use_mlp_projectors=True)
    with torch.no_grad():
        q, k = conmim_features(ours, weak, strong, mask)
        q_off = student(weak, bool_masked_pos=mask, **flags)
        k_off = teacher(strong, bool_masked_pos=torch.zeros_like(mask), **flags)
    rep.line("forward: student features", max_diff(q, q_off), args.tol)
    rep.line("forward: teacher features", max_diff(k, k_off), args.tol)

    # loss and gradients: our forward vs one step of the official train_one_epoch (its loss code as published)
    loss, _ = ours.loss_on_views(weak, strong, mask, cfg.tau)
    loss.backward()
    scaler, m = _CaptureScaler(), 0.9
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.0)
    with cpu_run():
        engine.train_one_epoch(_Wrapped(student), [((weak, strong, mask), None)], opt, torch.device("cpu"), 0,
                               scaler, [m], teacher, teacher, cfg.tau, max_norm=0, start_steps=0)
    rep.line("loss", abs(loss.item() - scaler.loss.item()), args.tol, f"  (ours {loss.item():.6f})")
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    n, absd, rel, lacking = grad_diffs(conmim_to_official(grads)[0], student)
    rep.line(f"gradients ({n} tensors): max abs", absd, args.tol)
    rep.line("gradients: max relative", rel, args.grad_rtol, f"  official-only: {lacking or 'none'}")

    # the engine's EMA step (momentum m) vs ours, on parameters
    ours.ema_update(m)
    t_sd = conmim_to_official({n: p for n, p in ours.named_parameters() if n.startswith("teacher")})[1]
    theirs = dict(teacher.named_parameters())
    rep.line(f"EMA update (m={m})", max(max_diff(v, theirs[n]) for n, v in t_sd.items()), args.tol)

    # schedules at the paper recipe (our Config defaults: lr, min lr, warmup, epochs, EMA start)
    utils = import_official(path, ["utils"])[0]
    c, spe = conmim.Config(), args.sched_steps
    with cpu_run():
        lr_off = utils.cosine_scheduler(c.lr, c.min_lr, c.epochs, spe, warmup_epochs=c.warmup_epochs)
        ema_off = utils.cosine_scheduler(c.ema_momentum, 1, c.epochs, spe)
    lr_ours, ema_ours = conmim_schedules(c, spe)
    sched_lines(rep, args, lr_ours, lr_off, ema_ours, ema_off,
                f"lr {c.lr:g} -> {c.min_lr:g}, warmup {c.warmup_epochs} ep, EMA {c.ema_momentum} -> 1",
                c.warmup_epochs * spe)


def conmim_features(ours, weak, strong, mask):
    """OUR FORWARD, ConMIM (adapt here if conmim.py changes): projected patch features q (student, masked weak view)
    and k (teacher, full strong view), each (B, N, d); the loss is `ours.loss_on_views(weak, strong, mask, tau)[0]`."""
    return ours.features(weak, strong, mask)


def conmim_schedules(c, spe):
    """OUR SCHEDULES, ConMIM: the calls conmim.py's main makes (adapt here if it changes)."""
    total = c.epochs * spe
    return (cosine_schedule(c.lr, c.min_lr, total, c.warmup_epochs * spe, warmup_endpoint=True),
            cosine_schedule(c.ema_momentum, 1.0, total))


def sched_lines(rep, args, lr_ours, lr_off, ema_ours, ema_off, what, warmup):
    n = len(lr_ours)
    lr_d = max(abs(a - b) for a, b in zip(lr_ours, lr_off))
    ema_d = max(abs(a - b) for a, b in zip(ema_ours, ema_off))
    print(f"  schedules over {n} optimizer steps ({args.sched_steps} per epoch): {what}")
    if len(lr_off) != n or len(ema_off) != n:
        rep.failed.append("schedule length")
        print(f"  schedule lengths differ: ours {n}, official lr {len(lr_off)}, EMA {len(ema_off)} FAIL")
    worst = max(range(n), key=lambda i: abs(lr_ours[i] - lr_off[i]))
    after = max((abs(a - b) for a, b in zip(lr_ours[warmup:], lr_off[warmup:])), default=0.0)
    rep.line("lr schedule", lr_d, args.sched_tol, f"  (worst step {worst}: ours {lr_ours[worst]:.4g}, official "
             f"{lr_off[worst]:.4g}; after the {warmup} warmup steps {after:.1e})")
    worst = max(range(n), key=lambda i: abs(ema_ours[i] - ema_off[i]))
    rep.line("EMA momentum schedule", ema_d, args.sched_tol,
             f"  (worst step {worst}: ours {ema_ours[worst]:.6f}, official {ema_off[worst]:.6f})")


# ----------------------------------------------------------------------------- Correlational image modeling


def correlate_to_official(sd):
    """WEIGHT MAPPING, correlational (adapt here if cim_correlate.py renames its modules). Our CorrelationalIM state
    dict (or gradients) -> the official CorrelationalAutoencoderViT's. The official target encoder uses the online
    cls token and positions, so ours are dropped; the decoder's cross block sits in decoder_corr_block.block."""
    rules = [("online.", ""), ("target.patch_embed.", "patch_embed_c."), ("target.blocks.", "blocks_c."),
             ("target.norm.", "norm_c."), ("decoder_block.q.", "decoder_corr_block.block.attn.q."),
             ("decoder_block.kv.", "decoder_corr_block.block.attn.kv."),
             ("decoder_block.proj.", "decoder_corr_block.block.attn.proj."),
             ("decoder_block.", "decoder_corr_block.block."), ("decoder_pred.", "decoder_pred_mask.0."),
             ("decoder_", "decoder_")]
    out = {}
    for k, v in sd.items():
        if k in ("target.cls_token", "target.pos_embed"):
            continue
        rule = next(((p, o) for p, o in rules if k.startswith(p)), None)
        if rule is None:
            raise KeyError(f"correlate_to_official: no rule for {k}")
        out[rule[1] + k[len(rule[0]):]] = v
    return out


def correlate_build(cim_correlate, official_cim, depth):
    """Ours and the official model: ViT-Tiny width, 56 px search image, context 40 px (10x10 tokens, as 160/16),
    2 exemplars of 16 px (4x4 tokens, as 64/16), decoder 128 wide with 4 heads; our weights perturbed."""
    cfg = cim_correlate.Config(arch="vit_tiny", depth=depth, img_size=56, patch_size=4, context_size=40,
                               exemplar_size=16, num_exemplars=2, decoder_dim=128, decoder_heads=4, device="cpu")
    ours = cim_correlate.CorrelationalIM(cfg)
    perturb_(ours, 0.02, torch.Generator().manual_seed(1))
    # our invariant (the official code shares them): the target's cls token and positions = online's
    with torch.no_grad():
        ours.target.cls_token.copy_(ours.online.cls_token)
        ours.target.pos_embed.copy_(ours.online.pos_embed)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        off = official_cim.CorrelationalAutoencoderViT(
            img_size=56, patch_size=4, embed_dim=192, depth=depth, num_heads=3, decoder_embed_dim=128,
            decoder_num_heads=4, mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), context_size=40,
            template_size=16, sigma_cont=0.0, sigma_corr=1.0)   # official script: --sigma_cont 0.0
    unset = load_mapped(off, correlate_to_official(ours.state_dict()), ("decoder_g_embed", "decoder_predictor"))
    return cfg, ours, off, unset


def correlate_parity(path, args, rep):
    import cim_correlate
    official_cim, lr_sched = import_official(path, ["models.cim", "util.lr_sched"])
    torch.manual_seed(args.seed)
    cfg, ours, off, unset = correlate_build(cim_correlate, official_cim, args.depth)
    unused = sorted({k.split(".")[0] for k in unset})
    print(f"  official tensors left unset (unused by the loss): {len(unset)} in {', '.join(unused) or 'none'}")
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (args.batch, 3, 56, 56), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        context, exemplars, target = cim_correlate.sample_pairs(images, cfg, g)  # (B,3,40,40), (B,E,3,16,16), maps
    mean, std = ours.mean, ours.std
    ours.train(), off.train()

    logits, loss = correlate_forward(ours, cim_correlate, context, exemplars, target)
    loss.backward()
    E = exemplars.shape[1]
    with cpu_run():
        loss_off, preds = off((context - mean) / std, [(exemplars[:, e] - mean) / std for e in range(E)],
                              [target[:, e].long() for e in range(E)])
        loss_off.backward()
    rep.line("forward: correlation maps (logits)", max_diff(logits, torch.stack(preds, 1)), args.tol)
    rep.line("loss", abs(loss.item() - loss_off.item()), args.tol, f"  (ours {loss.item():.6f})")
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    n, absd, rel, lacking = grad_diffs(correlate_to_official(grads), off)
    rep.line(f"gradients ({n} tensors): max abs", absd, args.tol)
    rep.line("gradients: max relative", rel, args.grad_rtol, f"  official-only: {lacking or 'none'}")

    m = 0.9
    ours.ema_update(m)
    off.momentum = m
    off.momentum_update()
    theirs = dict(off.named_parameters())
    mapped = correlate_to_official({k: v for k, v in ours.state_dict().items() if k.startswith("target.")})
    rep.line(f"EMA update (m={m})", max(max_diff(v, theirs[k]) for k, v in mapped.items() if k in theirs),
             args.tol)

    # schedules at the official recipe: lr = blr x 4096 / 256, min lr, warmup, epochs (our Config defaults)
    c, spe, acc = cim_correlate.Config(), args.sched_steps, args.accum_iter
    peak = c.blr * 4096 / 256
    ns = types.SimpleNamespace(lr=peak, min_lr=c.min_lr, warmup_epochs=c.warmup_epochs, epochs=c.epochs)
    fake_opt = types.SimpleNamespace(param_groups=[{}])
    micro = spe * acc                                                             # official: loader steps per epoch
    lr_off = [lr_sched.adjust_learning_rate(fake_opt, s / micro + ep, ns)
              for ep in range(c.epochs) for s in range(0, micro, acc)]            # set on the first micro-step
    ema_off = []
    state = types.SimpleNamespace(base_momentum=c.ema_momentum, end_momentum=1.0, accum_iter=acc, momentum=None,
                                  momentum_update=lambda: ema_off.append(state.momentum))
    official_cim.CorrelationalAutoencoderViT.train_update(state, c.epochs, micro, 0)
    for _ in range(c.epochs * micro):
        official_cim.CorrelationalAutoencoderViT.iter_update(state)              # updates on the last micro-step
    lr_ours, ema_ours = correlate_schedules(c, peak, spe)
    sched_lines(rep, args, lr_ours, lr_off, ema_ours, ema_off,
                f"peak lr {peak:g} -> {c.min_lr:g}, warmup {c.warmup_epochs} ep, EMA {c.ema_momentum} -> 1, "
                f"official accum_iter {acc}", c.warmup_epochs * spe)


def correlate_forward(ours, cim_correlate, context, exemplars, target):
    """OUR FORWARD, correlational: logits (B, E, 2, H, W) and loss for given context / exemplars / maps."""
    logits = ours.correlate(context, exemplars)
    return logits, cim_correlate.correlation_loss(logits, target)


def correlate_schedules(c, peak, spe):
    """OUR SCHEDULES, correlational: the calls cim_correlate.py's main makes (adapt here if it changes)."""
    total = c.epochs * spe
    return (cosine_schedule(peak, c.min_lr, total, c.warmup_epochs * spe),
            cosine_schedule(c.ema_momentum, 1.0, total))


# ----------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--official", required=True, help="root of a local clone of the official repository")
    p.add_argument("--method", choices=("conmim", "correlate"), help="default: detected from the files in --official")
    p.add_argument("--depth", type=int, default=2, help="ViT blocks of both models (default 2)")
    p.add_argument("--batch", type=int, default=4, help="images per comparison batch (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4, help="max abs diff of outputs, loss, gradients, EMA (1e-4)")
    p.add_argument("--grad-rtol", type=float, default=1e-3,
                   help="max gradient diff relative to the tensor's largest gradient (1e-3)")
    p.add_argument("--sched-tol", type=float, default=1e-9, help="max abs diff of lr and EMA schedules (1e-9)")
    p.add_argument("--sched-steps", type=int, default=2, help="optimizer steps per epoch for the schedule check "
                   "(default 2: 600 steps at 300 epochs)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="of both models and the inputs; float64 separates the math from fp32 rounding")
    p.add_argument("--accum-iter", type=int, default=1,
                   help="correlational: the official accum_iter for its schedules (official script: 2)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.official):
        sys.exit(f"error: --official {args.official} is not a directory")
    if min(args.depth, args.batch, args.sched_steps, args.accum_iter) < 1 or args.batch < 2:
        sys.exit("error: --depth, --sched-steps, --accum-iter must be >= 1 and --batch >= 2 (BatchNorm)")
    method = args.method or detect(args.official)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    torch.set_default_dtype(getattr(torch, args.dtype))
    print(f"parity: {method} vs official code at {os.path.abspath(args.official)} "
          f"({args.dtype}, CPU, torch {torch.__version__})")
    rep = Report()
    (conmim_parity if method == "conmim" else correlate_parity)(args.official, args, rep)
    print("PASS" if not rep.failed else f"FAIL: {', '.join(rep.failed)}")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
