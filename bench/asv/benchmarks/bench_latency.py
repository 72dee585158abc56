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

    params = [["x86", "cuda"], list(common.LAYERS)]
    param_names = ["target", "layer"]
    unit = "us"
    timeout = 180

    def setup(self, target: str, layer: str) -> None:
        try:
            import tvm  # noqa: F401
        except ImportError:
            raise common.skip("apache-tvm is not installed") from None
        from ternbench.schedules import _tvm, list_targets

        if target not in list_targets() or not _tvm.target_info(target).local:
            raise common.skip(f"target {target!r} cannot be timed on this machine")
        self.lx = common.layer_export(layer)

    def track_kernel_latency_us(self, target: str, layer: str) -> float:
        from ternbench.schedules import EvaluatorCfg, measure_layer

        lat = measure_layer(self.lx, target=target, ev=EvaluatorCfg(**EVALUATOR), threads=1)
        return float(lat.median_us)


class WholeModel:
    """The deployed artifact (the whole ternary model as ONE TVM module, batch 1, one thread)
    on x86, checked against the fake-quant logits, timed interleaved with torch FP32 eager,
    torch INT8 and ONNX Runtime INT8, and beside the sum of its kernels
    (``bench.model_bench``): ResNet-8 at Fashion-MNIST shapes and ResNet-18 at 224 px.
    asv reads lower as better, hence artifact / peer as the ratios."""

    params = [["resnet8", "resnet18"], ["rtn", "sttn", "fgq"]]
    param_names = ["model", "method"]
    timeout = 1200

    def setup_cache(self) -> dict[tuple[str, str], dict[str, float]]:
        try:
            import tvm  # noqa: F401
        except ImportError:
            raise common.skip("apache-tvm is not installed") from None
        from ternbench.bench.model_bench import whole_model_latency

        out = {}
        for model in self.params[0]:
            for method in self.params[1]:
                r = whole_model_latency(model, method, repeat=7, min_repeat_ms=100.0)
                out[(model, method)] = {
                    "tvm_ms": r.tvm_us / 1e3, "ratio": r.tvm_us / r.torch_fp32_us,
                    "over_kernels": r.overhead,
                    "over_int8": r.tvm_us / (r.torch_int8_us or float("nan")),
                    "over_ort": r.tvm_us / (r.ort_int8_us or float("nan"))}
        return out

    def track_tvm_ms(self, results: dict, model: str, method: str) -> float:
        return results[(model, method)]["tvm_ms"]

    track_tvm_ms.unit = "ms"  # type: ignore[attr-defined]

    def track_tvm_over_torch_fp32(self, results: dict, model: str, method: str) -> float:
        return results[(model, method)]["ratio"]

    track_tvm_over_torch_fp32.unit = "ratio"  # type: ignore[attr-defined]

    def track_artifact_over_kernel_sum(self, results: dict, model: str, method: str) -> float:
        return results[(model, method)]["over_kernels"]

    track_artifact_over_kernel_sum.unit = "ratio"  # type: ignore[attr-defined]

    def track_artifact_over_torch_int8(self, results: dict, model: str, method: str) -> float:
        return results[(model, method)]["over_int8"]

    track_artifact_over_torch_int8.unit = "ratio"  # type: ignore[attr-defined]

    def track_artifact_over_ort_int8(self, results: dict, model: str, method: str) -> float:
        return results[(model, method)]["over_ort"]

    track_artifact_over_ort_int8.unit = "ratio"  # type: ignore[attr-defined]
