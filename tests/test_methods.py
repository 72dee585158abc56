"""The math of the methods on hand-made tensors, and export/deploy parity for every method."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch
from ternbench.core.export_io import (
    exports_to_bytes,
    load_exports,
    pack_ternary,
    save_exports,
    unpack_ternary,
)
from ternbench.methods import (
    ConfigError,
    QuantContext,
    UnknownMethodError,
    create_method,
    deploy,
    layer_parity,
    list_methods,
    max_logit_diff,
    summarize_cost,
)
from ternbench.methods._ternarize import ternarize_exact, ternarize_rows, ternarize_twn


def _brute_force(w: torch.Tensor) -> float:
    best = float("inf")
    for mask in itertools.product([0, 1], repeat=w.numel()):
        m = torch.tensor(mask, dtype=w.dtype)
        k = int(m.sum())
        alpha = float((w.abs() * m).sum()) / max(k, 1)
        best = min(best, float(((w - alpha * torch.sign(w) * m) ** 2).sum()))
    return best


@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_exact_solver_equals_brute_force(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    for _ in range(25):
        w = torch.randn(1, n, generator=g, dtype=torch.float64)
        codes, alpha = ternarize_exact(w)
        err = float(((w - alpha * codes) ** 2).sum())
        assert err == pytest.approx(_brute_force(w[0]), abs=1e-12)


def test_exact_solver_hand_made() -> None:
    codes, alpha = ternarize_exact(torch.tensor([[3.0, -3.0, 0.1, -0.2], [0.0, 0.0, 0.0, 0.0]]))
    assert codes.tolist() == [[1, -1, 0, 0], [0, 0, 0, 0]]
    assert alpha[0].item() == pytest.approx(3.0)


def test_twn_rule_hand_made() -> None:
    w = torch.tensor([[1.0, -0.5, 0.1, 0.0]])  # mean|w| = 0.4 -> delta 0.28
    codes, alpha = ternarize_twn(w)
    assert codes.tolist() == [[1, -1, 0, 0]]
    assert alpha.item() == pytest.approx(0.75)


@pytest.mark.parametrize("solver", ["exact", "twn"])
def test_partial_last_group(solver: str) -> None:
    w = torch.randn(3, 10)
    codes, scales = ternarize_rows(w, 4, solver)  # groups of 4, 4, 2
    assert codes.shape == (3, 10) and scales.shape == (3, 3)
    alone, a_last = ternarize_rows(w[:, 8:], 2, solver)
    assert torch.equal(codes[:, 8:], alone)
    assert torch.allclose(scales[:, 2:], a_last)


def test_pack_roundtrip() -> None:
    c = np.random.default_rng(0).integers(-1, 2, size=(5, 37)).astype(np.int8)
    assert np.array_equal(unpack_ternary(pack_ternary(c), 37), c)
    assert pack_ternary(c).shape == (5, 10)
    with pytest.raises(ValueError):
        pack_ternary(np.array([[2]], np.int8))


def _ctx(x: torch.Tensor) -> QuantContext:
    y = torch.zeros(len(x), dtype=torch.long)
    return QuantContext(calib_loader=[(x, y)], train_loader=[(x, y)] * 2, bn_batches=2)


@pytest.mark.parametrize("name", list_methods())
def test_deployed_matches_fake_quant(name: str, cnn: torch.nn.Module) -> None:
    """Each deployed layer (integer arithmetic from the export alone), fed the fake-quant
    layer's input, gives its output to float precision; end to end only rounding flips of
    near-tie activations separate them."""
    x = torch.randn(32, 1, 12, 12)
    qm = create_method(name).quantize(cnn, _ctx(x))
    with torch.no_grad():
        ref = qm.module(x)
    assert layer_parity(qm, x) < 1e-5
    assert max_logit_diff(qm, x) <= 1e-2 * max(1.0, float(ref.abs().max()))
    # and the caller's model is untouched
    assert not any(type(m).__name__.startswith("Quant") for m in cnn.modules())


@pytest.mark.parametrize("name", list_methods())
def test_export_roundtrip_and_cost(name: str, cnn: torch.nn.Module, tmp_path) -> None:
    x = torch.randn(16, 1, 12, 12)
    qm = create_method(name).quantize(cnn, _ctx(x))
    ex = qm.export()
    save_exports(tmp_path / "e.npz", ex)
    back = load_exports(tmp_path / "e.npz")
    assert list(back) == list(ex)
    for k in ex:
        assert np.array_equal(back[k].codes, ex[k].codes)
        assert np.array_equal(back[k].scales, ex[k].scales)
        assert back[k].input_shape == ex[k].input_shape
        assert back[k].group_order == ex[k].group_order
    assert summarize_cost(back.values()) == qm.cost()
    assert b"pickle" not in exports_to_bytes(ex)[:0]  # npz of plain arrays


def test_fgq_group_cost_counts() -> None:
    """N=4 with FP16 scales: 2 + 16/4 = 6 bits per weight on ternary layers (the paper's figure)."""
    from torch import nn

    m = nn.Sequential(
        nn.Conv2d(8, 8, 1, bias=False),
        nn.Conv2d(8, 8, 1, bias=False),
        nn.Conv2d(8, 8, 1, bias=False),
    )
    x = torch.randn(4, 8, 2, 2)
    qm = create_method("fgq", group_size=4, first_last="same", bn_recalibrate=False).quantize(
        m, _ctx(x)
    )
    cost = qm.cost()
    assert cost.effective_bits == pytest.approx(6.0)
    assert cost.ternary_fraction == 1.0
    # one multiply per group per output position: 8 outputs x 2 groups x 4 positions x 3 layers
    assert cost.muls == 8 * 2 * 4 * 3
    nnz = sum(int(np.count_nonzero(lx.codes)) for lx in qm.export().values())
    assert cost.adds == nnz * 4


@pytest.mark.parametrize(("axis", "order"), [("cin_contiguous", "ijc"), ("flat_fanin", "cij")])
def test_fgq_group_axis(axis: str, order: str, cnn) -> None:
    """Groups run along the input channels of one tap (cin_contiguous) or along the flat
    (C, kh, kw) fan-in: the nonzero weights of each group share one magnitude, in that order."""
    x = torch.randn(8, 1, 12, 12)
    qm = create_method("fgq", group_size=4, group_axis=axis, first_last="same",
                       bn_recalibrate=False).quantize(cnn, _ctx(x))
    ex = qm.export()
    convs = [lx for lx in ex.values() if lx.op == "conv2d" and lx.in_channels >= 4]
    assert convs and all(lx.group_order == order for lx in convs)
    assert all(lx.group_order == "cij" for lx in ex.values() if lx.op == "linear")
    for lx in convs:
        n, c, (kh, kw) = lx.out_channels, lx.in_channels, lx.kernel_size
        w = lx.dequantized_weight().reshape(n, c, kh, kw)
        flat = w.transpose(0, 2, 3, 1).reshape(n, -1) if order == "ijc" else w.reshape(n, -1)
        k4 = flat.shape[1] // 4 * 4
        mags = np.abs(flat[:, :k4]).reshape(n, -1, 4)
        for grp in mags.reshape(-1, 4):
            nz = grp[grp > 0]
            assert nz.size == 0 or np.allclose(nz, nz[0]), (lx.name, grp)
    with pytest.raises(ConfigError, match="group_axis"):
        create_method("fgq", group_axis="channels")


def test_fgq_scales_are_fp16_values(cnn) -> None:
    qm = create_method("fgq", group_size=8, bn_recalibrate=False).quantize(
        cnn, _ctx(torch.randn(8, 1, 12, 12))
    )
    for lx in qm.export().values():
        if lx.weight_format == "ternary":
            assert np.array_equal(lx.scales.astype(np.float16).astype(np.float32), lx.scales)


def test_first_last_policy(cnn) -> None:
    x = torch.randn(8, 1, 12, 12)
    ex = (
        create_method("fgq", first_last="fp32", bn_recalibrate=False)
        .quantize(cnn, _ctx(x))
        .export()
    )
    fmts = [lx.weight_format for lx in ex.values()]
    assert fmts[0] == fmts[-1] == "fp32" and set(fmts[1:-1]) == {"ternary"}
    ex = (
        create_method("fgq", first_last="same", bn_recalibrate=False)
        .quantize(cnn, _ctx(x))
        .export()
    )
    assert {lx.weight_format for lx in ex.values()} == {"ternary"}


def test_bn_recalibration_changes_stats_and_is_recorded(cnn) -> None:
    x = torch.randn(32, 1, 12, 12) * 3
    on = create_method("twn", bn_recalibrate=True).quantize(cnn, _ctx(x))
    off = create_method("twn", bn_recalibrate=False).quantize(cnn, _ctx(x))
    assert on.info["bn_recalibrated"] and not off.info["bn_recalibrated"]
    bn_on = [m for m in on.module.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    bn_off = [m for m in off.module.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    assert not torch.allclose(bn_on.running_var, bn_off.running_var)


def test_deploy_uses_export_only(cnn) -> None:
    """Corrupting the exported codes must change the deployed output (the check can fail)."""
    x = torch.randn(8, 1, 12, 12)
    qm = create_method("fgq", bn_recalibrate=False).quantize(cnn, _ctx(x))
    dep = deploy(qm)
    layer = [m for m in dep.modules() if type(m).__name__ == "IntegerLayer"][1]
    layer.lx.codes[:] = -layer.lx.codes
    with torch.no_grad():
        assert (dep(x) - qm.module(x)).abs().max() > 1e-3


def test_unknown_method_suggests() -> None:
    with pytest.raises(UnknownMethodError, match="Did you mean 'fgq'"):
        create_method("fgqq")


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"group_size": 0}, "group_size"),
        ({"group_size": 2.5}, "group_size"),
        ({"solver": "magic"}, "solver"),
        ({"act_bits": 3}, "act_bits"),
        ({"first_last": "int4"}, "first_last"),
        ({"finetune_epochs": -1}, "finetune_epochs"),
        ({"groupsize": 4}, "Did you mean 'group_size'"),
    ],
)
def test_config_errors_name_the_field(kw, match) -> None:
    with pytest.raises(ConfigError, match=match):
        create_method("fgq", **kw)


