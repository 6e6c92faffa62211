"""common.py: config parsing, schedules, weight-decay groups, exact resume, DDP equivalence, bad input data."""
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from common import (ImageFolder, build_dataset, cosine_schedule, file_hash, load_image, no_decay, param_groups,
                    parse_config, prepare_out, save_checkpoint)
from conftest import ROOT


@dataclass
class Cfg:
    """test config"""
    mask_ratio: float = 0.4   # fraction of patches hidden
    arch: str = "vit_base"    # backbone size
    compile: bool = False     # use torch.compile
    from_: str = ""           # which encoder
    epochs: int = 300
    preset: str = ""
    PRESETS = {"tiny": dict(arch="vit_tiny", epochs=1)}
    CHOICES = {"arch": ("vit_tiny", "vit_base")}
    RANGES = {"mask_ratio": "(0, 1)", "epochs": ">= 1"}


def test_parse_config_spellings_presets_and_help(capsys):
    assert parse_config(Cfg, []) == Cfg()
    assert parse_config(Cfg, ["--mask-ratio", "0.6"]).mask_ratio == 0.6
    assert parse_config(Cfg, ["--mask_ratio", "0.7"]).mask_ratio == 0.7
    assert parse_config(Cfg, ["--compile"]).compile is True
    assert parse_config(Cfg, ["--compile", "false"]).compile is False
    assert parse_config(Cfg, ["--from", "student"]).from_ == "student"
    c = parse_config(Cfg, ["--preset", "tiny", "--epochs", "5"])   # the flag wins over the preset
    assert (c.arch, c.epochs) == ("vit_tiny", 5)
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--preset", "nope"])
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--arch", "vit_huge"])   # CHOICES
    assert parse_config(Cfg, [], defaults={"epochs": 90}).epochs == 90   # e.g. per-mode defaults
    assert parse_config(Cfg, ["--preset", "tiny"], defaults={"epochs": 90}).epochs == 1   # the preset wins
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--help"])
    text = capsys.readouterr().out
    assert "fraction of patches hidden [(0, 1)] (default: 0.4)" in text and "use torch.compile" in text


def test_cosine_schedule():
    s = cosine_schedule(1.0, 0.1, total_steps=100, warmup_steps=10)
    assert len(s) == 100 and s[0] == 0.0 and abs(s[10] - 1.0) < 1e-12
    s = np.array(s)
    assert np.all(np.diff(s[:11]) > 0) and np.all(np.diff(s[10:]) <= 0)
    assert abs(s[-1] - 0.1) < 1e-3
    assert len(cosine_schedule(0.996, 1.0, 7)) == 7 and cosine_schedule(0.996, 1.0, 7)[0] == 0.996


def test_param_groups_skip_1d_and_tokens():
    from finetune import VisionTransformer
    m = VisionTransformer(16, 4, 32, 1, 2, pos_embed="learned", rel_pos=True, init_values=0.1)
    m.mask_token = torch.nn.Parameter(torch.zeros(1, 1, 32))
    decay, skip = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    skipped = {names[id(p)] for p in skip["params"]}
    assert {"pos_embed", "cls_token", "mask_token", "blocks.0.attn.relative_position_bias_table",
            "blocks.0.attn.qkv.bias", "blocks.0.ls1.gamma", "norm.weight"} <= skipped
    assert {names[id(p)] for p in decay["params"]} == {
        "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight"}
    assert decay["weight_decay"] == 0.05 and skip["weight_decay"] == 0.0 and not no_decay("x.weight", torch.zeros(2, 2))


def run(args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_exact_resume(tmp_path):
    """4 steps in one go == 2 steps, stop (as if killed), resume, 2 more: identical losses and weights."""
    base = ["finetune.py", "--preset", "tiny", "--pretrained", "random", "--data", "synthetic", "--epochs", "2",
            "--steps-per-epoch", "2", "--batch-size", "4", "--log-every", "1"]
    a = run(base + ["--out", str(tmp_path / "a")])
    b1 = run(base + ["--out", str(tmp_path / "b"), "--stop-after", "2"])
    b2 = run(base + ["--out", str(tmp_path / "b")])
    for r in (a, b1, b2):
        assert r.returncode == 0, r.stderr
    assert "resumed from" in b2.stdout

    def loss_lines(out):
        return [line.split("|")[1] for line in out.splitlines() if line.startswith("ep ")]

    assert loss_lines(a.stdout) == loss_lines(b1.stdout) + loss_lines(b2.stdout)
    wa = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)
    wb = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)
    assert wa["step"] == wb["step"] == 4
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k


def test_ddp_matches_single_process(tmp_path):
    one = run(["tests/ddp_check.py", "8", str(tmp_path / "one.pt")])
    two = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "tests/ddp_check.py", "8",
               str(tmp_path / "two.pt")])
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    np.testing.assert_allclose(a["losses"], b["losses"], atol=1e-5)
    for k in a["weights"]:
        torch.testing.assert_close(a["weights"][k], b["weights"][k], atol=1e-5, rtol=0)


