"""Whole-model latency of a ternary network at deployment shapes (e.g. ResNet-18 at 224 px).

The accuracy pipeline times the small models it trains; this benchmark answers the deployment
question for the models people ship: a ternary ResNet-18 on ImageNet-sized input, batch 1,
every conv/linear a TVM kernel chained with the model's non-GEMM ops, against torch FP32 eager
and torch INT8 on the same input. Latency does not depend on the weight values, so the network
is seeded random (no download) and quantized by the chosen method on seeded random calibration
images; the TVM model is still checked against *that* fake-quant model's logits before timing.

Example:
    >>> from ternbench.bench.model_bench import WHOLE_MODELS
    >>> "resnet18" in WHOLE_MODELS
    True
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "WHOLE_MODELS", "WholeModelResult", "whole_model_latency", "write_model_results",
    "model_markdown",
]

log = logging.getLogger(__name__)

#: name -> (ternbench model name, input channels, classes, image size)
WHOLE_MODELS: dict[str, tuple[str, int, int, int]] = {
    "resnet18": ("resnet18", 3, 1000, 224),
    "resnet18-cifar": ("resnet18", 3, 10, 32),
    "resnet20": ("resnet20", 3, 10, 32),
}


@dataclass(frozen=True)
class WholeModelResult:
    """One end-to-end measurement (see :class:`ternbench.schedules.model.ModelLatency`)."""

    model: str
    method: str
    image_size: int
    batch: int
    threads: int
    tvm_us: float
    torch_fp32_us: float
    torch_int8_us: float | None
    other_us: float
    logit_rel_diff: float
    top1_agreement: float
    per_layer_us: dict[str, float]
    impls: dict[str, str]
    build_s: float

    @property
    def speedup_fp32(self) -> float:
        return self.torch_fp32_us / self.tvm_us

    @property
    def speedup_int8(self) -> float | None:
        return None if self.torch_int8_us is None else self.torch_int8_us / self.tvm_us


def whole_model_latency(model: str = "resnet18", method: str = "rtn", *, batch: int = 1,
                        threads: int = 1, seed: int = 0, check_samples: int = 8,
                        repeat: int = 15, min_repeat_ms: float = 200.0,
                        method_overrides: dict[str, Any] | None = None) -> WholeModelResult:
    """Quantize ``model`` with ``method`` (seeded random weights and calibration images),
    compile it for x86, check it against the fake-quant logits, then time it beside torch.

    QAT methods are used as initialised (no training: latency only); their kernels and
    activation modes are the trained model's.
    """
    from ternbench.methods import QuantContext, create_method
    from ternbench.schedules.model import compile_model, model_latency

    from .models import create_model

    if model not in WHOLE_MODELS:
        raise ValueError(f"unknown whole model {model!r}; known: {sorted(WHOLE_MODELS)}")
    name, chans, classes, size = WHOLE_MODELS[model]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    fp32 = create_model(name, in_chans=chans, num_classes=classes, image_size=size).eval()
    n_cal = max(check_samples, batch, 8)
    x = torch.randn(n_cal, chans, size, size, generator=gen)
    y = torch.randint(0, classes, (n_cal,), generator=gen)
    overrides = dict(method_overrides or {})
    if method not in ("fp32", "int8", "twn", "fgq", "trn"):
        overrides.setdefault("epochs", 0)  # QAT methods: latency only, no training
    ctx = QuantContext(calib_loader=[(x, y)], train_loader=[(x, y)], bn_batches=1,
                       progress=False)
    t0 = time.perf_counter()
    qm = create_method(method, **overrides).quantize(fp32, ctx)
    qm.module.eval()
    with torch.no_grad():
        ref = qm.module(x)
    tvm_model = compile_model(qm.module, qm.export(), batch=batch)
    build_s = time.perf_counter() - t0
    log.info("%s/%s: quantized and compiled in %.1f s", model, method, build_s)
    lat = model_latency(tvm_model, fp32, x, ref, threads=threads, repeat=repeat,
                        min_repeat_ms=min_repeat_ms)
    return WholeModelResult(
        model=model, method=method, image_size=size, batch=batch, threads=lat.threads,
        tvm_us=lat.tvm_us, torch_fp32_us=lat.torch_fp32_us, torch_int8_us=lat.torch_int8_us,
        other_us=lat.other_us, logit_rel_diff=lat.check.rel_diff,
        top1_agreement=lat.check.top1_agreement, per_layer_us=lat.per_layer_us,
        impls=lat.impls, build_s=build_s)


def write_model_results(results: list[WholeModelResult], out: str | Any) -> tuple[Any, Any]:
    """``OUT/model.csv`` (one row per model x method) and ``OUT/model_layers.csv`` (the
    per-layer split of the TVM time); returns both paths."""
    from pathlib import Path

    import pandas as pd

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, layers = [], []
    for r in results:
        rows.append({
            "model": r.model, "method": r.method, "image_size": r.image_size, "batch": r.batch,
            "threads": r.threads, "tvm_us": r.tvm_us, "torch_fp32_eager_us": r.torch_fp32_us,
            "torch_int8_us": r.torch_int8_us, "speedup_vs_torch_fp32": r.speedup_fp32,
            "speedup_vs_torch_int8": r.speedup_int8, "non_gemm_us": r.other_us,
            "logit_rel_diff": r.logit_rel_diff, "top1_agreement": r.top1_agreement,
            "build_s": r.build_s,
        })
        layers += [{"model": r.model, "method": r.method, "layer": k, "impl": r.impls[k],
                    "us": v} for k, v in r.per_layer_us.items()]
    a, b = out / "model.csv", out / "model_layers.csv"
    pd.DataFrame(rows).to_csv(a, index=False)
    pd.DataFrame(layers).to_csv(b, index=False)
    return a, b


def model_markdown(results: list[WholeModelResult]) -> str:
    """A short Markdown table of whole-model results."""
    lines = ["## Whole model (end to end, TVM kernels + the model's non-GEMM ops)", "",
             "| model | method | batch | TVM (ms) | torch FP32 eager (ms) | torch INT8 (ms) | "
             "x FP32 | x INT8 | non-GEMM (ms) | logit Δ | top-1 agree |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        i8 = "-" if r.torch_int8_us is None else f"{r.torch_int8_us / 1e3:.1f}"
        x8 = "-" if r.speedup_int8 is None else f"{r.speedup_int8:.2f}"
        lines.append(f"| {r.model} | {r.method} | {r.batch} | {r.tvm_us / 1e3:.1f} | "
                     f"{r.torch_fp32_us / 1e3:.1f} | {i8} | {r.speedup_fp32:.2f} | {x8} | "
                     f"{r.other_us / 1e3:.1f} | {r.logit_rel_diff:.1e} | "
                     f"{100 * r.top1_agreement:.0f}% |")
    return "\n".join(lines) + "\n"