def test_list_methods_wildcards() -> None:
    assert list_methods("fg*") == ["fgq"]
    assert set(list_methods("*")) >= {"fp32", "int8", "twn", "fgq"}
    assert list_methods("fp32,int8") == ["fp32", "int8"]
    assert list_methods(kind="baseline") == ["fp32", "int8"]


def test_builtins_register_through_entry_points() -> None:
    from importlib import metadata

    eps = {ep.value for ep in metadata.entry_points(group="ternbench.methods")}
    assert {"ternbench.methods.fgq", "ternbench.methods.baselines"} <= eps


def test_duplicate_registration_warns(caplog) -> None:
    from ternbench.methods import MethodConfig, register_method
    from ternbench.methods._registry import _REGISTRY

    def f1(cfg):
        return None

    f1.__module__ = "pkg_a"

    def f2(cfg):
        return None

    f2.__module__ = "pkg_b"
    try:
        register_method("dup_test", config=MethodConfig, paper="x", kind="ptq")(f1)
        register_method("dup_test", config=MethodConfig, paper="x", kind="ptq")(f2)
        assert "registered twice" in caplog.text and "pkg_a" in caplog.text
    finally:
        _REGISTRY.pop("dup_test", None)


def test_method_facts_come_from_the_registry() -> None:
    """What generic code knows about methods is declared with them (issue 13)."""
    from ternbench.methods import (
        MethodConfig,
        ablations,
        default_methods,
        get_method_info,
        paper_deltas,
        reference_method,
        register_method,
        whole_model_methods,
    )
    from ternbench.methods._registry import _REGISTRY

    assert reference_method() == "fp32"
    assert default_methods() == ("fp32", "int8", "twn", "fgq")
    assert whole_model_methods() == ["rtn", "sttn", "fgq", "twn"]
    assert ablations()["bn-recalibration"] == {
        "twn": {"bn_recalibrate": (True, False)}, "fgq": {"bn_recalibrate": (True, False)}}
    assert get_method_info("rtn").trains and not get_method_info("trn").trains
    assert {d.method for d in paper_deltas()} >= {"fgq", "trn", "ttq", "ttn_re", "sttn", "twn"}
    try:  # a new method's ablation joins one of the same name (the union over methods)
        register_method("facts_test", config=MethodConfig, paper="x", kind="ptq", order=-1,
                        ablations={"bn-recalibration": {"bn_recalibrate": (True, False)}})(
            lambda cfg: None)
        assert list(ablations()["bn-recalibration"]) == ["facts_test", "twn", "fgq"]
        assert list_methods()[0] == "facts_test"  # its display order
    finally:
        _REGISTRY.pop("facts_test", None)


