"""Model registry, the FP32 trainer / evaluation / BN re-estimation, and the checkpoint cache."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_fashion
from ternbench.bench import cache
from ternbench.bench.cache import (
    CheckpointError,
    baseline_key,
    cache_dir,
    load_checkpoint,
    load_or_train_fp32,
    load_state_dict_file,
    save_checkpoint,
    ship_checkpoint,
    shipped_dir,
)
from ternbench.bench.config import PROFILES
from ternbench.bench.models import create_model, list_models
from ternbench.core.train import (
    TrainCfg,
    TrainingDivergedError,
    evaluate,
    recalibrate_bn,
    seed_everything,
    train,
)
from torch import nn


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TERNBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TERNBENCH_FASHION_MNIST", raising=False)
    return tmp_path / "cache"


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------ models


def test_model_registry() -> None:
    assert list_models()[:3] == ["resnet8", "resnet20", "resnet18"]
    assert list_models("resnet2*") == ["resnet20"]
    with pytest.raises(ValueError, match=r"Did you mean 'resnet8'"):
        create_model("resnet-8", in_chans=1, num_classes=10)


@pytest.mark.parametrize(
    "name,in_chans,expected",
    [
        ("resnet8", 1, 77_754),
        ("resnet8", 3, 78_042),
        ("resnet20", 1, 272_186),
        ("resnet20", 3, 272_474),
    ],
)
def test_cifar_resnet_param_counts(name: str, in_chans: int, expected: int) -> None:
    # Hand count for ResNet-8/3ch: stem 432+32, stage1 4608+64, stage2 13824+512+192,
    # stage3 55296+2048+384, fc 650 = 78042 (option-B 1x1 shortcuts included).
    m = create_model(name, in_chans=in_chans, num_classes=10)
    assert _n_params(m) == expected


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "resnet18"])
@pytest.mark.parametrize("in_chans,size", [(1, 28), (3, 32)])
def test_forward_shapes_and_layer_types(name: str, in_chans: int, size: int) -> None:
    m = create_model(name, in_chans=in_chans, num_classes=7, image_size=size).eval()
    with torch.no_grad():
        out = m(torch.randn(2, in_chans, size, size))
    assert out.shape == (2, 7)
    allowed = (
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.ReLU,
        nn.Linear,
        nn.AdaptiveAvgPool2d,
        nn.MaxPool2d,
        nn.Identity,
    )
    leaves = [mod for mod in m.modules() if not list(mod.children())]
    assert all(isinstance(mod, allowed) for mod in leaves), {type(x) for x in leaves}
    weights = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d | nn.Linear)]
    assert all(
        mod.groups == 1 and mod.dilation == (1, 1)
        for _, mod in weights
        if isinstance(mod, nn.Conv2d)
    )
    first, last = weights[0][1], weights[-1][1]
    assert isinstance(first, nn.Conv2d) and first.in_channels == in_chans
    assert isinstance(last, nn.Linear) and last.out_features == 7
    if name == "resnet18":  # small-image stem: 3x3 stride 1, no max pool
        assert first.kernel_size == (3, 3) and first.stride == (1, 1)
        assert isinstance(m.maxpool, nn.Identity)


def test_resnet18_imagenet_stem() -> None:
    m = create_model("resnet18", in_chans=1, num_classes=1000, image_size=224)
    assert m.conv1.kernel_size == (7, 7) and m.conv1.in_channels == 1
    assert isinstance(m.maxpool, nn.MaxPool2d)
    assert 11.1e6 < _n_params(m) < 11.7e6
    m3 = create_model("resnet18", in_chans=3, num_classes=1000, image_size=224)
    assert _n_params(m3) == 11_689_512  # torchvision's published ResNet-18 size
    with torch.no_grad():
        assert m3.eval()(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


# ----------------------------------------------------------------------------------- TrainCfg


def test_traincfg_validation() -> None:
    with pytest.raises(ValueError, match=r"TrainCfg.epochs must be a number > 0, got 0"):
        TrainCfg(epochs=0)
    with pytest.raises(ValueError, match=r"TrainCfg.optimizer must be one of"):
        TrainCfg(optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"TrainCfg.batch_size must be an int >= 1, got 1.5"):
        TrainCfg(batch_size=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="TrainCfg.train_subset"):
        TrainCfg(train_subset=0)
    with pytest.raises(ValueError, match="TrainCfg.momentum"):
        TrainCfg(momentum=1.0)
    with pytest.raises(ValueError, match="TrainCfg.seed"):
        TrainCfg(seed=True)  # type: ignore[arg-type]
    # ints and floats canonicalise, so equal configs share a cache key
    assert TrainCfg(epochs=3, lr=1) == TrainCfg(epochs=3.0, lr=1.0)
    assert isinstance(TrainCfg(epochs=3).epochs, float)


# ------------------------------------------------------------------------- synthetic training


def _toy_batches(n_batches: int = 10, bs: int = 16, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(bs, 4, generator=g)
        out.append((x, (x[:, 0] > 0).long()))
    return out


def _toy_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("epochs,steps,n_records", [(0.5, 5, 1), (1, 10, 1), (1.5, 15, 2)])
def test_fractional_epochs(epochs: float, steps: int, n_records: int) -> None:
    h = train(_toy_model(), _toy_batches(), TrainCfg(epochs=epochs, lr=0.05), progress=False)
    assert h["steps"] == steps and len(h["step_loss"]) == steps
    assert len(h["epochs"]) == n_records


@pytest.mark.parametrize(
    "optimizer,schedule", [("sgd", "cosine"), ("sgd", "step"), ("adam", "onecycle")]
)
def test_optimizers_and_schedules_learn(optimizer: str, schedule: str) -> None:
    cfg = TrainCfg(
        epochs=4,
        lr=0.01 if optimizer == "adam" else 0.1,
        optimizer=optimizer,
        schedule=schedule,
        label_smoothing=0.0,
    )  # type: ignore[arg-type]
    h = train(_toy_model(), _toy_batches(), cfg, progress=False)
    assert h["epochs"][-1]["loss"] < h["epochs"][0]["loss"]


def test_train_is_deterministic_and_callback_stops() -> None:
    seen: list[int] = []

    def stop_after_first(epoch: int, rec: dict) -> bool:
        seen.append(epoch)
        return True

    cfg = TrainCfg(epochs=3)
    seed_everything(0)
    m1 = _toy_model()
    h1 = train(m1, _toy_batches(), cfg, progress=False, on_epoch_end=stop_after_first)
    assert seen == [0] and h1["steps"] == 10
    seed_everything(0)
    m2 = _toy_model()
    h2 = train(m2, _toy_batches(), cfg, progress=False, on_epoch_end=stop_after_first)
    assert h1["step_loss"] == h2["step_loss"]
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_divergence_names_the_step() -> None:
    calls = {"n": 0}

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = F.cross_entropy(logits, y)
        return loss * float("nan") if calls["n"] == 3 else loss

    with pytest.raises(TrainingDivergedError, match=r"loss became nan at step 3/10"):
        train(_toy_model(), _toy_batches(), TrainCfg(epochs=1), progress=False, loss_fn=loss_fn)
    assert issubclass(TrainingDivergedError, RuntimeError)


def test_evaluate_exact_counts() -> None:
    # Identity model: the inputs are the logits, so the expected counts follow by hand.
    logits = torch.tensor(
        [
            [5.0, 4, 3, 2, 1, 0],  # y=0: top1 hit
            [5.0, 4, 3, 2, 1, 0],  # y=4: top5 hit only
            [5.0, 4, 3, 2, 1, 0],  # y=5: miss
            [0.0, 0, 9, 0, 0, 1],  # y=2: top1 hit
        ]
    )
    y = torch.tensor([0, 4, 5, 2])
    loader = [(logits[:2], y[:2]), (logits[2:], y[2:])]
    r = evaluate(nn.Identity(), loader, topk=(1, 2, 5))
    assert r == {
        "correct1": 2,
        "correct2": 2,
        "correct5": 3,
        "n": 4,
        "loss_sum": pytest.approx(float(F.cross_entropy(logits, y, reduction="sum"))),
    }
    assert all(type(r[k]) is int for k in ("correct1", "correct5", "n"))
    # k larger than the class count counts every image
    r2 = evaluate(nn.Identity(), [(logits[:, :3], torch.tensor([0, 1, 2, 2]))], topk=(1, 5))
    assert r2["correct5"] == 4 and r2["correct1"] == 2


def test_evaluate_restores_mode() -> None:
    m = _toy_model().train()
    evaluate(m, _toy_batches(2))
    assert m.training


def test_recalibrate_bn_cumulative_average() -> None:
    bn = nn.BatchNorm2d(2, momentum=0.3)
    model = nn.Sequential(nn.Dropout(0.5), bn).eval()
    model[0].train()  # a train-mode dropout must also be back in train mode afterwards
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        bn.running_mean.fill_(-7.0)
        bn.running_var.fill_(42.0)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 2, 3, 3, generator=g) * 2 + 3, torch.zeros(8)) for _ in range(6)]
    used = recalibrate_bn(model, data, batches=4)
    assert used == 4
    # Dropout was held in eval during the pass, so BN saw the raw data: the cumulative average
    # of 4 equal-size batch means is the mean over those batches.
    xs = torch.cat([x for x, _ in data[:4]])
    torch.testing.assert_close(bn.running_mean, xs.mean(dim=(0, 2, 3)))
    var_unbiased = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x, _ in data[:4]])
    torch.testing.assert_close(bn.running_var, var_unbiased.mean(0))
    assert bn.momentum == 0.3 and not bn.training and model[0].training
    assert recalibrate_bn(model, data, batches=50) == 6
    assert recalibrate_bn(_toy_model(), data) == 0  # no BN


def test_recalibrate_bn_empty_loader_keeps_stats() -> None:
    bn = nn.BatchNorm2d(2)
    assert bn.running_mean is not None
    with torch.no_grad():
        bn.running_mean.fill_(1.5)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(nn.Sequential(bn), [])
    assert torch.equal(bn.running_mean, torch.full((2,), 1.5)) and bn.momentum == 0.1


# ---------------------------------------------------------------------- real data training


@needs_fashion
@pytest.mark.training
@pytest.mark.usefixtures("one_thread")
def test_resnet8_fashion_mnist_short_run_learns() -> None:
    from ternbench.bench.data import load_dataset, make_loader, subset_indices

    ds = load_dataset("fashion-mnist", "train", augment=True)
    idx = subset_indices(len(ds), 512, seed=0)
    loader = make_loader(ds, idx, 32, shuffle=True, seed=0)
    plain = make_loader(load_dataset("fashion-mnist", "train"), idx, 256)
    seed_everything(0)
    model = create_model("resnet8", in_chans=1, num_classes=10)
    before = evaluate(model, plain)
    h = train(model, loader, TrainCfg(epochs=1, batch_size=32, train_subset=512), progress=False)
    assert h["steps"] == 16 and all(math.isfinite(v) for v in h["step_loss"])
    after = evaluate(model, plain)
    assert after["n"] == 512
    # measured over seeds 0-2: loss ratio 0.78-0.89, +94..+148 correct of 512
    assert after["loss_sum"] < 0.95 * before["loss_sum"]
    assert after["correct1"] >= before["correct1"] + 60


# --------------------------------------------------------------------------------- the cache


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("TERNBENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "ternbench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "ternbench"


@needs_fashion
def test_baseline_key_stable() -> None:
    k = baseline_key("resnet8", "fashion-mnist", TrainCfg())
    # Pinned: changing it silently orphans every cached and shipped checkpoint (bump
    # FORMAT_VERSION on purpose instead, and update this value).
    assert k == baseline_key("resnet8", "fashion-mnist", TrainCfg(epochs=3.0, seed=0))
    assert k != baseline_key("resnet8", "fashion-mnist", TrainCfg(seed=1))
    assert k != baseline_key("resnet20", "fashion-mnist", TrainCfg())
    assert k == _PINNED_KEY
    # the profiles' recipe (plateau rule) is the shipped baseline's, for both blocks
    fp32 = PROFILES["default"].fp32
    for model, key in _SHIPPED.items():
        assert baseline_key(model, "fashion-mnist", fp32) == key
        assert (shipped_dir() / f"{key}.safetensors").is_file()


# format 2: the key covers the dataset's fingerprint (root, split sizes, content hash)
_PINNED_KEY = "resnet8-fashion-mnist-af47f4ff464e9865"
_SHIPPED = {"resnet8": "resnet8-fashion-mnist-fce01dc17f4c7de9",
            "sttn_resnet8": "sttn_resnet8-fashion-mnist-f532f08e987a6a81"}


def _small_state() -> dict[str, torch.Tensor]:
    seed_everything(0)
    return create_model("resnet8", in_chans=1, num_classes=10).state_dict()


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    state = _small_state()
    path = tmp_path / "ck" / "x.safetensors"
    save_checkpoint(path, state, {"model": "resnet8", "acc": 0.5})
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json", "x.safetensors"]  # no tmp
    side = json.loads(path.with_suffix(".json").read_text())
    assert len(side["sha256"]) == 64 and side["size"] == path.stat().st_size
    loaded, meta = load_checkpoint(path)
    assert meta == {"model": "resnet8", "acc": 0.5}
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype


def test_checkpoint_corruption_detected(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_checkpoint(path, _small_state(), {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)
    path.write_bytes(data)
    load_checkpoint(path)  # intact again
    path.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match="no metadata"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.safetensors")


class _Payload:
    """Unpickling this runs ``os.system`` (what an unsafe checkpoint can do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["torch.save", "raw-pickle"])
