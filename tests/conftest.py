"""Shared fixtures: seeds, a tiny CNN, capability probes, a tiny profile for end-to-end runs."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from ternbench.schedules import _tvm
from torch import nn

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

FASHION = Path("/usr/share/datasets/fashion-mnist")


@functools.cache
def has_fashion_mnist() -> bool:
    root = Path(os.environ.get("TERNBENCH_FASHION_MNIST", FASHION))
    return all((root / f"{split}-images-idx3-ubyte.gz").exists() for split in ("train", "t10k"))


needs_fashion = pytest.mark.skipif(
    not has_fashion_mnist(),
    reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist (.ci/run does)",
)


# ------------------------------------------------------------------- x86 ISA levels (kernels)
#: every x86 ISA level the rules know, highest first (``_tvm`` imports no TVM at import time)
ISAS = tuple(reversed(_tvm.ISA_LEVELS))


def x86_info():
    """The x86 target as the rules see it now (the CPU's own level, or a forced one)."""
    return _tvm.target_info("x86")


def amx_granted() -> bool:
    """Whether this x86 target has AMX-INT8 and Linux granted this process the tile state."""
    return {"amx-tile", "amx-int8"} <= x86_info().features and _tvm.enable_amx()


def expected_t2_impl(features: frozenset[str], lx=None, full_rate: bool = True,
                     amx: bool = False) -> str:
    """The int8-activation ternary kernel a feature set should get (derived from the CPU's
    features, never a hard-coded name: CI machines differ). With the layer ``lx``: the
    table-lookup kernel on AVX-512BW for one-group convs whose input tables are each read >= 9
    times with >= 64 or <= 4 input channels, or >= 2 times with >= 128; on a CPU without
    full-rate permutes (``full_rate``: ``x86.full_rate_permutes``) for the <= 4-channel stems
    only. With AMX granted (``amx``): ``t2_amx`` for one-group convs with 64k input channels
    (1x1 ones too), first, and with AMX-BF16 ``bf16_amx`` for grouped (FGQ) convs (1x1
    ones from 64 input channels)."""
    if (amx and "amx-bf16" in features and lx is not None and lx.op == "conv2d"
            and lx.group_size < lx.fan_in
            and not (tuple(lx.kernel_size) == (1, 1) and lx.in_channels < 64)):
        return "tvm_bf16_amx"
    if (amx and lx is not None and lx.op == "conv2d" and lx.group_size >= lx.fan_in
            and lx.in_channels % 64 == 0):
        return "tvm_t2_amx"
    if lx is not None and {"avx512f", "avx512bw"} <= features and lx.op == "conv2d":
        (kh, kw), (sh, sw) = lx.kernel_size, lx.stride
        c = lx.in_channels
        reuse9, reuse2 = kh * kw >= 9 * sh * sw, kh * kw >= 2 * sh * sw
        chosen = reuse9 and c <= 4
        if full_rate:
            chosen = chosen or (reuse9 and c >= 64) or (reuse2 and c >= 128)
        if lx.group_size >= lx.fan_in and chosen:
            return "tvm_t2_lut"
    if {"avx512vnni", "avx512vl"} <= features or "avxvnni" in features:
        return "tvm_t2_vnni"
    return "tvm_t2_avx2" if "avx2" in features else "tvm_t2_generic"


def require_x86_features(features: set[str], what: str) -> None:
    """Skip, saying why, unless TVM is installed and this x86 target has ``features``
    (``what``: e.g. "t2_lut needs AVX-512BW"). Forced lower ISA levels lack them too."""
    pytest.importorskip("tvm")
    if not _tvm.is_x86_host():
        pytest.skip("not an x86 host")
    if not features <= x86_info().features:
        pytest.skip(f"{what}; this target is {x86_info().isa}")


def expected_tt_impl(features: frozenset[str], lx=None, full_rate: bool = True,
                     amx: bool = False) -> str:
    """The ternary x ternary kernel a feature set should get. With the layer ``lx``: with AMX
    granted (``amx``), ``tt_amx`` for one-group convs wider than one tap with 64k input
    channels, first; the byte-table lookup kernel on AVX512-VBMI for one-group convs (RTN's
    offsets included) whose input and output channels are both >= 32 (16 inputs: >= 64
    outputs; for the wider-than-1x1 cases used here), or whose input has <= 4 channels
    (stems); without full-rate permutes
    (``full_rate``) stems only."""
    if (amx and lx is not None and lx.op == "conv2d" and lx.group_size >= lx.fan_in
            and lx.in_channels % 64 == 0 and tuple(lx.kernel_size) != (1, 1)):
        return "tvm_tt_amx"
    if lx is not None and {"avx512bw", "avx512vbmi"} <= features and lx.op == "conv2d":
        wide = (full_rate and lx.kernel_size[1] > 1
                and (min(lx.in_channels, lx.out_channels) >= 32
                     or lx.in_channels >= 16 and lx.out_channels >= 64))
        if (lx.group_size >= lx.fan_in and lx.fan_in < 2 ** 15
                and (wide or lx.in_channels <= 4)):
            return "tvm_tt_lut"
    return "tvm_tt_popc" if "avx2" in features else "tvm_tt_popc_generic"


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch) -> str:
    """Runs the test once per x86 ISA level this CPU has (lower ones forced through
    ``TERNBENCH_ISA``), and skips the levels it lacks, saying so."""
    pytest.importorskip("tvm")
    if not _tvm.is_x86_host():
        pytest.skip("not an x86 host")
    level = request.param
    monkeypatch.delenv(_tvm.ISA_ENV, raising=False)
    have = _tvm.host_isa_levels()
    if level not in have:
        pytest.skip(f"this CPU has no {level} (it has: {', '.join(have)})")
    monkeypatch.setenv(_tvm.ISA_ENV, level)
    return level


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test (steady timings, fixed reduction order for bit-exact
    comparisons), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_cnn(in_chans: int = 1, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_chans, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    )


