"""FP32 baseline checkpoints: trained once per (model, dataset, TrainCfg), then loaded.

A checkpoint is two files named by :func:`baseline_key`:

* ``<key>.safetensors``: the state dict (safetensors, so loading runs no code);
* ``<key>.json``: metadata, including the sha256 and size of the tensor file.

Loading verifies the sha256 first, so a truncated or corrupt file raises :class:`CheckpointError`
and :func:`load_or_train_fp32` deletes it and retrains instead of using it. Writes go to a
temporary file in the same folder followed by ``os.replace``, so readers never see half a file.

Lookup order: the user cache (:func:`cache_dir`), the checkpoints shipped with the package
(``ternbench/bench/checkpoints/``), else train on the dataset's train split and save to the cache.

Example:
    >>> from ternbench.core.train import TrainCfg
    >>> baseline_key("resnet8", "fashion-mnist", TrainCfg()).startswith("resnet8-fashion-mnist-")
    True
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import pickle
import shutil
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ternbench.core.files import atomic_write, cache_root
from ternbench.core.train import TrainCfg, seed_everything, train
from torch import Tensor, nn

from .data import (
    dataset_fingerprint,
    dataset_info,
    load_dataset,
    loader_workers,
    make_loader,
    subset_indices,
)
from .models import create_model

__all__ = [
    "CheckpointError",
    "check_finite",
    "FORMAT_VERSION",
    "cache_dir",
    "shipped_dir",
    "baseline_key",
    "save_checkpoint",
    "load_checkpoint",
    "load_state_dict_file",
    "load_or_train_fp32",
    "ship_checkpoint",
]

log = logging.getLogger(__name__)

#: bump when the checkpoint layout or the meaning of a key changes (old keys then miss the cache)
FORMAT_VERSION = 2


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt, incomplete, mismatched or unsafe to load."""


#: the one cache root (:func:`ternbench.core.files.cache_root`): baselines live at its top
cache_dir = cache_root


def shipped_dir() -> Path:
    """Folder of checkpoints shipped as package data (may not exist)."""
    return Path(__file__).resolve().parent / "checkpoints"


