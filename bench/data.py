"""Dataset registry: Fashion-MNIST (embedded default), CIFAR-10/100 and ImageNet from local roots.

Nothing here ever downloads. Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``
(or any folder holding the four IDX ``.gz`` files); CIFAR and ImageNet are read from a folder the
user already has. A missing dataset raises :class:`DatasetMissingError` saying where it looked and
how to provide it.

Subsets are deterministic (:func:`subset_indices`) and loaders shuffle from a seeded generator
(:func:`make_loader`), so a (dataset, subset, seed) triple always means the same images in the
same order.

Example:
    >>> from ternbench.bench.data import get_dataset_info, subset_indices
    >>> get_dataset_info("fashion-mnist").num_classes
    10
    >>> subset_indices(10, 3, seed=0).tolist()
    [2, 4, 6]
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import gzip
import hashlib
import json
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = [
    "DatasetInfo",
    "DatasetMissingError",
    "DatasetFormatError",
    "FashionMNIST",
    "CIFAR",
    "dataset_info",
    "dataset_fingerprint",
    "dataset_labels",
    "stratified_indices",
    "loader_workers",
    "imagenet_tree",
    "list_datasets",
    "get_dataset_info",
    "load_dataset",
    "subset_indices",
    "make_loader",
    "FASHION_MNIST_DEFAULT_ROOT",
]

log = logging.getLogger(__name__)

FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetMissingError(FileNotFoundError):
    """The dataset files are not where we looked; the message says how to provide them."""


class DatasetFormatError(ValueError):
    """A dataset file exists but does not hold what it should; the message names the file."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a registered dataset (what models are built for)."""

    name: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: tuple[str, ...]
    description: str
    #: where the data is looked for when neither ``root`` nor the env var is given
    default_root: str | None
    #: environment variable that overrides the default root
    env_var: str | None = None
    #: the split a cell evaluates on (``load_dataset`` also accepts "test" for it)
    test_split: str = "test"
    #: an ImageFolder tree: the class count comes from its folders, the image size may be
    #: chosen (``--image-size``), a ``train/`` folder beside the test split is optional (its
    #: absence needs ``--weights``), and images are decoded by loader workers
    image_folder: bool = False


_DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        num_classes=10,
        in_chans=1,
        image_size=28,
        mean=(0.2860,),
        std=(0.3530,),
        splits=("train", "test"),
        description="Fashion-MNIST, 28x28 grey, 60k train / 10k test (apt dataset-fashion-mnist)",
        default_root=FASHION_MNIST_DEFAULT_ROOT,
        env_var="TERNBENCH_FASHION_MNIST",
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        num_classes=10,
        in_chans=3,
        image_size=32,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        splits=("train", "test"),
        description="CIFAR-10, 32x32 RGB, 50k train / 10k test, torchvision layout, local root",
        default_root=None,
        env_var="TERNBENCH_CIFAR_ROOT",
    ),
    "cifar100": DatasetInfo(
        name="cifar100",
        num_classes=100,
        in_chans=3,
        image_size=32,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        splits=("train", "test"),
        description="CIFAR-100, 32x32 RGB, 50k train / 10k test, torchvision layout, local root",
        default_root=None,
        env_var="TERNBENCH_CIFAR_ROOT",
    ),
    "imagenet": DatasetInfo(
        name="imagenet",
        num_classes=1000,
        in_chans=3,
        image_size=224,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        splits=("val",),
        description="ImageNet-1k validation set as an ImageFolder of 1000 wnid folders (local)",
        default_root=None,
        env_var="TERNBENCH_IMAGENET_ROOT",
        test_split="val",
        image_folder=True,
    ),
}


def list_datasets(pattern: str = "*") -> list[str]:
    """Registered dataset names matching a shell-style ``pattern``.

    Example:
        >>> list_datasets("cifar*")
        ['cifar10', 'cifar100']
    """
    return [n for n in _DATASETS if fnmatch.fnmatchcase(n, pattern)]


