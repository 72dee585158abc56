"""Facts a method declares about its paper: reported top-1 numbers and accuracy deltas.

They are registered with the method (``@register_method(..., paper_numbers=..., paper_deltas=...)``)
in the method's own file; reports read them through :func:`ternbench.methods.paper_numbers` and
:func:`ternbench.methods.paper_deltas`. Every value is as *reported*, never measured here. Model
names follow ternbench's registry (``resnet20`` is the CIFAR ResNet-20, ``resnet18``
torchvision's ResNet-18).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PaperNumber", "PaperDelta"]


@dataclass(frozen=True)
class PaperNumber:
    """A top-1 accuracy a paper reports (with its own FP32 top-1 when it gives one)."""

    method: str
    model: str
    dataset: str
    top1: float
    fp32_top1: float | None
    setting: str
    source: str

    def delta(self) -> PaperDelta | None:
        """The reported change against the paper's own FP32 model (None without one)."""
        if self.fp32_top1 is None:
            return None
        return PaperDelta(self.method, self.model, self.dataset,
                          round(self.top1 - self.fp32_top1, 2), self.setting, self.source)


@dataclass(frozen=True)
class PaperDelta:
    """A paper's top-1 change against its own FP32 model (points; negative = a drop)."""

    method: str
    model: str
    dataset: str
    delta: float
    setting: str
    source: str

    def exact_for(self, model: str, dataset: str) -> bool:
        return (self.model, self.dataset) == (model, dataset)
