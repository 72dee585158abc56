"""Method registry (timm style): a decorator on factories, wildcard listing, entry-point plugins.

Built-in methods register through the ``ternbench.methods`` entry-point group exactly like
third-party plugins: loading a group entry imports its module, whose ``@register_method``
decorators fill the registry.
"""

from __future__ import annotations

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

__all__ = [
    "MethodInfo",
    "UnknownMethodError",
    "register_method",
    "create_method",
    "list_methods",
    "get_method_info",
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
) -> Callable[[Callable[[MethodConfig], TernaryMethod]], Callable[[MethodConfig], TernaryMethod]]:
    """Register ``factory(config) -> TernaryMethod`` under ``name`` (default: function name).

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
    order = {"fp32": 0, "int8": 1, "twn": 2, "ttq": 3}
    return sorted(names, key=lambda n: (order.get(n, 10), n))


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
