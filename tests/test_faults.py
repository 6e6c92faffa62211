"""Fault injection, tiny CPU runs of all four scripts: nothing good is ever overwritten (divergence, a failed save),
a refused run touches nothing, one resume guard, declarative flag checks, I/O faults, bad data, logs written once,
each protocol's own defaults, the Python floor. Runs go in-process (the scripts' own parse + main) where a process
boundary does not matter, as subprocesses where it does (exit code, stderr, signals)."""
import errno
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from common import build_dataset, parse_config, parse_range
from conftest import ROOT

SCRIPTS = {"conmim": ["--preset", "tiny"], "cim_correlate": ["--preset", "tiny"],
           "cim_corrupt": ["--preset", "tiny"], "finetune": ["--preset", "tiny", "--pretrained", "random"]}
LR = {"conmim": "--lr", "cim_correlate": "--blr", "cim_corrupt": "--blr", "finetune": "--blr"}
BASE = ["--data", "synthetic", "--batch-size", "4", "--steps-per-epoch", "2", "--epochs", "3", "--log-every", "1"]
ALL = pytest.mark.parametrize("name", list(SCRIPTS))


def start(name, *argv):
    """Parse argv as the script's __main__ does, run its main() here -> (exit code, error line or '')."""
    mod = importlib.import_module(name)
    args = [*SCRIPTS[name], *argv]
    try:
        cfg = parse_config(mod.Config, args)
        if name == "finetune":
            cfg = parse_config(mod.Config, args, defaults=mod.Config.mode_defaults(cfg))
        mod.main(cfg)
    except SystemExit as e:
        return (1, str(e.code)) if isinstance(e.code, str) else (e.code or 0, "")
    return 0, ""


def files(out):
    """{name: (size, mtime, sha256)} of everything in --out: what 'touched nothing' compares."""
    snap = {}
    for root, _, names in os.walk(out):
        for n in names:
            p = os.path.join(root, n)
            snap[os.path.relpath(p, out)] = (os.path.getsize(p), os.stat(p).st_mtime_ns,
                                             hashlib.sha256(open(p, "rb").read()).hexdigest())
    return snap


def finite(path):
    ck = torch.load(path, weights_only=True)
    return all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def steps(out, name="steps.jsonl"):
    return [r["step"] for r in map(json.loads, open(os.path.join(out, name))) if "step" in r]


def write_folder(root, n_per_class=6, classes=("a", "b"), bad=0, hidden=False, size=40):
    """A class-folder dataset of small JPEGs; `bad` unreadable files per class; `hidden`: a .ipynb_checkpoints
    folder with images, which must not become a class."""
    rng = np.random.default_rng(0)
    for c in classes + ((".ipynb_checkpoints",) if hidden else ()):
        os.makedirs(root / c, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
        for i in range(bad):
            (root / c / f"bad{i}.jpg").write_bytes(b"not a jpeg")
    return root


# ----------------------------------------------------------------------------- 1. nothing good is overwritten
@ALL
def test_divergence_keeps_the_last_good_checkpoint_which_resumes(tmp_path, name):
    out = str(tmp_path / "o")
    assert start(name, *BASE, "--out", out, "--stop-after", "2") == (0, "")
    good = open(os.path.join(out, "checkpoint.pth"), "rb").read()
    # no log step before the save: the check of every parameter before the save is what stops it
    code, err = start(name, *BASE, "--out", out, LR[name], "1e30", "--allow-change", LR[name][2:],
                      "--log-every", "100")
    assert code == 1 and "training diverged" in err and "from step 2 is kept" in err, err
    assert "at step 3" in err or "by step 4" in err or "at step 4" in err, err   # the step where it diverged
    assert open(os.path.join(out, "checkpoint.pth"), "rb").read() == good
    assert start(name, *BASE, "--out", out) == (0, "")   # the kept checkpoint resumes with its own settings
    assert torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["step"] == 6
    assert finite(os.path.join(out, "checkpoint.pth"))


@ALL
def test_stop_after_on_a_non_log_step_never_saves_nan(tmp_path, name):
    out = str(tmp_path / "o")
    code, err = start(name, *BASE, "--out", out, LR[name], "1e30", "--log-every", "100", "--stop-after", "3")
    assert code == 1 and "training diverged" in err and "no checkpoint was saved" in err, err
    assert not os.path.exists(os.path.join(out, "checkpoint.pth"))


@ALL
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, name):
    out = str(tmp_path / "o")
    assert start(name, *BASE, "--out", out, "--stop-after", "2") == (0, "")
    before = files(out)["checkpoint.pth"]
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):   # half a file, then the disk is full
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    code, err = start(name, *BASE, "--out", out)
    monkeypatch.setattr(torch, "save", real_save)
    assert code == 1 and "No space left on device" in err and "free some space" in err, err
    assert files(out)["checkpoint.pth"] == before and not os.path.exists(os.path.join(out, "checkpoint.pth.tmp"))
    assert start(name, *BASE, "--out", out) == (0, "")   # space back: the same command resumes


