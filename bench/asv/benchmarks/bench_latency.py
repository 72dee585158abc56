"""TVM kernel latency of fixed layer shapes, per target, as ``time_evaluator`` measures it.

asv's own timer would mostly time Python and FFI overhead around a 20-100 us kernel, so this is
a ``track_`` benchmark returning the median of :func:`ternbench.schedules.measure_layer` (which
also checks the kernel against the torch reference before timing it).
"""

from __future__ import annotations

from . import common

#: the profile "default" evaluator settings: 7 repeats of >= 20 ms each
EVALUATOR = {"number": 20, "repeat": 7, "min_repeat_ms": 20}


class KernelLatency:
    """Median kernel latency (us) of one layer shape on one target, batch 1, one thread."""

    params = [["x86"], list(common.LAYERS)]
    param_names = ["target", "layer"]
    unit = "us"
    timeout = 180

    def setup(self, target: str, layer: str) -> None:
        try:
            import tvm  # noqa: F401
        except ImportError:
            raise common.skip("apache-tvm is not installed") from None
        from ternbench.schedules import list_targets

        if target not in list_targets():
            raise common.skip(f"target {target!r} cannot be measured on this machine")
        self.lx = common.layer_export(layer)

    def track_kernel_latency_us(self, target: str, layer: str) -> float:
        from ternbench.schedules import EvaluatorCfg, measure_layer

        lat = measure_layer(self.lx, target=target, ev=EvaluatorCfg(**EVALUATOR), threads=1)
        return float(lat.median_us)