def get_dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; unknown names raise ``ValueError`` with suggestions."""
    try:
        return _DATASETS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_DATASETS), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"Unknown dataset {name!r}.{hint} Available: {', '.join(_DATASETS)}."
        ) from None


# --------------------------------------------------------------------------------------------
# Fashion-MNIST: IDX files read with numpy, held in memory as uint8
# --------------------------------------------------------------------------------------------


def _fashion_missing(folder: Path, missing: list[str]) -> DatasetMissingError:
    return DatasetMissingError(
        f"Fashion-MNIST not found in {folder} (missing: {', '.join(missing)}). Install it with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put "
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        "t10k-labels-idx1-ubyte.gz in a folder and pass --data-root DIR / set "
        "TERNBENCH_FASHION_MNIST=DIR."
    )


def _find_idx(folder: Path, stem: str) -> Path | None:
    # Accept the gzipped files (Debian, the original site) or unpacked ones (torchvision raw/).
    for cand in (folder / f"{stem}.gz", folder / stem):
        if cand.is_file():
            return cand
    return None


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    # mtime/size are part of the cache key so a replaced file is re-read.
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        raise DatasetFormatError(
            f"{path} is truncated or not a gzipped IDX file ({e}); expected the "
            "Fashion-MNIST file of that name"
        ) from None
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetFormatError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise DatasetFormatError(
            f"{path} is truncated or corrupt: header says {dims} ({expected} bytes), "
            f"file holds {len(raw) - header}"
        )
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    arr.setflags(write=False)
    return arr


def _read_idx(path: Path) -> np.ndarray:
    st = path.stat()
    return _read_idx_cached(str(path), st.st_mtime_ns, st.st_size)


class FashionMNIST(Dataset[tuple[Tensor, int]]):
    """One Fashion-MNIST split, held in memory as uint8 and normalised on access.

    Items are ``(float tensor [1, 28, 28], int label)``. With ``augment=True`` each item gets a
    random shift of up to 2 pixels (zero-pad 2, random 28x28 crop) and a random horizontal flip,
    drawn from torch's global RNG (seeded by :func:`ternbench.core.train.seed_everything`, and
    per worker by the DataLoader).
    """

    classes = (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )

    def __init__(self, folder: Path, split: str, *, augment: bool = False) -> None:
        img_stem, lbl_stem = _FASHION_FILES[split]
        img_path, lbl_path = _find_idx(folder, img_stem), _find_idx(folder, lbl_stem)
        missing = [f"{s}.gz" for s, p in ((img_stem, img_path), (lbl_stem, lbl_path)) if p is None]
        if img_path is None or lbl_path is None:
            raise _fashion_missing(folder, missing)
        images, labels = _read_idx(img_path), _read_idx(lbl_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetFormatError(
                f"Fashion-MNIST files in {folder} disagree: images {images.shape}, "
                f"labels {labels.shape}"
            )
        self.root = folder
        self.split = split
        self.augment = augment
        # torch.from_numpy of a read-only array warns; the cached arrays are shared, so copy once
        # per dataset object (47 MB for train) rather than risk writes into the shared cache.
        self.images = torch.from_numpy(images.copy())
        self.targets = torch.from_numpy(labels.astype(np.int64))
        info = _DATASETS["fashion-mnist"]
        self._mean, self._std = info.mean[0], info.std[0]

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.images[index].to(torch.float32).div_(255.0)
        x = x.sub_(self._mean).div_(self._std).unsqueeze(0)  # [1, 28, 28]
        if self.augment:
            x = _shift_flip(x, pad=2, fill=-self._mean / self._std)
        return x, int(self.targets[index])


def _shift_flip(x: Tensor, pad: int, fill: float) -> Tensor:
    """Random shift by up to ``pad`` pixels (pad + random crop) and random horizontal flip."""
    h, w = x.shape[-2:]
    # ``fill`` is black in normalised units: the images have a black background, so the shift
    # must not introduce a grey border (what padding with 0 after normalising would do).
    padded = F.pad(x, (pad, pad, pad, pad), value=fill)
    i, j = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
    out = padded[..., i : i + h, j : j + w]
    if bool(torch.rand(()) < 0.5):
        out = out.flip(-1)
    return out.contiguous()


def _fashion_root(root: str | Path | None) -> Path:
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("TERNBENCH_FASHION_MNIST")
    return Path(env).expanduser() if env else Path(FASHION_MNIST_DEFAULT_ROOT)


def _load_fashion(split: str, root: str | Path | None, augment: bool) -> Dataset:
    folder = _fashion_root(root)
    raw = folder / "FashionMNIST" / "raw"
    if _find_idx(folder, _FASHION_FILES[split][0]) is None and raw.is_dir():
        folder = raw  # torchvision's layout under a root
    if not folder.is_dir():
        raise _fashion_missing(folder, ["the folder itself"])
    return FashionMNIST(folder, split, augment=augment)


# --------------------------------------------------------------------------------------------
# CIFAR-10/100 and ImageNet via torchvision from local folders
# --------------------------------------------------------------------------------------------


def _root_from(info: DatasetInfo, root: str | Path | None) -> Path | None:
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(info.env_var or "")
    if env:
        return Path(env).expanduser()
    return Path(info.default_root) if info.default_root else None


def _normalize(info: DatasetInfo) -> Callable:
    from torchvision import transforms as T

    return T.Normalize(info.mean, info.std)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts, lists, numpy arrays) and nothing else: a pickle
    that asks for any other class is refused instead of run."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # protocol-2 pickles spell bytes as _codecs.encode(str, latin1)
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load the global {module}.{name}")


def _str_keys(obj: Any) -> Any:
    """The official CIFAR pickles, read by Python 3, may carry bytes keys (b'data')."""
    if isinstance(obj, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    return obj


@functools.lru_cache(maxsize=16)
def _read_cifar_batch_cached(
    path: str, mtime_ns: int, size: int, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    expected = (
        f"a CIFAR batch pickle: a dict with 'data' (uint8 [N, 3072], the R, G and B planes of "
        f"32x32 images) and '{label_key}' (N labels in 0..{num_classes - 1})"
    )
    try:
        with open(path, "rb") as f:
            entry = _str_keys(_NumpyOnlyUnpickler(f, encoding="latin1").load())
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            IndexError, ImportError, MemoryError) as e:
        raise DatasetFormatError(
            f"{path} is truncated or not a readable pickle ({type(e).__name__}: {e}); expected "
            f"{expected}"
        ) from None
    if not isinstance(entry, dict):
        raise DatasetFormatError(f"{path} holds a {type(entry).__name__}; expected {expected}")
    if label_key not in entry and "labels" in entry:
        label_key = "labels"
    missing = [k for k in ("data", label_key) if k not in entry]
    if missing:
        raise DatasetFormatError(
            f"{path} has no {', '.join(repr(m) for m in missing)} (keys: "
            f"{', '.join(repr(k) for k in list(entry)[:8])}); expected {expected}"
        )
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[label_key])
    if data.dtype != np.uint8 or not (
        (data.ndim == 2 and data.shape[1] == 3072) or (data.ndim == 4 and data.shape[1:] in (
            (3, 32, 32), (32, 32, 3)))
    ):
        raise DatasetFormatError(
            f"{path}: 'data' is {data.dtype} {tuple(data.shape)}; expected {expected}"
        )
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype,
                                                                          np.integer):
        raise DatasetFormatError(
            f"{path}: '{label_key}' is {labels.dtype} {tuple(labels.shape)} for {len(data)} "
            f"images; expected {expected}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetFormatError(
            f"{path}: labels range {labels.min()}..{labels.max()}; expected {expected}"
        )
    if data.ndim == 2 or data.shape[1] == 3:  # planar rows / NCHW -> NHWC
        data = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    data = np.ascontiguousarray(data)
    data.setflags(write=False)
    return data, labels.astype(np.int64)


class CIFAR(Dataset[tuple[Tensor, int]]):
    """A CIFAR-10/100 split read from the original pickles (str or bytes keys), held as uint8.

    Items are ``(float tensor [3, 32, 32], int label)``; ``augment`` adds a 4-px padded random
    crop and a random horizontal flip.
    """

    def __init__(self, name: str, folder: Path, files: list[str], *, augment: bool) -> None:
        info = _DATASETS[name]
        label_key = "labels" if name == "cifar10" else "fine_labels"
        parts = []
        for fname in files:
            path = folder / fname
            st = path.stat()
            parts.append(_read_cifar_batch_cached(str(path), st.st_mtime_ns, st.st_size,
                                                  label_key, info.num_classes))
        self.name = name
        self.root = folder
        self.files = list(files)
        self.data = np.concatenate([d for d, _ in parts]) if len(parts) > 1 else parts[0][0]
        self.targets = np.concatenate([t for _, t in parts])
        self.augment = augment
        self._mean = torch.tensor(info.mean).view(3, 1, 1)
        self._std = torch.tensor(info.std).view(3, 1, 1)

    def __len__(self) -> int:
        return int(len(self.targets))

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = torch.from_numpy(np.array(self.data[index])).permute(2, 0, 1).float().div_(255.0)
        x = (x - self._mean) / self._std
        if self.augment:
            x = _shift_flip(x, pad=4, fill=0.0)
        return x, int(self.targets[index])


def _load_cifar(info: DatasetInfo, split: str, root: str | Path | None, augment: bool) -> Dataset:
    sub = "cifar-10-batches-py" if info.name == "cifar10" else "cifar-100-python"
    archive = "cifar-10-python.tar.gz" if info.name == "cifar10" else "cifar-100-python.tar.gz"
    train_files = (
        [f"data_batch_{i}" for i in range(1, 6)] if info.name == "cifar10" else ["train"]
    )
    test_files = ["test_batch"] if info.name == "cifar10" else ["test"]
    folder = _root_from(info, root)
    how = (
        f"Download {archive} from https://www.cs.toronto.edu/~kriz/cifar.html yourself, extract "
        f"it so that DIR/{sub}/ exists, and pass --data-root DIR or set TERNBENCH_CIFAR_ROOT=DIR "
        "(ternbench never downloads)."
    )
    if folder is None:
        raise DatasetMissingError(f"{info.name}: no data root given. {how}")
    if folder.name == sub and not (folder / sub).is_dir():
        folder = folder.parent  # the batches folder itself was given
    needed = train_files + test_files
    missing = [n for n in needed if not (folder / sub / n).is_file()]
    if missing:
        raise DatasetMissingError(
            f"{info.name} not found: expected the folder {folder / sub} with "
            f"{', '.join(needed)} (missing: {', '.join(missing)}). {how}"
        )
    files = train_files if split == "train" else test_files
    return CIFAR(info.name, folder / sub, files, augment=augment)


_IMAGENET_LAYOUT = (
    "Expected an ImageFolder: DIR/val/<class>/*.JPEG (or DIR/<class>/... directly), optionally "
    "DIR/train/<class>/... for training; the sorted class folder names give the label indices "
    "(for ILSVRC2012, the 1000 wnids). Pass --data-root DIR or set TERNBENCH_IMAGENET_ROOT=DIR."
)


@dataclass(frozen=True)
class _Tree:
    val: Path
    train: Path | None
    classes: tuple[str, ...]


def _class_dirs(folder: Path) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and
                        not p.name.startswith(".")))


@functools.lru_cache(maxsize=8)
def _imagenet_tree(folder: Path) -> _Tree:
    """The val (and train) folders of an ImageFolder root and its classes; logged once."""
    if not folder.is_dir():
        raise DatasetMissingError(f"imagenet not found: {folder} does not exist. "
                                  f"{_IMAGENET_LAYOUT}")
    if (folder / "val").is_dir():
        val, train = folder / "val", folder / "train" if (folder / "train").is_dir() else None
    elif (folder / "train").is_dir():
        raise DatasetMissingError(f"imagenet: {folder} has a train/ folder but no val/ folder "
                                  f"to evaluate on. {_IMAGENET_LAYOUT}")
    else:
        val, train = folder, None
    classes = _class_dirs(val)
    if not classes:
        raise DatasetMissingError(f"imagenet: {val} holds no class folders. {_IMAGENET_LAYOUT}")
    if train is not None:
        tcls = _class_dirs(train)
        if tcls != classes:
            only_v = sorted(set(classes) - set(tcls))[:3]
            only_t = sorted(set(tcls) - set(classes))[:3]
            raise DatasetFormatError(
                f"imagenet: {train} has {len(tcls)} class folders and {val} has {len(classes)}; "
                f"both must hold the same classes (only in val: {only_v}, only in train: "
                f"{only_t})")
    log.info("imagenet: %d classes from the folders of %s%s", len(classes), val,
             f"; training split {train}" if train else "; no train/ folder")
    return _Tree(val=val, train=train, classes=classes)


def imagenet_tree(root: str | Path | None) -> _Tree:
    folder = _root_from(_DATASETS["imagenet"], root)
    if folder is None:
        raise DatasetMissingError(f"imagenet: no data root given. {_IMAGENET_LAYOUT}")
    return _imagenet_tree(folder.resolve())


def dataset_info(name: str, root: str | Path | None = None,
                 image_size: int | None = None) -> DatasetInfo:
    """:func:`get_dataset_info` resolved against the data: for ImageFolder datasets the class
    count comes from the folder tree, ``splits`` holds ``train`` when a ``train/`` folder
    exists, and ``image_size`` may be chosen (default 224)."""
    info = get_dataset_info(name)
    if not info.image_folder:
        return info
    tree = imagenet_tree(root)
    return dataclasses.replace(
        info, num_classes=len(tree.classes), image_size=int(image_size or info.image_size),
        splits=("train", "val") if tree.train is not None else ("val",))


def _load_imagenet(info: DatasetInfo, split: str, root: str | Path | None, augment: bool,
                   image_size: int | None) -> Dataset:
    from torchvision import datasets as D
    from torchvision import transforms as T

    tree = imagenet_tree(root)
    if split == "train" and tree.train is None:
        raise DatasetMissingError(
            f"imagenet: no train/ folder next to {tree.val}; the FP32 baseline, calibration and "
            "QAT need one: pass --weights FILE (your FP32 weights) or give a train/ folder")
    folder = tree.train if split == "train" and tree.train is not None else tree.val
    size = int(image_size or info.image_size)
    if augment:
        tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                        _normalize(info)])
    else:
        tf = T.Compose([T.Resize(max(size, size * 256 // 224)), T.CenterCrop(size),
                        T.ToTensor(), _normalize(info)])
    try:
        ds = D.ImageFolder(str(folder), transform=tf)
    except FileNotFoundError as e:  # e.g. class folders but no image files in them
        raise DatasetMissingError(f"imagenet: {e} {_IMAGENET_LAYOUT}") from e
    return ds


def load_dataset(
    name: str,
    split: str,
    root: str | Path | None = None,
    *,
    augment: bool = False,
    image_size: int | None = None,
) -> Dataset:
    """Load one split of a registered dataset from local files.

    Args:
        name: a name from :func:`list_datasets`.
        split: ``"train"`` or ``"test"`` (``"val"`` is ImageNet's test split; ``"test"`` is
            accepted for it; ``"train"`` needs a ``train/`` folder beside ``val/``).
        root: data folder; default from the dataset's env var, then its default root.
        augment: training augmentation (Fashion-MNIST: 2-px shift + flip; CIFAR: crop 32 pad 4 +
            flip; ImageNet: random resized crop + flip).
        image_size: ImageNet only: side of the centre crop (default 224).

    Raises:
        DatasetMissingError: the files are not there (the message says how to provide them).
        DatasetFormatError: a file is there but truncated or of the wrong shape (named).
        ValueError: unknown dataset or split.
    """
    info = get_dataset_info(name)
    if split == "test":
        split = info.test_split
    if info.image_folder:
        if split not in ("train", info.test_split):
            raise ValueError(f"Dataset {name!r} has splits ('train', {info.test_split!r}), "
                             f"got split={split!r}")
        return _load_imagenet(info, split, root, augment, image_size)
    if split not in info.splits:
        raise ValueError(f"Dataset {name!r} has splits {info.splits}, got split={split!r}")
    if name == "fashion-mnist":
        return _load_fashion(split, root, augment)
    return _load_cifar(info, split, root, augment)


def dataset_fingerprint(name: str, root: str | Path | None = None,
                        image_size: int | None = None, sample: int = 1024) -> dict[str, Any]:
    """What identifies the data a baseline is trained and evaluated on: the resolved root, the
    size of every split, the class count and a sha256 over all labels and an evenly spaced
    sample of ``sample`` images per split (image bytes; for ImageFolder the files' bytes and
    relative paths). Two folders with different data give different fingerprints."""
    info = dataset_info(name, root, image_size)
    h = hashlib.sha256()
    sizes: dict[str, int] = {}
    folder: Path | None = None
    for split in info.splits:
        ds = load_dataset(name, split, root, image_size=image_size)
        n = len(ds)  # type: ignore[arg-type]
        sizes[split] = n
        pick = np.unique(np.linspace(0, max(n - 1, 0), num=min(n, sample)).astype(np.int64))
        h.update(f"{split}:{n};".encode())
        if isinstance(ds, FashionMNIST | CIFAR):
            labels = np.asarray(ds.targets)
            images = ds.images.numpy() if isinstance(ds, FashionMNIST) else ds.data
            folder = ds.root
            h.update(labels.astype(np.int64).tobytes())
            h.update(np.ascontiguousarray(images[pick]).tobytes())
        else:  # ImageFolder
            samples = ds.samples  # type: ignore[attr-defined]
            base = Path(ds.root)  # type: ignore[attr-defined]
            folder = base.parent if base.name in ("val", "train") else base
            h.update(json.dumps([(str(Path(p).relative_to(base)), int(y)) for p, y in samples])
                     .encode())
            for i in pick[: min(len(pick), 64)]:
                h.update(Path(samples[int(i)][0]).read_bytes())
    return {
        "root": str(Path(folder).resolve()) if folder is not None else "",
        "splits": sizes,
        "num_classes": info.num_classes,
        "image_size": info.image_size,
        "content_sha256": h.hexdigest()[:16],
    }


def stratified_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices with every class in proportion to its share (largest remainders first),
    each class's images drawn from ``default_rng(seed)``; sorted. Deterministic.

    Example:
        >>> stratified_indices(np.array([0, 0, 0, 0, 1, 1, 1, 1]), 4, seed=0).size
        4
    """
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    if n < 1:
        raise ValueError(f"subset size must be >= 1, got {n}")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    take = np.floor(exact).astype(np.int64)
    rest = n - int(take.sum())
    order = np.argsort(-(exact - take), kind="stable")
    take[order[:rest]] += 1
    rng = np.random.default_rng(seed)
    out = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take,
                                                                            strict=True)]
    return np.sort(np.concatenate(out)).astype(np.int64)


