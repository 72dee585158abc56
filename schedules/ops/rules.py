"""Rules and kernels: :class:`Rule` (one schedule rule of a target) builds a :class:`Kernel`
from a layer, cached in process by spec."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _tvm
from . import packing
from .compute import gemm_compute
from .spec import GemmSpec, Params

if TYPE_CHECKING:
    from ternbench.core.export import LayerExport

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- rules and kernels


@dataclass
class Kernel:
    """A compiled layer kernel: ``module["main"](X, *weights, S, bias, out)``.

    ``executable`` is TVM's build result; ``module`` (the loaded runtime module) exists only
    for targets that run in this process (see :attr:`_tvm.TargetInfo.local`); a cross-compiled
    kernel is exported with :meth:`export` and run elsewhere (qemu, an RPC board).
    """

    rule: str
    impl: str
    spec: GemmSpec
    target_str: str
    executable: Any
    build_s: float
    params: Mapping[str, int] = field(default_factory=dict)
    _module: Any = field(default=None, repr=False)

    @property
    def module(self) -> Any:
        if self._module is None:
            self._module = self.executable.jit()
        return self._module

    @property
    def func(self) -> Any:
        return self.module["main"]

    def pack(self, lx: LayerExport) -> list[np.ndarray]:
        return packing.pack_weight_args(self.spec, lx)

    def export(self, path: str | Any, **kwargs: Any) -> None:
        """``export_library`` (``fcompile=`` a cross compiler for ARM)."""
        self.executable.export_library(str(path), **kwargs)


_CACHE: dict[tuple[str, GemmSpec, str], Kernel] = {}
_CACHE_LOCK = threading.Lock()


def kernel_cache_size() -> int:
    return len(_CACHE)


def clear_kernel_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


@dataclass(frozen=True)
class Rule:
    """One schedule rule of a target (dlight style: the first rule that applies wins).

    ``plan(lx, batch, target, params)`` turns a layer into a :class:`GemmSpec` (layout,
    padding, tiles from ``params``); ``schedule`` turns the spec's TE PrimFunc into a scheduled
    IRModule. ``grid`` lists the tile parameters a per-shape search may try; its first entry is
    the default (used when no search result is cached).
    """

    name: str
    impl: str
    applies: Callable[[LayerExport, _tvm.TargetInfo], bool]
    plan: Callable[[LayerExport, int, _tvm.TargetInfo, Params], GemmSpec]
    schedule: Callable[[Any, GemmSpec], Any] = field(repr=False)
    #: tag weight-only layers (float activations) with ``_a32`` (rules that serve both kinds)
    a32_suffix: bool = True
    grid: tuple[Params, ...] = ({},)

    @property
    def default_params(self) -> Params:
        return self.grid[0] if self.grid else {}

    def impl_for(self, lx: LayerExport) -> str:
        """Implementation name; weight-only layers (float activations) get an ``_a32`` suffix
        unless the rule serves only them."""
        if self.a32_suffix and lx.act_mode == "fp32" and lx.weight_format != "fp32":
            return self.impl + "_a32"
        return self.impl

    def spec_for(self, lx: LayerExport, batch: int, target: _tvm.TargetInfo, params: Params,
                 *, float_input: bool = False,
                 out_clip: tuple[int, int] | None = None) -> GemmSpec:
        """The planned spec; with ``float_input`` a ``pixel_bits`` ternary conv takes the
        layer's float input and quantizes it while packing; ``out_clip`` asks for int8
        outputs (:attr:`GemmSpec.out_clip`: AMX layouts only, else ``ValueError``)."""
        spec = self.plan(lx, batch, target, params)
        if float_input and spec.pixel_bits and lx.act_threshold >= 0:
            spec = dataclasses.replace(spec, float_in=True, threshold=float(lx.act_threshold))
        if out_clip is not None:
            spec = dataclasses.replace(spec, out_clip=(int(out_clip[0]), int(out_clip[1])))
        return spec

    def build(self, lx: LayerExport, batch: int, target: _tvm.TargetInfo,
              params: Params | None = None, *, float_input: bool = False,
              out_clip: tuple[int, int] | None = None) -> Kernel:
        """Compile (or fetch from the in-process cache) the kernel for ``lx`` at ``batch``.

        ``float_input``: where the layout can quantize while packing (``pixel_bits`` ternary
        convs), take the layer's float input instead of activation codes; elsewhere ignored
        (check ``kernel.spec.float_in``). ``out_clip``: int8 outputs requantized in the
        epilogue (:attr:`GemmSpec.out_clip`).
        """
        p = dict(self.default_params if params is None else params)
        spec = self.spec_for(lx, batch, target, p, float_input=float_input, out_clip=out_clip)
        key = (self.name, spec, target.target_str)
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
            if hit is not None:
                return hit
            t0 = time.perf_counter()
            mod = self.schedule(gemm_compute(spec), spec)
            exe = _tvm.compile_prim_module(mod, target)
            kern = Kernel(rule=self.name, impl=self.impl_for(lx), spec=spec,
                          target_str=target.target_str, executable=exe,
                          build_s=time.perf_counter() - t0, params=p)
            _CACHE[key] = kern
        log.debug("built %s for %s in %.2fs", self.name, spec.shape_key, kern.build_s)
        return kern
