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

import difflib
import fnmatch
import functools
import gzip
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = [
    "DatasetInfo",
    "DatasetMissingError",
    "FashionMNIST",
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
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise ValueError(
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
    drawn from torch's global RNG (seeded by :func:`ternbench.bench.train.seed_everything`, and
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
            raise ValueError(
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


def _load_cifar(info: DatasetInfo, split: str, root: str | Path | None, augment: bool) -> Dataset:
    from torchvision import datasets as D
    from torchvision import transforms as T

    base_cls = D.CIFAR10 if info.name == "cifar10" else D.CIFAR100
    sub = base_cls.base_folder
    archive = "cifar-10-python.tar.gz" if info.name == "cifar10" else "cifar-100-python.tar.gz"
    folder = _root_from(info, root)
    how = (
        f"Download {archive} from https://www.cs.toronto.edu/~kriz/cifar.html yourself, extract "
        f"it so that DIR/{sub}/ exists, and pass --data-root DIR or set TERNBENCH_CIFAR_ROOT=DIR "
        "(ternbench never downloads)."
    )
    if folder is None:
        raise DatasetMissingError(f"{info.name}: no data root given. {how}")
    needed = [n for n, _ in base_cls.train_list + base_cls.test_list] + [base_cls.meta["filename"]]
    missing = [n for n in needed if not (folder / sub / n).is_file()]
    if missing:
        raise DatasetMissingError(
            f"{info.name} not found: expected the folder {folder / sub} with "
            f"{', '.join(needed)} (missing: {', '.join(missing)}). {how}"
        )

    tf: list[Callable] = []
    if augment:
        tf += [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    tf += [T.ToTensor(), _normalize(info)]
    cls = _local_cifar_cls(base_cls.__name__)
    return cls(str(folder), train=(split == "train"), transform=T.Compose(tf), download=False)


@functools.cache
def _local_cifar_cls(base_name: str) -> type:
    """``torchvision.datasets.CIFAR10/100`` checking that the files exist instead of their md5.

    torchvision md5-checks every batch file against the official archive on each load; we only
    check existence (a broken pickle still fails loudly when read), which also accepts re-pickled
    copies. Built lazily so importing this module does not import torchvision; reachable as a
    module attribute (``__getattr__`` below) so datasets pickle into DataLoader workers.
    """
    from torchvision import datasets as D

    base = getattr(D, base_name)
    name = f"_Local{base_name}"
    cls = type(
        name,
        (base,),
        {
            "train_list": [[n, None] for n, _ in base.train_list],
            "test_list": [[n, None] for n, _ in base.test_list],
            "meta": {**base.meta, "md5": None},
            "__module__": __name__,
            "__qualname__": name,
        },
    )
    return cls


def __getattr__(name: str) -> type:
    if name in ("_LocalCIFAR10", "_LocalCIFAR100"):
        return _local_cifar_cls(name.removeprefix("_Local"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load_imagenet(info: DatasetInfo, root: str | Path | None) -> Dataset:
    from torchvision import datasets as D
    from torchvision import transforms as T

    layout = (
        "Expected an ImageFolder of the ILSVRC2012 validation set: DIR/val/n01440764/*.JPEG ... "
        "(or DIR/n01440764/...), 1000 wnid folders whose sorted order gives the standard class "
        "indices. Pass --data-root DIR or set TERNBENCH_IMAGENET_ROOT=DIR."
    )
    folder = _root_from(info, root)
    if folder is None:
        raise DatasetMissingError(f"imagenet: no data root given. {layout}")
    if not folder.is_dir():
        raise DatasetMissingError(f"imagenet not found: {folder} does not exist. {layout}")
    if (folder / "val").is_dir():
        folder = folder / "val"
    if not any(p.is_dir() for p in folder.iterdir()):
        raise DatasetMissingError(f"imagenet: {folder} holds no class folders. {layout}")
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), _normalize(info)])
    try:
        ds = D.ImageFolder(str(folder), transform=tf)
    except FileNotFoundError as e:  # e.g. class folders but no image files in them
        raise DatasetMissingError(f"imagenet: {e} {layout}") from e
    if len(ds.classes) != info.num_classes:
        log.warning(
            "imagenet: %s has %d class folders, not %d; label indices follow the sorted folder "
            "names and will not match models trained on the full ImageNet-1k",
            folder,
            len(ds.classes),
            info.num_classes,
        )
    return ds


def load_dataset(
    name: str, split: str, root: str | Path | None = None, *, augment: bool = False
) -> Dataset:
    """Load one split of a registered dataset from local files.

    Args:
        name: a name from :func:`list_datasets`.
        split: one of ``get_dataset_info(name).splits`` (``"test"`` is accepted for ImageNet's
            ``"val"``).
        root: data folder; default from the dataset's env var, then its default root.
        augment: training augmentation (Fashion-MNIST: 2-px shift + flip; CIFAR: crop 32 pad 4 +
            flip; ImageNet: none, it is evaluation only).

    Raises:
        DatasetMissingError: the files are not there (the message says how to provide them).
        ValueError: unknown dataset or split.
    """
    info = get_dataset_info(name)
    if name == "imagenet" and split == "test":
        split = "val"
    if split not in info.splits:
        raise ValueError(f"Dataset {name!r} has splits {info.splits}, got split={split!r}")
    if name == "fashion-mnist":
        return _load_fashion(split, root, augment)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(info, split, root, augment)
    if augment:
        log.warning("imagenet: augment=True ignored (validation set, evaluation only)")
    return _load_imagenet(info, root)


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
