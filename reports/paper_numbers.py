"""Top-1 accuracies the papers report, shown beside ours when the model and dataset match.

Sources and caveats are in ``shared/notes/methods.md`` §9; every value is as *reported*, never
measured here. Model names follow ternbench's registry (``resnet20`` is the CIFAR ResNet-20,
``resnet18`` torchvision's ResNet-18).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "PaperNumber", "PAPER_NUMBERS", "PaperDelta", "PAPER_DELTAS", "matching", "closest_delta",
]


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


#: the deltas of :data:`PAPER_NUMBERS` plus papers that state only a drop (notes §9)
PAPER_DELTAS: tuple[PaperDelta, ...] = tuple(
    PaperDelta(p.method, p.model, p.dataset, round(p.top1 - p.fp32_top1, 2), p.setting, p.source)
    for p in PAPER_NUMBERS
    if p.fp32_top1 is not None
) + (
    PaperDelta("fgq", "resnet50", "imagenet", -4.2, "N=4, 8-bit activations, no retraining "
               "('within 4.2%')", "Mellempudi et al. 2017, abstract"),
    PaperDelta("fgq", "resnet101", "imagenet", -3.7, "N=4, 8-bit activations, no retraining",
               "Mellempudi et al. 2017, abstract"),
    PaperDelta("trn", "resnet101", "imagenet", -1.0, "8-2 + residual edges ('~1% drop')",
               "Kundu et al. 2017, abstract"),
    PaperDelta("ttq", "alexnet", "imagenet", 0.3, "from scratch (error 42.5% vs 42.8%)",
               "Zhu et al., ICLR'17"),
)

#: models of one family (closest match when the paper has no number for ours)
_FAMILY = {"resnet8": "cifar-resnet", "resnet20": "cifar-resnet", "sttn_resnet8": "cifar-resnet",
           "sttn_resnet20": "cifar-resnet", "resnet18": "resnet18", "sttn_resnet18": "resnet18"}
_DATA_FAMILY = {"cifar10": "small", "cifar100": "small", "fashion-mnist": "small",
                "imagenet": "imagenet"}


def closest_delta(method: str, model: str, dataset: str) -> PaperDelta | None:
    """The paper's delta for ``method`` on ``model``/``dataset``, else the closest one: same
    dataset and model family first, then same kind of dataset (small images vs ImageNet), then
    the paper's first number. RTN has none (its absolute top-1 was not retrieved).

    Example:
        >>> closest_delta("ttq", "resnet8", "fashion-mnist").model
        'resnet20'
        >>> closest_delta("rtn", "resnet8", "fashion-mnist") is None
        True
    """
    cands = [d for d in PAPER_DELTAS if d.method == method]
    if not cands:
        return None

    def score(d: PaperDelta) -> tuple[int, int, int, int]:
        return (
            int(d.model == model and d.dataset == dataset),
            int(d.dataset == dataset),
            int(_FAMILY.get(d.model, d.model) == _FAMILY.get(model, model)),
            int(_DATA_FAMILY.get(d.dataset, d.dataset) == _DATA_FAMILY.get(dataset, dataset)),
        )

    return max(cands, key=score)  # max keeps the first of equal scores
