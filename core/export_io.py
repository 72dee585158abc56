"""The export file format: ``exports/<key>.npz`` (arrays + a JSON header; never pickle), and the
non-GEMM state that rebuilds a whole model (``exports/<key>.graph.safetensors``).

Ternary codes are stored 2-bit packed (4 per byte), which is also the storage the effective-bits
figure counts.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .export import LayerExport
from .files import atomic_write

__all__ = [
    "pack_ternary", "unpack_ternary", "save_exports", "load_exports", "exports_to_bytes",
    "graph_state", "graph_state_to_bytes", "load_graph_state",
]

_ARRAYS = ("codes", "scales", "bias", "weight_offset")


def pack_ternary(codes: np.ndarray) -> np.ndarray:
    """int8 {-1,0,1} [..., n] -> uint8 [..., ceil(n/4)], 2-bit two's complement, low bits first.

    Example:
        >>> unpack_ternary(pack_ternary(np.array([[1, -1, 0, 1, -1]], np.int8)), 5).tolist()
        [[1, -1, 0, 1, -1]]
    """
    c = np.asarray(codes)
    if c.size and (c.min() < -1 or c.max() > 1):
        raise ValueError("pack_ternary expects codes in {-1, 0, 1}")
    n = c.shape[-1]
    pad = (-n) % 4
    u = (np.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, pad)]).astype(np.int16) & 3).astype(np.uint8)
    u = u.reshape(*c.shape[:-1], -1, 4)
    return (u[..., 0] | (u[..., 1] << 2) | (u[..., 2] << 4) | (u[..., 3] << 6)).astype(np.uint8)


def unpack_ternary(packed: np.ndarray, n: int) -> np.ndarray:
    b = np.asarray(packed, dtype=np.uint8)[..., None] >> np.array([0, 2, 4, 6], np.uint8)
    c = (b & 3).astype(np.int8)
    c = np.where(c == 3, -1, c).astype(np.int8)
    return c.reshape(*packed.shape[:-1], -1)[..., :n]


def exports_to_bytes(exports: Mapping[str, LayerExport]) -> bytes:
    arrays: dict[str, np.ndarray] = {}
    header = []
    for i, (name, lx) in enumerate(exports.items()):
        meta = {
            f.name: getattr(lx, f.name) for f in dataclasses.fields(lx) if f.name not in _ARRAYS
        }
        meta["key"] = name
        meta["has_bias"] = lx.bias is not None
        meta["has_weight_offset"] = lx.weight_offset is not None
        header.append(meta)
        if lx.weight_format == "ternary":
            arrays[f"{i}.codes_packed"] = pack_ternary(lx.codes)
        else:
            arrays[f"{i}.codes"] = np.asarray(lx.codes)
        arrays[f"{i}.scales"] = lx.scales
        if lx.bias is not None:
            arrays[f"{i}.bias"] = lx.bias
        if lx.weight_offset is not None:
            arrays[f"{i}.weight_offset"] = lx.weight_offset
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def save_exports(path: str | Path, exports: Mapping[str, LayerExport]) -> None:
    atomic_write(path, exports_to_bytes(exports))


def load_exports(path: str | Path) -> dict[str, LayerExport]:
    """Read what :func:`save_exports` wrote (``allow_pickle=False``)."""
    with np.load(Path(path), allow_pickle=False) as z:
        header = json.loads(z["header"].tobytes().decode())
        out: dict[str, LayerExport] = {}
        for i, meta in enumerate(header):
            key = meta.pop("key")
            has_bias = meta.pop("has_bias")
            has_wo = meta.pop("has_weight_offset", False)
            if meta["weight_format"] == "ternary":
                n = meta["in_channels"] * meta["kernel_size"][0] * meta["kernel_size"][1]
                codes = unpack_ternary(z[f"{i}.codes_packed"], n)
            else:
                codes = z[f"{i}.codes"]
            for k in ("kernel_size", "stride", "padding", "input_shape", "output_hw"):
                meta[k] = tuple(meta[k])
            arrays = {"codes": codes, "scales": z[f"{i}.scales"],
                      "bias": z[f"{i}.bias"] if has_bias else None,
                      "weight_offset": z[f"{i}.weight_offset"] if has_wo else None}
            for field, arr in arrays.items():  # a NaN scale would make every kernel "exact"
                if arr is not None and arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    raise ValueError(f"{path}: layer {key!r} {field} holds "
                                     f"{int((~np.isfinite(arr)).sum())} NaN/Inf value(s); "
                                     "refusing an export that is not finite")
            out[key] = LayerExport(**arrays, **meta)  # type: ignore[arg-type]
    return out


def graph_state(module: Any) -> dict[str, Any]:
    """The non-GEMM state of a (quantized) model: every ``state_dict`` entry outside its
    conv/linear layers (BatchNorm statistics, ...), which the exports do not carry. With the
    exports it rebuilds the deployed model on the float architecture (whole-model latency).

    Example:
        >>> from torch import nn
        >>> sorted(graph_state(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))))[:2]
        ['1.bias', '1.num_batches_tracked']
    """
    from torch import nn

    skip = tuple(f"{n}." for n, m in module.named_modules()
                 if isinstance(m, nn.Conv2d | nn.Linear))
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()
            if not k.startswith(skip)}


def graph_state_to_bytes(module: Any) -> bytes:
    """:func:`graph_state` as safetensors bytes (no pickle)."""
    from safetensors.torch import save

    return save(graph_state(module))


def load_graph_state(arch: Any, data: bytes | Mapping[str, Any]) -> Any:
    """Load a :func:`graph_state` (safetensors bytes or a mapping) into a float architecture;
    every non-conv/linear entry of the architecture must be there (a model of another shape
    fails here, naming the keys). Returns ``arch`` in eval mode."""
    from safetensors.torch import load

    state = load(data) if isinstance(data, bytes | bytearray) else dict(data)
    want = graph_state(arch)
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        raise ValueError(f"graph state does not fit the model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    arch.load_state_dict(state, strict=False)
    return arch.eval()
