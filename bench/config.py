"""Run configuration: profiles (how much work each cell does) and the validated ``BenchConfig``.

Example:
    >>> cfg = BenchConfig(methods=("fgq", "int8"), profile="smoke")
    >>> cfg.profile_obj.n_eval
    1000
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ternbench.core.train import TrainCfg
from ternbench.methods import (
    ConfigError,
    ablations,
    config_from_mapping,
    default_methods,
    get_method_info,
    list_methods,
)

__all__ = [  # and ABLATIONS (module __getattr__: read from the method registry)
    "Profile",
    "PROFILES",
    "BenchConfig",
    "parse_override",
    "parse_sweep",
    "merge_sweeps",
    "ConfigError",
]


@dataclass(frozen=True)
class Profile:
    """How much data and time every cell of a run gets."""

    name: str
    description: str
    #: recipe of the FP32 baseline every method starts from (trained once, cached)
    fp32: TrainCfg
    n_eval: int | None  # test images evaluated (None = the whole split)
    n_calib: int  # training images for activation calibration
    bn_batches: int  # training batches for BatchNorm re-estimation
    train_subset: int | None  # training images available to fine-tune/QAT
    train_epochs: float  # QAT / fine-tune budget handed to methods
    eval_shards: int  # evaluation tasks per cell (merged exactly)
    latency_number: int
    latency_repeat: int
    latency_min_repeat_ms: int
    batch_size: int = 256
    deploy_check_samples: int = 32
    #: apply each method's registered paper recipe (epochs, optimizer, schedule, KD)
    apply_paper_recipes: bool = False
    #: QAT / fine-tune budget in optimizer steps (batch 128); replaces ``train_epochs`` when set,
    #: so the budget does not depend on the dataset size
    train_steps: int | None = None
    #: training curve: validation top-1 on ``n_val`` held-out test images at ``eval_points``
    #: evenly spaced steps of every QAT run (0: no curve)
    n_val: int = 2000
    eval_points: int = 4
    #: the FP32 baseline may train at least this many steps (its cap, in epochs, is raised on
    #: small datasets; the plateau rule usually stops it earlier)
    fp32_min_steps: int = 0

    def qat_epochs(self, steps_per_epoch: int, scale: float = 1.0) -> float:
        """The QAT budget in epochs of a loader with ``steps_per_epoch`` batches, for a method
        whose registered ``budget_scale`` is ``scale``."""
        if self.train_steps is None:
            return self.train_epochs * scale
        return round(self.train_steps * scale) / max(steps_per_epoch, 1)

    def fp32_recipe(self, n_train: int) -> TrainCfg:
        """The FP32 recipe for a training set of ``n_train`` images: ``fp32.epochs``, raised so
        that training runs at least ``fp32_min_steps`` steps (a 4k-image set gets ~44 epochs
        where Fashion-MNIST's 60k get the 3 of the recipe)."""
        n = n_train if self.fp32.train_subset is None else min(n_train, self.fp32.train_subset)
        steps_per_epoch = max(1, math.ceil(n / self.fp32.batch_size))
        need = self.fp32_min_steps / steps_per_epoch
        if need <= self.fp32.epochs:
            return self.fp32
        return dataclasses.replace(self.fp32, epochs=float(math.ceil(need)))

    def digest(self) -> str:
        return hashlib.sha256(
            json.dumps(dataclasses.asdict(self), sort_keys=True, default=str).encode()
        ).hexdigest()[:10]


# The FP32 baseline recipe is shared by smoke and default so both start from the same cached
# (and shipped) checkpoint. It trains to its plateau (every delta is measured against it): SGD
# 0.1 until the top-1 on 8% held-out training images stops gaining 0.1 point over two checks of
# 250 steps, then x0.1 twice; ``epochs`` is only the cap (docs/measured/fidelity.md).
_FP32_DEFAULT = TrainCfg(epochs=20, batch_size=128, lr=0.1, seed=0, schedule="plateau",
                         val_fraction=0.08)
#: the FP32 cap in steps on small datasets (a 4k-image set: 188 epochs at most)
_FP32_MIN_STEPS = 6000
#: QAT steps of the default profile (batch 128): sized so that the main job
#: (``--methods sttn,rtn,fgq``) fits 10 minutes on 2 cores (docs/measured/fidelity.md)
TRAIN_STEPS_DEFAULT = 469

_DEFAULT = Profile(
    name="default",
    description="the main job: full test split, 1k calibration images, stable timings",
    fp32=_FP32_DEFAULT,
    n_eval=None,
    n_calib=1024,
    bn_batches=50,
    train_subset=None,
    train_epochs=1.0,
    train_steps=TRAIN_STEPS_DEFAULT,
    n_val=2000,
    eval_points=5,
    fp32_min_steps=_FP32_MIN_STEPS,
    eval_shards=4,
    latency_number=20,
    latency_repeat=7,
    latency_min_repeat_ms=20,
)

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        description="under a minute of accuracy work: 1k test images, few timing repeats",
        fp32=_FP32_DEFAULT,
        n_eval=1000,
        n_calib=256,
        bn_batches=8,
        train_subset=2048,
        train_epochs=0.25,
        n_val=256,
        eval_points=2,
        fp32_min_steps=_FP32_MIN_STEPS,
        eval_shards=2,
        latency_number=5,
        latency_repeat=3,
        latency_min_repeat_ms=5,
    ),
    "default": _DEFAULT,
    "long": dataclasses.replace(
        _DEFAULT, name="long",
        description="the default profile with 4x the QAT steps (about 4 epochs of 60k images), "
        "for methods the curves show unconverged",
        train_epochs=4.0, train_steps=4 * TRAIN_STEPS_DEFAULT, eval_points=8),
    "paper": Profile(
        name="paper",
        description="the papers' training recipes (epochs, optimizer, schedule, KD) on a longer "
        "FP32 baseline: days on CPU, meant for a GPU cluster",
        fp32=TrainCfg(epochs=30, batch_size=128, lr=0.1, seed=0),
        n_eval=None,
        n_calib=2048,
        bn_batches=100,
        train_subset=None,
        train_epochs=10.0,
        eval_shards=8,
        latency_number=50,
        latency_repeat=11,
        latency_min_repeat_ms=50,
        apply_paper_recipes=True,
    ),
}

