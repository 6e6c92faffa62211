"""benchmarks/plot_log.py draws runs' logs and fails with one error line; the README's "Use an
exported encoder in timm" snippet runs as written on checkpoints from each method's checkpoint()."""
import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch

import cim_correlate
import cim_corrupt
import common
import conmim
from conftest import ROOT

PLOT = ROOT / "benchmarks" / "plot_log.py"


def write_run(folder, metric, steps=6):
    """A run folder as a method writes it: steps.jsonl every 10 steps, log.jsonl with a checkpoint
    record and a resume record (no "step")."""
    folder.mkdir(parents=True)
    with open(folder / "steps.jsonl", "w") as f:
        for i in range(1, steps + 1):
            record = {"step": 10 * i, "epoch": i // 3, "loss": 4.0 / i, metric: 0.1 * i,
                      "lr": 1e-3, "img_s": 14.0}
            f.write(json.dumps(record) + "\n")
    with open(folder / "log.jsonl", "w") as f:
        f.write(json.dumps({"epoch": 0, "step": 30, "loss": 4.0 / 3, metric: 0.3}) + "\n")
        f.write(json.dumps({"resumed_at": 30, "resume_changes": ["epochs: 1 -> 2"]}) + "\n")
    return folder


def plot(*args):
    cmd = [sys.executable, str(PLOT), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_plot_log_draws_runs_and_skips_records_without_step(tmp_path):
    pytest.importorskip("matplotlib")
    a = write_run(tmp_path / "conmim", "acc")
    b = write_run(tmp_path / "cim_correlate", "iou")
    for args in ([a, b, "--title", "two runs"], [a, "--metrics", "loss,acc"]):
        png = tmp_path / f"{len(args)}.png"
        r = plot(*args, "--out", png)
        assert r.returncode == 0, r.stderr
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 1000


BAD_INPUTS = {"missing folder": "steps.jsonl not found", "unknown metric": "no run logged 'iou'",
              "empty file": "has no log records", "no matplotlib": "needs matplotlib"}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_plot_log_bad_input_is_one_error_line(tmp_path, case):
    run = write_run(tmp_path / "run", "acc")
    png = tmp_path / "p.png"
    if case == "missing folder":
        r = plot(tmp_path / "nope", "--out", png)
    elif case == "unknown metric":
        r = plot(run, "--metrics", "loss,iou", "--out", png)
    elif case == "empty file":
        (run / "steps.jsonl").write_text("")
        r = plot(run, "--out", png)
    else:
        # as if matplotlib were not installed: a None in sys.modules makes its import fail
        argv = ["plot_log.py", str(run), "--out", str(png)]
        code = (f"import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = {argv!r}; "
                f"runpy.run_path({str(PLOT)!r}, run_name='__main__')")
        cmd = [sys.executable, "-c", code]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = r.stderr.splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert BAD_INPUTS[case] in lines[0], lines[0]
    assert not png.exists()


# ----------------------------------------------------------------------------- the README's snippet


def readme_snippet():
    text = (ROOT / "README.md").read_text()
    section = r"## Use an exported encoder in timm\n.*?```python\n(.*?)```"
    return re.search(section, text, re.S).group(1)


def perturb(module):
    """Non-zero biases, relative-position tables and layer scales: a wrong key mapping shows."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "relative_position" in name or "gamma" in name:
                p.normal_(0, 0.2)


def save(path, cfg, state):
    """The method's checkpoint() dict plus what common.Run.save adds, written as a run does."""
    path.parent.mkdir(parents=True)
    extra = {"step": 0, "epoch": 0, "rng": common.rng_state(), "config": dataclasses.asdict(cfg)}
    assert common.save_checkpoint({**state, **extra}, str(path)) is None


def fast_trunc_normal(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
    with torch.no_grad():
        return tensor.normal_(mean, std, generator=generator).clamp_(a, b)


def adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])