def test_unsafe_pickle_refused(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    if fmt == "torch.save":  # the realistic case: a zip checkpoint with a payload inside
        torch.save({"conv.weight": torch.zeros(2), "x": _Payload(marker)}, evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump({"x": _Payload(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"refused.*weights_only") as ei:
        load_state_dict_file(evil)
    assert "posix.system" in str(ei.value)  # says what was blocked
    assert "weights_only=False" not in str(ei.value)  # and never suggests the unsafe path
    assert not marker.exists(), "the pickle payload ran"


def test_load_state_dict_file_plain_and_wrapped(tmp_path: Path) -> None:
    state = {"fc.weight": torch.randn(3, 2), "fc.bias": torch.zeros(3)}
    torch.save(state, tmp_path / "a.pt")
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "b.pth"
    )
    for name in ("a.pt", "b.pth"):
        got = load_state_dict_file(tmp_path / name)
        assert got.keys() == state.keys()
        assert torch.equal(got["fc.weight"], state["fc.weight"])
    torch.save([1, 2, 3], tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_state_dict_file(tmp_path / "c.pt")


@needs_fashion
@pytest.mark.training
@pytest.mark.usefixtures("one_thread")
def test_load_or_train_cache_corrupt_and_shipped(
    tmp_path: Path,
    _tmp_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(cache, "shipped_dir", lambda: shipped)
    cfg = TrainCfg(epochs=1, batch_size=64, train_subset=256)

    m1, info1 = load_or_train_fp32("resnet8", "fashion-mnist", cfg, progress=False)
    assert info1["source"] == "trained" and info1["train_seconds"] > 0
    assert info1["history"]["steps"] == 4
    path = Path(info1["path"])
    assert path.parent == _tmp_cache and path.name == f"{info1['key']}.safetensors"
    assert not m1.training

    m2, info2 = load_or_train_fp32("resnet8", "fashion-mnist", cfg)
    assert info2["source"] == "cache" and "history" not in info2
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k

    # A truncated cache file is detected, deleted and retrained, never used.
    data = path.read_bytes()
    path.write_bytes(data[:1000])
    with caplog.at_level(logging.WARNING, logger="ternbench.bench.cache"):
        m3, info3 = load_or_train_fp32("resnet8", "fashion-mnist", cfg)
    assert info3["source"] == "trained"
    assert any("truncated" in r.getMessage() for r in caplog.records)
    load_checkpoint(path)  # the new file is whole
    # same seed, same data order, CPU: the retrained baseline matches the first
    for a, b in zip(m1.state_dict().values(), m3.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)

    # Ship it, empty the user cache: the shipped copy is used.
    target = ship_checkpoint("resnet8", "fashion-mnist", cfg)
    assert target == shipped / path.name and target.with_suffix(".json").is_file()
    path.unlink()
    _, info4 = load_or_train_fp32("resnet8", "fashion-mnist", cfg)
    assert info4["source"] == "shipped" and info4["path"] == str(target)


@needs_fashion
def test_ship_requires_cached(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train it first"):
        ship_checkpoint("resnet8", "fashion-mnist", TrainCfg(), dest=tmp_path)
