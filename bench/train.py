"""Moved to :mod:`ternbench.core.train` (the training loop is shared with ``methods``); these
names stay importable from here for bench's callers."""

from __future__ import annotations

from ternbench.core.train import (
    TrainCfg,
    TrainingDivergedError,
    TrainState,
    curve_converged,
    eval_steps,
    evaluate,
    recalibrate_bn,
    seed_everything,
    train,
)

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
