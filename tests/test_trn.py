"""TRN residual edges, run-time switching, and the sweep/ablation grid."""

from __future__ import annotations

import pytest
import torch
from ternbench.bench.config import ABLATIONS, BenchConfig, parse_sweep
from ternbench.bench.models import create_model
from ternbench.bench.runner import plan
from ternbench.methods import ConfigError, QuantContext, create_method, layer_parity
from ternbench.methods.trn import set_active_edges


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = create_model("resnet8", in_chans=1, num_classes=10).eval()
    x = torch.randn(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    ctx = QuantContext(calib_loader=[(x, y)], train_loader=[(x, y)] * 2, bn_batches=2)
    return model, x, ctx


def test_no_edges_is_exactly_the_fgq_base(setup) -> None:
    model, x, ctx = setup
    fgq = create_method("fgq", group_size=8).quantize(model, ctx)
    trn = create_method("trn", group_size=8, active_edges=0).quantize(model, ctx)
    with torch.no_grad():
        assert torch.equal(fgq.module(x), trn.module(x))
    assert fgq.cost() == trn.cost()
    assert trn.info["edges_total"] > 0  # edges exist, they are only switched off


def test_switching_edges_moves_cost_monotonically(setup) -> None:
    model, x, ctx = setup
    qm = create_method("trn", max_edges_per_layer=2, budget=2.0).quantize(model, ctx)
    total = qm.info["edges_total"]
    costs, outs = [], []
    for n in range(total + 1):
        assert set_active_edges(qm, n) == n
        costs.append(qm.cost())
        assert len([k for k in qm.export() if "#" in k]) == n
        assert layer_parity(qm, x[:8]) < 1e-5
        with torch.no_grad():
            outs.append(qm.module(x))
    for a, b in zip(costs, costs[1:], strict=False):
        assert b.effective_bits > a.effective_bits
        assert b.muls > a.muls and b.adds > a.adds
    assert costs[0].params == costs[-1].params  # edges add bits, not weights
    # the weight approximation error falls as edges are enabled
    set_active_edges(qm, 0)
    errs = []
    for n in range(total + 1):
        set_active_edges(qm, n)
        errs.append(sum(float((m.weight - m.quantized_weight()).detach().norm())
                        for _, m in qm.quant_layers() if hasattr(m.wq, "edges")))
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:], strict=False))


def test_budget_limits_extra_macs(setup) -> None:
    model, _, ctx = setup
    qm = create_method("trn", budget=0.2, max_edges_per_layer=3, active_fraction=1.0).quantize(
        model, ctx)
    set_active_edges(qm, 0)
    base = qm.cost()
    set_active_edges(qm, qm.info["edges_total"])
    full = qm.cost()
    base_tern_macs = sum(lx.macs_per_sample() for lx in qm.export().values()
                         if lx.weight_format == "ternary" and not lx.branch_of)
    extra = sum(lx.macs_per_sample() for lx in qm.export().values() if lx.branch_of)
    assert extra <= 0.2 * base_tern_macs and full.adds >= base.adds


def test_ranking_follows_the_rule(setup) -> None:
    model, _, ctx = setup
    by_err = create_method("trn", ranking="error", active_edges=0).quantize(model, ctx)
    eps = by_err.info["eps_base"]
    first = by_err.info["edge_ranking"][0].split("#")[0]
    assert eps[first] == max(eps.values())


@pytest.mark.parametrize("kw,field", [
    ({"tolerance": -1}, "tolerance"), ({"max_edges_per_layer": 9}, "max_edges_per_layer"),
    ({"budget": -0.5}, "budget"), ({"ranking": "x"}, "ranking"),
    ({"active_fraction": 1.5}, "active_fraction"), ({"active_edges": -1}, "active_edges"),
])
def test_trn_config_errors(kw, field) -> None:
    with pytest.raises(ConfigError, match=field):
        create_method("trn", **kw)


def test_sweep_grid_and_default_trn_sweep() -> None:
    cfg = BenchConfig(methods=("fp32", "fgq", "trn"), profile="smoke",
                      sweeps={"fgq": {"group_size": (4, 16, 64)}})
    cells = plan(cfg)
    fgq = [c for c in cells if c.method == "fgq"]
    trn = [c for c in cells if c.method == "trn"]
    assert [c.sweep for c in fgq] == [{"group_size": g} for g in (4, 16, 64)]
    assert [c.sweep["active_fraction"] for c in trn] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len({c.key for c in cells}) == len(cells) == 1 + 3 + 5
    two = BenchConfig(methods=("fgq",), sweeps={"fgq": {"group_size": (4, 8), "solver": ("exact",
                                                                                      "twn")}})
    assert len(plan(two)) == 4


def test_sweep_parsing_and_errors() -> None:
    assert parse_sweep("fgq.group_size=4,16,64") == ("fgq", "group_size", (4, 16, 64))
    with pytest.raises(ConfigError, match="METHOD.FIELD"):
        parse_sweep("group_size=4")
    with pytest.raises(ConfigError, match="group_size"):
        BenchConfig(methods=("fgq",), sweeps={"fgq": {"group_size": (4, 0)}})
    with pytest.raises(ConfigError, match="sweeps"):
        BenchConfig(methods=("fgq",), sweeps={"trn": {"budget": (1.0,)}})
    for spec in ABLATIONS.values():  # every built-in ablation is a valid grid
        BenchConfig(methods=tuple(spec), sweeps=spec)


def test_cli_sweep_dry_run(capsys) -> None:
    from ternbench.bench.cli import main

    assert main(["run", "--methods", "trn,fgq", "--sweep", "fgq.group_size=4,16,64",
                 "--profile", "smoke", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "9 cells" in out
    assert main(["run", "--ablation", "fgq-sizes", "--dry-run"]) == 2
    assert "fgq-group-size" in capsys.readouterr().err


def test_paper_profile_applies_paper_recipes() -> None:
    cells = {c.method: c for c in plan(BenchConfig(methods=("ttn_re", "sttn", "fgq"),
                                                  profile="paper"))}
    assert cells["ttn_re"].overrides["epochs"] == 200 and cells["ttn_re"].overrides["lr"] == 0.1
    assert cells["sttn"].overrides["optimizer"] == "adam" and cells["sttn"].overrides["kd"]
    assert cells["fgq"].overrides == {}
    user = plan(BenchConfig(methods=("ttn_re",), profile="paper",
                            overrides={"ttn_re": {"epochs": 5}}))
    assert user[0].overrides["epochs"] == 5  # --set wins over the paper recipe
    default = plan(BenchConfig(methods=("ttn_re",), profile="default"))
    assert "epochs" not in default[0].overrides


def test_qat_cells_ask_for_a_gpu_only_when_the_cluster_has_one() -> None:
    from ternbench.bench.executor import task_placement

    cells = {c.method: c for c in plan(BenchConfig(methods=("sttn", "fgq"), profile="smoke"))}
    cell, opts = task_placement(cells["sttn"], 1.0)
    assert opts == {"num_gpus": 1} and cell.device == "cuda"
    assert task_placement(cells["sttn"], 0.0) == (cells["sttn"], {})
    assert task_placement(cells["fgq"], 4.0) == (cells["fgq"], {})
