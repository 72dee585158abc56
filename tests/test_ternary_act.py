"""Ternary-activation methods RTN and STTN: quantizer math on hand-made tensors, the STTN merge,
export/deploy parity and short trainings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import needs_fashion, tiny_cnn
from ternbench.bench.models import create_model
from ternbench.methods import (
    ConfigError,
    QuantContext,
    create_method,
    deploy,
    layer_parity,
    max_logit_diff,
)
from ternbench.methods._layers import iter_quant_layers
from ternbench.methods.rtn import RTNAct, RTNWeight, fit_affine, ternary_code
from ternbench.methods.sttn import STTNAct, STTNConv2d, STTNWeight, binary_sign
from torch import nn

# one thread: on a shared, loaded machine two torch threads made the training tests ~15x slower
# (spin-waiting); restored afterwards for the other test files
pytestmark = pytest.mark.usefixtures("one_thread")


def _ctx(x: torch.Tensor, epochs: float = 0.0, y: torch.Tensor | None = None) -> QuantContext:
    y = torch.zeros(len(x), dtype=torch.long) if y is None else y
    half = len(x) // 2
    return QuantContext(
        calib_loader=[(x, y)],
        train_loader=[(x[:half], y[:half]), (x[half:], y[half:])],
        bn_batches=2,
        train_epochs=epochs,
    )


# ------------------------------------------------------------------------------ RTN quantizers


def test_ternary_code_is_strict_threshold() -> None:
    x = torch.tensor([-2.0, -0.5, -0.49, 0.0, 0.5, 0.51, 3.0])
    assert ternary_code(x, 0.5).tolist() == [-1, 0, 0, 0, 0, 1, 1]


def test_rtn_act_forward_hand_made() -> None:
    q = RTNAct()
    with torch.no_grad():
        q.clip.fill_(2.0)  # Delta = 1
        q.gamma.fill_(3.0)
        q.beta.fill_(0.5)
    x = torch.tensor([-5.0, -1.5, -1.0, 0.3, 1.0, 1.01, 2.5])
    # T = [-1, -1, 0, 0, 0, 1, 1]; x_q = 3 T + 0.5
    assert q(x).tolist() == [-2.5, -2.5, 0.5, 0.5, 0.5, 3.5, 3.5]
    f = q.export_fields()
    assert f == {
        "act_mode": "ternary",
        "act_bits": 2,
        "act_scale": 3.0,
        "act_threshold": 1.0,
        "act_offset": 0.5,
    }


def test_rtn_act_gradients_are_exact() -> None:
    """d/dgamma = T, d/dbeta = 1 (everywhere, also where the STE saturates), d/dx = gamma/c
    inside the clip range and 0 outside."""
    q = RTNAct()
    c = 2.0
    with torch.no_grad():
        q.clip.fill_(c)
        q.gamma.fill_(1.7)
        q.beta.fill_(-0.2)
    x = torch.tensor([-3.0, -1.5, -0.4, 0.2, 1.2, 1.99, 2.0, 4.0], requires_grad=True)
    g = torch.tensor([0.3, -1.0, 2.0, 0.5, -0.7, 1.1, 0.9, -2.0])
    (q(x) * g).sum().backward()
    t = ternary_code(x.detach(), 1.0)
    assert torch.equal(t, torch.tensor([-1.0, -1, 0, 0, 1, 1, 1, 1]))
    assert q.gamma.grad is not None and q.beta.grad is not None and x.grad is not None
    assert q.gamma.grad.item() == pytest.approx(float((t * g).sum()))
    assert q.beta.grad.item() == pytest.approx(float(g.sum()))
    inside = (x.detach().abs() < c).float()
    assert torch.allclose(x.grad, 1.7 * g * inside / c)
    assert x.grad[0] == 0 and x.grad[-1] == 0 and x.grad[6] == 0  # |x| >= c: saturated


def test_rtn_weight_gradients_are_exact() -> None:
    w = torch.tensor([[0.9, -0.1, 0.3, -0.5], [2.0, 0.2, -0.2, 0.0]])
    q = RTNWeight(w, ratio=0.7)
    with torch.no_grad():
        q.gamma.copy_(torch.tensor([[0.8], [1.5]]))
        q.beta.copy_(torch.tensor([0.05, -0.1]))
    wp = w.clone().requires_grad_(True)
    g = torch.tensor([[1.0, -2.0, 0.5, 0.25], [-1.0, 3.0, 0.5, 2.0]])
    out = q(wp)
    delta = 0.7 * w.abs().mean(1, keepdim=True)  # [0.315, 0.385]
    t = torch.sign(w) * (w.abs() > delta)
    assert t.tolist() == [[1, 0, 0, -1], [1, 0, 0, 0]]
    assert torch.allclose(out, q.gamma.detach() * t + q.beta.detach()[:, None])
    (out * g).sum().backward()
    assert q.gamma.grad is not None and q.beta.grad is not None and wp.grad is not None
    assert torch.allclose(q.gamma.grad, (t * g).sum(1, keepdim=True))
    assert torch.allclose(q.beta.grad, g.sum(1))
    c = 2 * delta
    assert torch.allclose(wp.grad, q.gamma.detach() * g * (w.abs() < c) / c)
    assert wp.grad[1, 0] == 0  # |2.0| > c = 0.77: outside the clip range


def test_fit_affine_matches_lstsq() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    t = torch.sign(x) * (x.abs() > 0.6)
    gamma, beta = fit_affine(x, t, dim=1)
    for k in range(3):
        a = torch.stack([t[k], torch.ones(50, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(a, x[k, :, None]).solution.flatten()
        assert gamma[k].item() == pytest.approx(sol[0].item(), abs=1e-10)
        assert beta[k].item() == pytest.approx(sol[1].item(), abs=1e-10)
    g0, b0 = fit_affine(x, t, dim=1, offset=False)
    assert torch.all(b0 == 0)
    assert torch.allclose(g0, (x * t).sum(1) / (t * t).sum(1))


def test_rtn_weight_init_is_least_squares_fit() -> None:
    w = torch.randn(4, 18)
    q = RTNWeight(w)
    codes, scales, gs = q.encode(w)
    assert gs == 18 and scales.shape == (4, 1)
    err = ((w - (scales * codes + q.beta.detach()[:, None])) ** 2).sum()
    # any other (gamma, beta) for the same codes does worse
    for dg, db in [(0.01, 0.0), (-0.01, 0.0), (0.0, 0.01), (0.0, -0.01)]:
        other = ((w - ((scales + dg) * codes + q.beta.detach()[:, None] + db)) ** 2).sum()
        assert other > err


@pytest.mark.parametrize("offset", [True, False])
def test_rtn_act_calibration_finds_the_levels(offset: bool) -> None:
    """Samples near {-2, 0, 2}: the fit puts the threshold between the levels and recovers
    gamma ~ 2, beta ~ 0; post-ReLU-like samples near {0, 3} give beta + gamma ~ 3."""
    gen = torch.Generator().manual_seed(0)
    levels = torch.tensor([-2.0, 0.0, 2.0])[torch.randint(3, (4000,), generator=gen)]
    x = levels + 0.05 * torch.randn(4000, generator=gen)
    q = RTNAct(learn_offset=offset)
    q.calibrating = True
    q(x)
    q.calibrating = False
    q.fit()
    assert torch.equal(ternary_code(x, q.threshold), torch.sign(levels))  # in the gap
    assert q.gamma.item() == pytest.approx(2.0, abs=0.05)
    assert q.beta.item() == pytest.approx(0.0, abs=0.05)
    relu = torch.tensor([0.0, 3.0])[torch.randint(2, (4000,), generator=gen)]
    x = relu + 0.05 * torch.rand(4000, generator=gen)
    q.calibrating = True
    q(x)
    q.calibrating = False
    q.fit()
    assert torch.equal(ternary_code(x, q.threshold), torch.sign(relu))
    assert (q.gamma + q.beta).item() == pytest.approx(3.0, abs=0.05)
    if not offset:
        assert q.beta.item() == 0.0


def test_rtn_export_carries_scales_and_offsets(cnn) -> None:
    x = torch.randn(16, 1, 12, 12)
    qm = create_method("rtn").quantize(cnn, _ctx(x))
    ex = qm.export()
    names = list(ex)
    assert [ex[n].weight_format for n in names] == ["fp32", "ternary", "ternary", "fp32"]
    for name, layer in iter_quant_layers(qm.module):
        lx = ex[name]
        if lx.weight_format != "ternary":
            assert lx.act_mode == "fp32"
            continue
        assert isinstance(layer.wq, RTNWeight) and isinstance(layer.aq, RTNAct)
        assert set(np.unique(lx.codes)) <= {-1, 0, 1} and lx.scales.shape == (lx.out_channels, 1)
        assert np.array_equal(lx.scales[:, 0], layer.wq.gamma.detach().numpy()[:, 0])
        assert lx.weight_offset is not None
        assert np.array_equal(lx.weight_offset, layer.wq.beta.detach().numpy())
        assert lx.act_mode == "ternary" and lx.act_bits == 2
        assert lx.act_threshold == pytest.approx(0.5 * float(layer.aq.clip))
        assert lx.act_offset == layer.aq.beta.item() and lx.act_scale == layer.aq.gamma.item()


def test_rtn_without_offsets_exports_pure_ternary(cnn) -> None:
    x = torch.randn(16, 1, 12, 12)
    qm = create_method("rtn", learn_offset=False).quantize(cnn, _ctx(x))
    tern = [lx for lx in qm.export().values() if lx.weight_format == "ternary"]
    assert tern and all(lx.weight_offset is None and lx.act_offset == 0.0 for lx in tern)
    assert max_logit_diff(qm, x) < 1e-4


# ----------------------------------------------------------------------------- STTN quantizers


def test_sttn_act_thresholds_and_ste() -> None:
    q = STTNAct()
    x = torch.tensor([-1.5, -1.0, -0.7, -0.5, 0.0, 0.5, 0.51, 0.99, 1.0, 2.0], requires_grad=True)
    y = q(x)
    assert y.tolist() == [-1, -1, -1, 0, 0, 0, 1, 1, 1, 1]
    y.sum().backward()
    assert x.grad is not None
    assert x.grad.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]  # STE only where |x| < 1
    assert q.export_fields() == {
        "act_mode": "ternary",
        "act_bits": 2,
        "act_scale": 1.0,
        "act_threshold": 0.5,
        "act_offset": 0.0,
    }


def _sttn_pair(w1: torch.Tensor, w2: torch.Tensor, rule: str = "repo") -> STTNWeight:
    q = STTNWeight(grad_rule=rule)  # type: ignore[arg-type]
    q.latent2 = nn.Parameter(w2.clone())
    return q


def test_sttn_alpha_and_merge_hand_made() -> None:
    w1 = torch.tensor([[0.5, -0.2, 0.1, -0.4], [0.0, 0.3, -0.6, 0.2]])
    w2 = torch.tensor([[0.3, 0.2, -0.1, -0.2], [-0.1, 0.1, -0.2, -0.2]])
    q = _sttn_pair(w1, w2)
    # alpha_k = (|W1_k|_1 + |W2_k|_1) / (2n), n = 4
    alpha = torch.tensor([[(1.2 + 0.8) / 8], [(1.1 + 0.6) / 8]])
    assert torch.allclose(STTNWeight.alpha(w1, w2), alpha)
    codes, scales, gs = q.encode(w1)
    # sign(0) = +1: W1[1, 0] = 0 and W2[1, 0] < 0 disagree -> 0
    assert codes.tolist() == [[1, 0, 0, -1], [0, 1, -1, 0]]
    assert torch.allclose(scales, 2 * alpha) and gs == 4
    b1, b2 = q.binary_kernels(w1)
    assert torch.equal(b1 + b2, scales * codes)
    assert torch.equal(b1, alpha * binary_sign(w1)) and torch.equal(b2, alpha * binary_sign(w2))


def test_sttn_latents_are_clamped() -> None:
    w1 = torch.tensor([[3.0, -0.5]])
    w2 = torch.tensor([[-2.0, 0.5]])
    q = _sttn_pair(w1, w2)
    # alpha uses the clamped latents: (1 + 0.5 + 1 + 0.5) / 4; the merged scale is 2 alpha
    codes, scales, _ = q.encode(w1)
    assert scales.item() == pytest.approx(1.5) and codes.tolist() == [[0, 0]]
    p = nn.Parameter(w1.clone())
    q.clamp_(p)
    assert p.abs().max() <= 1 and q.latent2.abs().max() <= 1


def test_sttn_repo_gradient_rule() -> None:
    """dL/dW_j = g_j + sign(W_j) * mean(sign(W_j) * g_j), per output channel (the repo's
    ``updateBinaryGradWeight``); alpha gets no gradient."""
    gen = torch.Generator().manual_seed(3)
    w1 = (torch.rand(3, 5, generator=gen) - 0.5).requires_grad_(True)
    w2 = torch.rand(3, 5, generator=gen) - 0.5
    q = _sttn_pair(w1.detach(), w2)
    g1 = torch.randn(3, 5, generator=gen)
    g2 = torch.randn(3, 5, generator=gen)
    b1, b2 = q.binary_kernels(w1)
    ((b1 * g1).sum() + (b2 * g2).sum()).backward()
    s1, s2 = binary_sign(w1.detach()), binary_sign(w2)
    assert w1.grad is not None and q.latent2.grad is not None
    assert torch.allclose(w1.grad, g1 + s1 * (s1 * g1).mean(1, keepdim=True))
    assert torch.allclose(q.latent2.grad, g2 + s2 * (s2 * g2).mean(1, keepdim=True))


def test_sttn_exact_gradient_rule() -> None:
    """``exact``: autograd of alpha(W1, W2) * ste(sign W_j)."""
    gen = torch.Generator().manual_seed(4)
    w1 = (torch.rand(2, 6, generator=gen) - 0.5).requires_grad_(True)
    w2 = torch.rand(2, 6, generator=gen) - 0.5
    q = _sttn_pair(w1.detach(), w2, "exact")
    g = torch.randn(2, 6, generator=gen)
    b1, b2 = q.binary_kernels(w1)
    ((b1 + b2) * g).sum().backward()
    s1, s2 = binary_sign(w1.detach()), binary_sign(w2)
    a = STTNWeight.alpha(w1.detach(), w2)
    n = 6
    expect = a * g + s1 / (2 * n) * ((s1 + s2) * g).sum(1, keepdim=True)
    assert w1.grad is not None and torch.allclose(w1.grad, expect)


@pytest.mark.parametrize("scale", ["fit", "unit"])
def test_sttn_init_is_twn_ternarization(scale: str) -> None:
    conv = nn.Conv2d(3, 4, 3, bias=False)
    w = conv.weight.detach().reshape(4, -1).clone()
    layer = STTNConv2d(conv, STTNWeight(0.7, scale), STTNAct())  # type: ignore[arg-type]
    codes, _, _ = layer.wq.encode(layer.weight.detach().reshape(4, -1))
    delta = 0.7 * w.abs().mean(1, keepdim=True)
    assert torch.equal(codes, torch.sign(w) * (w.abs() > delta))
    w1, w2 = layer.weight.detach().reshape(4, -1), layer.wq.latent2.detach().reshape(4, -1)
    if scale == "fit":  # in range already: W1, W2 = W +- delta exactly
        assert torch.allclose(w1, w + delta) and torch.allclose(w2, w - delta)
    else:  # the clamp range is filled
        assert max(w1.abs().max().item(), w2.abs().max().item()) == pytest.approx(1.0)
    big = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        big.weight.fill_(3.0)
    layer = STTNConv2d(big, STTNWeight(0.7, scale), STTNAct())  # type: ignore[arg-type]
    assert layer.weight.abs().max().item() == pytest.approx(1.0)  # scaled into range


def test_sttn_two_branch_equals_merged_export() -> None:
    """The training graph (two binary convs) and the merged ternary export give the same
    output; the integer accumulations agree exactly: acc(s1) + acc(s2) == 2 acc(codes)."""
    gen = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(6, 5, 3, padding=1, stride=2, bias=True)
    layer = STTNConv2d(conv, STTNWeight(), STTNAct()).eval()
    x = torch.randn(4, 6, 9, 9, generator=gen)
    y_exact = layer(x)  # eval: both branches in float64
    layer.exact_eval = False
    y = layer(x)  # the float32 training graph
    lx = layer.export("c")
    a = ternary_code(x, 0.5).double()
    w1 = layer.weight.detach().clamp(-1, 1)
    w2 = layer.wq.latent2.detach().clamp(-1, 1)
    acc1 = F.conv2d(a, binary_sign(w1).double(), stride=2, padding=1)
    acc2 = F.conv2d(a, binary_sign(w2).double(), stride=2, padding=1)
    merged = torch.from_numpy(lx.codes).double().reshape(w1.shape)
    acc = F.conv2d(a, merged, stride=2, padding=1)
    assert torch.equal(acc1 + acc2, 2 * acc)  # exact integers
    scale = torch.from_numpy(lx.scales).double()[:, 0]
    bias = torch.from_numpy(lx.bias).double()  # type: ignore[arg-type]
    ref = acc * scale[None, :, None, None] + bias[None, :, None, None]
    assert torch.allclose(y.double(), ref, atol=1e-5)
    assert torch.equal(y_exact, ref.float())
    assert lx.act_mode == "ternary" and lx.act_threshold == 0.5 and lx.weight_offset is None


def test_sttn_float32_two_branch_graph_matches_merged_export(cnn) -> None:
    """End to end: the float32 training graph (two binary convs per layer, ``exact_eval`` off)
    against the deployed merged ternary kernels."""
    x = torch.randn(16, 1, 12, 12)
    qm = create_method("sttn", exact_eval=False).quantize(cnn, _ctx(x))
    assert all(not m.exact_eval for _, m in iter_quant_layers(qm.module))  # type: ignore[attr-defined]
    assert max_logit_diff(qm, x) < 1e-4


def test_sttn_export_and_model(cnn) -> None:
    x = torch.randn(16, 1, 12, 12)
    qm = create_method("sttn").quantize(cnn, _ctx(x))
    ex = qm.export()
    assert [lx.weight_format for lx in ex.values()] == ["fp32", "ternary", "ternary", "fp32"]
    layers = dict(iter_quant_layers(qm.module))
    for name, lx in ex.items():
        if lx.weight_format == "ternary":
            assert isinstance(layers[name], STTNConv2d)
            assert set(np.unique(lx.codes)) <= {-1, 0, 1}
            assert (lx.act_scale, lx.act_threshold, lx.act_offset) == (1.0, 0.5, 0.0)
    # first_last="same": every layer ternary, the classifier as two binary linears
    same = create_method("sttn", first_last="same").quantize(cnn, _ctx(x))
    assert {lx.weight_format for lx in same.export().values()} == {"ternary"}
    assert max_logit_diff(same, x) < 1e-4


def _fashion_batches(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from ternbench.bench.data import load_dataset

    ds = load_dataset("fashion-mnist", "test")  # the smaller file: faster to read
    xs, ys = zip(*(ds[i] for i in range(n)), strict=True)
    return torch.stack(xs), torch.tensor(ys)


# ------------------------------------------------------------------------------- STTN models


@pytest.mark.parametrize(
    "name,size,weight_layers",
    [
        ("sttn_resnet8", 28, 8),
        ("sttn_resnet8", 27, 8),
        ("sttn_resnet20", 32, 20),
        ("sttn_resnet18", 32, 18),
    ],
)
def test_sttn_models(name: str, size: int, weight_layers: int) -> None:
    """The repo's layout: one Conv2d per unit plus stem and classifier, parameter-free
    downsampling (max-pool + zero channels), any input size."""
    from ternbench.bench.models import ParamFreeShortcut, STTNUnit

    m = create_model(name, in_chans=1, num_classes=7, image_size=size).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 1, size, size)).shape == (2, 7)
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d | nn.Linear)]
    assert len(convs) == weight_layers
    units = [u for u in m.modules() if isinstance(u, STTNUnit)]
    assert len(units) == weight_layers - 2
    downs = [u.shortcut for u in units if isinstance(u.shortcut, ParamFreeShortcut)]
    assert downs and all(sum(p.numel() for p in d.parameters()) == 0 for d in downs)
    sc = ParamFreeShortcut(2, 4, 2)
    y = sc(torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(1, 2, 5, 5))
    assert y.shape == (1, 4, 3, 3) and torch.all(y[:, 2:] == 0) and y[0, 0, 0, 0] == 6


# ----------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("method", ["rtn", "sttn"])
@pytest.mark.parametrize("model", ["tiny", "resnet8", "sttn_resnet8"])
def test_deploy_parity(method: str, model: str) -> None:
    if model == "tiny":
        net, x = tiny_cnn().eval(), torch.randn(32, 1, 12, 12)
    else:
        net, x = create_model(model, in_chans=1, num_classes=10).eval(), torch.randn(8, 1, 28, 28)
    qm = create_method(method).quantize(net, _ctx(x))
    assert max_logit_diff(qm, x) < 1e-4
    assert layer_parity(qm, x) < 1e-5
    # the deployed model really runs on the export: corrupt one ternary layer
    dep = deploy(qm)
    lx = [m for m in dep.modules() if type(m).__name__ == "IntegerLayer"][1].lx
    assert lx.weight_format == "ternary"
    lx.codes[:] = -lx.codes
    with torch.no_grad():
        assert (dep(x) - qm.module(x)).abs().max() > 1e-3
    assert qm.info["epochs_run"] == 0.0 and qm.info["deviations"]
    assert qm.info["recipe"]["epochs"] == 0.0 and qm.info["paper_recipe"]


@needs_fashion
@pytest.mark.parametrize("method", ["rtn", "sttn"])
def test_deploy_parity_on_real_images(method: str) -> None:
    """On real images (many near-tie activations) the evaluated model is the deployed one:
    exact evaluation leaves no threshold flips (the float32 graph gave logit differences up
    to 0.05 on such batches)."""
    x, y = _fashion_batches(64)
    net = create_model("resnet8", in_chans=1, num_classes=10).eval()
    qm = create_method(method).quantize(net, _ctx(x, 0.0, y))
    assert max_logit_diff(qm, x) < 1e-4


def test_caller_model_untouched() -> None:
    net = create_model("sttn_resnet8", in_chans=1, num_classes=10).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(8, 1, 16, 16)
    for method in ("rtn", "sttn"):
        create_method(method).quantize(net, _ctx(x))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(hasattr(m, "wq") for m in net.modules())  # no swapped layer


@pytest.mark.parametrize(
    "method,kw,match",
    [
        ("rtn", {"act_bits": 8}, "act_bits"),
        ("rtn", {"weight_ratio": 0}, "weight_ratio"),
        ("rtn", {"lr": -1}, "lr"),
        ("sttn", {"act_threshold": 1.5}, "act_threshold"),
        ("sttn", {"grad_rule": "magic"}, "grad_rule"),
        ("sttn", {"latent_scale": "big"}, "latent_scale"),
    ],
)
def test_config_errors(method: str, kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create_method(method, **kw)


# --------------------------------------------------------------------------------- training


@pytest.mark.training
@pytest.mark.parametrize("method", ["rtn", "sttn"])
def test_tiny_budget_trains_and_keeps_parity(method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 12, 12, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    net = tiny_cnn().eval()
    q0 = create_method(method).quantize(net, _ctx(x, 0.0, y))
    q1 = create_method(method).quantize(net, _ctx(x, 1.0, y))
    assert q1.info["epochs_run"] == 1.0 and q1.info["recipe"]["kd"] is True
    w0 = [m.weight for _, m in iter_quant_layers(q0.module)][1]
    w1 = [m.weight for _, m in iter_quant_layers(q1.module)][1]
    assert not torch.equal(w0, w1)
    assert not q1.module.training
    assert max_logit_diff(q1, x[:8]) < 1e-4


@needs_fashion
@pytest.mark.training
@pytest.mark.parametrize("method", ["rtn", "sttn"])
def test_fashion_mnist_training_lowers_the_loss(method: str) -> None:
    """QAT (hard labels, 40 steps) on 256 Fashion-MNIST images lowers the quantized model's
    cross entropy on them. The FP32 start is the tiny CNN after 30 Adam steps."""
    x, y = _fashion_batches(256)
    net = tiny_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    loader = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    ctx = QuantContext(calib_loader=loader[:1], train_loader=loader, bn_batches=4)

    def loss(qm) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(qm.module(x), y))

    # the loop itself is under test: a fixed SGD recipe for RTN (its default is Adam 1e-3).
    # lr 0.05 was at the edge: BatchNorm's running statistics lagged the weights (train-mode
    # loss 1.14, eval 1.92 on one thread) and the outcome flipped with the CPU's float
    # reduction order (AVX2 vs AVX-512); 0.02 lowers the loss for every init seed tried.
    kw = {"optimizer": "sgd", "lr": 0.02, "weight_decay": 1e-4} if method == "rtn" else {
        "lr": 1e-2}
    base = create_method(method, kd=False, **kw).quantize(net, ctx)
    ctx.train_epochs = 10
    trained = create_method(method, kd=False, **kw).quantize(net, ctx)
    assert trained.info["epochs_run"] == 10.0
    assert loss(trained) < loss(base) - 0.05, (loss(base), loss(trained))
