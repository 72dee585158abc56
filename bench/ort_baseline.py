"""ONNX Runtime INT8: the peer a CPU deployer would pick for a quantized model.

The FP32 model is exported to ONNX (TorchScript exporter, opset 17), statically quantized by
``onnxruntime.quantization.quantize_static`` to INT8 QDQ (per-channel int8 weights, uint8
activations, MinMax calibration on the given calibration images) and run by an
``InferenceSession`` with 1 intra-op thread (or the run's thread count) and every graph
optimisation on, so the QDQ pairs are fused into integer kernels.

Example:
    >>> from ternbench.bench.ort_baseline import ort_available
    >>> isinstance(ort_available(), bool)
    True
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

__all__ = ["ort_available", "OrtModel", "ort_int8_model", "export_onnx"]

log = logging.getLogger(__name__)


class _Collect(logging.Handler):
    """Keeps the messages of the records it is handed (the quantizer's root-logger output)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
OPSET = 17


def ort_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    """ONNX bytes of ``model`` (eval mode) for inputs shaped like ``example``, batch dynamic."""
    m = copy.deepcopy(model).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation notices
        torch.onnx.export(m, (example,), buf,  # type: ignore[arg-type]  # file-like works
                          input_names=["x"], output_names=["logits"],
                          opset_version=OPSET, dynamic_axes={"x": {0: "batch"},
                                                             "logits": {0: "batch"}},
                          dynamo=False)
    return buf.getvalue()


class _Reader:
    """``CalibrationDataReader`` over a float32 NCHW array, one sample per read."""

    def __init__(self, x: np.ndarray) -> None:
        self._x = x
        self._it: Iterator[np.ndarray] = iter(x)

    def get_next(self) -> dict[str, np.ndarray] | None:
        try:
            return {"x": next(self._it)[None].astype(np.float32)}
        except StopIteration:
            return None

    def rewind(self) -> None:  # calibration methods that read the data twice
        self._it = iter(self._x)


class OrtModel:
    """A quantized ONNX model in an InferenceSession: ``model(x)`` -> logits (numpy)."""

    def __init__(self, onnx_bytes: bytes, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.threads = threads
        self.session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {"x": x})[0])


def ort_int8_model(fp32: nn.Module, calib: torch.Tensor, *, threads: int = 1) -> OrtModel:
    """``fp32`` exported to ONNX and statically quantized to INT8 QDQ, per channel,
    calibrated on ``calib`` (NCHW float32, normalised like the test images)."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx_bytes = export_onnx(fp32, calib[:1])
    with tempfile.TemporaryDirectory(prefix="ternbench-ort-") as d:
        src, pre, dst = Path(d) / "fp32.onnx", Path(d) / "pre.onnx", Path(d) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        try:  # shape inference + constant folding, as onnxruntime recommends before quantizing
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as exc:  # the plain export quantizes too
            log.debug("onnx pre-processing skipped: %s", exc)
            pre = src
        # the quantizer logs each node (INFO) and e.g. every unfused BatchNorm (WARNING) on
        # the root logger: collect its warnings and report them once, under our name
        root = logging.getLogger()
        level, handlers = root.level, root.handlers[:]
        caught = _Collect()
        root.setLevel(max(level, logging.WARNING))
        root.handlers[:] = [caught]
        try:
            quantize_static(str(pre), str(dst), _Reader(calib.numpy()),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        if caught.messages:
            log.warning("onnxruntime quantizer: %d warning(s), e.g. %s", len(caught.messages),
                        caught.messages[0])
        data = dst.read_bytes()
    log.info("onnxruntime INT8 QDQ model: %d calibration images, %d KiB", len(calib),
             len(data) // 1024)
    return OrtModel(data, threads=threads)

