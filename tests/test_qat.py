"""The shared QAT trainer (recipe, KD, divergence, checkpoints/resume) and TTN-RE / TTQ."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cnn
from ternbench.core.train import TrainingDivergedError
from ternbench.methods import ConfigError, QuantContext, create_method, max_logit_diff
from ternbench.methods._layers import QuantConv2d, swap_layers
from ternbench.methods._ptq import calibrate_activations, make_layer, policy_layer
from ternbench.methods._qat import (
    QATRecipe,
    kd_loss,
    qat_train,
    recipe_deviations,
)
from ternbench.methods.ttn_re import TTNREConfig, TTNREWeight, ttn_threshold_codes
from ternbench.methods.ttq import TTQWeight
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable 2-class problem: class 1 has a bright top-left quadrant."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 12, 12, generator=g)
    x[:, :, :6, :6] += 1.5 * y[:, None, None, None].float()
    return x, y


def _loader(seed: int = 0, n: int = 64, bs: int = 16) -> DataLoader:
    x, y = _data(n)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, generator=gen)


def _ctx(epochs: float = 0.0, ckpt: Path | None = None, loader=None) -> QuantContext:
    x, y = _data(32, seed=1)
    return QuantContext(
        calib_loader=[(x, y)],
        train_loader=loader if loader is not None else _loader(),
        train_epochs=epochs,
        checkpoint_dir=None if ckpt is None else str(ckpt),
        progress=False,
    )


def _ttn_model(t_ex: int = 1) -> nn.Module:
    """A tiny CNN with TTN-RE layers swapped in (fixed initial weights)."""
    torch.manual_seed(0)
    m = tiny_cnn(classes=2)
    cfg = TTNREConfig(t_ex=t_ex)
    swap_layers(m, policy_layer(cfg, lambda: TTNREWeight(cfg.thresholds())))
    calibrate_activations(m, [_data(8)])
    return m


# ------------------------------------------------------------------------------- the recipe


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"lr": 0}, r"QATRecipe.lr must be a finite number > 0, got 0"),
        ({"lr": float("nan")}, r"QATRecipe.lr must be a finite number > 0"),
        ({"epochs": -1}, r"QATRecipe.epochs must be None \(the profile's budget\) or a number"),
        ({"optimizer": "rmsprop"}, r"QATRecipe.optimizer must be 'sgd' or 'adam', got 'rmsprop'"),
        ({"momentum": 1.0}, r"QATRecipe.momentum must be in \[0, 1\), got 1.0"),
        ({"nesterov": 1}, r"QATRecipe.nesterov must be a bool, got 1"),
        ({"schedule": "poly"}, r"QATRecipe.schedule must be one of"),
        ({"schedule": "step"}, r"QATRecipe.milestones must be non-empty when schedule is 'step'"),
        ({"milestones": (0.5, 0.3)}, r"QATRecipe.milestones must be increasing fractions"),
        ({"milestones": (1.5,)}, r"QATRecipe.milestones must be increasing fractions"),
        ({"milestones": (0.5,), "gammas": (0.1, 0.2)}, r"QATRecipe.gammas must be empty"),
        ({"label_smoothing": 1.0}, r"QATRecipe.label_smoothing must be in \[0, 1\)"),
        ({"kd_temperature": 0}, r"QATRecipe.kd_temperature must be a finite number > 0"),
        ({"kd_alpha": 1.5}, r"QATRecipe.kd_alpha must be in \[0, 1\], got 1.5"),
        ({"weight_decay": -1e-4}, r"QATRecipe.weight_decay must be a finite number >= 0"),
    ],
)
def test_recipe_validation(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        QATRecipe(**kw)


def test_recipe_canonical_and_deviations() -> None:
    r = QATRecipe(epochs=2, lr=1, schedule="step", milestones=[0.5, 0.75])  # type: ignore[arg-type]
    assert r.milestones == (0.5, 0.75) and r.gammas == (0.1, 0.1)
    assert r == QATRecipe(epochs=2.0, lr=1.0, schedule="step", milestones=(0.5, 0.75))
    assert json.loads(r.to_json())["milestones"] == [0.5, 0.75]
    assert QATRecipe().resolve_epochs(_ctx(0.25)) == 0.25
    assert QATRecipe(epochs=3).resolve_epochs(_ctx(0.25)) == 3.0
    paper = QATRecipe(epochs=200, lr=0.1, schedule="step", milestones=(0.4,), gammas=(0.5,))
    devs = recipe_deviations(QATRecipe(epochs=1.0), paper)
    assert devs == [
        "epochs 1 instead of 200",
        "lr 0.01 instead of 0.1",
        "schedule cosine instead of step@0.4x0.5",
    ]
    assert recipe_deviations(paper, paper) == []


def test_method_config_errors_name_the_method() -> None:
    with pytest.raises(ConfigError, match=r"TTNREConfig.lr must be a finite number > 0"):
        create_method("ttn_re", lr=-1)
    with pytest.raises(ConfigError, match=r"TTQConfig.gammas must be"):
        create_method("ttq", schedule="step", milestones=[0.5], gammas=[0.1, 0.1])
    with pytest.raises(ConfigError, match=r"TTNREConfig.t_ex must be one of \(1, 2, 4\), got 3"):
        create_method("ttn_re", t_ex=3)
    with pytest.raises(
        ConfigError,
        match=r"TTNREConfig.delta must be a number in \(0, 1/t_ex\) = \(0, 0.25\), got 0.3",
    ):
        create_method("ttn_re", t_ex=4, delta=0.3)
    with pytest.raises(ConfigError, match=r"TTQConfig.t must be a number in \(0, 1\)"):
        create_method("ttq", t=0)
    with pytest.raises(ConfigError, match="act_bits"):
        create_method("ttq", act_bits=4)
    cfg = create_method("ttn_re", milestones=[0.5], schedule="step").config
    assert isinstance(cfg, TTNREConfig) and cfg.milestones == (0.5,)
    assert cfg.recipe().schedule == "step"


# ---------------------------------------------------------------------------------- TTN-RE


def test_ttn_threshold_and_alpha_hand_made() -> None:
    w = torch.tensor([[1.0, -0.5, 0.04, 0.06], [-0.08, 0.2, 0.0, -0.1]])
    # max|W| = 1: delta 0.05 keeps |w| >= 0.05, delta 0.1 keeps |w| >= 0.1
    c1, a1 = ttn_threshold_codes(w, 0.05)
    assert c1.tolist() == [[1, -1, 0, 1], [-1, 1, 0, -1]]
    assert float(a1) == pytest.approx((1 + 0.5 + 0.06 + 0.08 + 0.2 + 0.1) / 6)
    c2, a2 = ttn_threshold_codes(w, 0.1)
    assert c2.tolist() == [[1, -1, 0, 0], [0, 1, 0, -1]]
    assert float(a2) == pytest.approx((1 + 0.5 + 0.2 + 0.1) / 4)
    assert TTNREConfig(t_ex=2).thresholds() == (0.05, 0.1)
    assert TTNREConfig(t_ex=4).thresholds() == (0.05, 0.1, 0.15, 0.2)
    zero, a0 = ttn_threshold_codes(torch.zeros(2, 3), 0.05)
    assert not zero.any() and float(a0) == 0.0

    # t_ex = 2: the layer weight is a1*T1 + a2*T2, exported as two branches
    q = TTNREWeight((0.05, 0.1))
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = make_layer(lin, q, 32)
    layer(torch.randn(3, 4))
    expect = float(a1) * c1 + float(a2) * c2
    torch.testing.assert_close(layer.quantized_weight(), expect)
    main, br = layer.exports("fc")
    assert (main.name, br.name, br.branch_of, main.branch_of) == ("fc", "fc#1", "fc", "")
    assert br.bias is None and main.bias is not None
    assert np.array_equal(main.codes, c1.numpy()) and np.array_equal(br.codes, c2.numpy())
    assert main.scales.shape == (2, 1) and np.allclose(br.scales, float(a2))
    total = main.dequantized_weight() + br.dequantized_weight()
    np.testing.assert_allclose(total, expect.numpy(), rtol=1e-6)


@pytest.mark.parametrize("t_ex", [1, 2])
def test_ttn_ste_gradient(t_ex: int) -> None:
    w = torch.tensor([[1.5, -0.5, 0.04], [-1.0, 0.2, 0.9]], requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    (TTNREWeight((0.05, 0.1)[:t_ex])(w) * g).sum().backward()
    assert w.grad is not None
    # identity per branch, zeroed where |w| >= 1
    expect = g * (w.detach().abs() < 1) * t_ex
    torch.testing.assert_close(w.grad, expect)


# -------------------------------------------------------------------------------------- TTQ


def test_ttq_codes_scales_and_gradients() -> None:
    w0 = torch.tensor([[0.8, -0.4, 0.03, -0.02, 0.5], [0.1, -0.6, 0.0, 0.3, -0.2]])
    q = TTQWeight(0.05)  # delta = 0.05 * 0.8 = 0.04; the paper's normaliser max|w| = 0.8
    q.init_scales(w0)
    assert float(q.norm) == pytest.approx(0.8)
    assert float(q.wp.detach()) == pytest.approx((0.8 + 0.5 + 0.1 + 0.3) / 4 / 0.8)
    assert float(q.wn.detach()) == pytest.approx((0.4 + 0.6 + 0.2) / 3 / 0.8)
    w = w0.clone().requires_grad_(True)
    out = q(w)
    wp, wn = float(q.wp.detach()), float(q.wn.detach())
    pos = (w0 > 0.04).float()
    neg = (w0 < -0.04).float()
    torch.testing.assert_close(out, 0.8 * (wp * pos - wn * neg))
    g = torch.arange(1.0, 11.0).reshape(2, 5)
    (out * g).sum().backward()
    assert q.wp.grad is not None and q.wn.grad is not None and w.grad is not None
    # the paper's rules in the normalised coordinates w' = w / 0.8, ŵ' = ŵ / 0.8:
    # dL/dW_p = Σ_{I_p} dL/dŵ', dL/dw' = {W_p, 1, W_n} * dL/dŵ' (so dL/dw = 0.8**2 * ...)
    assert float(q.wp.grad) == pytest.approx(0.8 * float((g * pos).sum()))
    assert float(q.wn.grad) == pytest.approx(-0.8 * float((g * neg).sum()))
    torch.testing.assert_close(w.grad, 0.64 * g * (wp * pos + (1 - pos - neg) + wn * neg))


def test_ttq_scale_steps_are_relative_to_the_scale() -> None:
    """The bug that stalled TTQ near 55%: W_p in raw weight units (~0.04) took gradient sums of
    ~5 per step. In the normalised units one SGD step moves W_p by a fraction of itself."""
    torch.manual_seed(0)
    w = torch.randn(64, 64 * 9) * 0.02
    q = TTQWeight(0.05)
    q.init_scales(w)
    g = torch.full_like(w, 1e-4)  # a coherent dL/dŵ, summed over ~18k weights of I_p
    (q(w.requires_grad_(True)) * g).sum().backward()
    assert q.wp.grad is not None
    assert abs(float(q.wp.grad)) * 0.01 < 0.1 * float(q.wp.detach())


def test_ttq_two_branch_export_equals_fake_quant() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, bias=True)
    q = TTQWeight(0.05)
    q.init_scales(conv.weight)
    layer = make_layer(conv, q, 32)
    with torch.no_grad():  # learned scales move away from their start
        q.wp.mul_(1.3)
        q.wn.mul_(0.7)
    layer(torch.randn(1, 3, 5, 5))
    pos, neg = layer.exports("c")
    assert neg.name == "c#1" and neg.branch_of == "c" and neg.bias is None
    assert set(np.unique(pos.codes)) <= {0, 1} and set(np.unique(neg.codes)) <= {-1, 0}
    sp, sn = q.scales()
    assert np.allclose(pos.scales, float(sp)) and np.allclose(neg.scales, float(sn))
    fq = layer.quantized_weight().detach().reshape(4, -1).numpy()
    np.testing.assert_array_equal(pos.dequantized_weight() + neg.dequantized_weight(), fq)


# ------------------------------------------------------------------- parity after training


@pytest.mark.parametrize(
    "name,kw",
    [
        ("ttn_re", {"t_ex": 1}),
        ("ttn_re", {"t_ex": 2}),
        ("ttn_re", {"t_ex": 4}),
        ("ttn_re", {"t_ex": 2, "act_bits": 8, "first_last": "int8"}),
        ("ttq", {}),
        ("ttq", {"first_last": "same", "act_bits": 8}),
    ],
)
def test_parity_after_training(name: str, kw: dict) -> None:
    torch.manual_seed(0)
    fp = tiny_cnn(classes=2).eval()
    qm = create_method(name, lr=0.05, **kw).quantize(fp, _ctx(1.0))
    assert not qm.module.training
    assert qm.info["epochs_run"] == 1.0 and qm.info["resumed_from_epoch"] == 0
    x, _ = _data(16, seed=3)
    assert max_logit_diff(qm, x) < 1e-4
    ex = qm.export()
    n_branch = {"ttn_re": kw.get("t_ex", 1), "ttq": 2}[name]
    primaries = [k for k, lx in ex.items() if not lx.branch_of and lx.weight_format == "ternary"]
    for k in primaries:
        assert len([lx for lx in ex.values() if lx.branch_of == k]) == n_branch - 1
    # the weights really trained, and the caller's model is untouched
    w_after = next(m for m in qm.module.modules() if isinstance(m, QuantConv2d)).weight
    assert not torch.equal(w_after.detach(), fp[0].weight.detach())
    assert not any(type(m).__name__.startswith("Quant") for m in fp.modules())


def test_info_ledger_and_zero_budget() -> None:
    torch.manual_seed(0)
    fp = tiny_cnn(classes=2).eval()
    before = copy.deepcopy(fp.state_dict())
    qm = create_method("ttn_re", t_ex=2).quantize(fp, _ctx(0.0))
    info = qm.info
    assert info["epochs_run"] == 0.0 and info["train_steps"] == 0
    assert info["recipe"]["epochs"] == 0.0
    assert "epochs 0 instead of 200" in info["deviations"]
    assert any("from scratch" in d for d in info["deviations"])
    assert "200 epochs" in info["paper_recipe"] and info["thresholds"] == [0.05, 0.1]
    for k, v in fp.state_dict().items():
        assert torch.equal(v, before[k])
    # no training: the latent weights are the FP32 ones
    q0 = next(m for m in qm.module.modules() if isinstance(m, QuantConv2d))
    torch.testing.assert_close(q0.weight, fp[0].weight)
    ttq = create_method("ttq", first_last="same").quantize(fp, _ctx(0.0)).info
    assert any("instead of 1.0" in d for d in ttq["deviations"])
    assert "first/last layers same instead of FP32" in ttq["deviations"]


# ---------------------------------------------------------------------------------- training


@pytest.mark.training
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name,ratio,min_correct", [("ttn_re", 0.5, 230), ("ttq", 0.9, 0)])
def test_training_lowers_the_loss(name: str, ratio: float, min_correct: int) -> None:
    """Measured (seeds 0-2): TTN-RE loss ratio 0.31-0.40 and 243-251/256 held-out correct;
    TTQ (FP first/last, only two ternary convs) ratio 0.03-0.83."""
    from ternbench.core.train import evaluate

    torch.manual_seed(0)
    fp = tiny_cnn(classes=2).eval()
    qm = create_method(name, lr=0.2, epochs=6).quantize(fp, _ctx(0.0))
    hist = qm.info["train_history"]
    assert len(hist) == 6 and qm.info["epochs_run"] == 6.0
    assert hist[-1]["loss"] < ratio * hist[0]["loss"]
    x, y = _data(256, seed=7)
    assert evaluate(qm.module, [(x, y)])["correct1"] >= min_correct


@pytest.mark.training
@pytest.mark.usefixtures("one_thread")
def test_kd_runs_and_matches_formula() -> None:
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.5, 3.0, -1.0]])
    T = 2.0
    pt = F.softmax(t / T, 1)
    manual = (pt * (pt.log() - F.log_softmax(s / T, 1))).sum() * T * T  # T**2 * KL
    assert float(kd_loss(s, t, T)) == pytest.approx(float(manual))
    assert float(kd_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)  # no teacher-entropy floor
    # same gradient as the soft cross entropy (they differ by a constant)
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    kd_loss(s1, t, T).backward()
    (-(pt * F.log_softmax(s2 / T, 1)).sum() * T * T).backward()
    assert s1.grad is not None and s2.grad is not None
    torch.testing.assert_close(s1.grad, s2.grad)
    torch.manual_seed(0)
    teacher = tiny_cnn(classes=2).eval()
    m = _ttn_model()
    h = qat_train(
        m,
        _ctx(),
        QATRecipe(epochs=2, lr=0.05, kd=True, kd_alpha=0.5),
        method="x",
        teacher=teacher,
    )
    assert h["steps"] == 8 and all(math.isfinite(v) for v in h["step_loss"])
    with pytest.raises(ValueError, match="kd needs the FP32 teacher"):
        qat_train(m, _ctx(), QATRecipe(epochs=1, kd=True), method="x")


def test_divergence_is_reported_with_the_step() -> None:
    calls = {"n": 0}

    def extra(module: nn.Module) -> torch.Tensor:
        calls["n"] += 1
        return torch.tensor(float("nan") if calls["n"] == 3 else 0.0)

    with pytest.raises(TrainingDivergedError, match=r"ttn_re QAT: loss became nan at step 3/4"):
        qat_train(_ttn_model(), _ctx(), QATRecipe(epochs=1), method="ttn_re", loss_extra=extra)
    with pytest.raises(TrainingDivergedError, match="loss became"):
        qat_train(_ttn_model(), _ctx(), QATRecipe(epochs=3, lr=1e30), method="ttn_re")


def test_before_step_sees_gradients() -> None:
    seen: list[float] = []

    def hook(module: nn.Module) -> None:
        g = next(module.parameters()).grad
        assert g is not None
        seen.append(float(g.abs().sum()))

    h = qat_train(_ttn_model(), _ctx(), QATRecipe(epochs=0.5), method="x", before_step=hook)
    assert h["steps"] == 2 and len(seen) == 2 and all(v > 0 for v in seen)


# ------------------------------------------------------------------------ checkpoint/resume


class _Killed(Exception):
    pass


def _kill_at(step: int):
    calls = {"n": 0}

    def hook(module: nn.Module) -> None:
        calls["n"] += 1
        if calls["n"] == step:
            raise _Killed

    return hook


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), k


@pytest.mark.usefixtures("one_thread")
def test_checkpoint_resume_matches_uninterrupted(tmp_path: Path) -> None:
    recipe = QATRecipe(epochs=2, lr=0.05)
    ref = _ttn_model(t_ex=2)
    h_ref = qat_train(ref, _ctx(), recipe, method="ttn_re")
    assert h_ref["steps"] == 8 and h_ref["resumed_from_epoch"] == 0

    # killed during epoch 2 (its 2nd step): the epoch-1 checkpoint survives
    m = _ttn_model(t_ex=2)
    with pytest.raises(_Killed):
        qat_train(m, _ctx(ckpt=tmp_path), recipe, method="ttn_re", before_step=_kill_at(6))
    path = tmp_path / "ttn_re.ckpt"
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == 4 and isinstance(ck["recipe"], str)
    assert json.loads(ck["recipe"])["recipe"]["lr"] == 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ttn_re.ckpt"]  # no temp files

    # a new process: fresh model and loader; it resumes after epoch 1
    m2 = _ttn_model(t_ex=2)
    h2 = qat_train(m2, _ctx(ckpt=tmp_path), recipe, method="ttn_re")
    assert h2["resumed_from_epoch"] == 1 and h2["epochs_run"] == 2.0
    assert h2["step_loss"] == h_ref["step_loss"]
    assert [e["epoch"] for e in h2["epochs"]] == [1, 2]
    _same_weights(m2, ref)
    assert torch.load(path, weights_only=True)["epoch"] == 2  # kept, not deleted

    # a finished checkpoint: nothing to train, same weights (e.g. killed during evaluation)
    m3 = _ttn_model(t_ex=2)
    h3 = qat_train(m3, _ctx(ckpt=tmp_path), recipe, method="ttn_re", before_step=_kill_at(1))
    assert h3["resumed_from_epoch"] == 2 and h3["step_loss"] == h_ref["step_loss"]
    _same_weights(m3, ref)


@pytest.mark.usefixtures("one_thread")
def test_method_level_resume(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fp = tiny_cnn(classes=2).eval()
    a = create_method("ttq", lr=0.05).quantize(fp, _ctx(1.0, ckpt=tmp_path))
    assert a.info["resumed_from_epoch"] == 0 and (tmp_path / "ttq.ckpt").is_file()
    b = create_method("ttq", lr=0.05).quantize(fp, _ctx(1.0, ckpt=tmp_path))
    assert b.info["resumed_from_epoch"] == 1 and b.info["train_steps"] == 4
    _same_weights(a.module, b.module)
    # another recipe does not pick the checkpoint up
    c = create_method("ttq", lr=0.02).quantize(fp, _ctx(1.0, ckpt=tmp_path))
    assert c.info["resumed_from_epoch"] == 0


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-shape", "other-format"])
def test_bad_checkpoint_is_ignored(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    recipe = QATRecipe(epochs=1, lr=0.05)
    good = _ttn_model()
    qat_train(good, _ctx(ckpt=tmp_path), recipe, method="ttn_re")
    path = tmp_path / "ttn_re.ckpt"
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        ck = torch.load(path, weights_only=True)
        if damage == "wrong-shape":  # recipe key matches, contents do not: loads nothing
            k = next(k for k in ck["model"] if k.endswith("weight"))
            ck["model"][k] = torch.zeros(3)
            ck["optimizer"] = {"state": {}, "param_groups": []}
        else:
            ck["format"] = 999
        torch.save(ck, path)
    m = _ttn_model()
    with caplog.at_level(logging.WARNING, logger="ternbench.methods._qat"):
        h = qat_train(m, _ctx(ckpt=tmp_path), recipe, method="ttn_re")
    assert h["resumed_from_epoch"] == 0
    assert any("ignoring" in r.getMessage() for r in caplog.records)
    _same_weights(m, good)  # trained from the start, nothing half-loaded
    assert torch.load(path, weights_only=True)["epoch"] == 1  # and rewritten whole


def test_no_loader_or_empty_loader() -> None:
    ctx = QuantContext(calib_loader=[_data(4)], train_loader=None, train_epochs=1.0)
    with pytest.raises(ValueError, match="needs ctx.train_loader"):
        qat_train(_ttn_model(), ctx, QATRecipe(), method="x")
    ctx.train_loader = []
    with pytest.raises(ValueError, match="yields no batches"):
        qat_train(_ttn_model(), ctx, QATRecipe(), method="x")


@pytest.mark.training
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["ttq", "ttn_re", "rtn", "sttn"])
def test_every_qat_method_records_its_training_curve(name: str) -> None:
    torch.manual_seed(0)
    x, y = _data(64, seed=3)
    ctx = QuantContext(calib_loader=[(x[:32], y[:32])], train_loader=_loader(),
                       train_epochs=1.0, val_loader=[(x, y)], eval_points=2)
    qm = create_method(name).quantize(tiny_cnn(classes=2).eval(), ctx)
    curve = qm.info["train_curve"]
    assert [p["step"] for p in curve] == [2, 4]  # 4 steps per epoch, two evaluation points
    assert all(0 <= p["val_top1"] <= 100 and math.isfinite(p["train_loss"]) for p in curve)
