"""benchmarks/speed.py --quick runs on CPU and prints a row per method step plus the reference classifier rows."""
import os
import subprocess
import sys

from conftest import ROOT


def test_speed_quick_runs_every_row():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "benchmarks/speed.py", "--device", "cpu", "--quick"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    rows = [l for l in r.stdout.splitlines() if l[:1].isalpha() and ("px" in l)]
    names = [" ".join(l.split()[:2]) for l in rows]
    assert names == ["conmim vit_tiny", "cim_correlate vit_tiny", "cim_corrupt vit_tiny", "timm vit_tiny",
                     "cim_correlate resnet50", "cim_corrupt resnet50", "torchvision resnet50"], r.stdout
    for l in rows:   # img/s, GFLOP/img and MFU are real positive numbers
        cols = l.split()
        ips, gflop, mfu = float(cols[-4]), float(cols[-3]), float(cols[-2].rstrip("%"))
        assert ips > 0 and gflop > 0 and mfu > 0, l


def test_speed_loader_rows_on_generated_jpegs(tmp_path):
    """--loader writes ImageNet-sized JPEGs from the bundled photos and prints one row per input pipeline, the
    reference first, each with its ratio to the reference and the cores a GPU needs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "benchmarks/speed.py", "--loader", "--jpegs", "8", "--seconds", "0.3",
                        "--rounds", "1", "--workers", "1", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines()[2:] if line.strip() and not line.startswith("--decode")]
    assert "--decode device (conmim): workers read bytes" in r.stdout
    names = [line[:38].strip() for line in rows]
    assert names == ["reference: RandomResizedCrop + flip", "conmim", "cim_correlate", "cim_corrupt",
                     "finetune.py --mode finetune (train)", "finetune.py --mode linear (train)",
                     "finetune.py val / kNN"], r.stdout
    assert float(rows[0].split()[6]) == 1.0 and all(float(line[38:].split()[0]) > 0 for line in rows)
    from PIL import Image
    jpegs = sorted((tmp_path / "jpegs").rglob("*.JPEG"))
    assert len(jpegs) == 8 and Image.open(jpegs[0]).size in ((500, 375), (375, 500))
