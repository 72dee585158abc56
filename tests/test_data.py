"""Dataset registry: Fashion-MNIST from the Debian files, CIFAR / ImageFolder from tiny real-format
folders written here, subsets, loaders and the missing-data messages."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_fashion
from ternbench.bench.data import (
    DatasetMissingError,
    get_dataset_info,
    list_datasets,
    load_dataset,
    make_loader,
    subset_indices,
)


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("TERNBENCH_FASHION_MNIST", "TERNBENCH_CIFAR_ROOT", "TERNBENCH_IMAGENET_ROOT"):
        monkeypatch.delenv(var, raising=False)


# ------------------------------------------------------------------------------------ registry


def test_registry_names_and_info() -> None:
    assert list_datasets() == ["fashion-mnist", "cifar10", "cifar100", "imagenet"]
    assert list_datasets("cifar*") == ["cifar10", "cifar100"]
    fm = get_dataset_info("fashion-mnist")
    assert (fm.num_classes, fm.in_chans, fm.image_size) == (10, 1, 28)
    assert fm.mean == (0.2860,) and fm.std == (0.3530,)
    assert get_dataset_info("cifar100").num_classes == 100
    assert get_dataset_info("imagenet").splits == ("val",)


def test_dataset_facts_replace_name_checks() -> None:
    """Where a dataset differs (ImageNet's ``val`` test split, its ImageFolder tree) is a
    DatasetInfo fact, not a name compared in the harness (issue 13)."""
    from ternbench.bench.data import loader_workers

    inet = get_dataset_info("imagenet")
    assert (inet.test_split, inet.image_folder) == ("val", True)
    for name in ("fashion-mnist", "cifar10", "cifar100"):
        info = get_dataset_info(name)
        assert (info.test_split, info.image_folder) == ("test", False)
        assert loader_workers(name) == 0


def test_unknown_dataset_suggests() -> None:
    with pytest.raises(ValueError, match=r"Did you mean 'cifar10'"):
        get_dataset_info("cifar-10")
    with pytest.raises(ValueError, match="has splits"):
        load_dataset("fashion-mnist", "validation")


# ---------------------------------------------------------------------------- Fashion-MNIST


@needs_fashion
def test_fashion_mnist_real_files() -> None:
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert len(train) == 60_000 and len(test) == 10_000
    x, y = test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert isinstance(y, int) and y == 9  # the first test image is an ankle boot
    # Balanced classes: 6000 / 1000 per class.
    assert np.bincount(train.targets.numpy(), minlength=10).tolist() == [6000] * 10
    assert np.bincount(test.targets.numpy(), minlength=10).tolist() == [1000] * 10
    # Normalisation: item == (uint8 / 255 - mean) / std, and the split is ~zero-mean unit-std.
    raw = test.images[123].float() / 255
    torch.testing.assert_close(test[123][0][0], (raw - 0.2860) / 0.3530)
    xs = torch.stack([test[i][0] for i in range(0, 10_000, 5)])
    assert abs(float(xs.mean())) < 0.05 and abs(float(xs.std()) - 1) < 0.05


@needs_fashion
def test_fashion_mnist_augment_is_shift_and_flip() -> None:
    plain = load_dataset("fashion-mnist", "test")
    aug = load_dataset("fashion-mnist", "test", augment=True)
    black = -0.2860 / 0.3530
    x = plain[7][0]
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=black)
    candidates = [padded[:, i : i + 28, j : j + 28] for i in range(5) for j in range(5)]
    candidates += [c.flip(-1) for c in candidates]
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        a = aug[7][0]
        assert a.shape == (1, 28, 28)
        match = [k for k, c in enumerate(candidates) if torch.equal(a, c)]
        assert match, "augmented image is not a 2-px shift (+ flip) of the original"
        seen.add(match[0])
    assert len(seen) > 5  # it really varies
    torch.manual_seed(0)
    first = aug[7][0]
    torch.manual_seed(0)
    assert torch.equal(first, aug[7][0])  # seeded


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _fake_fashion(folder: Path, n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    lbls = np.arange(n, dtype=np.uint8) % 10
    for prefix in ("train", "t10k"):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", imgs)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", lbls)
    return imgs, lbls


def test_fashion_mnist_root_and_env_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    imgs, lbls = _fake_fashion(tmp_path / "fm")
    ds = load_dataset("fashion-mnist", "train", root=tmp_path / "fm")
    assert len(ds) == 6
    x, y = ds[4]
    assert y == int(lbls[4])
    torch.testing.assert_close(x[0], (torch.from_numpy(imgs[4]).float() / 255 - 0.286) / 0.353)
    monkeypatch.setenv("TERNBENCH_FASHION_MNIST", str(tmp_path / "fm"))
    assert len(load_dataset("fashion-mnist", "test")) == 6


def test_fashion_mnist_truncated_idx(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_dataset("fashion-mnist", "train", root=tmp_path)


def test_fashion_mnist_missing_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERNBENCH_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetMissingError) as ei:
        load_dataset("fashion-mnist", "train")
    msg = str(ei.value)
    assert str(tmp_path / "nowhere") in msg
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    assert "--data-root" in msg and "TERNBENCH_FASHION_MNIST" in msg
    assert isinstance(ei.value, FileNotFoundError)
    (tmp_path / "half").mkdir()
    _write_idx(tmp_path / "half" / "train-images-idx3-ubyte.gz", np.zeros((1, 28, 28)))
    with pytest.raises(DatasetMissingError, match="train-labels-idx1-ubyte.gz"):
        load_dataset("fashion-mnist", "train", root=tmp_path / "half")


# ------------------------------------------------------------------------- subsets / loaders


def test_subset_indices_deterministic() -> None:
    a = subset_indices(1000, 100, seed=3)
    assert np.array_equal(a, subset_indices(1000, 100, seed=3))
    assert not np.array_equal(a, subset_indices(1000, 100, seed=4))
    assert len(np.unique(a)) == 100 and np.all(np.diff(a) > 0) and a.max() < 1000
    assert set(a) <= set(subset_indices(1000, 200, seed=3))  # nested in the seed's permutation
    assert np.array_equal(subset_indices(50, None, seed=0), np.arange(50))
    assert np.array_equal(subset_indices(50, 50, seed=9), np.arange(50))
    assert np.array_equal(subset_indices(50, 80, seed=9), np.arange(50))
    with pytest.raises(ValueError):
        subset_indices(50, 0, seed=0)


def test_make_loader_seeded_shuffle() -> None:
    ds = torch.utils.data.TensorDataset(torch.arange(100).float(), torch.arange(100))
    idx = subset_indices(100, 40, seed=1)

    def order(seed: int) -> list[int]:
        loader = make_loader(ds, idx, 8, shuffle=True, seed=seed)
        return torch.cat([y for _, y in loader]).tolist()

    o1 = order(5)
    assert o1 == order(5)
    assert o1 != order(6)
    assert sorted(o1) == idx.tolist()
    unshuffled = torch.cat([y for _, y in make_loader(ds, idx, 8)]).tolist()
    assert unshuffled == idx.tolist()
    assert len(make_loader(ds, None, 30)) == 4


# ------------------------------------------------------------------------------------- CIFAR


def _fake_cifar(root: Path, kind: str) -> dict[str, np.ndarray]:
    """Write the real on-disk pickle layout of cifar-10-batches-py / cifar-100-python."""
    rng = np.random.default_rng(1)
    written: dict[str, np.ndarray] = {}
    if kind == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        label_key, meta_name, meta = (
            "labels",
            "batches.meta",
            {
                "num_cases_per_batch": 2,
                "label_names": [f"c{i}" for i in range(10)],
                "num_vis": 3072,
            },
        )
    else:
        folder = root / "cifar-100-python"
        files = ["train", "test"]
        label_key, meta_name, meta = (
            "fine_labels",
            "meta",
            {
                "fine_label_names": [f"f{i}" for i in range(100)],
                "coarse_label_names": [f"k{i}" for i in range(20)],
            },
        )
    folder.mkdir(parents=True)
    for name in files:
        data = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)  # rows: R plane, G, B
        entry = {
            "batch_label": name,
            "data": data,
            label_key: [1, 7],
            "filenames": [f"{name}_{i}.png" for i in range(2)],
        }
        if kind == "cifar100":
            entry["coarse_labels"] = [0, 3]
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        written[name] = data
    with open(folder / meta_name, "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return written


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_loader_real_format(tmp_path: Path, kind: str) -> None:
    written = _fake_cifar(tmp_path, kind)
    info = get_dataset_info(kind)
    train = load_dataset(kind, "train", root=tmp_path)
    test = load_dataset(kind, "test", root=tmp_path)
    assert len(train) == (10 if kind == "cifar10" else 2) and len(test) == 2
    x, y = test[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 7
    raw = written["test_batch" if kind == "cifar10" else "test"][1].reshape(3, 32, 32)
    mean = torch.tensor(info.mean).view(3, 1, 1)
    std = torch.tensor(info.std).view(3, 1, 1)
    torch.testing.assert_close(x, (torch.from_numpy(raw).float() / 255 - mean) / std)
    xa, _ = load_dataset(kind, "train", root=tmp_path, augment=True)[0]
    assert xa.shape == (3, 32, 32)
    # picklable (DataLoader workers under spawn, Ray): the class resolves by module attribute
    clone = pickle.loads(pickle.dumps(test))
    assert torch.equal(clone[1][0], x)


def test_cifar_missing_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetMissingError, match="no data root given"):
        load_dataset("cifar10", "train")
    monkeypatch.setenv("TERNBENCH_CIFAR_ROOT", str(tmp_path))
    with pytest.raises(DatasetMissingError) as ei:
        load_dataset("cifar10", "test")
    assert str(tmp_path / "cifar-10-batches-py") in str(ei.value)
    assert "never downloads" in str(ei.value)
    with pytest.raises(DatasetMissingError, match="cifar-100-python"):
        load_dataset("cifar100", "train")


# ---------------------------------------------------------------------------------- ImageNet


def _fake_imagefolder(folder: Path) -> list[str]:
    from PIL import Image

    wnids = ["n01440764", "n01443537", "n01484850"]
    rng = np.random.default_rng(2)
    for k, wnid in enumerate(wnids):
        (folder / wnid).mkdir(parents=True)
        for i, ext in enumerate(("JPEG", "png")):
            arr = rng.integers(0, 256, size=(260 + 10 * i, 300, 3), dtype=np.uint8)
            arr[..., 0] = 40 * k  # class-dependent red channel
            Image.fromarray(arr).save(folder / wnid / f"img{i}.{ext}")
    return wnids


def test_imagenet_imagefolder(tmp_path: Path) -> None:
    wnids = _fake_imagefolder(tmp_path / "val")
    ds = load_dataset("imagenet", "val", root=tmp_path)  # finds root/val
    assert len(ds) == 6
    assert ds.classes == wnids  # sorted wnid order gives the indices
    x, y = ds[5]
    assert x.shape == (3, 224, 224) and y == 2
    assert [ds[i][1] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    # the red channel is constant per class: 80/255 normalised for class 2
    torch.testing.assert_close(x[0], torch.full((224, 224), (80 / 255 - 0.485) / 0.229))
    assert len(load_dataset("imagenet", "test", root=tmp_path / "val")) == 6  # alias + flat root


def test_imagenet_missing_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetMissingError, match="TERNBENCH_IMAGENET_ROOT"):
        load_dataset("imagenet", "val")
    with pytest.raises(DatasetMissingError, match="wnid"):
        load_dataset("imagenet", "val", root=tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetMissingError, match="no class folders"):
        load_dataset("imagenet", "val", root=tmp_path / "empty")
    (tmp_path / "noimg" / "n01440764").mkdir(parents=True)
    monkeypatch.setenv("TERNBENCH_IMAGENET_ROOT", str(tmp_path / "noimg"))
    with pytest.raises(DatasetMissingError, match="n01440764"):
        load_dataset("imagenet", "val")