Executor = Literal["ray", "local"]


def _fail(field_name: str, rule: str, value: Any) -> None:
    raise ConfigError(f"BenchConfig.{field_name} must be {rule}, got {value!r}")


@dataclass(frozen=True)
class BenchConfig:
    """Everything a ``ternbench run`` needs; validated on construction.

    ``overrides`` maps a method name to config-field values (``--set fgq.group_size=8``).
    """

    #: default: the methods registered with ``default_run=True`` (fp32, int8, twn, fgq)
    methods: tuple[str, ...] = field(default_factory=default_methods)
    models: tuple[str, ...] = ("resnet8",)
    datasets: tuple[str, ...] = ("fashion-mnist",)
    seeds: tuple[int, ...] = (0,)
    targets: tuple[str, ...] = ("x86",)
    profile: str = "default"
    out: Path = Path("runs/latest")
    executor: Executor = "ray"
    ray_address: str | None = None
    data_root: str | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per method, config fields with lists of values; the grid runs their cartesian product
    sweeps: dict[str, dict[str, tuple[Any, ...]]] = field(default_factory=dict)
    latency_threads: int = 1
    latency_batch: int = 1
    accuracy_threads: int = 1
    num_cpus: int | None = None
    #: the user's own FP32 weights (state dict; read with weights_only=True) instead of the
    #: cached/trained baseline; one model and one dataset per run then
    weights: str | None = None
    #: TVM RPC endpoint of an ARM board ("HOST:PORT" or "tracker=HOST:PORT,key=KEY"): ARM
    #: targets are then timed there instead of being verified under qemu
    rpc: str | None = None
    #: also time the whole deployed model end to end on x86 (beside torch FP32 eager and INT8)
    whole_model: bool = True
    #: evaluate on a deterministic class-stratified subset of N test images (replaces the
    #: profile's count)
    subset: int | None = None
    #: the class count the user expects (checked against the data's folder tree / the model)
    num_classes: int | None = None
    #: ImageFolder datasets: centre-crop side the images are resized to (default 224)
    image_size: int | None = None
    #: build every method on the model as named, not on the block form its paper uses
    #: (per method: ``--set rtn.block=plain``)
    plain_blocks: bool = False
    #: where the local executor trains and quantizes: auto = cuda for training-time (QAT)
    #: cells when a GPU is visible, else cpu
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: a collapsed (``degraded``) cell does not make the run exit non-zero
    allow_degraded: bool = False
    #: QAT budget in steps (replaces the profile's ``train_steps``; times each method's
    #: registered ``budget_scale``)
    budget: int | None = None

    def __post_init__(self) -> None:
        from .data import get_dataset_info, list_datasets
        from .models import list_models

        if not self.methods:
            _fail("methods", "a non-empty list (see `ternbench list methods`)", self.methods)
        expanded: list[str] = []
        for pat in self.methods:
            names = list_methods(pat) if any(c in pat for c in "*?[") else [pat]
            if not names:
                _fail("methods", "patterns matching registered methods", pat)
            for n in names:
                get_method_info(n)  # raises UnknownMethodError with "did you mean"
                if n.lower() not in expanded:
                    expanded.append(n.lower())
        object.__setattr__(self, "methods", tuple(expanded))
        for m in self.models:
            if m not in list_models():
                _did_you_mean("models", m, list_models())
        for d in self.datasets:
            if d not in list_datasets():
                _did_you_mean("datasets", d, list_datasets())
        if not self.models:
            _fail("models", "a non-empty list", self.models)
        if not self.datasets:
            _fail("datasets", "a non-empty list", self.datasets)
        if not self.seeds or any(
            not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in self.seeds
        ):
            _fail("seeds", "non-empty non-negative integers", self.seeds)
        if len(set(self.seeds)) != len(self.seeds):
            dup = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
            _fail("seeds", f"distinct (seed {dup[0]} is given twice)", self.seeds)
        if self.profile not in PROFILES:
            _did_you_mean("profile", self.profile, list(PROFILES))
        known = ("x86", "arm", "arm-neon", "arm-sve", "cuda")  # ternbench.schedules targets
        for t in self.targets:
            if t not in known:
                _did_you_mean("targets", t, list(known))
        if len(set(self.targets)) != len(self.targets):
            _fail("targets", "distinct target names", self.targets)
        if self.rpc is not None:
            if not isinstance(self.rpc, str) or not self.rpc.strip():
                _fail("rpc", "'HOST:PORT' or 'tracker=HOST:PORT,key=KEY'", self.rpc)
            _check_rpc(self.rpc)
            if not any(t.startswith("arm") for t in self.targets):
                _fail("rpc", "used with an ARM target (--targets arm, arm-neon or arm-sve)",
                      self.rpc)
        if self.executor not in ("ray", "local"):
            _fail("executor", "'ray' or 'local'", self.executor)
        for name in ("latency_threads", "latency_batch", "accuracy_threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                _fail(name, "a positive integer", v)
        for name in ("num_cpus", "subset", "num_classes", "image_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                _fail(name, "a positive integer or None", v)
        if self.image_size is not None and not all(
            get_dataset_info(d).image_folder for d in self.datasets
        ):
            _fail("image_size", "used with --dataset imagenet (ImageFolder) only",
                  self.image_size)
        object.__setattr__(self, "out", Path(self.out))
        if self.weights is not None and (len(self.models) > 1 or len(self.datasets) > 1):
            _fail("weights", "used with a single --model and --dataset", self.weights)
        if self.weights is not None and not Path(self.weights).is_file():
            raise ConfigError(f"--weights {self.weights} does not exist (a .pt/.pth state dict "
                              "or a .safetensors file)")
        if self.device not in ("auto", "cpu", "cuda"):
            _fail("device", "'auto', 'cpu' or 'cuda'", self.device)
        if self.budget is not None and (
            not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 0
        ):
            _fail("budget", "None or a number of QAT steps >= 0", self.budget)
        for name in ("plain_blocks", "allow_degraded"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "a bool", getattr(self, name))
        for meth, values in self.overrides.items():
            if meth not in self.methods:
                _fail("overrides", f"for methods in the run {list(self.methods)}", meth)
            _block, rest = split_block(meth, values)
            config_from_mapping(get_method_info(meth).config_cls, rest)  # validates fields
        sweeps: dict[str, dict[str, tuple[Any, ...]]] = {}
        for meth, axes in self.sweeps.items():
            if meth not in self.methods:
                _fail("sweeps", f"for methods in the run {list(self.methods)}", meth)
            sweeps[meth] = {}
            for fld, vals in axes.items():
                vals = tuple(vals) if isinstance(vals, list | tuple) else (vals,)
                if not vals:
                    _fail("sweeps", f"a non-empty list of values for {meth}.{fld}", vals)
                for v in vals:  # every point must be a valid config
                    config_from_mapping(
                        get_method_info(meth).config_cls,
                        split_block(meth, {**self.overrides.get(meth, {}), fld: v})[1],
                    )
                sweeps[meth][fld] = vals
        object.__setattr__(self, "sweeps", sweeps)

    @property
    def profile_obj(self) -> Profile:
        prof = PROFILES[self.profile]
        if self.budget is not None:
            return dataclasses.replace(prof, train_steps=self.budget)
        return prof

    def block_for(self, method: str, overrides: dict[str, Any]) -> str:
        """The block form ``method`` runs on: its own ``block`` override, else ``plain`` with
        ``plain_blocks``, else the form its paper uses (registered with the method)."""
        block, _ = split_block(method, overrides)
        if block is None or block == "paper":
            declared = get_method_info(method).block
            return "plain" if self.plain_blocks or declared is None else declared
        return block

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d

    @classmethod
    def from_toml(cls, path: str | Path, **cli: Any) -> BenchConfig:
        """Read a ``[run]`` table (and ``[methods.<name>]`` override tables) from TOML.

        Values given on the command line (``cli``, ``None`` dropped) win over the file.
        """
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
        run = dict(data.get("run", {}))
        unknown = set(data) - {"run", "methods", "sweep"}
        if unknown:
            raise ConfigError(
                f"config file {p}: unknown table(s) {sorted(unknown)}; "
                "use [run], [methods.<name>] and [sweep.<name>]"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        for k in run:
            if k not in known:
                _did_you_mean(f"[run] key in {p}", k, sorted(known))
        overrides = {k: dict(v) for k, v in data.get("methods", {}).items()}
        sweeps = {k: {f: tuple(v) if isinstance(v, list) else (v,) for f, v in d.items()}
                  for k, d in data.get("sweep", {}).items()}
        for key in ("methods", "models", "datasets", "seeds", "targets"):
            if key in run and isinstance(run[key], str):
                run[key] = [s.strip() for s in run[key].split(",") if s.strip()]
        for key in ("methods", "models", "datasets", "seeds", "targets"):
            if key in run:
                if not isinstance(run[key], list):
                    _fail(key, "a list", run[key])
                run[key] = tuple(run[key])
        merged = {**run, **{k: v for k, v in cli.items() if v is not None}}
        merged["overrides"] = {**overrides, **merged.get("overrides", {})}
        merged["sweeps"] = merge_sweeps(sweeps, merged.get("sweeps", {}))
        return cls(**merged)


def _check_rpc(text: str) -> None:
    """``--rpc`` must parse as HOST:PORT (or tracker=HOST:PORT,key=KEY) and HOST must resolve,
    so a typo fails now rather than after the accuracy cells have run."""
    import socket

    from ternbench.schedules.rpc import RpcEndpoint

    try:
        ep = RpcEndpoint.parse(text)
    except ConfigError as exc:
        raise ConfigError(f"--rpc {text!r}: {exc}") from None
    try:
        socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(
            f"--rpc {text!r}: host {ep.host!r} does not resolve ({exc}); expected HOST:PORT of "
            "a TVM RPC server, e.g. 192.168.1.20:9090"
        ) from None


#: the per-method override key that picks the block form (not a method config field)
BLOCK_KEY = "block"


def split_block(method: str, values: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """``(block, the other overrides)``: ``block`` is ``values["block"]`` (``"paper"`` = the
    form the method's paper uses, or one of ``BLOCK_FORMS``) or None.

    Example:
        >>> split_block("rtn", {"block": "plain", "lr": 0.1})
        ('plain', {'lr': 0.1})
    """
    from .models import BLOCK_FORMS

    rest = {k: v for k, v in values.items() if k != BLOCK_KEY}
    if BLOCK_KEY not in values:
        return None, rest
    block = values[BLOCK_KEY]
    if block not in ("paper", *BLOCK_FORMS):
        raise ConfigError(
            f"{method}.{BLOCK_KEY} must be one of {('paper', *BLOCK_FORMS)}, got {block!r}"
        )
    return str(block), rest


def _did_you_mean(field_name: str, value: str, options: list[str]) -> None:
    import difflib

    close = difflib.get_close_matches(value, options, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"unknown {field_name.rstrip('s')} {value!r}.{hint} Available: {', '.join(options)}"
    )


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"fgq.group_size=8"`` -> ``("fgq", "group_size", 8)`` (value parsed as TOML, else str).

    Example:
        >>> parse_override("fgq.solver=twn")
        ('fgq', 'solver', 'twn')
    """
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set expects METHOD.FIELD=VALUE (e.g. fgq.group_size=8), got {text!r}")
    lhs, raw = text.split("=", 1)
    meth, fld = lhs.split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return meth.strip().lower(), fld.strip(), value


def __getattr__(name: str) -> Any:
    """``ABLATIONS``: the named ablations (``--ablation NAME``) the registered methods declare,
    ablation -> method -> field -> values (:func:`ternbench.methods.ablations`)."""
    if name == "ABLATIONS":
        return ablations()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_sweep(text: str) -> tuple[str, str, tuple[Any, ...]]:
    """``"fgq.group_size=4,16,64"`` -> ``("fgq", "group_size", (4, 16, 64))``.

    Example:
        >>> parse_sweep("fgq.solver=exact,twn")
        ('fgq', 'solver', ('exact', 'twn'))
    """
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(
            f"--sweep expects METHOD.FIELD=V1,V2,... (e.g. fgq.group_size=4,16,64), got {text!r}"
        )
    lhs, raw = text.split("=", 1)
    meth, fld = lhs.split(".", 1)
    values = []
    for part in [p.strip() for p in raw.split(",")]:
        if not part:
            raise ConfigError(f"--sweep {text!r}: empty value in the list")
        try:
            values.append(tomllib.loads(f"v = {part}")["v"])
        except tomllib.TOMLDecodeError:
            values.append(part)
    return meth.strip().lower(), fld.strip(), tuple(values)


def merge_sweeps(
    *specs: dict[str, dict[str, tuple[Any, ...]]],
) -> dict[str, dict[str, tuple[Any, ...]]]:
    """Union of sweep specs; a later spec's axis replaces an earlier one of the same field."""
    out: dict[str, dict[str, tuple[Any, ...]]] = {}
    for spec in specs:
        for meth, axes in spec.items():
            out.setdefault(meth, {}).update(axes)
    return out
