"""Shared fixtures of the asv suite: fixed seeds, the small model, data and layer shapes.

Everything here is deterministic (fixed seeds, fixed shapes) so a change in a benchmark's
number means a change in the code under test, not in its inputs. Heavy imports (torch) happen
at module import: asv's forkserver pays them once and forks every benchmark from there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

#: every seed of the suite (model init, calibration batch, layer codes, evaluation subset)
SEED = 0
MODEL = "resnet8"
DATASET = "fashion-mnist"
#: size of the embedded Fashion-MNIST test subset that ``track_top1`` evaluates
N_EVAL = 500


def methods() -> list[str]:
    """Registered methods of the installed ternbench (the ``params`` of per-method benchmarks)."""
    from ternbench.methods import list_methods

    return list(list_methods())


def skip(reason: str) -> NotImplementedError:
    """asv marks a benchmark whose ``setup`` raises ``NotImplementedError`` as skipped (n/a)."""
    return NotImplementedError(reason)


def require_method(name: str) -> None:
    """Skip a parameter whose method the installed (older) commit does not register."""
    if name not in methods():
        raise skip(f"method {name!r} is not registered in this commit")


def small_model() -> torch.nn.Module:
    """ResNet-8 for 1x28x28 inputs, 10 classes, weights from a fixed seed, eval mode."""
    from ternbench.bench.models import create_model

    torch.manual_seed(SEED)
    return create_model(MODEL, in_chans=1, num_classes=10).eval()


def synthetic_context(n_calib: int = 64, n_train: int = 128) -> Any:
    """A ``QuantContext`` over fixed seeded tensors (no dataset files needed).

    Calibration is one batch of ``n_calib`` images; QAT/fine-tune methods get one epoch over
    ``n_train`` images, which bounds the cost of methods that train.
    """
    from ternbench.methods import QuantContext
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(n_train, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n_train,), generator=g)
    calib = DataLoader(TensorDataset(x[:n_calib], y[:n_calib]), batch_size=n_calib)
    train = DataLoader(TensorDataset(x, y), batch_size=64)
    return QuantContext(
        calib_loader=calib,
        train_loader=train,
        seed=SEED,
        train_epochs=1.0,
        bn_batches=2,
        progress=False,
    )


#: fixed kernel shapes: (op, weight format, out, in, spatial H=W, group size or None=fan-in);
#: the ResNet-8 stages on 28x28 inputs plus an int8 baseline of the middle stage
LAYERS: dict[str, tuple[str, str, int, int, int, int | None]] = {
    "t2_conv3x3_16x16_28": ("conv2d", "ternary", 16, 16, 28, None),
    "t2_conv3x3_32x32_14": ("conv2d", "ternary", 32, 32, 14, None),
    "t2_conv3x3_64x64_7_gs64": ("conv2d", "ternary", 64, 64, 7, 64),
    "int8_conv3x3_32x32_14": ("conv2d", "int8", 32, 32, 14, None),
}


def layer_export(key: str) -> Any:
    """A ``LayerExport`` of one of :data:`LAYERS` with seeded random codes and scales."""
    from ternbench.methods import LayerExport

    op, fmt, out, cin, hw, gs = LAYERS[key]
    rng = np.random.default_rng(SEED)
    k = 3 if op == "conv2d" else 1
    fan = cin * k * k
    gs = gs or fan
    if fmt == "ternary":
        codes = rng.integers(-1, 2, (out, fan)).astype(np.int8)
        scales = (rng.random((out, -(-fan // gs))) + 0.5).astype(np.float32)
    else:
        codes = rng.integers(-127, 128, (out, fan)).astype(np.int8)
        scales, gs = (rng.random((out, 1)) * 0.01 + 1e-3).astype(np.float32), fan
    conv = op == "conv2d"
    return LayerExport(
        name=key,
        op=op,  # type: ignore[arg-type]
        weight_format=fmt,  # type: ignore[arg-type]
        codes=codes,
        scales=scales,
        group_size=gs,
        bias=rng.standard_normal(out).astype(np.float32),
        act_mode="int",
        act_bits=8,
        act_scale=0.05,
        in_channels=cin,
        out_channels=out,
        kernel_size=(k, k),
        stride=(1, 1),
        padding=(1, 1) if conv else (0, 0),
        input_shape=(cin, hw, hw) if conv else (cin,),
        output_hw=(hw, hw) if conv else (1, 1),
    )


def accuracy_profile() -> Any:
    """The smoke profile cut to the asv budget: 500 test images, 256 calibration images,
    one epoch over 1024 training images for methods that fine-tune or train."""
    from ternbench.bench.config import PROFILES

    base = PROFILES["smoke"]
    changes = {
        "name": "asv",
        "description": "asv track_top1: fixed 500-image Fashion-MNIST test subset",
        "n_eval": N_EVAL,
        "n_calib": 256,
        "bn_batches": 4,
        "train_subset": 1024,
        "train_epochs": 1.0,
        "eval_shards": 1,
        # the layer-wise deploy parity check runs the integer reference (costly): keep it
        # exercised on a couple of images; its own tests cover it in depth
        "deploy_check_samples": 2,
    }
    known = {f.name for f in dataclasses.fields(base)}  # older commits lack some fields
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if k in known})
