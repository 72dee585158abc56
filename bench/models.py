"""Model registry: CIFAR-style ResNet-8/20, torchvision's ResNet-18, and the STTN layout.

The weight layers are only ``Conv2d`` (groups=1, dilation=1) and ``Linear``, because the
quantization layer swap (``ternbench.methods._layers``) replaces exactly those modules; the
first conv is the first such module and the classifier the last, in module order. The rest is
``BatchNorm2d``, ``ReLU`` and pooling, plus ``Hardtanh``/``PReLU`` and a parameter-free
shortcut in the ``sttn_*`` models (the STTN repository's block, see :class:`STTNResNet`).

Example:
    >>> import torch
    >>> from ternbench.bench.models import create_model
    >>> m = create_model("resnet8", in_chans=1, num_classes=10)
    >>> m(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CifarResNet",
    "BasicBlock",
    "STTNResNet",
    "STTNUnit",
    "ParamFreeShortcut",
    "list_models",
    "create_model",
    "get_model_info",
    "BLOCK_FORMS",
    "model_for_block",
]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (He et al. 2016).

    The shortcut is option B: a strided 1x1 conv + BN when the shape changes, so every weight
    layer is a Conv2d/Linear that the quantizers can see (option A's zero-padding has none).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet-(6n+2): 3x3 stem, three stages of 16/32/64 channels, avg pool, Linear.

    ``blocks_per_stage`` = n (1 for ResNet-8, 3 for ResNet-20). Works for any input size (global
    average pooling); stages 2 and 3 halve the resolution.
    """

    def __init__(self, blocks_per_stage: int, *, in_chans: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


class ParamFreeShortcut(nn.Module):
    """Parameter-free downsampling shortcut (STTN, Bi-Real style): a 2x2 max-pool when the
    stride is 2, then zero channels appended up to ``planes``.

    ``ceil_mode`` makes odd sizes match a 3x3/2 conv with padding 1 (7 -> 4).
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        if planes < in_planes or stride not in (1, 2):
            raise ValueError(
                f"ParamFreeShortcut needs planes >= in_planes and stride 1 or 2, got "
                f"{in_planes}->{planes}, stride {stride}"
            )
        self.pool: nn.Module = nn.MaxPool2d(2, 2, ceil_mode=True) if stride == 2 else nn.Identity()
        self.extra = planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        y = self.pool(x)
        if self.extra == 0:
            return y
        # zero channels appended (F.pad keeps the module torch.fx-traceable: the whole-model
        # latency path and torch's FX INT8 quantization trace it)
        return F.pad(y, (0, 0, 0, 0, 0, self.extra))


class STTNUnit(nn.Module):
    """One conv of the STTN repository's block: BN -> Hardtanh -> conv3x3 -> BN -> + shortcut
    -> PReLU, every conv with its own shortcut.

    The FP32 model carries ``Hardtanh`` (the repo's float option) where the ternary activation
    goes: the STTN/RTN quantizers put theirs on the conv input, and a ternary activation with
    threshold 0.5 and an STE on ``|x| < 1`` gives the same values and gradients after it.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm2d(in_planes)
        self.act = nn.Hardtanh()
        self.conv = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn_out = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = ParamFreeShortcut(in_planes, planes, stride)
        self.prelu = nn.PReLU(planes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn_out(self.conv(self.act(self.bn_in(x))))
        return self.prelu(out + self.shortcut(x))


class STTNResNet(nn.Module):
    """The STTN repository's ResNet (``resnet18_bwx2``) layout at any depth.

    A stem (3x3/1 conv for small images, else 7x7/2 conv + 3x3/2 max pool) -> BN -> PReLU;
    stages of blocks, each block two :class:`STTNUnit` (the first of a stage may downsample);
    global average pool; Linear. Stem conv and Linear are the first and last weight layers
    (kept FP32 by STTN).
    """

    def __init__(
        self,
        widths: tuple[int, ...],
        blocks_per_stage: int,
        *,
        in_chans: int = 3,
        num_classes: int = 10,
        small_stem: bool = True,
    ) -> None:
        super().__init__()
        stem: list[nn.Module]
        if small_stem:
            stem = [nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)]
        else:
            stem = [nn.Conv2d(in_chans, widths[0], 7, stride=2, padding=3, bias=False)]
        stem += [nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0])]
        if not small_stem:
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)
        units: list[nn.Module] = []
        in_planes = widths[0]
        for i, planes in enumerate(widths):
            for b in range(blocks_per_stage):
                stride = 2 if i > 0 and b == 0 else 1
                units.append(STTNUnit(in_planes, planes, stride))
                units.append(STTNUnit(planes, planes, 1))
                in_planes = planes
        self.features = nn.Sequential(*units)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.stem(x))
        return self.fc(self.avgpool(x).flatten(1))


