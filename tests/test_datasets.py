"""--data cifar10 | cifar100 | stl10: torchvision's on-disk layouts built offline, end-to-end runs, bad caches."""
import os
import pickle
from urllib.error import URLError

import numpy as np
import pytest
import torchvision.datasets.cifar as tv_cifar
import torchvision.datasets.stl10 as tv_stl10
from PIL import Image
from torch.utils.data import Subset
from torchvision.datasets.utils import check_integrity

import conmim
import finetune
from common import build_dataset, parse_config, skipped_images

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def pixels(n, shape, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def write_cifar10(root, n=8):
    """cifar-10-batches-py/ as in the real archive: pickled dicts of (n, 3072) uint8 rows (CHW) and int labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch = {"batch_label": name, "data": pixels(n, (3 * 32 * 32,), i), "labels": [(i + j) % 10 for j in range(n)],
                 "filenames": [f"{name}_{j}.png" for j in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": CIFAR_NAMES, "num_cases_per_batch": n, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def write_stl10(root, n=6):
    """stl10_binary/ as in the real archive: raw uint8 images (column-major 3x96x96), labels 1..10, class names."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for i, split in enumerate(("unlabeled", "train", "test")):
        (folder / f"{split}_X.bin").write_bytes(pixels(n * (i + 1), (3, 96, 96), 10 + i).tobytes())
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes(np.arange(1, n * (i + 1) + 1, dtype=np.uint8) % 10 + 1)
    (folder / "class_names.txt").write_text("\n".join(CIFAR_NAMES[:6] + ["monkey", "horse", "ship", "truck"]) + "\n")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fake cache in MIMREF_DATASETS; md5 sums: "file exists"; any download attempt fails like a machine offline."""
    root = tmp_path / "cache"
    write_cifar10(root)
    write_stl10(root)
    monkeypatch.setenv("MIMREF_DATASETS", str(root))
    for module in (tv_cifar, tv_stl10):
        monkeypatch.setattr(module, "check_integrity", lambda path, md5=None: os.path.isfile(path))
        monkeypatch.setattr(module, "download_and_extract_archive", offline)
    return root


def offline(*args, **kwargs):
    raise URLError("[Errno -3] Temporary failure in name resolution")


def test_named_sets_give_pil_rgb_int_labels_and_classes(cache):
    train, val = build_dataset("cifar10", "train", None), build_dataset("cifar10", "val", None)
    assert (len(build_dataset("cifar10", "pretrain", None)), len(train), len(val)) == (40, 40, 8)
    img, label = val[3]
    raw = pickle.loads((cache / "cifar-10-batches-py" / "test_batch").read_bytes())
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32) and type(label) is int
    assert np.array_equal(np.asarray(img), raw["data"][3].reshape(3, 32, 32).transpose(1, 2, 0)) and label == 8
    assert train.classes == val.classes == CIFAR_NAMES and skipped_images(Subset(train, [0, 1])) == 0

    pre, train, val = (build_dataset("stl10", split, None) for split in ("pretrain", "train", "val"))
    assert (len(pre), len(train), len(val)) == (6, 12, 18) and pre[0][1] == -1   # pretrain = the unlabeled split
    raw = np.fromfile(cache / "stl10_binary" / "test_X.bin", dtype=np.uint8).reshape(-1, 3, 96, 96)
    img, label = val[5]
    assert img.mode == "RGB" and img.size == (96, 96) and type(label) is int and label == 6   # file label 7 -> 6
    assert np.array_equal(np.asarray(img), raw[5].transpose(2, 1, 0))   # column-major rows as torchvision reads
    assert train.classes == val.classes and train.classes[6] == "monkey" and skipped_images(pre) == 0


def test_conmim_then_knn_run_on_cifar10_cache(cache, tmp_path):
    out = tmp_path / "pre"
    conmim.main(parse_config(conmim.Config, ["--preset", "tiny", "--data", "cifar10", "--steps-per-epoch", "2",
                                             "--out", str(out)]))
    assert (out / "checkpoint.pth").is_file() and len((out / "steps.jsonl").read_text().splitlines()) == 2
    argv = ["--preset", "tiny", "--mode", "knn", "--data", "cifar10", "--pretrained", str(out / "checkpoint.pth"),
            "--out", str(tmp_path / "knn")]
    finetune.main(parse_config(finetune.Config, argv))
    assert "knn" in (tmp_path / "knn" / "log.jsonl").read_text()


@pytest.mark.parametrize("name,damage,shown", [
    ("cifar10", "cifar-10-batches-py/data_batch_3", "Temporary failure in name resolution"),   # partial, offline
    ("stl10", "stl10_binary/test_y.bin", "File not found or corrupted"),   # partial archive: torchvision's md5 error
    ("stl10", "", "File not found or corrupted")])   # every file there, but not the real ones: md5 sums differ
def test_partial_or_corrupt_cache_fails_with_one_line(cache, monkeypatch, name, damage, shown):
    if damage:
        (cache / damage).unlink()
    else:
        monkeypatch.setattr(tv_stl10, "check_integrity", check_integrity)   # torchvision's real md5 check
    if name == "stl10":
        monkeypatch.setattr(tv_stl10, "download_and_extract_archive", bad_archive)
    with pytest.raises(SystemExit) as e:
        build_dataset(name, "pretrain", None)
    msg = str(e.value)
    assert msg.startswith(f"error: --data {name}: ") and "\n" not in msg and shown in msg
    assert str(cache) in msg and "delete it" in msg and "by hand" in msg


def bad_archive(*args, **kwargs):
    raise RuntimeError("File not found or corrupted.")


def broken_cache_rank(rank, world, init_file, root, out):
    """One gloo process: CIFAR-10 cache missing a batch, offline; records how build_dataset ended on this rank."""
    import torch.distributed as dist
    os.environ.update(RANK=str(rank), MIMREF_DATASETS=str(root))
    tv_cifar.check_integrity = lambda path, md5=None: os.path.isfile(path)
    tv_cifar.download_and_extract_archive = offline
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        build_dataset("cifar10", "train", None)
        code = "returned"
    except SystemExit as e:
        code = repr(e.code)
    (out / f"rank{rank}").write_text(code)
    dist.destroy_process_group()


def test_two_ranks_bad_download_one_line_from_rank_0_others_exit_quietly(tmp_path):
    """Under torchrun a failed download used to leave the other ranks in a barrier with a gloo traceback."""
    import torch.multiprocessing as mp
    write_cifar10(tmp_path / "cache")
    (tmp_path / "cache" / "cifar-10-batches-py" / "data_batch_2").unlink()
    mp.start_processes(broken_cache_rank, args=(2, str(tmp_path / "init"), tmp_path / "cache", tmp_path), nprocs=2,
                       join=True, start_method="spawn")
    msg = (tmp_path / "rank0").read_text()
    assert msg.startswith("'error: --data cifar10: cannot download") and "\\n" not in msg and "name resolution" in msg
    assert (tmp_path / "rank1").read_text() == "1"
