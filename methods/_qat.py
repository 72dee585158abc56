"""Shared quantization-aware training: the recipe, the loop driver, checkpoints and resume.

Every QAT method swaps its fake-quant layers into a copy of the FP32 model and hands it to
:func:`qat_train`, which runs the one shared loop of :func:`ternbench.core.train.train` with

* the optimizer/scheduler of a validated :class:`QATRecipe` (SGD/Adam; cosine, step,
  one-cycle or constant learning rate, stepped per batch);
* optional knowledge distillation from the FP32 teacher (soft cross entropy at temperature T,
  scaled by T**2 as in Hinton et al.);
* a checkpoint after every epoch in ``ctx.checkpoint_dir`` (``<method>.ckpt``, written
  atomically, loadable with ``torch.load(..., weights_only=True)``) and resume from the last
  finished epoch when a matching checkpoint is found.

Example:
    >>> QATRecipe(lr=0.1, schedule="step", milestones=(0.5, 0.75)).gammas
    (0.1, 0.1)
    >>> try:
    ...     QATRecipe(lr=0)
    ... except ConfigError as exc:
    ...     print(exc)
    QATRecipe.lr must be a finite number > 0, got 0
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from ternbench.core.files import atomic_write
from torch import Tensor, nn

from ._base import ConfigError, MethodConfig, QuantContext, QuantInfo, QuantizedModel, _check
from ._flow import Step, quantize_flow, recalibrate_bn
from ._layers import ActQuantizer, Position, WeightQuantizer

__all__ = [
    "QATRecipe",
    "QATMethodConfig",
    "qat_train",
    "qat_quantize",
    "QATTraining",
    "bn_after_training",
    "recipe_deviations",
    "kd_loss",
    "checkpoint_path",
    "CHECKPOINT_FORMAT",
]

log = logging.getLogger(__name__)

#: bumped when the checkpoint layout changes; older files are then ignored (start over)
CHECKPOINT_FORMAT = 1

Optimizer = Literal["sgd", "adam"]
Schedule = Literal["cosine", "step", "onecycle", "constant"]


def _real(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(float(v))


@dataclass(frozen=True)
class QATRecipe:
    """How a QAT method trains: validated and frozen (part of the checkpoint key).

    ``epochs`` None takes the profile's budget (``ctx.train_epochs``); fractions are allowed
    (training stops after ``ceil(epochs * batches_per_epoch)`` steps). ``milestones`` are
    fractions of training where the ``step`` schedule multiplies the lr by the matching entry
    of ``gammas`` (empty ``gammas``: 0.1 each). With ``kd`` the loss is
    ``kd_alpha * KD + (1 - kd_alpha) * CE``. For ``adam``, ``momentum`` is beta1.
    """

    epochs: float | None = None
    optimizer: Optimizer = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: Schedule = "cosine"
    milestones: tuple[float, ...] = ()
    gammas: tuple[float, ...] = ()
    label_smoothing: float = 0.0
    kd: bool = False
    kd_temperature: float = 4.0
    kd_alpha: float = 1.0

    def __post_init__(self) -> None:
        c = "QATRecipe"
        _check(
            self.epochs is None or (_real(self.epochs) and self.epochs >= 0),
            c,
            "epochs",
            "None (the profile's budget) or a number >= 0",
            self.epochs,
        )
        _check(self.optimizer in ("sgd", "adam"), c, "optimizer", "'sgd' or 'adam'", self.optimizer)
        _check(_real(self.lr) and self.lr > 0, c, "lr", "a finite number > 0", self.lr)
        _check(
            _real(self.momentum) and 0 <= self.momentum < 1,
            c,
            "momentum",
            "in [0, 1)",
            self.momentum,
        )
        _check(isinstance(self.nesterov, bool), c, "nesterov", "a bool", self.nesterov)
        _check(
            _real(self.weight_decay) and self.weight_decay >= 0,
            c,
            "weight_decay",
            "a finite number >= 0",
            self.weight_decay,
        )
        _check(
            self.schedule in ("cosine", "step", "onecycle", "constant"),
            c,
            "schedule",
            "one of ('cosine', 'step', 'onecycle', 'constant')",
            self.schedule,
        )
        ms = self.milestones
        _check(
            isinstance(ms, tuple | list)
            and all(_real(m) and 0 < m < 1 for m in ms)
            and all(a < b for a, b in zip(ms, ms[1:], strict=False)),
            c,
            "milestones",
            "increasing fractions of training in (0, 1)",
            ms,
        )
        gs = self.gammas
        _check(
            isinstance(gs, tuple | list)
            and all(_real(g) and g > 0 for g in gs)
            and len(gs) in (0, len(ms)),
            c,
            "gammas",
            "empty (0.1 per milestone) or one number > 0 per milestone",
            gs,
        )
        _check(
            self.schedule != "step" or len(ms) > 0,
            c,
            "milestones",
            "non-empty when schedule is 'step'",
            ms,
        )
        _check(
            _real(self.label_smoothing) and 0 <= self.label_smoothing < 1,
            c,
            "label_smoothing",
            "in [0, 1)",
            self.label_smoothing,
        )
        _check(isinstance(self.kd, bool), c, "kd", "a bool", self.kd)
        _check(
            _real(self.kd_temperature) and self.kd_temperature > 0,
            c,
            "kd_temperature",
            "a finite number > 0",
            self.kd_temperature,
        )
        _check(
            _real(self.kd_alpha) and 0 <= self.kd_alpha <= 1,
            c,
            "kd_alpha",
            "in [0, 1]",
            self.kd_alpha,
        )
        # canonical types: equal recipes give equal JSON (the checkpoint key)
        if self.epochs is not None:
            object.__setattr__(self, "epochs", float(self.epochs))
        for name in (
            "lr",
            "momentum",
            "weight_decay",
            "label_smoothing",
            "kd_temperature",
            "kd_alpha",
        ):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "milestones", tuple(float(m) for m in ms))
        gam = tuple(float(g) for g in gs) if gs else (0.1,) * len(ms)
        object.__setattr__(self, "gammas", gam)

    def resolve_epochs(self, ctx: QuantContext) -> float:
        """The epochs this recipe trains for under ``ctx`` (its own, else the profile's)."""
        return float(self.epochs) if self.epochs is not None else float(ctx.train_epochs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"], d["gammas"] = list(self.milestones), list(self.gammas)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


_RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(QATRecipe))


@dataclass(frozen=True)
class QATMethodConfig(MethodConfig):
    """A method config carrying a flat copy of the :class:`QATRecipe` fields.

    Flat fields keep ``--set ttq.lr=0.05`` overrides simple; :meth:`recipe` builds the validated
    recipe, and recipe errors are reported under the subclass's name. QAT methods do not
    re-estimate BatchNorm after training (``bn_recalibrate`` False).
    """

    act_bits: int = 32
    bn_recalibrate: bool = False
    epochs: float | None = None
    optimizer: Optimizer = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: Schedule = "cosine"
    milestones: tuple[float, ...] = ()
    gammas: tuple[float, ...] = ()
    label_smoothing: float = 0.0
    kd: bool = False
    kd_temperature: float = 4.0
    kd_alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("milestones", "gammas"):  # TOML/CLI give lists
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        try:
            rec = self.recipe()
        except ConfigError as exc:
            raise ConfigError(
                str(exc).replace("QATRecipe.", f"{type(self).__name__}.", 1)
            ) from None
        for name in _RECIPE_FIELDS:  # canonical values (lr=1 and lr=1.0 are one config)
            object.__setattr__(self, name, getattr(rec, name))

    def recipe(self) -> QATRecipe:
        return QATRecipe(**{k: getattr(self, k) for k in _RECIPE_FIELDS})


# ------------------------------------------------------------------------------ losses, optim


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton's distillation term ``T**2 * KL(softmax(t/T) || softmax(s/T))``, batch mean.

    The KL divergence, not the soft cross entropy: both have the same gradient (they differ by
    the teacher's entropy, a constant), but the cross entropy at T = 4 carries
    ``T**2 * H(teacher) ≈ 16 * 2.2 ≈ 35`` nats that no training can remove, which is why RTN's
    logged loss used to "sit near 35". The KL reads 0 when the student matches the teacher.
    """
    t_log = F.log_softmax(teacher.detach().float() / temperature, dim=1)
    s = F.log_softmax(student.float() / temperature, dim=1)
    return (t_log.exp() * (t_log - s)).sum(1).mean() * temperature**2


def _quantizer_param_ids(module: nn.Module) -> set[int]:
    ids: set[int] = set()
    for m in module.modules():
        if isinstance(m, WeightQuantizer | ActQuantizer):
            ids.update(id(p) for p in m.parameters())
    return ids


def _make_optimizer(recipe: QATRecipe) -> Callable[[nn.Module], torch.optim.Optimizer]:
    def make(model: nn.Module) -> torch.optim.Optimizer:
        # Learned quantizer parameters (TTQ's scales, thresholds) get no weight decay: decay
        # would pull the quantization grid toward 0 instead of regularising the weights.
        qids = _quantizer_param_ids(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("qat_train: the model has no trainable parameters")
        decay = [p for p in params if id(p) not in qids]
        no_decay = [p for p in params if id(p) in qids]
        groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": recipe.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        if recipe.optimizer == "sgd":
            return torch.optim.SGD(
                groups,
                lr=recipe.lr,
                momentum=recipe.momentum,
                nesterov=recipe.nesterov and recipe.momentum > 0,
            )
        return torch.optim.Adam(groups, lr=recipe.lr, betas=(recipe.momentum, 0.999))

    return make


def _lr_factor(recipe: QATRecipe, total: int) -> Callable[[int], float]:
    if recipe.schedule == "cosine":
        return lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))
    if recipe.schedule == "step":
        cuts = [
            (round(m * total), g) for m, g in zip(recipe.milestones, recipe.gammas, strict=True)
        ]
        return lambda s: math.prod(g for c, g in cuts if s >= c)
    return lambda s: 1.0


def _make_scheduler(
    recipe: QATRecipe,
) -> Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]:
    def make(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LRScheduler:
        S = torch.optim.lr_scheduler
        if recipe.schedule == "onecycle":
            # one-cycle needs >= 2 steps per phase; tiny runs are still valid
            return S.OneCycleLR(opt, max_lr=recipe.lr, total_steps=max(total, 2))
        # a plain function of the step: its state dict holds only numbers (weights_only-safe)
        return S.LambdaLR(opt, _lr_factor(recipe, max(total, 1)))

    return make


# ------------------------------------------------------------------------------- checkpoints


def checkpoint_path(ctx: QuantContext, method: str) -> Path | None:
    """``<ctx.checkpoint_dir>/<method>.ckpt``, or None when checkpoints are off."""
    if not ctx.checkpoint_dir:
        return None
    return Path(ctx.checkpoint_dir) / f"{method}.ckpt"


def _param_digest(module: nn.Module) -> str:
    """Names, shapes and starting values of the parameters (buffers: names and shapes only,
    so BN statistics or calibration ranges that differ by rounding do not block a resume)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        t = p.detach().float().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    for name, b in module.named_buffers():
        h.update(f"{name}:{tuple(b.shape)}:{b.dtype};".encode())
    return h.hexdigest()[:32]


def _rng_state(loader: Any) -> dict[str, Any]:
    np_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))
    assert np_state[0] == "MT19937"
    py_version, py_state, py_gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_version": int(py_version),
        "python_gauss": py_gauss,
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):  # the loader's own shuffle order (make_loader)
        out["loader"] = gen.get_state()
    return out


