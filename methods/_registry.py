"""Method registry (timm style): a decorator on factories, wildcard listing, entry-point plugins.

Built-in methods register through the ``ternbench.methods`` entry-point group exactly like
third-party plugins: loading a group entry imports its module, whose ``@register_method``
decorators fill the registry.

Everything the harness knows about a method is a fact declared there, in the method's own file:
its kind, default sweep and named ablations, paper recipe overrides and reported numbers, the
block form its paper uses, its display order, whether a plain ``ternbench run`` or
``ternbench kernels --whole-model`` includes it, and whether it is the reference the deltas are
taken against. Generic code (``bench``, ``schedules``, ``reports``) reads these facts and names
no method.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal

from ._base import MethodConfig, TernaryMethod, config_from_mapping
from ._facts import PaperDelta, PaperNumber

__all__ = [
    "MethodInfo",
    "UnknownMethodError",
    "register_method",
    "create_method",
    "list_methods",
    "get_method_info",
    "reference_method",
    "default_methods",
    "whole_model_methods",
    "ablations",
    "paper_numbers",
    "paper_deltas",
    "ENTRY_POINT_GROUP",
]

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "ternbench.methods"
# imported when the package metadata is not available (e.g. running from an unpacked sdist)
_BUILTIN_MODULES = (
    "ternbench.methods.baselines",
    "ternbench.methods.fgq",
    "ternbench.methods.ttn_re",
    "ternbench.methods.ttq",
    "ternbench.methods.rtn",
    "ternbench.methods.sttn",
    "ternbench.methods.trn",
)

Kind = Literal["baseline", "ptq", "qat"]
#: named ablations of one method: ablation name -> config field -> values
Ablations = dict[str, dict[str, tuple[Any, ...]]]


class UnknownMethodError(ValueError):
    """Raised for a method name that is not registered; the message suggests close names."""


@dataclass(frozen=True)
class MethodInfo:
    name: str
    factory: Callable[[MethodConfig], TernaryMethod]
    config_cls: type[MethodConfig]
    paper: str
    kind: Kind
    module: str
    distribution: str | None = None
    #: swept by the harness when the user gives no sweep for this method
    default_sweep: dict[str, tuple[Any, ...]] | None = None
    #: config fields that reproduce the paper's recipe; applied by the ``paper`` profile
    paper_overrides: dict[str, Any] | None = None
    #: the block form the method's paper uses (see ``BLOCK_FORMS`` in bench's ``models``):
    #: ``"preact"`` = BN before the ternary activation; None = the model as named
    block: str | None = None
    #: the method's QAT step budget relative to the profile's ``train_steps``: weight-only
    #: fine-tunes (TTQ, TTN-RE) need ~4 epochs of Fashion-MNIST to land within a point of FP32
    #: and cost a third of an activation-ternary step with KD
    budget_scale: float = 1.0
    #: named ablations (``--ablation NAME``): name -> config field -> values; an ablation
    #: declared by several methods sweeps all of them
    ablations: Ablations | None = None
    #: top-1 numbers the paper reports (shown beside ours when model and dataset match)
    paper_numbers: tuple[PaperNumber, ...] = ()
    #: deltas vs FP32 the paper states without absolute numbers (beside those of
    #: ``paper_numbers``)
    paper_deltas: tuple[PaperDelta, ...] = ()
    #: display order (registry listings, report rows, plot colours); ties sort by name
    order: int = 10
    #: part of a ``ternbench run`` that names no methods
    default_run: bool = False
    #: position in the default ``ternbench kernels --whole-model`` method list (None: not in it)
    whole_model: int | None = None
    #: the unquantized reference every delta and speed-up is taken against (one method)
    reference: bool = False

    @property
    def trains(self) -> bool:
        """Whether quantizing trains the model (a budget of epochs applies)."""
        return self.kind == "qat"

    def all_paper_deltas(self) -> tuple[PaperDelta, ...]:
        """The deltas of :attr:`paper_numbers` (those with an FP32 number), then
        :attr:`paper_deltas`."""
        derived = tuple(d for d in (p.delta() for p in self.paper_numbers) if d is not None)
        return derived + self.paper_deltas

    def summary(self) -> str:
        return self.paper.split(",")[0] if self.paper else ""


_REGISTRY: dict[str, MethodInfo] = {}
_LOCK = threading.Lock()
_LOADED = False
_CURRENT_DIST: str | None = None


def register_method(
    name: str | None = None,
    *,
    config: type[MethodConfig],
    paper: str,
    kind: Kind,
    default_sweep: dict[str, tuple[Any, ...]] | None = None,
    paper_overrides: dict[str, Any] | None = None,
    block: str | None = None,
    budget_scale: float = 1.0,
    ablations: Ablations | None = None,
    paper_numbers: tuple[PaperNumber, ...] = (),
    paper_deltas: tuple[PaperDelta, ...] = (),
    order: int = 10,
    default_run: bool = False,
    whole_model: int | None = None,
    reference: bool = False,
) -> Callable[[Callable[[MethodConfig], TernaryMethod]], Callable[[MethodConfig], TernaryMethod]]:
    """Register ``factory(config) -> TernaryMethod`` under ``name`` (default: function name),
    with the method's facts (see :class:`MethodInfo`).

    Example:
        >>> from ternbench.methods import MethodConfig, register_method
        >>> @register_method("my_method", config=MethodConfig, paper="Me 2026", kind="ptq")
        ... def my_method(cfg): ...
    """

    def deco(
        factory: Callable[[MethodConfig], TernaryMethod],
    ) -> Callable[[MethodConfig], TernaryMethod]:
        key = (name or factory.__name__).lower()
        info = MethodInfo(
            key, factory, config, paper, kind, factory.__module__, _CURRENT_DIST, default_sweep,
            paper_overrides, block, float(budget_scale),
            ablations={a: {f: tuple(v) for f, v in axes.items()}
                       for a, axes in (ablations or {}).items()} or None,
            paper_numbers=tuple(dataclasses.replace(p, method=key) for p in paper_numbers),
            paper_deltas=tuple(dataclasses.replace(d, method=key) for d in paper_deltas),
            order=int(order), default_run=bool(default_run), whole_model=whole_model,
            reference=bool(reference),
        )
        old = _REGISTRY.get(key)
        if old is not None and old.module != info.module:
            log.warning(
                "method %r registered twice: %s (%s) replaces %s (%s)",
                key,
                info.module,
                info.distribution or "?",
                old.module,
                old.distribution or "?",
            )
        _REGISTRY[key] = info
        return factory

    return deco


def _load_plugins() -> None:
    """Import every module of the entry-point group once; broken plugins are logged, skipped."""
    global _LOADED, _CURRENT_DIST
    with _LOCK:
        if _LOADED:
            return
        _LOADED = True
        eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
        if not any(ep.value.startswith("ternbench.") for ep in eps):
            eps_builtin = [(m, None) for m in _BUILTIN_MODULES]
        else:
            eps_builtin = []
        for mod, _ in eps_builtin:
            importlib.import_module(mod)
        for ep in eps:
            _CURRENT_DIST = ep.dist.name if ep.dist is not None else None
            try:
                ep.load()
            except Exception as exc:  # a broken plugin must not break `ternbench list`
                log.error("method plugin %r (%s) failed to load: %s", ep.name, ep.value, exc)
            finally:
                _CURRENT_DIST = None


def list_methods(pattern: str = "*", kind: Kind | None = None) -> list[str]:
    """Registered method names matching a shell-style ``pattern`` (timm's ``list_models``).

    Example:
        >>> "fgq" in list_methods("fg*")
        True
    """
    _load_plugins()
    names = [n for n, i in _REGISTRY.items() if kind is None or i.kind == kind]
    pats = [p.strip().lower() for p in pattern.split(",") if p.strip()] or ["*"]
    return [n for n in _ordered(names) if any(fnmatch.fnmatchcase(n, p) for p in pats)]


def _ordered(names: list[str]) -> list[str]:
    """``names`` in display order: each method's registered ``order``, then by name."""
    return sorted(names, key=lambda n: (_REGISTRY[n].order if n in _REGISTRY else 10, n))


def _infos() -> list[MethodInfo]:
    _load_plugins()
    return [_REGISTRY[n] for n in _ordered(list(_REGISTRY))]


def reference_method() -> str | None:
    """The method registered as the reference (``reference=True``), or None.

    Example:
        >>> reference_method()
        'fp32'
    """
    refs = [i.name for i in _infos() if i.reference]
    if len(refs) > 1:
        log.warning("several reference methods registered (%s); using %r", refs, refs[0])
    return refs[0] if refs else None


def default_methods() -> tuple[str, ...]:
    """The methods of a ``ternbench run`` that names none (``default_run=True``), in order."""
    return tuple(i.name for i in _infos() if i.default_run)


def whole_model_methods() -> list[str]:
    """The default methods of ``ternbench kernels --whole-model`` (``whole_model`` positions)."""
    chosen = [i for i in _infos() if i.whole_model is not None]
    return [i.name for i in sorted(chosen, key=lambda i: (i.whole_model, i.name))]


def ablations() -> dict[str, dict[str, dict[str, tuple[Any, ...]]]]:
    """Named ablations, sorted by name: ablation -> method -> field -> values, the union over
    the methods that declare it (in registry order).

    Example:
        >>> ablations()["fgq-group-size"]
        {'fgq': {'group_size': (4, 8, 16, 32, 64)}}
    """
    out: dict[str, dict[str, dict[str, tuple[Any, ...]]]] = {}
    for info in _infos():
        for name, axes in (info.ablations or {}).items():
            out.setdefault(name, {})[info.name] = dict(axes)
    return {k: out[k] for k in sorted(out)}


def paper_numbers() -> tuple[PaperNumber, ...]:
    """Every registered method's reported top-1 numbers, in registry order."""
    return tuple(p for i in _infos() for p in i.paper_numbers)


def paper_deltas() -> tuple[PaperDelta, ...]:
    """Every registered method's reported deltas vs FP32 (derived from its numbers, then the
    stated ones), in registry order."""
    return tuple(d for i in _infos() for d in i.all_paper_deltas())


def get_method_info(name: str) -> MethodInfo:
    _load_plugins()
    key = name.strip().lower()
    if key not in _REGISTRY:
        available = _ordered(list(_REGISTRY))
        close = difflib.get_close_matches(key, available, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownMethodError(
            f"Unknown method {name!r}.{hint} Available: {', '.join(available)}. "
            f"Third-party methods register via the {ENTRY_POINT_GROUP!r} entry-point group."
        )
    return _REGISTRY[key]


def create_method(
    name: str, overrides: Mapping[str, Any] | None = None, **kwargs: Any
) -> TernaryMethod:
    """Build a method from its registered config with ``overrides`` (``None`` values dropped).

    Example:
        >>> create_method("fgq", group_size=8).config.group_size
        8
    """
    info = get_method_info(name)
    values = {**(overrides or {}), **kwargs}
    values = {k: v for k, v in values.items() if v is not None}
    cfg = config_from_mapping(info.config_cls, values)
    return info.factory(cfg)
