"""benchmarks/learning.py --quick: the learning benchmark's whole pipeline (digits -> ImageFolder, every method's
small32 pre-training, cim_corrupt's own tokenizer, kNN + linear probe on finetune.py's frozen features, per block too, table + JSON) keeps working.
No quality assertion: a seconds-long run learns nothing; the numbers live in the benchmark's output (README)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("sklearn")   # the digits are a test/benchmark extra, never a runtime dependency


def test_learning_quick(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "benchmarks/learning.py", "--quick", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["quick"] is True
    for name in ("raw pixels", "random ViT-Tiny", "conmim", "cim_correlate", "cim_corrupt"):
        row = res["rows"][name]
        assert 0 <= row["knn"] <= 100 and 0 <= row["linear"] <= 100, (name, row)
        if name != "raw pixels":   # ViT-Tiny: one (kNN, linear) pair per block, and the best block of each
            assert len(row["per_block"]) == 12 and 1 <= row["best_block_knn"][0] <= 12, (name, row)
    for m in ("conmim", "cim_correlate", "cim_corrupt"):
        assert res["rows"][m]["pretrain_seconds"] > 0
    assert res["rows"]["cim_corrupt"]["tok_mse"] >= 0   # its own dVAE's held-out reconstruction error is reported
    assert "conmim" in r.stdout and "best block kNN" in r.stdout   # the printed table
