"""Contracts every method plugin meets: configs, the quantized model and its deployable export.

A method turns an FP32 ``nn.Module`` into a :class:`QuantizedModel`:

* ``module`` is the fake-quant graph whose forward gives the accuracy;
* ``export()`` returns the deployable form, one :class:`LayerExport` per quantized conv/linear
  (integer codes, scales, group size, activation quantizer), the only thing the TVM schedules see;
* ``cost()`` summarises effective bits per weight (scales included), sparsity and op counts.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, TypedDict, runtime_checkable

import numpy as np
import torch
from ternbench.core.errors import ConfigError
from ternbench.core.export import ActMode, LayerExport, WeightFormat
from torch import nn

__all__ = [
    "ConfigError",
    "MethodConfig",
    "LayerExport",
    "CostSummary",
    "QuantContext",
    "QuantInfo",
    "ROW_COUNTS",
    "QuantizedModel",
    "TernaryMethod",
    "WeightFormat",
    "ActMode",
    "FirstLast",
]

FirstLast = Literal["fp32", "int8", "same"]


def _check(cond: bool, cls: str, field_name: str, rule: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{cls}.{field_name} must be {rule}, got {value!r}")


@dataclass(frozen=True)
class MethodConfig:
    """Knobs shared by every method; subclasses add their own fields and checks.

    Frozen and self-validating (torchao style): a bad value raises :class:`ConfigError` naming
    the field.

    Example:
        >>> MethodConfig(act_bits=8).act_bits
        8
        >>> MethodConfig(act_bits=3)
        Traceback (most recent call last):
        ...
        ternbench.core.errors.ConfigError: MethodConfig.act_bits must be one of (4, 8, 32), got 3
    """

    #: activation precision fed to quantized layers (32 = float, 8/4 = symmetric integer)
    act_bits: int = 8
    #: policy for the first conv and the last linear layer: keep FP32, use 8-8, or the method itself
    first_last: FirstLast = "int8"
    #: re-estimate BatchNorm statistics after quantization (post-training methods)
    bn_recalibrate: bool = True

    allowed_act_bits: ClassVar[tuple[int, ...]] = (4, 8, 32)

    def __post_init__(self) -> None:
        cls = type(self).__name__
        _check(
            self.act_bits in self.allowed_act_bits,
            cls,
            "act_bits",
            f"one of {self.allowed_act_bits}",
            self.act_bits,
        )
        _check(
            self.first_last in ("fp32", "int8", "same"),
            cls,
            "first_last",
            "one of ('fp32', 'int8', 'same')",
            self.first_last,
        )
        _check(
            isinstance(self.bn_recalibrate, bool),
            cls,
            "bn_recalibrate",
            "a bool",
            self.bn_recalibrate,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class CostSummary:
    """Model-level cost of the deployable form, per inference of one sample."""

    effective_bits: float  # bits per weight, scales and residual edges included
    sparsity: float  # fraction of zero codes over all stored ternary codes, edges included
    muls: int  # multiplications per inference
    adds: int  # additions per inference
    params: int  # conv/linear weights counted
    ternary_fraction: float  # fraction of weights stored as ternary

    def as_metrics(self) -> dict[str, tuple[float, str]]:
        return {
            "effective_bits": (self.effective_bits, "bits/weight"),
            "sparsity": (self.sparsity, "fraction"),
            "muls": (float(self.muls), "ops"),
            "adds": (float(self.adds), "ops"),
            "params": (float(self.params), "count"),
            "ternary_fraction": (self.ternary_fraction, "fraction"),
        }


def summarize_cost(layers: Iterable[LayerExport]) -> CostSummary:
    """Cost of a set of exported layers.

    A ternary MAC is an add/sub (zeros skipped); each group contributes one multiply by its
    scale per output. Int8 and FP32 MACs count as one multiply and one add.
    """
    bits = params = muls = adds = 0
    tern_params = tern_zeros = tern_primary = 0
    for lx in layers:
        n = lx.codes.size
        if not lx.branch_of:  # a residual edge adds bits and ops, not weights
            params += n
        bits += lx.weight_bits()
        ho, wo = lx.output_hw
        pos = ho * wo
        if lx.weight_format == "ternary":
            nnz = int(np.count_nonzero(lx.codes))
            tern_params += n
            tern_primary += 0 if lx.branch_of else n
            tern_zeros += n - nnz
            adds += nnz * pos
            muls += lx.out_channels * lx.n_groups * pos
        else:
            muls += n * pos
            adds += n * pos
    return CostSummary(
        effective_bits=bits / max(params, 1),
        sparsity=tern_zeros / tern_params if tern_params else 0.0,
        muls=muls,
        adds=adds,
        params=params,
        ternary_fraction=tern_primary / max(params, 1),
    )


@dataclass
class QuantContext:
    """What a method may use while quantizing: data and budgets, chosen by the profile.

    Loaders yield ``(x, y)`` float/long batches. ``train_epochs`` is the QAT/fine-tune budget of
    the profile; a method's own config may override it.
    """

    calib_loader: Iterable[tuple[torch.Tensor, torch.Tensor]]
    train_loader: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None
    seed: int = 0
    device: str = "cpu"
    train_epochs: float = 0.0
    bn_batches: int = 50
    #: where QAT writes a checkpoint every epoch and resumes from (None: no checkpoints)
    checkpoint_dir: str | None = None
    progress: bool | None = None
    #: held-out images for the training curve (validation top-1 at ``eval_points`` steps)
    val_loader: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None
    eval_points: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class QuantInfo(TypedDict, total=False):
    """What a quantize run records (``QuantizedModel.info``): one set of keys for every method.

    The quantize flow (:func:`ternbench.methods._flow.quantize_flow`) fills the common keys;
    a key is absent when its step did not run. The harness reports ``bn_recalibrated`` and the
    :data:`ROW_COUNTS` as result rows and writes the ledger keys (``recipe``, ``paper_recipe``,
    ``deviations``) to ``run.json``.
    """

    # preparation: BatchNorm re-estimation and activation calibration
    bn_recalibrated: bool
    bn_batches: int  # batches BatchNorm statistics were re-estimated on
    calib_samples: int  # images activation ranges were recorded on
    # post-training methods: the optional STE fine-tune
    finetune_epochs: float
    # training-time methods: the deviations ledger ...
    recipe: dict[str, Any]  # the QATRecipe actually used, epochs resolved
    paper_recipe: str  # what the paper did (text)
    deviations: list[str]  # how this run differs from the paper
    # ... and the training record
    epochs_run: float  # epochs of training the returned weights have had
    resumed_from_epoch: int  # finished epochs loaded from a checkpoint (0: a fresh run)
    train_seconds: float
    train_steps: int
    final_train_loss: float | None  # mean loss of the last epoch (None: no training)
    train_history: list[dict[str, Any]]  # per epoch
    train_curve: list[dict[str, Any]]  # validation top-1 and train loss per evaluation point
    # method-specific figures
    thresholds: list[float]  # TTN-RE: the branch thresholds
    edge_ranking: list[str]  # TRN: residual edges in the order they are switched on
    edges_total: int  # TRN
    active_edges: int  # TRN: edges switched on
    sensitivity: dict[str, float]  # TRN: loss increase per layer ternarized alone
    eps_base: dict[str, float]  # TRN: relative weight error of the base per layer


#: the :class:`QuantInfo` counts reported as result rows (unit ``count``) when present
ROW_COUNTS: tuple[str, ...] = ("edges_total", "active_edges", "epochs_run", "resumed_from_epoch")


@dataclass
class QuantizedModel:
    """Result of :meth:`TernaryMethod.quantize`."""

    module: nn.Module
    method: str
    config: MethodConfig
    info: QuantInfo = field(default_factory=lambda: QuantInfo())

    def quant_layers(self) -> Iterator[tuple[str, Any]]:
        from ._layers import QuantLayer

        for name, m in self.module.named_modules():
            if isinstance(m, QuantLayer):
                yield name, m

    def export(self, include_disabled: bool = False) -> dict[str, LayerExport]:
        """Deployable form of every conv/linear layer (and branch), keyed by module name.

        Branches switched off at run time are left out unless ``include_disabled``.
        """
        out: dict[str, LayerExport] = {}
        for name, m in self.quant_layers():
            for lx in m.exports(name):
                if lx.enabled or include_disabled:
                    out[lx.name] = lx
        return out

    def cost(self) -> CostSummary:
        return summarize_cost(self.export().values())


@runtime_checkable
class TernaryMethod(Protocol):
    """The interface every registered method implements."""

    @property
    def name(self) -> str: ...

    @property
    def config(self) -> MethodConfig: ...

    def quantize(self, model: nn.Module, ctx: QuantContext) -> QuantizedModel:
        """Return a new quantized model; ``model`` itself is left untouched."""
        ...


def config_from_mapping(cls: type[MethodConfig], values: Mapping[str, Any]) -> MethodConfig:
    """Build ``cls`` from user values, naming unknown fields with a suggestion."""
    import difflib

    known = cls.field_names()
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{cls.__name__} has no field '{key}'.{hint} Fields: {', '.join(known)}"
            )
    # true/false are not numbers: bool is an int subclass in Python, so a numeric field's own
    # isinstance check would let `--set fgq.group_size=true` through as 1
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, bool) and isinstance(default, int | float) and not isinstance(
            default, bool
        ):
            kind = "an integer" if isinstance(default, int) else "a number"
            raise ConfigError(f"{cls.__name__}.{key} must be {kind}, got {value!r}")
    return cls(**values)
