"""Issue 14: trustworthy under the situations real users create (data fingerprints in baseline
keys, the official bytes-keyed CIFAR pickles, ImageFolder trees, the --out lock, FGQ's exact
solver at extreme scales, progress without a terminal, report on a hand-edited csv)."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ternbench.bench.cache import baseline_key, load_or_train_fp32
from ternbench.bench.cli import main
from ternbench.bench.data import (
    dataset_fingerprint,
    dataset_info,
    load_dataset,
    stratified_indices,
)
from ternbench.core.train import TrainCfg


def write_cifar(root: Path, seed: int, n_train: int = 64, n_test: int = 32,
                bytes_keys: bool = True) -> Path:
    """cifar-10-batches-py as the official pickles load in Python 3: bytes keys (b'data')."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def key(k: str) -> str | bytes:
        return k.encode() if bytes_keys else k

    per = -(-n_train // 5)
    for name, n in [(f"data_batch_{i}", per) for i in range(1, 6)] + [("test_batch", n_test)]:
        labels = rng.integers(0, 10, size=n)
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        data[:, :1024] = (labels[:, None] * 25).astype(np.uint8)  # red plane tells the class
        entry = {key("batch_label"): name.encode(), key("data"): data,
                 key("labels"): labels.tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({key("label_names"): [f"c{i}".encode() for i in range(10)]}, f)
    return root


def write_imagefolder(root: Path, classes: int = 10, per_val: int = 6, per_train: int = 4,
                      size: int = 40) -> Path:
    from PIL import Image

    rng = np.random.default_rng(3)
    for split, per in (("val", per_val), ("train", per_train)):
        for k in range(classes):
            d = root / split / f"n{k:08d}"
            d.mkdir(parents=True)
            for i in range(per):
                arr = rng.integers(0, 256, size=(size, size + 4 * (i % 2), 3), dtype=np.uint8)
                arr[..., 0] = 20 * k
                Image.fromarray(arr).save(d / f"img{i}.{'png' if i % 2 else 'JPEG'}")
    return root


# ------------------------------------------------------------------------------------- data


def test_bytes_keyed_cifar_loads(tmp_path: Path) -> None:
    root = write_cifar(tmp_path, seed=0)
    train, test = load_dataset("cifar10", "train", root), load_dataset("cifar10", "test", root)
    assert len(train) == 65 and len(test) == 32
    x, y = test[3]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    red = (25 * y / 255 - 0.4914) / 0.2470
    torch.testing.assert_close(x[0], torch.full((32, 32), red))
    clone = pickle.loads(pickle.dumps(test))  # DataLoader workers / Ray
    assert torch.equal(clone[3][0], x)


def test_cifar_str_and_bytes_keys_give_the_same_data(tmp_path: Path) -> None:
    a = load_dataset("cifar10", "test", write_cifar(tmp_path / "a", seed=5))
    b = load_dataset("cifar10", "test", write_cifar(tmp_path / "b", seed=5, bytes_keys=False))
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(len(a)))


def test_dataset_fingerprint_follows_content(tmp_path: Path) -> None:
    a = dataset_fingerprint("cifar10", write_cifar(tmp_path / "a", seed=0))
    b = dataset_fingerprint("cifar10", write_cifar(tmp_path / "b", seed=1))
    assert a["splits"] == b["splits"] == {"train": 65, "test": 32}
    assert a["content_sha256"] != b["content_sha256"] and a["root"] != b["root"]
    assert a == dataset_fingerprint("cifar10", tmp_path / "a")  # stable


def test_two_cifar_roots_give_two_fp32_baselines(tmp_path: Path, monkeypatch,
                                                 one_thread) -> None:
    monkeypatch.setenv("TERNBENCH_CACHE", str(tmp_path / "cache"))
    cfg = TrainCfg(epochs=1, batch_size=32, seed=0)
    ra, rb = write_cifar(tmp_path / "a", seed=0), write_cifar(tmp_path / "b", seed=1)
    ka = baseline_key("resnet8", "cifar10", cfg, root=ra)
    kb = baseline_key("resnet8", "cifar10", cfg, root=rb)
    assert ka != kb
    ma, ia = load_or_train_fp32("resnet8", "cifar10", cfg, root=ra, progress=False)
    mb, ib = load_or_train_fp32("resnet8", "cifar10", cfg, root=rb, progress=False)
    assert ia["source"] == ib["source"] == "trained"  # b's data did not reuse a's baseline
    assert (ia["key"], ib["key"]) == (ka, kb)
    assert not torch.equal(ma.state_dict()["fc.weight"], mb.state_dict()["fc.weight"])
    _, again = load_or_train_fp32("resnet8", "cifar10", cfg, root=ra, progress=False)
    assert again["source"] == "cache" and again["key"] == ka


def test_stratified_subset() -> None:
    labels = np.repeat(np.arange(10), [50, 50, 50, 50, 50, 100, 100, 100, 100, 100])
    idx = stratified_indices(labels, 75, seed=0)
    assert len(idx) == 75 and len(np.unique(idx)) == 75
    counts = np.bincount(labels[idx], minlength=10)
    assert counts[:5].tolist() == [5] * 5 and counts[5:].tolist() == [10] * 5
    assert np.array_equal(idx, stratified_indices(labels, 75, seed=0))
    assert not np.array_equal(idx, stratified_indices(labels, 75, seed=1))
    assert len(stratified_indices(labels, 10_000, seed=0)) == len(labels)


def test_imagefolder_tree_classes_and_train_split(tmp_path: Path, caplog) -> None:
    root = write_imagefolder(tmp_path / "inet", classes=10)
    with caplog.at_level(logging.INFO, logger="ternbench.bench.data"):
        info = dataset_info("imagenet", root)
        for _ in range(5):
            dataset_info("imagenet", root)
            load_dataset("imagenet", "val", root)
    assert info.num_classes == 10 and info.splits == ("train", "val")
    assert sum("10 classes" in r.getMessage() for r in caplog.records) == 1  # logged once
    val = load_dataset("imagenet", "val", root, image_size=32)
    tr = load_dataset("imagenet", "train", root, augment=True, image_size=32)
    assert len(val) == 60 and len(tr) == 40
    assert val[0][0].shape == tr[0][0].shape == (3, 32, 32)
    flat = write_imagefolder(tmp_path / "flat", classes=3)  # a val tree without train/
    assert dataset_info("imagenet", flat / "val").splits == ("val",)
    with pytest.raises(FileNotFoundError, match="pass --weights FILE .* or give a train/"):
        load_dataset("imagenet", "train", flat / "val")


@pytest.mark.slow
def test_imagenet_acceptance_subset_500_at_224(tmp_path: Path, capsys) -> None:
    """The issue's acceptance command: 10-class ImageFolder with train/, --subset 500,
    ResNet-18 at the default 224 px, the user's weights; accuracy is reported."""
    from ternbench.bench.models import create_model

    root = write_imagefolder(tmp_path / "inet", classes=10, per_val=60, per_train=8, size=24)
    w = tmp_path / "w.pt"
    torch.save(create_model("resnet18", in_chans=3, num_classes=10, image_size=224)
               .state_dict(), w)
    out = tmp_path / "run"
    code = main(["run", "--dataset", "imagenet", "--data-root", str(root), "--subset", "500",
                 "--model", "resnet18", "--weights", str(w), "--methods", "fgq",
                 "--profile", "smoke", "--targets", "", "--executor", "local", "--no-progress",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    import pandas as pd

    df = pd.read_parquet(out / "results.parquet")
    n = df[(df.metric == "n_eval")].value
    assert set(n) == {500.0}
    assert set(df[df.metric == "top1"].method) == {"fp32", "fgq"}


def test_imagenet_run_with_weights_and_subset(tmp_path: Path, capsys) -> None:
    """A user ImageFolder (10 classes, train/ folder) evaluated with the user's ResNet-18
    weights on a stratified subset; small images keep it quick (--image-size 16)."""
    from ternbench.bench.models import create_model

    root = write_imagefolder(tmp_path / "inet", classes=10)
    w = tmp_path / "w.pt"
    torch.save(create_model("resnet18", in_chans=3, num_classes=10, image_size=16)
               .state_dict(), w)
    out = tmp_path / "run"
    argv = ["run", "--dataset", "imagenet", "--data-root", str(root), "--subset", "20",
            "--model", "resnet18", "--weights", str(w), "--methods", "fgq", "--image-size", "16",
            "--num-classes", "10", "--profile", "smoke", "--targets", "", "--executor", "local",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "top1" in printed and "fgq" in printed and "report:" in printed
    import pandas as pd

    df = pd.read_parquet(out / "results.parquet")
    assert set(df[df.metric == "n_eval"].value) == {20.0}
    sub = sorted((out / "subsets").glob("*.npy"))
    idx = np.load(sub[0])
    assert len(idx) == 20 and sorted(np.bincount(idx // 6, minlength=10)) == [2] * 10


# ------------------------------------------------------------------------- FGQ exact solver


@pytest.mark.parametrize("scale", [1e-25, 1e-20, 1e20, 1e25])
def test_fgq_exact_support_is_scale_free(scale: float) -> None:
    from ternbench.methods._ternarize import ternarize_exact

    w = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    codes, alpha = ternarize_exact(w)
    codes_s, alpha_s = ternarize_exact(w * scale)
    assert torch.equal(codes, codes_s)
    torch.testing.assert_close(alpha_s / scale, alpha, rtol=1e-5, atol=0)


def test_fgq_exact_zero_group() -> None:
    from ternbench.methods._ternarize import ternarize_exact

    codes, alpha = ternarize_exact(torch.zeros(2, 4))
    assert not codes.any() and not alpha.any()


# ------------------------------------------------------------------ lock, progress, report


def hold_lock(out: Path) -> subprocess.Popen:
    """Another process holding --out's lock the way a run does (flock + its PID)."""
    code = ("import fcntl,os,sys,time; os.makedirs(sys.argv[1], exist_ok=True); "
            "fd=os.open(sys.argv[1]+'/.lock', os.O_RDWR|os.O_CREAT); fcntl.flock(fd, "
            "fcntl.LOCK_EX); os.ftruncate(fd,0); os.write(fd, f'{os.getpid()}\\n'.encode()); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_out_lock_waits_for_the_holder(tmp_path: Path) -> None:
    from ternbench.bench.runner import RunLockedError, out_lock

    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        with pytest.raises(RunLockedError, match=f"PID {holder.pid}"), out_lock(out):
            pass
    finally:
        holder.kill()
        holder.wait()
    t0 = time.monotonic()
    with out_lock(out, wait=True):  # free again: taken at once, our PID written
        assert (out / ".lock").read_text().strip() == str(os.getpid())
    assert time.monotonic() - t0 < 60


def test_heartbeat_logs_without_a_terminal(caplog) -> None:
    from ternbench.bench.runner import _Heartbeat, log_progress

    assert log_progress(False) is False  # --no-progress silences the log lines too
    beat = _Heartbeat(3, enabled=True, every_s=0.0)
    with caplog.at_level(logging.INFO, logger="ternbench.bench.runner"):
        for what in ("fp32 accuracy", "fgq accuracy", "fgq x86 latency"):
            beat.update(what)
        _Heartbeat(3, enabled=False, every_s=0.0).update("x")
    lines = [r.getMessage() for r in caplog.records if "progress:" in r.getMessage()]
    assert len(lines) == 3 and "3/3 parts done" in lines[-1] and "ETA" in lines[0]


def test_report_uses_a_newer_hand_edited_csv(tmp_path: Path, capsys) -> None:
    from ternbench.bench.results import ResultStore, make_row

    out = tmp_path / "run"
    store = ResultStore(out)
    store.open_session(["ternbench"], {"x": 1})
    base = {"cell_key": "k", "method": "fp32", "model": "resnet8", "dataset": "fashion-mnist"}
    store.write_part("k", "accuracy", [make_row(base, metric="top1", value=90.0, unit="%")])
    store.consolidate()
    csv = out / "results.csv"
    csv.write_text(csv.read_text().replace("90.0", "12.5"))
    st = (out / "results.parquet").stat()
    os.utime(csv, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"results read from: {csv}" in printed
    from ternbench.reports.tables import load_results

    assert load_results(out)[0].value.tolist() == [12.5]


def test_no_report_prints_no_report_path(tmp_path: Path, capsys) -> None:
    import pandas as pd
    from ternbench.bench.cli import _print_summary

    df = pd.DataFrame({"method": ["fp32"], "model": ["m"], "dataset": ["d"], "target": ["-"],
                       "layer": [""], "metric": ["top1"], "value": [90.0], "status": ["ok"],
                       "unit": ["%"], "impl": [""]})
    _print_summary(df, tmp_path, report=False)
    assert "report:" not in capsys.readouterr().out


def test_ray_start_failure_is_one_line(monkeypatch) -> None:
    import ray
    from ternbench.bench.executor import RayExecutor, RayStartError, available_cpus

    assert 1 <= available_cpus() <= (os.cpu_count() or 1)

    def refuse(**kw):
        raise ValueError("When connecting to an existing cluster, num_cpus and num_gpus must "
                         "not be provided\nmore detail")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RayStartError) as ei:
        RayExecutor()
    assert "\n" not in str(ei.value) and "--executor local" in str(ei.value)
    with pytest.raises(RayStartError, match="cannot connect to the Ray cluster at h:1"):
        RayExecutor(address="h:1")