# ----------------------------------------------------------------------------- 2, 3. refused runs, resume guard
@ALL
def test_resume_guard_names_each_difference_and_touches_nothing(tmp_path, name):
    out = str(tmp_path / "o")
    assert start(name, *BASE, "--out", out, "--stop-after", "2") == (0, "")
    snap = files(out)
    code, err = start(name, *BASE, "--out", out, LR[name], "0.5", "--steps-per-epoch", "3", "--seed", "1")
    assert code == 1 and "\n" not in err, err
    for key in (f"{LR[name][2:]}:", "steps_per_epoch: 2 -> 3", "seed: 0 -> 1", "--allow-change"):
        assert key in err, err
    assert files(out) == snap   # config.json, the script copies, logs: all as the checkpoint left them
    # workers and logging may change freely; a named change is accepted and recorded
    assert start(name, *BASE, "--out", out, "--log-every", "2", "--workers", "0", "--stop-after", "1") == (0, "")
    assert start(name, *BASE, "--out", out, "--seed", "1", "--allow-change", "seed") == (0, "")
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert any(r.get("resume_changes") == ["seed: 0 -> 1"] for r in log)
    assert json.load(open(os.path.join(out, "config.json")))["seed"] == 1


def test_data_size_change_is_refused(tmp_path):
    data, out = write_folder(tmp_path / "data", n_per_class=8), str(tmp_path / "o")
    args = ["--data", str(data), "--batch-size", "4", "--epochs", "2", "--out", out]
    assert start("conmim", *args, "--stop-after", "1") == (0, "")
    write_folder(tmp_path / "data", n_per_class=12)
    code, err = start("conmim", *args)
    assert code == 1 and "images: 16 -> 24" in err and "steps_per_epoch: 4 -> 6" in err, err


@ALL
def test_refused_runs_create_and_touch_nothing(tmp_path, name):
    out = tmp_path / "o"
    assert start(name, *BASE, "--out", str(out), "--batch-size", "0")[0] == 1   # bad flag: no --out made
    assert start(name, *BASE, "--out", str(out), "--data", str(tmp_path / "nope"))[0] == 1
    assert not out.exists()


def test_a_live_run_refuses_a_second_one_which_touches_nothing(tmp_path):
    out = str(tmp_path / "o")
    assert start("conmim", *BASE, "--out", out, "--stop-after", "1") == (0, "")
    snap = files(out)
    cmd = [sys.executable, "conmim.py", *SCRIPTS["conmim"], *BASE, "--out", out]
    # the run above still holds --out: its lock lives as long as its process, this one
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: --out {out} is in use by another "
                                                                   "running process; pass another --out"]
    assert files(out) == snap


# ----------------------------------------------------------------------------- 4. declarative flag checks
def violations(spec, kind):
    """Values just outside a RANGES spec (and NaN / inf for floats)."""
    low, high, low_in, high_in = parse_range(spec)
    bad = [low - 1 if low_in else low]
    if high != float("inf"):
        bad.append(high + 1 if high_in else high)
    bad = [kind(v) for v in bad if kind is float or float(v).is_integer()]
    return bad + ([float("nan"), float("inf")] if kind is float else [])


