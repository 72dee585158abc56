"""The CUDA rule set (``rules()``): which rule serves which layer, the GEMM plan and the tile
grids a per-shape search may try."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import _tvm
from ..ops import GemmSpec, Params, Rule, plan_gemm
from .dlight import schedule_dlight
from .nvrtc import ensure_cuda_path
from .schedules import (
    GEMV_DEFAULT,
    GEMV_MAX_M,
    MAX_THREADS,
    TILED_DEFAULT,
    WARP,
    schedule_t2,
)

if TYPE_CHECKING:
    from ternbench.core.export import LayerExport


def _is_cuda(target: _tvm.TargetInfo) -> bool:
    return target.family == "cuda"


def _applies_t2_gemv(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    # linear layers: M = batch, few rows in the common batch-1 case
    return (_is_cuda(target) and lx.weight_format == "ternary"
            and lx.act_mode in ("int", "fp32") and lx.op == "linear")


def _applies_t2_gemm(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    return _is_cuda(target) and lx.weight_format == "ternary" and lx.act_mode in ("int", "fp32")


def _applies_tt(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    return _is_cuda(target) and lx.weight_format == "ternary" and lx.act_mode == "ternary"


def _applies_dense(fmt: str) -> Any:
    def applies(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
        return _is_cuda(target) and lx.weight_format == fmt and lx.act_mode in ("int", "fp32")

    return applies


def _applies_any(lx: LayerExport, target: _tvm.TargetInfo) -> bool:
    return _is_cuda(target) and (
        (lx.weight_format == "ternary" and lx.act_mode in ("int", "fp32", "ternary"))
        or (lx.weight_format in ("int8", "fp32") and lx.act_mode in ("int", "fp32")))


def _layout(lx: LayerExport) -> Any:
    if lx.weight_format != "ternary":
        return "dense_blocked"
    return "tt_planes" if lx.act_mode == "ternary" else "t2_blocked"


def _plan(lx: LayerExport, batch: int, target: _tvm.TargetInfo, params: Params) -> GemmSpec:
    """GEMM view of ``lx`` with the tiles of ``params`` (missing ones: the kernel's defaults):
    ``nb`` channels per thread block (also the weight layout's block, so that a block's
    weights are one contiguous slab); for the tiled kernel ``mb`` rows per thread and ``rows``
    rows per thread block."""
    layout = _layout(lx)
    spec = plan_gemm(lx, batch, layout, nb=int(params.get("nb", GEMV_DEFAULT["nb"])),
                     mb_max=1, rows_per_task=1)
    if spec.M <= GEMV_MAX_M:  # split-K: one row per thread block, mb / rows unused
        return spec
    nb = int(params.get("nb", TILED_DEFAULT["nb"]))
    mb = int(params.get("mb", TILED_DEFAULT["mb"]))
    # at most MAX_THREADS threads per block: (rows / mb) row threads x min(nb, 32) channel ones
    rows = min(int(params.get("rows", TILED_DEFAULT["rows"])), mb * (MAX_THREADS // min(WARP, nb)))
    return plan_gemm(lx, batch, layout, nb=nb, mb_max=mb, rows_per_task=rows)


def _grid(default: dict[str, int], **axes: tuple[int, ...]) -> tuple[Params, ...]:
    """Default first, then the cartesian product of ``axes`` (what a search may try)."""
    pts: list[dict[str, int]] = [{}]
    for key, vals in axes.items():
        pts = [{**p, key: v} for p in pts for v in vals]
    return (default, *[p for p in pts if p != default])


#: split-K tiles (linear layers: few rows); the tiled kernel's tiles (conv layers). The default
#: grid points leave ``nb`` to the kernel the row count selects (see :func:`_plan`).
_GEMV_GRID = _grid({}, nb=(8, 16, 32, 64))
_TILED_GRID = _grid({"mb": TILED_DEFAULT["mb"], "rows": TILED_DEFAULT["rows"]},
                    nb=(32, 64, 128), mb=(1, 2, 4), rows=(16, 32, 64))


def rules() -> list[Rule]:
    """CUDA rules in priority order: hand schedules first, dlight last (any format).

    Also points ``CUDA_PATH`` at a CUDA toolkit when needed (:func:`ensure_cuda_path`), so
    that the kernels built from these rules compile when they are first loaded on a GPU.
    """
    ensure_cuda_path()
    return [
        Rule("cuda.t2_gemv", "tvm_t2_gemv_cuda", _applies_t2_gemv, _plan,
             schedule_t2, grid=_GEMV_GRID),
        Rule("cuda.t2_gemm", "tvm_t2_gemm_cuda", _applies_t2_gemm, _plan,
             schedule_t2, grid=_TILED_GRID),
        Rule("cuda.tt_popc", "tvm_tt_popc_cuda", _applies_tt, _plan,
             schedule_t2, grid=_TILED_GRID),
        Rule("cuda.int8", "tvm_int8_cuda", _applies_dense("int8"), _plan,
             schedule_t2, grid=_TILED_GRID),
        Rule("cuda.fp32", "tvm_fp32_cuda", _applies_dense("fp32"), _plan,
             schedule_t2, grid=_TILED_GRID),
        Rule("cuda.dlight", "tvm_dlight_cuda", _applies_any, _plan, schedule_dlight),
    ]
