"""Top-1 accuracies the papers report, shown beside ours when the model and dataset match.

Sources and caveats are in ``shared/notes/methods.md`` §9; every value is as *reported*, never
measured here. Model names follow ternbench's registry (``resnet20`` is the CIFAR ResNet-20,
``resnet18`` torchvision's ResNet-18).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PaperNumber", "PAPER_NUMBERS", "matching"]


@dataclass(frozen=True)
class PaperNumber:
    method: str
    model: str
    dataset: str
    top1: float
    fp32_top1: float | None
    setting: str
    source: str


PAPER_NUMBERS: tuple[PaperNumber, ...] = (
    PaperNumber("ttn_re", "resnet20", "cifar10", 91.65, 91.70, "all layers ternary",
                "He & Fan, github.com/elliothe/Ternarized_Neural_Network README"),
    PaperNumber("ttn_re", "resnet18", "imagenet", 66.01, 69.75, "t_ex=1",
                "He & Fan, official README"),
    PaperNumber("ttn_re", "resnet18", "imagenet", 68.35, 69.75, "REL t_ex=2, ternary first/last",
                "He & Fan, official README"),
    PaperNumber("ttn_re", "resnet18", "imagenet", 69.44, 69.75, "REL t_ex=4, ternary first/last",
                "He & Fan, official README"),
    PaperNumber("ttq", "resnet20", "cifar10", 91.13, 91.77, "error 8.87% vs FP 8.23%",
                "Zhu et al., ICLR'17 / github.com/czhu95/ternarynet"),
    PaperNumber("sttn", "resnet18", "imagenet", 66.2, 69.3, "IJCAI'20",
                "Xu et al., IJCAI'20"),
    PaperNumber("sttn", "resnet18", "imagenet", 68.2, 69.3,
                "modified ResNet-18, 256 epochs, KD from ResNet-50",
                "github.com/WeixiangXu/STTN README"),
    PaperNumber("twn", "resnet18", "imagenet", 61.8, 65.4, "ResNet-18B, trained (not PTQ)",
                "Li & Liu 2016, v1 tables (unverified)"),
)


def matching(pairs: set[tuple[str, str]]) -> list[PaperNumber]:
    """Reported numbers whose (model, dataset) is among ``pairs``.

    Example:
        >>> [p.method for p in matching({("resnet20", "cifar10")})]
        ['ttn_re', 'ttq']
    """
    return [p for p in PAPER_NUMBERS if (p.model, p.dataset) in pairs]