def _set_rng_state(rng: dict[str, Any], loader: Any) -> None:
    torch.set_rng_state(rng["torch"])
    keys = rng["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, rng["numpy_pos"], rng["numpy_has_gauss"], rng["numpy_gauss"])
    )
    random.setstate(
        (rng["python_version"], tuple(int(v) for v in rng["python"].tolist()), rng["python_gauss"])
    )
    if rng["cuda"] and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(rng["cuda"])
    gen = getattr(loader, "generator", None)
    if "loader" in rng and isinstance(gen, torch.Generator):
        gen.set_state(rng["loader"])


def _save(path: Path, state: Any, key: str) -> None:
    from ternbench.core.train import TrainState

    assert isinstance(state, TrainState)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "recipe": key,
        "epoch": int(state.epoch),
        "step": int(state.step),
        "model": {k: v.detach().cpu() for k, v in state.model.state_dict().items()},
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "rng": _rng_state(state.loader),
        "history": json.dumps(state.history),
    }
    # atomic: a kill leaves the previous checkpoint intact
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    log.debug("checkpoint %s: epoch %d, step %d", path, state.epoch, state.step)


def _load_into(path: Path, state: Any, key: str) -> bool:
    """Restore ``state`` from ``path`` if it holds a matching checkpoint; False otherwise.

    Anything wrong (unreadable, another recipe, wrong shapes) is logged and leaves ``state``
    as it was: training then starts over.
    """
    if not path.is_file():
        return False
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated/corrupt file or a refused pickle
        log.warning(
            "ignoring unreadable QAT checkpoint %s (%s: %s); starting over",
            path,
            type(exc).__name__,
            exc,
        )
        return False
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        log.warning("ignoring QAT checkpoint %s: unknown format; starting over", path)
        return False
    if ck.get("recipe") != key:
        log.warning(
            "ignoring QAT checkpoint %s: written for another recipe or model; starting over", path
        )
        return False
    epoch, step = ck.get("epoch"), ck.get("step")
    expected = (
        None
        if not isinstance(epoch, int)
        else min(epoch * state.steps_per_epoch, state.total_steps)
    )
    if not isinstance(epoch, int) or not 1 <= epoch <= state.n_epochs or step != expected:
        log.warning(
            "ignoring QAT checkpoint %s: epoch %r / step %r do not fit this run", path, epoch, step
        )
        return False
    saved_model = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
    saved_opt = copy.deepcopy(state.optimizer.state_dict())
    saved_sched = copy.deepcopy(state.scheduler.state_dict())
    try:
        state.model.load_state_dict(ck["model"], strict=True)
        state.optimizer.load_state_dict(ck["optimizer"])
        state.scheduler.load_state_dict(ck["scheduler"])
        history = json.loads(ck["history"])
        _set_rng_state(ck["rng"], state.loader)
    except Exception as exc:
        log.warning(
            "ignoring incompatible QAT checkpoint %s (%s: %s); starting over",
            path,
            type(exc).__name__,
            exc,
        )
        state.model.load_state_dict(saved_model)
        state.optimizer.load_state_dict(saved_opt)
        state.scheduler.load_state_dict(saved_sched)
        return False
    state.epoch, state.step, state.history = epoch, step, history
    log.info("resuming QAT from %s after epoch %d (step %d)", path, epoch, step)
    return True