def test_readme_timm_snippet_loads_each_method_checkpoint(tmp_path, monkeypatch):
    """Each method's default ViT-B/16 encoder and a ResNet-50 export load strictly as the README
    says and give the method's own output (1e-4) on one 224x224 image."""
    pytest.importorskip("timm")
    # torch rejection-samples BEiT's +-1 std cut: 35 s for these ViT-Bs; random weights suffice
    monkeypatch.setattr(torch.nn.init, "trunc_normal_", fast_trunc_normal)
    code = readme_snippet()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.randn(1, 3, 224, 224)
    torch.manual_seed(0)
    ours = {}
    with torch.no_grad():
        cfg = conmim.Config()
        model = conmim.ConMIM(cfg)
        # the teacher only: it differs from the student, so the snippet must take the default
        perturb(model.teacher)
        ck = conmim.checkpoint(model, adamw(model), scaler)
        save(tmp_path / "out/conmim/checkpoint.pth", cfg, ck)
        ours["conmim"] = model.teacher.eval()(x)

        cfg = cim_correlate.Config()
        model = cim_correlate.CorrelationalIM(cfg)
        perturb(model.online)
        ck = cim_correlate.checkpoint(cfg, model, adamw(model), scaler)
        save(tmp_path / "out/cim_correlate/checkpoint.pth", cfg, ck)
        ours["correlate"] = model.online.eval()(x)

        cfg = cim_corrupt.Config(tok_hid=16, tok_vocab=64)
        model = cim_corrupt.CIM(cfg, cim_corrupt.new_tokenizer(cfg))
        perturb(model.enhancer)
        ck = cim_corrupt.checkpoint(cfg, model, adamw(model), scaler)
        save(tmp_path / "out/cim_corrupt/checkpoint.pth", cfg, ck)
        ours["corrupt"] = model.enhancer.eval()(x)

        cfg = cim_correlate.Config(arch="resnet50")
        model = cim_correlate.CorrelationalIM(cfg)
        ck = cim_correlate.checkpoint(cfg, model, adamw(model), scaler)
        save(tmp_path / "out/resnet50/checkpoint.pth", cfg, ck)
        ours["resnet"] = model.online.net.eval()(x)
        del model, ck

    # the snippet reads exactly these files, by its relative paths
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("checkpoint.pth")}
    assert set(re.findall(r'"(out/\S+?\.pth)"', code)) == written
    monkeypatch.chdir(tmp_path)
    scope = {}
    with torch.no_grad():
        exec(compile(code, "README.md (Use an exported encoder in timm)", "exec"), scope)
        assert scope["tokens"].shape == (1, 197, 768) and scope["feature"].shape == (1, 768)
        for name in ("conmim", "correlate", "corrupt"):
            theirs = scope[name].eval().forward_features(x)
            torch.testing.assert_close(theirs, ours[name], atol=1e-4, rtol=0,
                                       msg=lambda m, name=name: f"{name}: {m}")
        theirs = scope["resnet"].eval()(x)
        torch.testing.assert_close(theirs, ours["resnet"], atol=1e-4, rtol=1e-4)


def test_an_encoder_without_layer_scale_loads_into_timm_with_init_values_0(tmp_path):
    """The README's note on other sizes: small32's ConMIM teacher (init_values None in its
    encoder_args) loads strictly into timm's Beit built with init_values=0; with None, timm's
    create_model keeps its 0.1 default and the strict load fails."""
    timm = pytest.importorskip("timm")
    cfg = conmim.Config(**conmim.Config.PRESETS["small32"])
    torch.manual_seed(0)
    model = conmim.ConMIM(cfg)
    perturb(model.teacher)
    ck = conmim.checkpoint(model, adamw(model), torch.amp.GradScaler("cpu", enabled=False))
    args = ck["encoder_args"]
    assert args["init_values"] is None
    state = ck["encoders"][ck["default_encoder"]]
    kw = dict(img_size=args["img_size"], patch_size=args["patch_size"], embed_dim=args["embed_dim"],
              depth=args["depth"], num_heads=args["num_heads"], num_classes=0, global_pool="token",
              use_abs_pos_emb=False, use_rel_pos_bias=True)
    theirs = timm.create_model("beit_base_patch16_224", init_values=0, **kw)
    theirs.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, args["img_size"], args["img_size"])
    with torch.no_grad():
        ours = model.teacher.eval()(x)
        torch.testing.assert_close(theirs.eval().forward_features(x), ours, atol=1e-4, rtol=0)
    with pytest.raises(RuntimeError, match="gamma"):
        timm.create_model("beit_base_patch16_224", init_values=None, **kw).load_state_dict(state)