def dataset_labels(ds: Dataset) -> np.ndarray:
    """All labels of a dataset without decoding images (FashionMNIST, CIFAR, ImageFolder)."""
    if isinstance(ds, FashionMNIST):
        return ds.targets.numpy()
    if isinstance(ds, CIFAR):
        return ds.targets
    targets = getattr(ds, "targets", None)
    if targets is not None:
        return np.asarray(targets, dtype=np.int64)
    return np.asarray([int(ds[i][1]) for i in range(len(ds))])  # type: ignore[arg-type]


def loader_workers(name: str) -> int:
    """DataLoader workers to decode with: JPEG/PNG decoding (ImageFolder) gets up to 4, the
    in-memory arrays none."""
    if not get_dataset_info(name).image_folder:
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus))


# --------------------------------------------------------------------------------------------
# Deterministic subsets and loaders
# --------------------------------------------------------------------------------------------


def subset_indices(n_total: int, n: int | None, seed: int) -> np.ndarray:
    """Indices of a deterministic ``n``-image subset of ``range(n_total)``, sorted.

    The first ``n`` entries of a permutation drawn from ``numpy.random.default_rng(seed)``, so a
    larger ``n`` with the same seed is a superset of a smaller one. ``n`` of ``None`` (or at
    least ``n_total``) gives every index.

    Example:
        >>> subset_indices(5, None, seed=1).tolist()
        [0, 1, 2, 3, 4]
    """
    if n_total < 0:
        raise ValueError(f"n_total must be >= 0, got {n_total}")
    if n is None or n >= n_total:
        return np.arange(n_total, dtype=np.int64)
    if n < 1:
        raise ValueError(f"subset size must be >= 1 or None, got {n}")
    perm = np.random.default_rng(seed).permutation(n_total)
    return np.sort(perm[:n]).astype(np.int64)


def make_loader(
    ds: Dataset,
    indices: np.ndarray | None,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over ``ds`` (restricted to ``indices``) with a seeded shuffle order.

    The shuffle order comes from a ``torch.Generator`` seeded with ``seed``, so it does not depend
    on the global RNG; worker processes (``num_workers > 0``) derive their seeds from it as well.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data: Dataset = ds if indices is None else Subset(ds, np.asarray(indices).tolist())
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return DataLoader(
        data,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=gen,
        num_workers=num_workers,
        drop_last=False,
        persistent_workers=False,
    )
