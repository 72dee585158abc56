"""The layer shapes the kernel benchmark measures: :class:`KernelShape` and the shape suites
(``resnet18``, ``cifar``, ``gemv``, ``bitnet``), selected by :func:`select_shapes`."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

SUITES = ("resnet18", "cifar", "gemv", "bitnet")


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class KernelShape:
    """One conv / linear layer shape (per sample; the batch is chosen per measurement)."""

    suite: str
    name: str
    op: Literal["conv2d", "linear"]
    cin: int
    cout: int
    hw: tuple[int, int] = (1, 1)
    k: int = 1
    stride: int = 1
    pad: int = 0

    @property
    def out_hw(self) -> tuple[int, int]:
        if self.op == "linear":
            return (1, 1)
        h, w = self.hw
        return ((h + 2 * self.pad - self.k) // self.stride + 1,
                (w + 2 * self.pad - self.k) // self.stride + 1)

    @property
    def fan_in(self) -> int:
        return self.cin * self.k * self.k

    @property
    def label(self) -> str:
        """e.g. ``conv 3x3/2 64x56x56->128`` or ``linear 512->1000``."""
        if self.op == "linear":
            return f"linear {self.cin}->{self.cout}"
        h, w = self.hw
        return f"conv {self.k}x{self.k}/{self.stride} {self.cin}x{h}x{w}->{self.cout}"

    def macs(self, batch: int) -> int:
        ho, wo = self.out_hw
        return batch * ho * wo * self.fan_in * self.cout


def _conv(suite: str, name: str, cin: int, cout: int, hw: int, k: int = 3,
          stride: int = 1) -> KernelShape:
    return KernelShape(suite, name, "conv2d", cin, cout, (hw, hw), k, stride, k // 2)


def resnet18_shapes() -> list[KernelShape]:
    """The distinct conv/linear shapes of torchvision's ResNet-18 at 224x224."""
    s = "resnet18"
    out = [_conv(s, "resnet18.conv1", 3, 64, 224, k=7, stride=2),
           _conv(s, "resnet18.layer1.conv", 64, 64, 56)]
    for i, (cin, cout, hw) in enumerate(((64, 128, 56), (128, 256, 28), (256, 512, 14)), 2):
        out += [_conv(s, f"resnet18.layer{i}.0.conv1", cin, cout, hw, stride=2),
                _conv(s, f"resnet18.layer{i}.conv", cout, cout, hw // 2),
                _conv(s, f"resnet18.layer{i}.0.downsample", cin, cout, hw, k=1, stride=2)]
    out.append(KernelShape(s, "resnet18.fc", "linear", 512, 1000))
    return out


def cifar_shapes() -> list[KernelShape]:
    """The distinct shapes of the CIFAR ResNet-20 (16/32/64 channels at 32/16/8; the option-B
    1x1 shortcut of ``bench.models``)."""
    s = "cifar"
    out = [_conv(s, "resnet20.conv1", 3, 16, 32), _conv(s, "resnet20.layer1.conv", 16, 16, 32)]
    for i, (cin, cout, hw) in enumerate(((16, 32, 32), (32, 64, 16)), 2):
        out += [_conv(s, f"resnet20.layer{i}.0.conv1", cin, cout, hw, stride=2),
                _conv(s, f"resnet20.layer{i}.conv", cout, cout, hw // 2),
                _conv(s, f"resnet20.layer{i}.0.shortcut", cin, cout, hw, k=1, stride=2)]
    out.append(KernelShape(s, "resnet20.fc", "linear", 64, 10))
    return out


def gemv_shapes() -> list[KernelShape]:
    """The GEMV/GEMM probe shape of ``shared/notes/tvm.md`` §2 (K=4608, N=512; batch 1 is the
    GEMV, batch 64 the GEMM)."""
    return [KernelShape("gemv", "gemv.4608x512", "linear", 4608, 512)]


def bitnet_shapes() -> list[KernelShape]:
    """The distinct linear shapes of BitNet b1.58 2B (hidden 2560, FFN 6912): attention
    projections 2560->2560, FFN up/gate 2560->6912 and down 6912->2560; batch 1 is the decode
    GEMV, batch 64 a prefill-sized GEMM (the shapes bitnet.cpp publishes kernel figures for)."""
    s = "bitnet"
    return [KernelShape(s, "bitnet.attn.2560x2560", "linear", 2560, 2560),
            KernelShape(s, "bitnet.ffn_up.2560x6912", "linear", 2560, 6912),
            KernelShape(s, "bitnet.ffn_down.6912x2560", "linear", 6912, 2560)]


_SUITE_FUNCS: dict[str, Callable[[], list[KernelShape]]] = {
    "resnet18": resnet18_shapes, "cifar": cifar_shapes, "gemv": gemv_shapes,
    "bitnet": bitnet_shapes}


def select_shapes(which: str | Iterable[str] = "all",
                  layers: Iterable[str] | None = None) -> list[KernelShape]:
    """Shapes of the named suites (``resnet18``, ``cifar``, ``gemv``, ``bitnet``, ``all``; a
    comma list or an iterable), optionally only the layers matching one of the shell-style
    ``layers`` patterns (e.g. ``resnet18.layer3.*``, ``*fc``)."""
    names = [w.strip() for w in (which.split(",") if isinstance(which, str) else which)]
    names = [n for n in names if n]
    if not names or "all" in names:
        names = list(SUITES)
    bad = [n for n in names if n not in _SUITE_FUNCS]
    if bad:
        raise ValueError(f"unknown shape suite(s) {bad}; choose from {[*SUITES, 'all']}")
    out = [s for n in dict.fromkeys(names) for s in _SUITE_FUNCS[n]()]
    if layers is not None:
        pats = list(layers)
        out = [s for s in out if any(fnmatch.fnmatchcase(s.name, p) for p in pats)]
        if not out:
            raise ValueError(f"no layer of {names} matches {pats}")
    return out
