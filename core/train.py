"""Shared training loop, evaluation and BatchNorm re-estimation (FP32 baselines and QAT).

The default :class:`TrainCfg` is the fixed-length recipe measured to work here (SGD Nesterov 0.9,
weight decay 5e-4, OneCycle with max lr 0.1, batch 128, label smoothing 0.1): ResNet-8 reaches
89.8% on Fashion-MNIST after 3 epochs with the 2-pixel shift + flip augmentation, which is not
converged. ``schedule="plateau"`` (:class:`PlateauRule`) instead trains until held-out accuracy
stops improving.

Example:
    >>> TrainCfg(epochs=0.5, train_subset=1024).epochs
    0.5
    >>> TrainCfg(lr=-1)
    Traceback (most recent call last):
    ...
    ValueError: TrainCfg.lr must be a number > 0, got -1
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from numbers import Real
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

__all__ = [
    "TrainCfg",
    "TrainState",
    "TrainingDivergedError",
    "seed_everything",
    "train",
    "evaluate",
    "recalibrate_bn",
    "eval_steps",
    "curve_converged",
]

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; the message gives the step."""


def _is_real(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


@dataclass(frozen=True)
class TrainCfg:
    """Validated, frozen training settings (part of the baseline cache key).

    ``epochs`` may be fractional: training stops after ``ceil(epochs * len(loader))`` steps.
    Schedules step per batch: ``onecycle`` (max lr ``lr``), ``cosine`` (``lr`` to 0) and
    ``step`` (x0.1 at 50% and 75% of the steps). For ``adam``, ``momentum`` is beta1.

    ``plateau`` trains until the validation top-1 stops improving, so the budget follows the
    dataset instead of a fixed epoch count: after a linear warm-up of ``PLATEAU_WARMUP`` steps
    the lr is ``lr``; every ``plateau_every`` steps the top-1 on the held-out images (the
    ``val_fraction`` of the training set that :func:`~ternbench.bench.cache.load_or_train_fp32`
    keeps out of training) is measured; after ``plateau_patience`` checks without a gain of at
    least ``plateau_min_delta`` points the lr drops x0.1, and after ``plateau_decays`` drops the
    next plateau ends training (converged) and the best checked weights are restored.
    ``epochs`` is then only the cap; reaching it first is "not converged" (logged, recorded).
    """

    epochs: float = 3
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    optimizer: Literal["sgd", "adam"] = "sgd"
    schedule: Literal["onecycle", "cosine", "step", "plateau"] = "onecycle"
    train_subset: int | None = None
    seed: int = 0
    plateau_every: int = 250
    plateau_patience: int = 2
    plateau_min_delta: float = 0.1
    plateau_decays: int = 2
    val_fraction: float = 0.0

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"TrainCfg.{name} must be {rule}, got {getattr(self, name)!r}")

        check(
            _is_real(self.epochs) and math.isfinite(self.epochs) and self.epochs > 0,
            "epochs",
            "a number > 0",
        )
        check(_is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "an int >= 1")
        check(_is_real(self.lr) and math.isfinite(self.lr) and self.lr > 0, "lr", "a number > 0")
        check(_is_real(self.momentum) and 0 <= self.momentum < 1, "momentum", "in [0, 1)")
        check(
            _is_real(self.weight_decay)
            and math.isfinite(self.weight_decay)
            and self.weight_decay >= 0,
            "weight_decay",
            "a number >= 0",
        )
        check(
            _is_real(self.label_smoothing) and 0 <= self.label_smoothing < 1,
            "label_smoothing",
            "in [0, 1)",
        )
        check(self.optimizer in ("sgd", "adam"), "optimizer", "one of ('sgd', 'adam')")
        check(
            self.schedule in ("onecycle", "cosine", "step", "plateau"),
            "schedule",
            "one of ('onecycle', 'cosine', 'step', 'plateau')",
        )
        check(_is_int(self.plateau_every) and self.plateau_every >= 1, "plateau_every",
              "an int >= 1")
        check(_is_int(self.plateau_patience) and self.plateau_patience >= 1, "plateau_patience",
              "an int >= 1")
        check(_is_real(self.plateau_min_delta) and 0 <= self.plateau_min_delta < 100,
              "plateau_min_delta", "in [0, 100) (points of top-1)")
        check(_is_int(self.plateau_decays) and self.plateau_decays >= 0, "plateau_decays",
              "an int >= 0")
        check(_is_real(self.val_fraction) and 0 <= self.val_fraction < 0.5, "val_fraction",
              "in [0, 0.5)")
        check(self.schedule != "plateau" or self.val_fraction > 0, "val_fraction",
              "> 0 with schedule 'plateau' (the rule needs held-out images)")
        check(
            self.train_subset is None or (_is_int(self.train_subset) and self.train_subset >= 1),
            "train_subset",
            "None or an int >= 1",
        )
        check(_is_int(self.seed) and self.seed >= 0, "seed", "an int >= 0")
        # Canonical types, so TrainCfg(epochs=3) and TrainCfg(epochs=3.0) hash (cache key) alike.
        for name in ("epochs", "lr", "momentum", "weight_decay", "label_smoothing",
                     "plateau_min_delta", "val_fraction"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("batch_size", "seed", "plateau_every", "plateau_patience", "plateau_decays"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.train_subset is not None:
            object.__setattr__(self, "train_subset", int(self.train_subset))


    def key_fields(self) -> dict[str, Any]:
        """The fields that define the recipe (the cache key): the plateau rule's own fields
        only when ``schedule == "plateau"``, so other recipes keep their keys.

        Example:
            >>> "plateau_every" in TrainCfg().key_fields()
            False
        """
        d = asdict(self)
        if self.schedule != "plateau":
            for name in _PLATEAU_FIELDS:
                d.pop(name)
        return d


_PLATEAU_FIELDS = ("plateau_every", "plateau_patience", "plateau_min_delta", "plateau_decays",
                   "val_fraction")
#: linear lr warm-up of the ``plateau`` schedule (steps; the other schedules have their own)
PLATEAU_WARMUP = 200


class PlateauRule:
    """The ``plateau`` schedule's state: lr factor, checks, best weights, stop decision.

    Example:
        >>> r = PlateauRule(TrainCfg(schedule="plateau", val_fraction=0.1, plateau_patience=1,
        ...                          plateau_decays=1))
        >>> [r.observe(v) for v in (80.0, 85.0, 85.05, 85.5, 85.5)]
        [False, False, False, False, True]
        >>> r.decays, r.best
        (1, 85.5)
    """

    def __init__(self, cfg: TrainCfg) -> None:
        self.cfg = cfg
        self.decays = 0
        self.bad = 0
        self.best = -math.inf  # the last significant (>= min_delta) improvement
        self.top = -math.inf  # the highest check, whose weights are restored
        self.top_state: dict[str, Tensor] | None = None
        self.converged = False

    def factor(self, step: int) -> float:
        """The lr multiplier at ``step`` (warm-up times 0.1 per drop so far)."""
        return min(1.0, (step + 1) / PLATEAU_WARMUP) * 0.1**self.decays

    def observe(self, top1: float, model: nn.Module | None = None) -> bool:
        """Record one check (validation top-1 in %); True when training should stop."""
        if top1 > self.top:
            self.top = top1
            if model is not None:
                self.top_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if top1 >= self.best + self.cfg.plateau_min_delta:
            self.best, self.bad = top1, 0
            return False
        self.bad += 1
        if self.bad < self.cfg.plateau_patience:
            return False
        if self.decays < self.cfg.plateau_decays:
            self.decays, self.bad = self.decays + 1, 0
            log.info("plateau at %.2f%% top-1: lr x0.1 (drop %d of %d)", self.best, self.decays,
                     self.cfg.plateau_decays)
            return False
        self.converged = True
        return True


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and, if present, CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():  # manual_seed already covers CUDA lazily; explicit for clarity
        torch.cuda.manual_seed_all(seed)


def _make_optimizer(model: nn.Module, cfg: TrainCfg) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.Adam(
        params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay
    )


def _make_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainCfg, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    S = torch.optim.lr_scheduler
    if cfg.schedule == "onecycle":
        # OneCycle's default pct_start 0.3 needs >= 2 steps per phase; tiny runs are still valid.
        return S.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total_steps, 2))
    if cfg.schedule == "cosine":
        return S.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    milestones = sorted({max(1, int(total_steps * 0.5)), max(1, int(total_steps * 0.75))})
    return S.MultiStepLR(opt, milestones=milestones, gamma=0.1)