def test_lean_import() -> None:
    """Importing the methods must not import tvm or ray (they cost seconds and memory)."""
    code = (
        "import sys, ternbench.methods as m; m.list_methods(); "
        "bad=[k for k in ('tvm','ray') if k in sys.modules]; print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.training
def test_fgq_finetune_trains_and_keeps_parity(cnn) -> None:
    """The optional STE fine-tune changes the latent weights and the export still matches."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 12, 12, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    ctx = QuantContext(
        calib_loader=[(x, y)], train_loader=[(x[:32], y[:32]), (x[32:], y[32:])], bn_batches=2
    )
    before = create_method("fgq", group_size=4).quantize(cnn, ctx)
    after = create_method("fgq", group_size=4, finetune_epochs=1.0).quantize(cnn, ctx)
    assert after.info["finetune_epochs"] == 1.0
    w0 = [m.weight for m in before.module.modules() if hasattr(m, "wq")][1]
    w1 = [m.weight for m in after.module.modules() if hasattr(m, "wq")][1]
    assert not torch.equal(w0, w1)
    assert layer_parity(after, x[:8]) < 1e-5


def test_export_with_nan_is_refused_on_load(cnn: torch.nn.Module, tmp_path) -> None:
    import dataclasses

    x = torch.randn(16, 1, 12, 12)
    ex = create_method("fgq").quantize(cnn, _ctx(x)).export()
    name = next(iter(ex))
    scales = np.array(ex[name].scales, copy=True)
    scales.flat[0] = np.nan
    ex[name] = dataclasses.replace(ex[name], scales=scales)
    save_exports(tmp_path / "e.npz", ex)
    with pytest.raises(ValueError, match=f"layer '{name}' scales holds 1 NaN/Inf"):
        load_exports(tmp_path / "e.npz")