@pytest.fixture
def cnn() -> nn.Module:
    return tiny_cnn().eval()


@pytest.fixture(scope="session")
def tiny_profile():
    """A profile small enough for end-to-end tests (FP32 baseline: 1 epoch on 1024 images)."""
    from ternbench.bench.config import PROFILES, Profile
    from ternbench.core.train import TrainCfg

    prof = Profile(
        name="tiny",
        description="tests only",
        fp32=TrainCfg(epochs=1, train_subset=1024, seed=0),
        n_eval=256,
        n_calib=128,
        bn_batches=4,
        train_subset=512,
        train_epochs=0.1,
        eval_shards=2,
        latency_number=1,
        latency_repeat=2,
        latency_min_repeat_ms=0,
        batch_size=128,
        deploy_check_samples=8,
    )
    PROFILES["tiny"] = prof
    yield prof
    PROFILES.pop("tiny", None)


@pytest.fixture
def stream_everything(monkeypatch):
    """Every output counts as large (non-temporal stores), with empty kernel and schedule
    caches for the test (both are keyed by spec, and the bound is not part of it); the
    process's caches come back afterwards."""
    from ternbench.schedules import graph
    from ternbench.schedules.ops import lut, rules

    monkeypatch.setattr(lut, "STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(rules, "_CACHE", {})
    monkeypatch.setattr(graph, "_SCHED_CACHE", {})


def assert_int8_codes(q, clip: tuple[int, int], fixed_scale: bool, both_ends: bool = False):
    """An int8-output kernel's codes (``out_clip``): int8 inside the clip, not constant, and
    with a fixed output scale reaching the clip's ends (``both_ends``: both, else either)."""
    import numpy as np

    assert q.dtype == np.int8 and q.min() >= clip[0] and q.max() <= clip[1]
    assert len(np.unique(q)) >= min(3, clip[1] - clip[0] + 1)  # the codes are not constant
    if fixed_scale:  # a fixed scale: the clip bites and the check still holds
        ends = [bool((q == clip[1]).any()), bool((q == clip[0]).any())]
        assert all(ends) if both_ends else any(ends)