def baseline_key(
    model: str,
    dataset: str,
    cfg: TrainCfg,
    *,
    root: str | Path | None = None,
    image_size: int | None = None,
) -> str:
    """Stable name of the FP32 baseline for ``(model, dataset data, cfg)``.

    ``<model>-<dataset>-<16 hex>``: the hash covers the model (name, input channels, class
    count, image size), the data (:func:`~ternbench.bench.data.dataset_fingerprint` of the
    resolved root: its path, split sizes and a content hash of the labels and a sample of the
    images), every :class:`TrainCfg` field and :data:`FORMAT_VERSION`. Other data under the same
    dataset name therefore gives another key: a baseline is retrained, never reused.
    """
    info = dataset_info(dataset, root, image_size)
    payload = {
        "model": model,
        "dataset": dataset,
        "in_chans": info.in_chans,
        "num_classes": info.num_classes,
        "image_size": info.image_size,
        "data": dataset_fingerprint(dataset, root, image_size),
        "cfg": cfg.key_fields(),
        "format": FORMAT_VERSION,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return f"{model}-{dataset}-{hashlib.sha256(blob).hexdigest()[:16]}"


def check_finite(state: Mapping[str, Tensor], what: str) -> None:
    """Refuse weights holding NaN or Inf (every method would score chance and report ok)."""
    for name, t in state.items():
        if t.is_floating_point() or t.is_complex():
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                raise CheckpointError(
                    f"{what}: tensor {name!r} holds {int(bad.sum())} NaN/Inf value(s) of "
                    f"{t.numel()}; refusing weights that are not finite"
                )


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_checkpoint(path: str | Path, state_dict: Mapping[str, Tensor], meta: dict) -> None:
    """Write ``state_dict`` to ``path`` (safetensors) and ``meta`` + sha256 to the sidecar json.

    Both writes are atomic; the tensor file is written first, so a crash in between leaves a
    checkpoint without sidecar, which :func:`load_checkpoint` rejects.
    """
    from safetensors.torch import save_file

    path = Path(path)
    # Contiguous CPU copies: safetensors refuses shared or non-contiguous storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    written: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={"ternbench_format": str(FORMAT_VERSION)})
        written.update(sha256=_sha256(tmp), size=tmp.stat().st_size)

    atomic_write(path, write)
    side = {
        "format": FORMAT_VERSION,
        "file": path.name,
        "sha256": written["sha256"],
        "size": written["size"],
        "meta": meta,
    }
    atomic_write(_sidecar(path), json.dumps(side, indent=2, sort_keys=True, default=str).encode())


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`; returns ``(state_dict, meta)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: missing/invalid sidecar, size or sha256 mismatch (truncated or corrupt
            file), or an unreadable safetensors file.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    side_path = _sidecar(path)
    try:
        side = json.loads(side_path.read_text())
        expected, size = str(side["sha256"]), int(side["size"])
        meta = dict(side.get("meta") or {})
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path} has no metadata file {side_path.name} (an interrupted write?)"
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint metadata {side_path} is unreadable: {e}") from e
    actual_size = path.stat().st_size
    if actual_size != size:
        raise CheckpointError(
            f"checkpoint {path} is {actual_size} bytes, expected {size} (truncated or corrupt)"
        )
    digest = _sha256(path)
    if digest != expected:
        raise CheckpointError(
            f"checkpoint {path} has sha256 {digest[:12]}..., expected {expected[:12]}... (corrupt)"
        )
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {e}") from e
    check_finite(state, f"checkpoint {path}")
    return state, meta


def _clean_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    # Accept the common wrappers ({"state_dict": ...}, {"model": ...}) and DataParallel prefixes.
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, Tensor) for v in inner.values())
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"{path} does not hold a state dict (a mapping of names to "
            f"tensors); got {type(obj).__name__}"
        )
    out = {}
    for k, v in obj.items():
        out[k.removeprefix("module.")] = v
    check_finite(out, f"weights file {path}")
    return out


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Load a user-given state dict (``.pt``/``.pth`` or ``.safetensors``) without running code.

    ``.pt``/``.pth`` files go through ``torch.load(map_location="cpu", weights_only=True)``; a
    pickle that needs arbitrary objects is refused with :class:`CheckpointError` (there is no
    unsafe fallback). ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and ``module.``
    prefixes are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _clean_state_dict(load_file(str(path), device="cpu"), path)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        with warnings.catch_warnings():
            # files pickled with protocol > 2 are common and fine; torch warns about them
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False; we never do that, so quote only the
        # line that says what was blocked.
        why = [ln for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        raise CheckpointError(
            f"refused to load {path}: torch.load(weights_only=True) rejected it because it "
            "holds Python objects other than tensors and containers, and unpickling those "
            "could run arbitrary code. Re-save it as a plain state dict "
            "(torch.save(model.state_dict(), ...)) or as safetensors."
            + (f" ({why[0].strip().split('. ')[0]})" if why else "")
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {e}") from e
    return _clean_state_dict(obj, path)


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock, so parallel workers train one baseline once (POSIX only)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the atomic writes still keep files whole
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _hold_out(idx: np.ndarray, cfg: TrainCfg) -> tuple[np.ndarray, np.ndarray]:
    """Split the training indices into (train, held out) for the plateau rule: a seeded
    ``val_fraction`` of them (none for the other schedules).

    Example:
        >>> a, b = _hold_out(np.arange(100), TrainCfg(schedule="plateau", val_fraction=0.1))
        >>> len(a), len(b), len(set(a) | set(b))
        (90, 10, 100)
    """
    if cfg.schedule != "plateau":
        return idx, idx[:0]
    n = max(1, round(len(idx) * cfg.val_fraction))
    perm = np.random.default_rng(cfg.seed + 7).permutation(len(idx))
    return np.sort(idx[perm[n:]]), np.sort(idx[perm[:n]])


def _build(model: str, dataset: str, root: str | Path | None = None,
           image_size: int | None = None) -> nn.Module:
    info = dataset_info(dataset, root, image_size)
    return create_model(
        model, in_chans=info.in_chans, num_classes=info.num_classes, image_size=info.image_size
    )


def _try_load(model: str, dataset: str, path: Path, root: str | Path | None = None,
              image_size: int | None = None) -> tuple[nn.Module, dict] | None:
    """Model from the checkpoint at ``path``, ``None`` if absent; CheckpointError if bad."""
    if not path.is_file():
        return None
    state, meta = load_checkpoint(path)
    net = _build(model, dataset, root, image_size)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:  # key/shape mismatch: written for another architecture
        raise CheckpointError(f"checkpoint {path} does not fit {model}: {e}") from e
    return net, meta


def _remove(path: Path) -> None:
    for p in (path, _sidecar(path)):
        try:
            p.unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not delete %s: %s", p, e)


def load_or_train_fp32(
    model: str,
    dataset: str,
    cfg: TrainCfg,
    *,
    root: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    image_size: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The FP32 baseline of ``model`` on ``dataset`` trained with ``cfg``, from cache or fresh.

    Returns ``(model on device in eval mode, info)`` with ``info = {"key", "path", "source":
    "cache" | "shipped" | "trained"}`` plus ``"train_seconds"`` and ``"history"`` when trained.
    A corrupt user-cache checkpoint is logged, deleted and retrained; a corrupt shipped one is
    logged and skipped.
    """
    key = baseline_key(model, dataset, cfg, root=root, image_size=image_size)
    user_path = cache_dir() / f"{key}.safetensors"
    shipped_path = shipped_dir() / f"{key}.safetensors"

    def lookup() -> tuple[nn.Module, dict[str, Any]] | None:
        for path, source in ((user_path, "cache"), (shipped_path, "shipped")):
            try:
                got = _try_load(model, dataset, path, root, image_size)
            except CheckpointError as e:
                if source == "cache":
                    log.warning("%s; deleting it and training the baseline again", e)
                    _remove(path)
                else:
                    log.warning("%s; ignoring the shipped checkpoint", e)
                continue
            if got is not None:
                net, _meta = got
                log.info("FP32 baseline %s loaded from %s (%s)", key, path, source)
                out: dict[str, Any] = {"key": key, "path": str(path), "source": source}
                if _meta.get("converged") is not None:  # plateau-rule recipes record it
                    out["converged"] = bool(_meta["converged"])
                return net.to(device).eval(), out
        return None

    hit = lookup()
    if hit is not None:
        return hit
    with _file_lock(cache_dir() / f".{key}.lock"):
        hit = lookup()  # another process may have trained it while we waited for the lock
        if hit is not None:
            return hit
        info = dataset_info(dataset, root, image_size)
        ds = load_dataset(dataset, "train", root, augment=True, image_size=image_size)
        idx = subset_indices(len(ds), cfg.train_subset, cfg.seed)  # type: ignore[arg-type]
        idx, held = _hold_out(idx, cfg)
        workers = loader_workers(dataset)
        loader = make_loader(ds, idx, cfg.batch_size, shuffle=True, seed=cfg.seed,
                             num_workers=workers)
        val_loader = None
        if len(held):  # the plateau rule's held-out training images, without augmentation
            plain = load_dataset(dataset, "train", root, image_size=image_size)
            val_loader = make_loader(plain, held, 256, num_workers=workers)
        seed_everything(cfg.seed)  # model init is part of the reproducible recipe
        net = _build(model, dataset, root, image_size)
        log.info("training FP32 baseline %s (%s on %s, %d images, %d held out)", key, model,
                 dataset, len(idx), len(held))
        history = train(
            net, loader, cfg, device=device, progress=progress, desc=f"fp32 {model}/{dataset}",
            val_loader=val_loader,
        )
        meta = {
            "key": key,
            "model": model,
            "dataset": dataset,
            "in_chans": info.in_chans,
            "num_classes": info.num_classes,
            "image_size": info.image_size,
            "data": dataset_fingerprint(dataset, root, image_size),
            "cfg": asdict(cfg),
            "train_images": len(idx),
            "held_out_images": len(held),
            "train_seconds": history["seconds"],
            "train_steps": history["steps"],
            "final_train_loss": history["epochs"][-1]["loss"] if history["epochs"] else None,
            "converged": history.get("converged"),
            "val_curve": [[e["step"], round(e["val_top1"], 3)] for e in history["evals"]],
            "torch": torch.__version__,
            "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        save_checkpoint(user_path, net.state_dict(), meta)
        log.info("saved FP32 baseline %s to %s", key, user_path)
    return net.to(device).eval(), {
        "key": key,
        "path": str(user_path),
        "source": "trained",
        "train_seconds": history["seconds"],
        "history": history,
        **({"converged": bool(history["converged"])} if "converged" in history else {}),
    }


def ship_checkpoint(
    model: str, dataset: str, cfg: TrainCfg, *, dest: str | Path | None = None,
    root: str | Path | None = None,
) -> Path:
    """Copy the cached baseline into the package's ``checkpoints/`` (or ``dest``) folder.

    The cached checkpoint must exist (run :func:`load_or_train_fp32` first) and is verified
    before copying. Returns the path of the copied ``.safetensors`` file.
    """
    key = baseline_key(model, dataset, cfg, root=root)
    src = cache_dir() / f"{key}.safetensors"
    if not src.is_file():
        raise FileNotFoundError(
            f"no cached baseline {src}; train it first with "
            f"load_or_train_fp32({model!r}, {dataset!r}, cfg)"
        )
    load_checkpoint(src)  # raises CheckpointError rather than shipping a corrupt file
    out_dir = Path(dest) if dest is not None else shipped_dir()
    target = out_dir / src.name
    for s, d in ((src, target), (_sidecar(src), _sidecar(target))):
        atomic_write(d, lambda tmp, s=s: shutil.copyfile(s, tmp))
    log.info("shipped %s to %s", key, target)
    return target
