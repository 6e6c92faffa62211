"""The README's CPU quick start runs exactly as written (commands taken from the README itself)."""
import os
import re
import shlex
import subprocess
import sys

from conftest import ROOT


def test_readme_cpu_quickstart(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"I only have a laptop.*?```bash\n(.*?)```", text, re.S).group(1)
    cmds = [shlex.split(l) for l in block.splitlines() if l.startswith("python ")]
    assert len(cmds) == 2 and cmds[0][1] == "conmim.py" and cmds[1][1] == "finetune.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for cmd in cmds:   # run from a scratch dir so out/ lands there
        r = subprocess.run([sys.executable, str(ROOT / cmd[1]), *cmd[2:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
    assert "kNN" in r.stdout and (tmp_path / "out" / "quick" / "checkpoint.pth").exists()
