"""No host synchronisation inside a training step that is not a log step: on a GPU each one stalls the CPU until
the device catches up. A dispatch mode records every op that makes the host wait for a device value
(`.item()`, `bool(tensor)`, `float(tensor)`, boolean-mask indexing, nonzero, unique, repeat_interleave with a
tensor of repeats) while a tiny CPU run of each method trains, and the test fails if one happens between the start
of a step and the end of its end_step() on a step that logs nothing. Not seen by the dispatcher: `.tolist()` and
`.cpu()` (review those by hand). Excluded: ops inside the DataLoader (loader workers run on the CPU), inside
torch.optim (the CPU optimizers read their step counters; the fused CUDA ones keep them on the device) and inside
torchvision's transforms (MixUp / CutMix draw their parameters from fresh CPU tensors)."""
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import common
from common import parse_config

SYNCING = {"aten._local_scalar_dense", "aten.nonzero", "aten._unique2", "aten.unique_consecutive",
           "aten.masked_select"}


class HostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.window, self.found = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        syncs = name in SYNCING
        if name == "aten.index":   # x[mask]: the result's size depends on the mask's values
            syncs = any(t is not None and t.dtype == torch.bool for t in args[1])
        if name == "aten.repeat_interleave":
            syncs = torch.is_tensor(args[-1] if len(args) > 1 else args[0])
        if syncs and self.window:
            stack = traceback.extract_stack()
            files = [f.filename for f in stack]
            excluded = ("torch/utils/data", "torch/optim", "torchvision/transforms")
            if not any(e in f for f in files for e in excluded):
                ours = [f"{f.filename.split('/')[-1]}:{f.lineno}" for f in stack if "/work/" in f.filename
                        or f.filename.split("/")[-1] in ("conmim.py", "cim_correlate.py", "cim_corrupt.py",
                                                         "common.py", "finetune.py")]
                self.found.append((name, ours[-3:]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["conmim", "cim_correlate", "cim_corrupt", "finetune"])
def test_no_host_sync_on_steps_that_do_not_log(tmp_path, monkeypatch, name):
    import importlib
    mod = importlib.import_module(name)
    mode = HostSyncs()
    real_steps, real_end = common.Run.steps, common.Run.end_step

    def steps(run):
        for item in real_steps(run):
            mode.window = True
            yield item

    def end_step(run, it, lr):
        logs = (it + 1) % run.cfg.log_every == 0 or it + 1 == run.total
        mode.window = not logs   # a log step may read device values: that is what it is for
        done = real_end(run, it, lr)
        mode.window = False
        return done

    monkeypatch.setattr(common.Run, "steps", steps)
    monkeypatch.setattr(common.Run, "end_step", end_step)
    argv = ["--preset", "tiny", "--data", "synthetic", "--batch-size", "4", "--steps-per-epoch", "3",
            "--epochs", "1", "--log-every", "100", "--out", str(tmp_path / "o")]
    argv += ["--pretrained", "random"] if name == "finetune" else ["--accum-iter", "2"]
    with mode:
        mod.main(parse_config(mod.Config, argv))
    assert not mode.found, mode.found


def test_the_detector_sees_a_sync(tmp_path):
    """The same mode flags an .item() and a boolean-mask index in a window (the test above can fail)."""
    mode = HostSyncs()
    with mode:
        x = torch.randn(8)
        mode.window = True
        x.sum().item()
        x[x > 0].sum()
        mode.window = False
    assert [f[0] for f in mode.found] == ["aten._local_scalar_dense", "aten.index"]