@ALL
def test_every_numeric_flag_has_a_range_and_each_violation_is_one_line(name):
    mod = importlib.import_module(name)
    fields = [f for f in mod.Config.__dataclass_fields__.values() if type(f.default) in (int, float)]
    assert {f.name for f in fields} == set(mod.Config.RANGES)
    cases = 0
    for f in fields:
        for v in violations(mod.Config.RANGES[f.name], type(f.default)):
            flag = "--" + f.name.rstrip("_").replace("_", "-")
            with pytest.raises(SystemExit) as e:
                parse_config(mod.Config, [*SCRIPTS[name], flag, str(v)])
            assert str(e.value.code).startswith(f"error: {flag} ") and "\n" not in str(e.value.code), (flag, v)
            cases += 1
    assert cases >= len(fields)


def test_a_numeric_field_without_a_range_is_a_programming_error():
    from dataclasses import dataclass

    @dataclass
    class C:
        lr: float = 0.1

    with pytest.raises(TypeError, match="RANGES"):
        parse_config(C, [])


@pytest.mark.parametrize("name,args,msg", [
    ("conmim", ["--global-batch", "16", "--accum-iter", "2"], "both set the accumulation"),
    ("cim_corrupt", ["--global-batch", "16", "--accum-iter", "2"], "both set the accumulation"),
    ("conmim", ["--epochs", "2", "--warmup-epochs", "2"], "never reaches its peak"),
    ("cim_correlate", ["--epochs", "0"], "--epochs 0: must be >= 1"),
    ("cim_corrupt", ["--epochs", "0"], "--epochs 0 trains nothing"),
    ("finetune", ["--mode", "knn", "--knn-k", "0"], "--knn-k 0: must be >= 1"),
    ("finetune", ["--knn-k", "5"], "--knn-k applies only with --mode knn"),
    ("finetune", ["--mode", "knn", "--epochs", "5"], "--epochs applies only with --mode finetune or linear"),
    ("finetune", ["--pretrained", "x.pth", "--arch", "vit_small"], "--arch applies only with --pretrained random"),
    ("conmim", ["--mask-patches", "5"], "--mask-patches applies only with --mask-type block"),
    ("cim_corrupt", ["--objective", "revdet", "--respix-window", "2"], "applies only with --objective respix"),
    ("conmim", ["--lr", "abc"], "invalid float value"),
    ("conmim", ["--no-such-flag"], "unrecognized arguments"),
    ("finetune", ["--workers", "-1"], "--workers -1: must be >= 0"),
    ("conmim", ["--log-every", "0"], "--log-every 0: must be >= 1"),
    ("finetune", ["--stop-after", "-1"], "--stop-after -1: must be >= 0"),
])
def test_cross_flag_rules_and_parse_errors_are_one_line(tmp_path, name, args, msg):
    code, err = start(name, *BASE, *args, "--out", str(tmp_path / "o"))
    assert code == 1 and msg in err and err.startswith("error: ") and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_flag_errors_are_one_stderr_line_from_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "cim_corrupt.py", "--preset", "tiny", "--batch-size", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr == "error: --batch-size 0: must be >= 1\n"


# ----------------------------------------------------------------------------- 5. I/O faults
@ALL
def test_out_that_is_a_file_or_unwritable_is_one_line(tmp_path, monkeypatch, name):
    (tmp_path / "f").write_text("x")
    code, err = start(name, *BASE, "--out", str(tmp_path / "f"))
    assert code == 1 and "is a file, not a folder" in err, err
    real_makedirs = os.makedirs

    def read_only(path, *a, **kw):   # as on a read-only mount, for root too
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_makedirs(path, *a, **kw)

    monkeypatch.setattr(os, "makedirs", read_only)
    code, err = start(name, *BASE, "--out", str(tmp_path / "ro" / "o"))
    assert code == 1 and "cannot write to --out" in err and "Read-only file system" in err, err