# ------------------------------------------------------------------------------------ driver


def qat_train(
    module: nn.Module,
    ctx: QuantContext,
    recipe: QATRecipe,
    *,
    method: str,
    teacher: nn.Module | None = None,
    loss_extra: Callable[[nn.Module], Tensor] | None = None,
    before_step: Callable[[nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Train ``module`` (fake-quant layers already swapped in) in place on ``ctx.train_loader``.

    Runs ``recipe.epochs`` (None: ``ctx.train_epochs``) epochs on ``ctx.device`` with the shared
    loop of :func:`ternbench.core.train.train`; ``module`` is left in train mode. Zero epochs
    train nothing. ``teacher`` is the FP32 model the method received (a copy is moved to the
    device, the caller's is untouched); with ``recipe.kd`` its logits are distilled.
    ``loss_extra(module)`` is added to the loss; ``before_step(module)`` runs after
    ``backward()``, before each optimizer step (gradient edits).

    With ``ctx.checkpoint_dir`` a checkpoint ``<dir>/<method>.ckpt`` is written after every
    epoch and a matching one is resumed from (same method, recipe, seed, data size and
    starting weights); a stale or corrupt one is logged and ignored. Nothing is deleted.

    Returns:
        the loop's history (``epochs``, ``step_loss``, ``steps``) plus ``resumed_from_epoch``
        (finished epochs loaded from a checkpoint, 0 for a fresh run), ``epochs_run`` (epochs
        of training the returned weights have had) and ``seconds`` (this call).

    Raises:
        TrainingDivergedError: the loss became NaN/inf (the message names the step).
    """
    from ternbench.core.train import TrainCfg, TrainState, train

    t0 = time.perf_counter()
    epochs = recipe.resolve_epochs(ctx)
    empty: dict[str, Any] = {
        "epochs": [],
        "step_loss": [],
        "steps": 0,
        "resumed_from_epoch": 0,
        "epochs_run": 0.0,
    }
    if epochs <= 0:
        log.info("%s: training budget is 0 epochs; no QAT", method)
        return {**empty, "seconds": time.perf_counter() - t0}
    loader = ctx.train_loader
    if loader is None:
        raise ValueError(f"{method}: QAT for {epochs} epochs needs ctx.train_loader")
    if recipe.kd and teacher is None:
        raise ValueError(f"{method}: recipe.kd needs the FP32 teacher")
    steps_per_epoch = len(loader)  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise ValueError(f"{method}: ctx.train_loader yields no batches")

    # TrainCfg carries the epochs, seed and label smoothing; optimizer and scheduler come from
    # the recipe's factories (its schedule names are a superset of TrainCfg's).
    tcfg = TrainCfg(
        epochs=epochs,
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        label_smoothing=recipe.label_smoothing,
        optimizer=recipe.optimizer,
        schedule="cosine",
        seed=ctx.seed,
    )
    ce = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    tmodel: nn.Module | None = None
    if recipe.kd:
        assert teacher is not None
        tmodel = copy.deepcopy(teacher).to(ctx.device).eval()
        for p in tmodel.parameters():
            p.requires_grad_(False)

    def batch_loss(x: Tensor, logits: Tensor, y: Tensor) -> Tensor:
        loss = ce(logits, y)
        if tmodel is not None:
            with torch.no_grad():
                t_logits = tmodel(x)
            kd = kd_loss(logits, t_logits, recipe.kd_temperature)
            loss = recipe.kd_alpha * kd + (1.0 - recipe.kd_alpha) * loss
        if loss_extra is not None:
            loss = loss + loss_extra(module)
        return loss

    path = checkpoint_path(ctx, method)
    key = json.dumps(
        {
            "format": CHECKPOINT_FORMAT,
            "method": method,
            "recipe": {**recipe.to_dict(), "epochs": epochs},
            "seed": ctx.seed,
            "steps_per_epoch": steps_per_epoch,
            "params": _param_digest(module) if path is not None else "",
        },
        sort_keys=True,
    )
    resumed = {"epoch": 0}

    def resume(state: TrainState) -> None:
        if path is not None and _load_into(path, state, key):
            resumed["epoch"] = state.epoch

    def save(state: TrainState) -> None:
        if path is not None:
            _save(path, state, key)

    hist = train(
        module,
        loader,  # type: ignore[arg-type]
        tcfg,
        device=ctx.device,
        progress=ctx.progress,
        desc=f"{method} QAT",
        batch_loss=batch_loss,
        make_optimizer=_make_optimizer(recipe),
        make_scheduler=_make_scheduler(recipe),
        before_step=before_step,
        resume=resume,
        checkpoint=save,
        val_loader=ctx.val_loader,
        eval_points=ctx.eval_points if ctx.val_loader is not None else 0,
    )
    hist["resumed_from_epoch"] = resumed["epoch"]
    hist["epochs_run"] = hist["steps"] / steps_per_epoch
    hist["seconds"] = time.perf_counter() - t0
    return hist


# ------------------------------------------------------------------------- method-level flow


def _fmt(v: Any) -> str:
    if isinstance(v, tuple | list):
        return "/".join(_fmt(x) for x in v) or "none"
    return f"{v:g}" if isinstance(v, float) else str(v)


def recipe_deviations(used: QATRecipe, paper: QATRecipe) -> list[str]:
    """Short ``"<field> <ours> instead of <paper's>"`` notes for every field that differs.

    ``used.epochs`` should be resolved (a number). The milestones and gammas of a step schedule
    are part of the schedule note.

    Example:
        >>> recipe_deviations(QATRecipe(epochs=1.0), QATRecipe(epochs=200, lr=0.1))
        ['epochs 1 instead of 200', 'lr 0.01 instead of 0.1']
    """
    out: list[str] = []
    for name in _RECIPE_FIELDS:
        if name in ("milestones", "gammas"):
            continue
        a, b = getattr(used, name), getattr(paper, name)
        if name == "schedule":
            a = a if a != "step" else f"step@{_fmt(used.milestones)}x{_fmt(used.gammas)}"
            b = b if b != "step" else f"step@{_fmt(paper.milestones)}x{_fmt(paper.gammas)}"
        if name.startswith("kd_") and not (used.kd or paper.kd):
            continue
        if name == "nesterov" and "sgd" not in (used.optimizer, paper.optimizer):
            continue
        if a != b:
            out.append(f"{name} {_fmt(a)} instead of {_fmt(b)}")
    return out


@dataclass(frozen=True)
class QATTraining:
    """The ``train`` hook of training-time methods: :func:`qat_train` on ``recipe`` (the FP32
    model the method received is the KD teacher), recording the deviations ledger and the
    training record in the info.

    ``paper_recipe`` describes what the paper did; ``deviations(epochs)`` lists how this run
    (``epochs`` resolved from the profile's budget) differs from it.
    """

    method: str
    recipe: QATRecipe
    paper_recipe: str
    deviations: Callable[[float], list[str]]
    loss_extra: Callable[[nn.Module], Tensor] | None = None
    before_step: Callable[[nn.Module], None] | None = None

    def __call__(self, m: nn.Module, ctx: QuantContext, teacher: nn.Module) -> QuantInfo:
        hist = qat_train(
            m,
            ctx,
            self.recipe,
            method=self.method,
            teacher=teacher,
            loss_extra=self.loss_extra,
            before_step=self.before_step,
        )
        epochs = self.recipe.resolve_epochs(ctx)
        used = dataclasses.replace(self.recipe, epochs=epochs)
        return QuantInfo(
            recipe=used.to_dict(),
            paper_recipe=self.paper_recipe,
            deviations=list(self.deviations(epochs)),
            epochs_run=float(hist["epochs_run"]),
            resumed_from_epoch=int(hist["resumed_from_epoch"]),
            train_seconds=float(hist["seconds"]),
            train_steps=int(hist["steps"]),
            final_train_loss=float(hist["epochs"][-1]["loss"]) if hist["epochs"] else None,
            train_history=list(hist["epochs"]),
            train_curve=list(hist.get("evals", [])),
        )


def bn_after_training(cfg: MethodConfig) -> Step:
    """The ``finish`` hook of QAT methods: BatchNorm re-estimated with the trained weights when
    ``cfg.bn_recalibrate`` (the activation quantizers stay active with the ranges found before
    training)."""

    def finish(m: nn.Module, ctx: QuantContext) -> QuantInfo:
        if not cfg.bn_recalibrate:
            return QuantInfo(bn_recalibrated=False)
        return QuantInfo(bn_batches=recalibrate_bn(m, ctx), bn_recalibrated=True)

    return finish


def qat_quantize(
    model: nn.Module,
    ctx: QuantContext,
    cfg: QATMethodConfig,
    method: str,
    make: Callable[[str, nn.Module, Position], nn.Module | None],
    *,
    paper_recipe: str,
    deviations: Callable[[float], list[str]],
    prepare: Step | None = None,
    finish: Step | None = None,
    loss_extra: Callable[[nn.Module], Tensor] | None = None,
    before_step: Callable[[nn.Module], None] | None = None,
) -> QuantizedModel:
    """:func:`~ternbench.methods._flow.quantize_flow` for a training-time method: swap layers
    with ``make``, ``prepare`` (default: activation ranges recorded once before training and
    kept; the pass also records the layer shapes the export needs), :class:`QATTraining` on the
    config's recipe, then ``finish`` (default: :func:`bn_after_training`, i.e. BatchNorm
    re-estimated after training only if ``cfg.bn_recalibrate``).
    """
    training = QATTraining(
        method, cfg.recipe(), paper_recipe, deviations, loss_extra=loss_extra,
        before_step=before_step,
    )
    return quantize_flow(
        model,
        ctx,
        cfg,
        method,
        make,
        prepare=prepare,
        train=training,
        finish=finish if finish is not None else bn_after_training(cfg),
    )
