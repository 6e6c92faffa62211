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
