"""Top-1 accuracies the papers report, shown beside ours when the model and dataset match.

The numbers are facts each method declares in its own file (``@register_method(...,
paper_numbers=..., paper_deltas=...)``); this module reads them through the public
``ternbench.methods`` API (no ``bench``) and matches them to a report's models and datasets.
Sources and caveats are in ``shared/notes/methods.md`` §9; every value is as *reported*, never
measured here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing ternbench.methods loads torch: only when the numbers are read
    from ternbench.methods import PaperDelta, PaperNumber

__all__ = [
    "PaperNumber", "PaperDelta", "paper_numbers", "paper_deltas", "matching", "closest_delta",
]

log = logging.getLogger(__name__)


def paper_numbers() -> tuple[PaperNumber, ...]:
    """The registered methods' reported numbers ((), with a log line, without a registry)."""
    try:
        from ternbench.methods import paper_numbers as registered

        return registered()
    except Exception as exc:  # the report must still build without torch / a broken plugin
        log.info("method registry unavailable (%s); no paper numbers", exc)
        return ()


def paper_deltas() -> tuple[PaperDelta, ...]:
    """The registered methods' reported deltas vs FP32 (numbers' deltas, then stated ones)."""
    try:
        from ternbench.methods import paper_deltas as registered

        return registered()
    except Exception as exc:
        log.info("method registry unavailable (%s); no paper deltas", exc)
        return ()


def __getattr__(name: str) -> Any:  # the former constants, now read from the registry
    if name == "PAPER_NUMBERS":
        return paper_numbers()
    if name == "PAPER_DELTAS":
        return paper_deltas()
    if name in ("PaperNumber", "PaperDelta"):
        import ternbench.methods as methods

        return getattr(methods, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def matching(pairs: set[tuple[str, str]]) -> list[PaperNumber]:
    """Reported numbers whose (model, dataset) is among ``pairs``.

    Example:
        >>> [p.method for p in matching({("resnet20", "cifar10")})]
        ['ttq', 'ttn_re']
    """
    return [p for p in paper_numbers() if (p.model, p.dataset) in pairs]


#: models of one family (closest match when the paper has no number for ours)
_FAMILY = {"resnet8": "cifar-resnet", "resnet20": "cifar-resnet", "sttn_resnet8": "cifar-resnet",
           "sttn_resnet20": "cifar-resnet", "resnet18": "resnet18", "sttn_resnet18": "resnet18"}
_DATA_FAMILY = {"cifar10": "small", "cifar100": "small", "fashion-mnist": "small",
                "imagenet": "imagenet"}


def closest_delta(method: str, model: str, dataset: str) -> PaperDelta | None:
    """The paper's delta for ``method`` on ``model``/``dataset``, else the closest one: same
    dataset and model family first, then same kind of dataset (small images vs ImageNet), then
    the paper's first number. None when the method declares no delta.

    Example:
        >>> closest_delta("ttq", "resnet8", "fashion-mnist").model
        'resnet20'
        >>> closest_delta("rtn", "resnet8", "fashion-mnist") is None
        True
    """
    cands = [d for d in paper_deltas() if d.method == method]
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
