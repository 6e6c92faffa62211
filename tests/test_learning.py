"""benchmarks/learning.py: the MAE baseline learns a batch, the shapes and photos sets are deterministic and balanced,
and --quick runs the whole pipeline (digits -> ImageFolder, cim_corrupt's dVAE outside the timed run, every row's
pre-training with seeds, kNN and linear probe on finetune.py's frozen features for both poolings, table, JSON,
pretext plot). No quality assertion on --quick: a seconds-long run learns nothing; the numbers live in
benchmarks/README.md."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
pytest.importorskip("sklearn")   # the digits and sample photos are a test/benchmark extra, never a runtime dependency
import learning  # noqa: E402
from finetune import VisionTransformer  # noqa: E402


def test_mae_fits_one_batch_and_scores_only_hidden_patches():
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, pos_embed="sincos")
    mae = learning.MAE(enc, dec_dim=16, dec_depth=1, dec_heads=2)
    x = torch.randn(4, 3, 16, 16)
    opt = torch.optim.Adam(mae.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        torch.manual_seed(1)                       # the same mask every step
        loss = mae(x)
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::20]
    # changing only the patches the encoder sees (same seed = same mask) leaves the target of the loss unchanged:
    # the loss moves only through the encoder input, so a model that ignores its input gives the same loss
    torch.manual_seed(1)
    keep = torch.rand(4, 16).argsort(1)[:, :4]     # the visible patches MAE draws under seed 1
    x2 = x.clone()
    for b in range(4):
        for p in keep[b].tolist():
            r, c = divmod(p, 4)
            x2[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = torch.randn(3, 4, 4)   # new content, not an offset
    enc.patch_embed.proj.weight.data.zero_(), enc.patch_embed.proj.bias.data.zero_()   # input-blind model
    with torch.no_grad():
        torch.manual_seed(1)
        a = mae(x)
        torch.manual_seed(1)
        b = mae(x2)
    assert torch.allclose(a, b), (a, b)


def test_shapes_deterministic_and_balanced(tmp_path):
    a = learning.write_shapes(tmp_path / "a", train_per_class=3, val_per_class=2)
    b = learning.write_shapes(tmp_path / "b", train_per_class=3, val_per_class=2)
    xa, ya = learning.load_split(a, "train")
    xb, _ = learning.load_split(b, "train")
    assert xa.shape == (30, 3, 32, 32) and torch.equal(xa, xb)
    assert torch.bincount(ya).tolist() == [3] * 10 and len(learning.load_split(a, "val")[1]) == 20


def test_photos_deterministic_balanced_grey(tmp_path):
    pytest.importorskip("skimage")   # scikit-image's bundled photos: a test/benchmark extra
    a = learning.write_photos(tmp_path / "a", train_per_class=3, val_per_class=2)
    b = learning.write_photos(tmp_path / "b", train_per_class=3, val_per_class=2)
    (xa, ya), (xb, _) = learning.load_split(a, "train"), learning.load_split(b, "train")
    assert xa.shape == (30, 3, 32, 32) and torch.equal(xa, xb)
    assert torch.equal(xa[:, 0], xa[:, 1]) and torch.equal(xa[:, 0], xa[:, 2])   # grey crops
    assert torch.bincount(ya).tolist() == [3] * 10 and len(learning.load_split(a, "val")[1]) == 20


def test_learning_quick(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "benchmarks/learning.py", "--quick", "--seeds", "0,1", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["quick"] is True and res["seeds"] == [0, 1] and res["machine"]
    for name in ("random ViT-Tiny", "conmim", "cim_correlate", "cim_corrupt", "mae"):
        row = res["rows"][name]
        for key in ("mean_knn", "mean_linear", "cls_knn", "cls_linear"):
            mean, spread, values = row[key]
            assert len(values) == 2 and 0 <= mean <= 100 and spread >= 0, (name, key, row[key])
    for name, metric in (("conmim", "acc"), ("cim_correlate", "iou"), ("cim_corrupt", "gen_acc"), ("mae", "loss")):
        assert all(v is not None for v in res["rows"][name]["final_pretext"][metric]), name
        assert res["rows"][name]["images_seen"][0] > 0
    assert res["rows"]["cim_corrupt"]["tokenizer"][0]["tok_mse"] >= 0
    # cim_corrupt's dVAE is trained once per seed before the timed run, which only loads it (no dVAE log lines)
    corrupt = tmp_path / "cim_corrupt"
    assert res["rows"]["cim_corrupt"]["tokenizer"][1]["seconds"] > 0
    assert "nll" in (corrupt / "tok_seed1" / "run.log").read_text()
    assert (corrupt / "seed1" / "tokenizer.pth").read_bytes() == (corrupt / "tok_seed1" / "tokenizer.pth").read_bytes()
    assert "nll" not in (corrupt / "seed1" / "run.log").read_text()
    assert (tmp_path / "pretext.png").stat().st_size > 0
    assert "mae" in r.stdout and "kNN mean" in r.stdout   # the printed table


def test_bad_run_flags_end_with_the_runs_error_line(tmp_path):
    """A run that stops at its own argument checks (here the calibration run, before it makes its --out) ends the
    benchmark with that line."""
    r = subprocess.run([sys.executable, "benchmarks/learning.py", "--rows", "conmim", "--seeds", "0",
                        "--extra", "conmim:--lr -1", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().endswith("error: --lr -1.0: must be > 0"), r.stderr[-2000:]
    assert "--lr -1.0: must be > 0" in (tmp_path / "conmim" / "cal.log").read_text()