@dataclass
class TrainState:
    """The live state of one :func:`train` call, handed to its ``resume``/``checkpoint`` hooks.

    ``epoch`` counts finished epochs and ``step`` optimizer steps; a ``resume`` hook that loads
    a checkpoint sets both (and ``history``) so the loop continues with the next epoch.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Any
    steps_per_epoch: int
    total_steps: int
    n_epochs: int
    epoch: int = 0
    step: int = 0
    history: dict[str, Any] = field(
        default_factory=lambda: {"epochs": [], "step_loss": [], "steps": 0, "seconds": 0.0}
    )


def _batches(loader: Iterable) -> Iterable[tuple[Tensor, Tensor]]:
    for batch in loader:
        x, y = batch[0], batch[1]
        yield x, y


def train(
    model: nn.Module,
    loader: DataLoader | Sequence,
    cfg: TrainCfg,
    *,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    desc: str = "train",
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], bool | None] | None = None,
    batch_loss: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    make_scheduler: Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]
    | None = None,
    before_step: Callable[[nn.Module], None] | None = None,
    resume: Callable[[TrainState], None] | None = None,
    checkpoint: Callable[[TrainState], None] | None = None,
    val_loader: Iterable | None = None,
    eval_points: int = 0,
) -> dict[str, Any]:
    """Train ``model`` in place on ``loader`` with ``cfg``; return the history.

    The model is moved to ``device`` and left in train mode. Global RNGs are seeded with
    ``cfg.seed`` first (augmentation draws from them); the data order comes from the loader's
    own generator (:func:`ternbench.bench.data.make_loader`), so a run is reproducible.

    Args:
        loss_fn: ``(logits, targets) -> scalar``; default cross entropy with
            ``cfg.label_smoothing``. QAT methods can add regularisers by closing over the model.
        on_epoch_end: called as ``on_epoch_end(epoch, record)`` after every (possibly partial)
            epoch; returning ``True`` stops training.
        progress: tqdm progress bar; ``None`` shows it only on a terminal.
        batch_loss: ``(inputs, logits, targets) -> scalar``, used instead of ``loss_fn`` when a
            loss needs the batch itself (knowledge distillation runs a teacher on it).
        make_optimizer / make_scheduler: replace the optimizer built from ``cfg`` (``model ->
            optimizer``) and the per-step scheduler (``(optimizer, total_steps) -> scheduler``).
        before_step: ``before_step(model)`` after ``backward()``, before the optimizer step
            (gradient edits).
        resume: ``resume(state)`` once before the first step, after seeding; it may load a
            checkpoint into ``state`` (model, optimizer, scheduler, RNGs) and set
            ``state.epoch``/``state.step``/``state.history`` to continue from there.
        checkpoint: ``checkpoint(state)`` after every finished (possibly partial) epoch,
            before ``on_epoch_end``.
        val_loader / eval_points: evaluate top-1 on ``val_loader`` at ``eval_points`` evenly
            spaced steps (the last one at the end of training) and record the mean training
            loss since the previous point: ``history["evals"]`` holds ``{"step", "epoch"
            (fractional), "train_loss", "val_top1" (%)}`` per point (the training curve).

    Returns:
        ``{"epochs": [{"epoch", "steps", "loss", "acc", "lr", "n", "seconds"}, ...],
        "step_loss": [float per step], "steps": int, "seconds": float, "evals": [...]}``.

    Raises:
        TrainingDivergedError: the loss became NaN/inf (the message names the step).
    """
    from tqdm.auto import tqdm

    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError("train: the loader yields no batches")
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    n_epochs = math.ceil(total_steps / steps_per_epoch)

    seed_everything(cfg.seed)
    model.to(device)
    model.train()
    opt = make_optimizer(model) if make_optimizer is not None else _make_optimizer(model, cfg)
    rule: PlateauRule | None = None
    if make_scheduler is not None:
        sched = make_scheduler(opt, total_steps)
    elif cfg.schedule == "plateau":
        if val_loader is None:
            raise ValueError("train: schedule 'plateau' needs a val_loader (held-out images)")
        rule = PlateauRule(cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, rule.factor)
    else:
        sched = _make_scheduler(opt, cfg, total_steps)
    if loss_fn is not None and batch_loss is not None:
        raise ValueError("train: pass loss_fn or batch_loss, not both")
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    state = TrainState(model, opt, sched, loader, steps_per_epoch, total_steps, n_epochs)
    if resume is not None:
        resume(state)
    history = state.history
    history.setdefault("evals", [])
    step = state.step
    eval_at = eval_steps(total_steps, eval_points) if val_loader is not None else set()
    if rule is not None:  # the plateau checks are the curve
        eval_at = set(range(cfg.plateau_every, total_steps + 1, cfg.plateau_every))
    stop = False
    seg_loss, seg_n = 0.0, 0
    t_start = time.perf_counter()
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=desc,
        disable=None if progress is None else not progress,
        leave=False,
        dynamic_ncols=True,
    )
    # without a terminal tqdm is off: log a progress line every 30 s instead (CI logs, files)
    beat = progress is None and not sys.stderr.isatty()
    last_beat = time.monotonic()
    start_step = step
    try:
        for epoch in range(state.epoch, n_epochs):
            t_epoch = time.perf_counter()
            loss_sum, correct, seen, ep_steps = 0.0, 0, 0, 0
            for x, y in _batches(loader):
                if step >= total_steps:
                    break
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                logits = model(x)
                loss = batch_loss(x, logits, y) if batch_loss is not None else loss_fn(logits, y)
                loss_v = float(loss.detach())
                if not math.isfinite(loss_v):
                    raise TrainingDivergedError(
                        f"{desc}: loss became {loss_v} at step {step + 1}/{total_steps} "
                        f"(epoch {epoch + 1}, lr {opt.param_groups[0]['lr']:.4g}); try a lower "
                        "learning rate"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if before_step is not None:
                    before_step(model)
                opt.step()
                sched.step()
                step += 1
                ep_steps += 1
                bs = int(y.shape[0])
                loss_sum += loss_v * bs
                seen += bs
                correct += int((logits.detach().argmax(1) == y).sum())
                history["step_loss"].append(loss_v)
                seg_loss, seg_n = seg_loss + loss_v, seg_n + 1
                if step in eval_at:
                    assert val_loader is not None
                    r = evaluate(model, val_loader, device=device, topk=(1,))
                    history["evals"].append({
                        "step": step,
                        "epoch": step / steps_per_epoch,
                        "train_loss": seg_loss / max(seg_n, 1),
                        "val_top1": 100.0 * r["correct1"] / max(r["n"], 1),
                    })
                    log.info("%s step %d (epoch %.2f): train loss %.4f, val top-1 %.2f%%",
                             desc, step, step / steps_per_epoch, seg_loss / max(seg_n, 1),
                             history["evals"][-1]["val_top1"])
                    seg_loss, seg_n = 0.0, 0
                    if rule is not None:
                        stop = rule.observe(history["evals"][-1]["val_top1"], model)
                bar.update(1)
                if beat and time.monotonic() - last_beat >= 30.0:
                    last_beat = time.monotonic()
                    spent = time.perf_counter() - t_start
                    eta = spent / max(step - start_step, 1) * (total_steps - step)
                    log.info("%s: step %d/%d (epoch %d/%d), loss %.4f, ETA %.0fs", desc, step,
                             total_steps, epoch + 1, n_epochs, loss_sum / max(seen, 1), eta)
                if step % 20 == 0 or step == total_steps:
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
                if stop:
                    break
            record = {
                "epoch": epoch + 1,
                "steps": ep_steps,
                "loss": loss_sum / max(seen, 1),
                "acc": correct / max(seen, 1),
                "lr": opt.param_groups[0]["lr"],
                "n": seen,
                "seconds": time.perf_counter() - t_epoch,
            }
            history["epochs"].append(record)
            log.info(
                "%s epoch %d: loss %.4f acc %.4f (%d steps, %.1fs)",
                desc,
                epoch + 1,
                record["loss"],
                record["acc"],
                ep_steps,
                record["seconds"],
            )
            state.epoch, state.step = epoch + 1, step
            history["steps"] = step
            if checkpoint is not None:
                checkpoint(state)
            if on_epoch_end is not None and on_epoch_end(epoch, record) is True:
                break
            if step >= total_steps or stop:
                break
    finally:
        bar.close()
    if rule is not None:
        _finish_plateau(model, rule, history, desc, step)
    history["steps"] = step
    history["seconds"] = time.perf_counter() - t_start
    return history


def _finish_plateau(model: nn.Module, rule: PlateauRule, history: dict[str, Any], desc: str,
                    step: int) -> None:
    if rule.top_state is not None:
        model.load_state_dict(rule.top_state)  # the best checked weights
    history["converged"] = rule.converged
    history["plateau"] = {"lr_drops": rule.decays, "best_val_top1": rule.top, "steps": step}
    if rule.converged:
        log.info("%s converged after %d steps (%d lr drops, best val top-1 %.2f%%)", desc, step,
                 rule.decays, rule.top)
    else:
        log.warning("%s reached its cap of %d steps before the plateau rule stopped it: not "
                    "converged (best val top-1 %.2f%%, %d lr drops); raise the cap (epochs)",
                    desc, step, rule.top, rule.decays)


def eval_steps(total_steps: int, points: int) -> set[int]:
    """``points`` evenly spaced steps in ``1..total_steps``, always including the last.

    Example:
        >>> sorted(eval_steps(10, 4))
        [2, 5, 8, 10]
    """
    if points <= 0 or total_steps <= 0:
        return set()
    n = min(points, total_steps)
    return {max(1, round(total_steps * (i + 1) / n)) for i in range(n)}


def curve_converged(evals: Sequence[dict[str, Any]], min_gain: float = 0.3) -> bool | None:
    """False when the last segment of a training curve still gained more than ``min_gain``
    points of validation top-1; None when there are fewer than two points.

    Example:
        >>> curve_converged([{"val_top1": 80.0}, {"val_top1": 85.0}, {"val_top1": 85.1}])
        True
    """
    if len(evals) < 2:
        return None
    return float(evals[-1]["val_top1"]) - float(evals[-2]["val_top1"]) <= min_gain


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: str | torch.device = "cpu",
    topk: Sequence[int] = (1, 5),
) -> dict[str, Any]:
    """Exact integer top-k counts and the summed (unsmoothed) cross entropy over ``loader``.

    Returns ``{"correct1": int, "correct5": int, ..., "n": int, "loss_sum": float}`` (one
    ``correct<k>`` per ``k`` in ``topk``; ``k`` above the class count counts every image). The
    model is put in eval mode and its previous mode restored afterwards.
    """
    ks = tuple(int(k) for k in topk)
    if not ks or min(ks) < 1:
        raise ValueError(f"topk must be ints >= 1, got {topk!r}")
    was_training = model.training
    model.to(device)
    model.eval()
    counts = dict.fromkeys(ks, 0)
    n = 0
    loss_sum = 0.0
    try:
        for x, y in _batches(loader):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            kmax = min(max(ks), logits.shape[1])
            top = logits.topk(kmax, dim=1).indices  # [B, kmax]
            hit = top.eq(y.unsqueeze(1))
            for k in ks:
                counts[k] += int(hit[:, : min(k, kmax)].any(1).sum())
            n += int(y.shape[0])
    finally:
        model.train(was_training)
    out: dict[str, Any] = {f"correct{k}": c for k, c in counts.items()}
    out["n"] = n
    out["loss_sum"] = loss_sum
    return out


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    loader: Iterable,
    *,
    batches: int = 50,
    device: str | torch.device = "cpu",
) -> int:
    """Re-estimate BatchNorm running statistics from up to ``batches`` batches of ``loader``.

    Statistics are reset and accumulated as a cumulative average (``momentum=None``) with only
    the BN layers in train mode (dropout and quantizers stay in eval), then the momentum and all
    module modes are restored. Returns the number of batches used (0 when the model has no BN).
    If the loader yields nothing, the old statistics are put back and ``ValueError`` is raised.
    """
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    saved = [
        (
            m.momentum,
            {
                k: v.clone()
                for k, v in m.state_dict().items()
                if k in ("running_mean", "running_var", "num_batches_tracked")
            },
        )
        for m in bns
    ]
    used = 0
    model.to(device)
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the batches seen
            m.train()
        for x, _y in _batches(loader):
            if used >= batches:
                break
            model(x.to(device, non_blocking=True))
            used += 1
        if used == 0:
            raise ValueError("recalibrate_bn: the loader yielded no batches")
    except BaseException:
        for m, (_mom, state) in zip(bns, saved, strict=True):
            for k, v in state.items():
                getattr(m, k).copy_(v)
        raise
    finally:
        for m, (mom, _state) in zip(bns, saved, strict=True):
            m.momentum = mom
        for mod, was in modes.items():
            mod.training = was
    log.debug("recalibrate_bn: %d BN layers, %d batches", len(bns), used)
    return used