def write_images(folder):
    """Every odd-but-valid image kind, plus broken files with image extensions."""
    folder.mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.jpg")
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(folder / "palette.gif")
    Image.fromarray(rgb).convert("RGBA").save(folder / "alpha.png")
    Image.fromarray((np.arange(20 * 24).reshape(20, 24) * 100).astype(np.uint16)).save(folder / "sixteen.png")
    Image.fromarray(rgb[:1, :1]).save(folder / "tiny.png")
    good = (folder / "rgb.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "text.jpg").write_text("this is not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image extension")


def test_odd_images_are_converted_and_bad_ones_skipped(tmp_path, capsys):
    write_images(tmp_path / "a")
    ds = ImageFolder(str(tmp_path), T.Compose([T.RandomResizedCrop(16), T.ToTensor()]))
    assert len(ds) == 9   # torchvision's image extensions: .txt and .gif are not listed
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and y == 0
    assert ds.skipped.item() == 3   # truncated, text, empty
    assert "skipping unreadable image" in capsys.readouterr().err
    sixteen = np.asarray(load_image(tmp_path / "a" / "sixteen.png"))
    assert sixteen.shape == (20, 24, 3) and sixteen.min() == 0 and sixteen.max() == 255   # rescaled, not clipped


@pytest.mark.parametrize("layout,msg", [("missing", "does not exist"), ("empty", "any class folder"),
                                        ("files_only", "any class folder"), ("no_images", "no valid file")])
def test_bad_data_dirs_fail_with_one_clear_line(tmp_path, layout, msg):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "files_only":
        (root / "x.jpg").write_bytes(b"")
    if layout == "no_images":
        (root / "cls").mkdir()
        (root / "cls" / "readme.txt").write_text("x")
    with pytest.raises(SystemExit, match=msg) as e:
        build_dataset(str(root), "train", None)
    assert str(root) in str(e.value) and "\n" not in str(e.value)
    r = run(["finetune.py", "--preset", "tiny", "--pretrained", "random", "--data", str(root),
             "--out", str(tmp_path / "o")])
    assert r.returncode == 1 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_run_over_folder_with_bad_files_completes(tmp_path):
    for c in ("cat", "dog"):
        write_images(tmp_path / "data" / c)
        for i in range(2):   # 22 files: the fixed hold-out is cat/extra1.png (good) and cat/truncated.jpg (dropped)
            Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(tmp_path / "data" / c / f"extra{i}.png")
    r = run(["finetune.py", "--preset", "tiny", "--pretrained", "random", "--data", str(tmp_path / "data"),
             "--mode", "knn", "--batch-size", "4", "--out", str(tmp_path / "o")])
    assert r.returncode == 0, r.stderr
    assert "holding out 2 of 22" in r.stdout and "on 1 images, bank of 15" in r.stdout, r.stdout
    log = [json.loads(line) for line in open(tmp_path / "o" / "log.jsonl")]
    assert log[-1]["mode"] == "knn"


def test_checkpoint_fsync_hash_and_out_lock(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    save_checkpoint({"a": torch.ones(2)}, str(tmp_path / "ck.pth"))
    assert synced and not (tmp_path / "ck.pth.tmp").exists() and len(file_hash(tmp_path / "ck.pth")) == 12
    out, other = str(tmp_path / "o"), str(tmp_path / "other")
    prepare_out(out, Cfg(), __file__)
    prepare_out(out, Cfg(), __file__)   # the same process may prepare its --out again
    assert json.loads((tmp_path / "o" / "config.json").read_text())["arch"] == "vit_base"

    def hold(path):   # another process that locks `path` and waits for stdin
        code = ("import dataclasses, sys; from common import prepare_out; "
                f"prepare_out({path!r}, dataclasses.make_dataclass('C', [])(), {__file__!r}); "
                "print('held', flush=True); sys.stdin.read()")
        return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    p = hold(out)   # a second run into our --out stops with one line
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and err == f"error: --out {out} is in use by another running process; pass another --out\n"
    p = hold(other)
    assert p.stdout.readline() == "held\n"
    with pytest.raises(SystemExit, match="is in use"):
        prepare_out(other, Cfg(), __file__)
    p.kill()   # its lock dies with it: no stale lock to delete by hand
    p.wait()
    prepare_out(other, Cfg(), __file__)


def test_read_image_gives_load_image_pixels(tmp_path):
    """The fast decoders (torchvision's libjpeg-turbo / libpng) give PIL's pixels, odd modes included."""
    from common import read_image
    write_images(tmp_path / "a")
    for name in ("rgb.jpg", "gray.png", "cmyk.jpg", "alpha.png", "sixteen.png", "tiny.png"):
        ours = read_image(tmp_path / "a" / name)
        ref = torch.from_numpy(np.array(load_image(tmp_path / "a" / name))).permute(2, 0, 1)
        assert ours.dtype == torch.uint8 and torch.equal(ours, ref), name


def test_crop_flip_decoded_on_the_device_equals_the_worker_path(tmp_path, capsys):
    """--decode device, run with device = CPU: the loader hands over JPEG bytes and the drawn box, images_to()
    decodes and crops; the pixels equal those of the worker path (decode + crop in the loader), PNGs included;
    a broken JPEG is named and replaced by another image of the batch."""
    from common import CropFlip, Encoded, collate, images_to
    folder = tmp_path / "d" / "c"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(folder / "5.png")
    crop = CropFlip(16, (0.2, 1.0))
    worker = build_dataset(str(tmp_path / "d"), "train", crop, decode="tensor")
    device = build_dataset(str(tmp_path / "d"), "train", crop, decode="bytes")
    torch.manual_seed(0)
    a = collate([worker[i] for i in range(6)])[0]
    torch.manual_seed(0)
    items, labels = collate([device[i] for i in range(6)])
    assert isinstance(items, list) and sum(isinstance(x, Encoded) for x in items) == 5
    b = images_to(items, torch.device("cpu"))
    assert a.shape == b.shape == (6, 3, 16, 16) and torch.equal(a, b)
    items[1].data = items[1].data.clone()
    items[1].data[2:200] = 0   # a broken header between intact start and end markers
    capsys.readouterr()
    c = images_to(items, torch.device("cpu"))
    assert c.shape == (6, 3, 16, 16) and "skipping unreadable image" in capsys.readouterr().err
    assert torch.equal(c[1], c[0]) and torch.equal(c[2:], b[2:])   # replaced by another image of the batch