def _init_weights(model: nn.Module) -> None:
    # He init for convs (as in the ResNet papers / torchvision), unit BN, default Linear.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _resnet18(in_chans: int, num_classes: int, image_size: int | None) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    if image_size is not None and image_size <= 64:
        # Small images (CIFAR, Fashion-MNIST): the 7x7/2 stem + max pool would shrink 32 px to
        # 8 px before the first stage; the usual CIFAR adaptation is a 3x3/1 stem without pool.
        model.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    elif in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


#: block forms a method can declare it needs (``register_method(..., block=...)``):
#: ``plain`` = the model as named (conv-BN-ReLU); ``preact`` = BN before the (ternary) activation
#: that feeds every quantized conv, so a ternary activation sees signed inputs and really is
#: {-1, 0, +1} (not {0, +1} after a ReLU): the STTN repository's block (:class:`STTNUnit`).
BLOCK_FORMS = ("plain", "preact")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    factory: Callable[[int, int, int | None], nn.Module]
    #: the same network in another block form: block form -> registered model name
    variants: dict[str, str] = field(default_factory=dict)


_MODELS: dict[str, ModelInfo] = {
    "resnet8": ModelInfo(
        "resnet8",
        "CIFAR-style ResNet-8 (1 BasicBlock per stage, 16/32/64 ch, ~78k params)",
        lambda c, k, s: CifarResNet(1, in_chans=c, num_classes=k),
        variants={"preact": "sttn_resnet8"},
    ),
    "resnet20": ModelInfo(
        "resnet20",
        "CIFAR-style ResNet-20 (3 BasicBlocks per stage, 16/32/64 ch, ~0.27M params)",
        lambda c, k, s: CifarResNet(3, in_chans=c, num_classes=k),
        variants={"preact": "sttn_resnet20"},
    ),
    "resnet18": ModelInfo(
        "resnet18",
        "torchvision ResNet-18 (11.7M params); 3x3/1 stem without max pool for images <= 64 px",
        _resnet18,
        variants={"preact": "sttn_resnet18"},
    ),
    "sttn_resnet8": ModelInfo(
        "sttn_resnet8",
        "STTN-repo layout, ResNet-8 size (BN-act-conv-BN-add-PReLU per conv, max-pool + "
        "zero-channel downsampling, 16/32/64 ch)",
        lambda c, k, s: STTNResNet((16, 32, 64), 1, in_chans=c, num_classes=k),
    ),
    "sttn_resnet20": ModelInfo(
        "sttn_resnet20",
        "STTN-repo layout, ResNet-20 size (3 blocks of 2 units per stage, 16/32/64 ch)",
        lambda c, k, s: STTNResNet((16, 32, 64), 3, in_chans=c, num_classes=k),
    ),
    "sttn_resnet18": ModelInfo(
        "sttn_resnet18",
        "STTN-repo ResNet-18 (resnet18_bwx2 without the binary split, 64-512 ch); 3x3/1 stem "
        "without max pool for images <= 64 px",
        lambda c, k, s: STTNResNet(
            (64, 128, 256, 512),
            2,
            in_chans=c,
            num_classes=k,
            small_stem=s is not None and s <= 64,
        ),
    ),
}


def model_for_block(name: str, block: str | None) -> str:
    """The registered model that is ``name`` in block form ``block`` (``None``/``plain``, or a
    model without that variant: ``name`` itself).

    Example:
        >>> model_for_block("resnet8", "preact"), model_for_block("resnet8", None)
        ('sttn_resnet8', 'resnet8')
    """
    if block is None or block == "plain":
        return name
    if block not in BLOCK_FORMS:
        raise ValueError(f"unknown block form {block!r}; known: {', '.join(BLOCK_FORMS)}")
    return get_model_info(name).variants.get(block, name)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``.

    Example:
        >>> list_models("resnet*")
        ['resnet8', 'resnet20', 'resnet18']
    """
    return [n for n in _MODELS if fnmatch.fnmatchcase(n, pattern)]


def get_model_info(name: str) -> ModelInfo:
    """Registry entry of ``name``; unknown names raise ``ValueError`` with suggestions."""
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_MODELS), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        avail = ", ".join(_MODELS)
        raise ValueError(f"Unknown model {name!r}.{hint} Available: {avail}.") from None


def create_model(
    name: str, *, in_chans: int, num_classes: int, image_size: int | None = None
) -> nn.Module:
    """Build a freshly initialised model (FP32, train mode).

    Args:
        name: a name from :func:`list_models`.
        in_chans: input channels (1 for Fashion-MNIST, 3 for CIFAR/ImageNet).
        num_classes: classifier outputs.
        image_size: input side length; only ResNet-18 uses it (small-image stem for <= 64 px).
    """
    info = get_model_info(name)
    if in_chans < 1 or num_classes < 1:
        raise ValueError(
            f"in_chans and num_classes must be >= 1, got in_chans={in_chans}, "
            f"num_classes={num_classes}"
        )
    return info.factory(in_chans, num_classes, image_size)