@ALL
def test_a_truncated_checkpoint_in_out_is_one_line(tmp_path, name):
    out = tmp_path / "o"
    assert start(name, *BASE, "--out", str(out), "--stop-after", "1") == (0, "")
    data = (out / "checkpoint.pth").read_bytes()
    (out / "checkpoint.pth").write_bytes(data[: len(data) // 2])
    code, err = start(name, *BASE, "--out", str(out))
    assert code == 1 and f"cannot read checkpoint {out / 'checkpoint.pth'}" in err, err


@pytest.mark.parametrize("kind,msg", [("empty", "is an empty file"), ("truncated", "cannot read --pretrained"),
                                      ("text", "cannot read --pretrained"), ("tensor", "holds a Tensor"),
                                      ("foreign", "not a checkpoint of this project's method files")])
def test_bad_pretrained_files_are_one_line(tmp_path, kind, msg):
    path = tmp_path / "ck.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
    else:
        torch.save({"encoders": {"e": {"w": torch.zeros(1000)}}, "encoder_args": {}}, path)
        path.write_bytes(path.read_bytes()[:300])
    code, err = start("finetune", "--pretrained", str(path), "--out", str(tmp_path / "o"))
    assert code == 1 and msg in err and "\n" not in err, err


@pytest.mark.parametrize("kind", ["empty", "truncated"])
def test_bad_tokenizer_file_is_one_line(tmp_path, kind):
    path = tmp_path / "tok.pth"
    torch.save({"encoder": {"w": torch.zeros(1000)}, "decoder": {}}, path)
    path.write_bytes(b"" if kind == "empty" else path.read_bytes()[:200])
    code, err = start("cim_corrupt", *BASE, "--tokenizer", str(path), "--out", str(tmp_path / "o"))
    assert code == 1 and str(path) in err and "\n" not in err, err


# ----------------------------------------------------------------------------- 6. data
def test_hidden_folders_are_not_classes(tmp_path):
    data = write_folder(tmp_path / "d", hidden=True)
    assert build_dataset(str(data), "train", None).classes == ["a", "b"]


@ALL
def test_an_all_unreadable_folder_is_one_line(tmp_path, name):
    data = tmp_path / "d"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(5):
            (data / c / f"{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    code, err = start(name, *BASE, "--data", str(data), "--out", str(tmp_path / "o"))
    assert code == 1 and "none of 10 sampled files is a readable image" in err and "\n" not in err, err


@pytest.mark.parametrize("name", ["conmim", "cim_corrupt"])
def test_unreadable_training_images_are_skipped_named_and_counted(tmp_path, capfd, name):
    data = write_folder(tmp_path / "d", n_per_class=8, bad=2)
    code, _ = start(name, "--data", str(data), "--batch-size", "4", "--epochs", "1", "--out", str(tmp_path / "o"))
    out, err = capfd.readouterr()
    assert code == 0
    named = {line.split()[4] for line in err.splitlines() if line.startswith("warning: skipping unreadable")}
    assert named and all("bad" in p for p in named)
    assert "unreadable images skipped so far" in out


def test_unreadable_val_and_knn_images_are_dropped_and_counts_are_the_images_used(tmp_path, capfd):
    data = tmp_path / "d"
    write_folder(data / "train", n_per_class=6, bad=1)
    write_folder(data / "val", n_per_class=3, bad=1)
    code, _ = start("finetune", "--data", str(data), "--mode", "knn", "--batch-size", "4",
                    "--out", str(tmp_path / "k"))
    out, err = capfd.readouterr()
    assert code == 0 and "on 6 images, bank of 12" in out and "4 unreadable images dropped" in out, out
    assert err.count("warning: skipping unreadable") == 4
    code, _ = start("finetune", "--data", str(data), "--batch-size", "4", "--out", str(tmp_path / "f"))
    out, _ = capfd.readouterr()
    assert code == 0 and "on 6 images" in out


# ----------------------------------------------------------------------------- 7. logs, tokenizer resume
@ALL
def test_each_step_is_logged_once_after_any_number_of_resumes(tmp_path, name):
    out = str(tmp_path / "o")
    for stop in ("1", "2"):
        assert start(name, *BASE, "--out", out, "--stop-after", stop) == (0, "")
    # a run that logs step 4, then dies before its next checkpoint (diverged): the resume redoes step 4
    code, _ = start(name, *BASE, "--out", out, LR[name], "1e30", "--allow-change", LR[name][2:])
    assert code == 1 and 4 in steps(out)
    assert start(name, *BASE, "--out", out, "--stop-after", "2") == (0, "")
    assert start(name, *BASE, "--out", out) == (0, "")
    assert steps(out) == [1, 2, 3, 4, 5, 6]
    saved = steps(out, "log.jsonl")   # one record per save: the stops, the epoch ends, the recorded change
    assert saved == sorted(set(saved)) and {2, 4, 6} <= set(saved)


def test_tokenizer_training_resumes_exactly(tmp_path):
    args = [*BASE, "--train-tokenizer", "--tok-epochs", "2", "--epochs", "0"]
    assert start("cim_corrupt", *args, "--out", str(tmp_path / "a")) == (0, "")
    assert start("cim_corrupt", *args, "--out", str(tmp_path / "b"), "--stop-after", "3") == (0, "")
    assert not (tmp_path / "b" / "tokenizer.pth").exists()
    assert start("cim_corrupt", *args, "--out", str(tmp_path / "b")) == (0, "")
    a = torch.load(tmp_path / "a" / "tokenizer.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "tokenizer.pth", weights_only=True)
    for part in ("encoder", "decoder"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k
    assert steps(tmp_path / "b", "tokenizer_steps.jsonl") == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- 8. protocols
def test_each_mode_keeps_its_own_protocol_defaults():
    import finetune

    def cfg(*argv):
        c = parse_config(finetune.Config, list(argv))
        return parse_config(finetune.Config, list(argv), defaults=finetune.Config.mode_defaults(c))

    beit = cfg("--mode", "linear", "--probe", "blocks")   # run_linear_eval.py
    assert (beit.blr, beit.weight_decay, beit.epochs, beit.warmup_epochs, beit.batch_size) == (1e-3, 1e-4, 100, 0, 128)
    mae = cfg("--mode", "linear", "--preset", "tiny")     # the tiny preset sets no protocol value
    assert (mae.blr, mae.weight_decay, mae.min_lr) == (0.1, 0.0, 0.0)
    with pytest.raises(SystemExit, match="--preset resnet50 is a fine-tuning recipe"):
        finetune.main(cfg("--mode", "linear", "--preset", "resnet50", "--pretrained", "random"))


def test_block_probe_lr_is_constant_within_an_epoch(tmp_path):
    out = tmp_path / "o"
    assert start("finetune", "--mode", "linear", "--probe", "blocks", "--data", "synthetic", "--batch-size", "4",
                 "--steps-per-epoch", "2", "--epochs", "2", "--out", str(out)) == (0, "")
    lrs = [json.loads(line)["lr"] for line in open(out / "steps.jsonl")]
    assert lrs[0] == lrs[1] == pytest.approx(1e-3 * 4 / 256) and lrs[2] == lrs[3] == pytest.approx(lrs[0] / 2)


# ----------------------------------------------------------------------------- 10, 11. Python floor, test extras
def test_code_runs_on_the_declared_python_floor():
    """README declares Python >= 3.10: vermin finds nothing newer in any file (it reads `.long()` as Python 2's
    `long`, hence the exclusion)."""
    vermin = shutil.which("vermin") or pytest.fail("vermin (requirements-test.txt) is not installed")
    r = subprocess.run([vermin, "--no-tips", "--violations", "-t=3.10-", "--exclude", "long", "--no-parse-comments",
                        "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3.10" in (ROOT / "README.md").read_text().split("## Install")[1][:600]


def test_test_extras_cover_every_import_of_the_tests_and_benchmarks():
    """What the README's test command installs is what the tests import (matplotlib: learning.py's plot)."""
    req = (ROOT / "requirements-test.txt").read_text().lower()
    for package in ("pytest", "timm", "scikit-learn", "scikit-image", "matplotlib", "vermin"):
        assert package in req, package


def test_decode_on_the_device_trains_like_decode_in_the_workers(tmp_path, capsys):
    """--decode device (here the device is the CPU) draws the same crops in the loader and decodes the same
    pixels: the run prints the same losses as --decode cpu."""
    data = write_folder(tmp_path / "d", n_per_class=8, size=48)
    losses = []
    for decode in ("cpu", "device"):
        args = ["--data", str(data), "--batch-size", "4", "--epochs", "1", "--decode", decode]
        assert start("conmim", *args, "--out", str(tmp_path / decode)) == (0, "")
        losses.append([line.split("|")[1] for line in capsys.readouterr().out.splitlines() if line.startswith("ep ")])
    assert losses[0] == losses[1] and len(losses[0]) == 4
