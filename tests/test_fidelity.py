"""Issue 15: paper blocks by default, step budgets, training curves, collapse detection, device."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx
from conftest import needs_fashion
from ternbench.bench import runner, tasks
from ternbench.bench.config import PROFILES, BenchConfig, ConfigError
from ternbench.bench.models import create_model, model_for_block
from ternbench.bench.runner import cell_device, degraded_reason, plan
from ternbench.core.train import curve_converged, eval_steps
from ternbench.methods import create_method, get_method_info


def test_methods_declare_their_block_and_plan_builds_it(tiny_profile) -> None:
    assert get_method_info("rtn").block == "preact" and get_method_info("sttn").block == "preact"
    assert get_method_info("ttq").block is None and get_method_info("fgq").block is None
    assert model_for_block("resnet8", "preact") == "sttn_resnet8"
    assert model_for_block("sttn_resnet8", "preact") == "sttn_resnet8"  # no variant: as named
    cells = {c.method: c for c in plan(BenchConfig(methods=("fp32", "rtn", "fgq"),
                                                   profile="tiny"))}
    assert cells["rtn"].model == "sttn_resnet8" and cells["rtn"].extra["block"] == "preact"
    assert cells["rtn"].extra["requested_model"] == "resnet8"
    assert cells["fgq"].model == "resnet8" and cells["fgq"].extra["block"] == "plain"
    assert cells["rtn"].baseline_key != cells["fgq"].baseline_key  # its own FP32 baseline
    plain = plan(BenchConfig(methods=("rtn",), profile="tiny", plain_blocks=True))[0]
    assert plain.model == "resnet8" and plain.extra["block"] == "plain"
    one = plan(BenchConfig(methods=("rtn",), profile="tiny",
                           overrides={"rtn": {"block": "plain"}}))[0]
    assert one.model == "resnet8" and one.key == plain.key
    with pytest.raises(ConfigError, match="rtn.block must be one of"):
        BenchConfig(methods=("rtn",), overrides={"rtn": {"block": "round"}})


def test_step_budgets_and_fp32_min_steps() -> None:
    prof = PROFILES["default"]
    assert prof.train_steps is not None
    assert prof.qat_epochs(469) == pytest.approx(prof.train_steps / 469)
    assert prof.qat_epochs(32) == pytest.approx(prof.train_steps / 32)  # small data: more epochs
    assert prof.fp32_recipe(60000) == prof.fp32  # the shipped baseline's recipe (same key)
    small = prof.fp32_recipe(4000)  # 32 steps/epoch: 3 epochs would be 96 steps
    assert small.epochs * 32 >= prof.fp32_min_steps
    assert prof.qat_epochs(469, 4.0) == pytest.approx(4 * prof.train_steps / 469)
    assert get_method_info("ttq").budget_scale == 4.0 and get_method_info("rtn").budget_scale == 1
    cfg = BenchConfig(methods=("ttq",), budget=50)
    assert cfg.profile_obj.train_steps == 50 and cfg.profile_obj.name == "default"
    with pytest.raises(ConfigError, match="budget"):
        BenchConfig(methods=("ttq",), budget=-1)


def test_curve_helpers_and_rows() -> None:
    assert sorted(eval_steps(469, 5)) == [94, 188, 281, 375, 469]
    assert eval_steps(3, 5) == {1, 2, 3} and eval_steps(10, 0) == set()
    assert curve_converged([{"val_top1": 80.0}]) is None
    assert curve_converged([{"val_top1": 80.0}, {"val_top1": 80.5}]) is False
    curve = [{"step": 10, "epoch": 0.5, "train_loss": 1.0, "val_top1": 70.0},
             {"step": 20, "epoch": 1.0, "train_loss": 0.8, "val_top1": 71.0}]
    rows = runner.curve_rows({"method": "x"}, curve)
    vals = [r for r in rows if r["metric"] == "val_top1"]
    assert [r["layer"] for r in vals] == ["epoch=0.5", "epoch=1"] and vals[1]["value"] == 71.0
    conv = [r for r in rows if r["metric"] == "converged"]
    assert len(conv) == 1 and conv[0]["value"] == 0.0  # the last segment gained 1 point


def test_degraded_rule() -> None:
    assert "chance" in (degraded_reason(11.0, 90.0, 10) or "")
    assert "under its FP32" in (degraded_reason(59.0, 90.0, 10) or "")
    assert degraded_reason(61.0, 90.0, 10) is None
    assert degraded_reason(61.0, None, 10) is None
    assert degraded_reason(2.5, None, 1000) is None and degraded_reason(1.5, None, 1000)


def test_device_choice(monkeypatch) -> None:
    cfg = BenchConfig(methods=("ttq", "fgq"), executor="local")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cell_device(cfg, "ttq") == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cell_device(BenchConfig(methods=("ttq",), executor="local", device="cuda"), "ttq")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cell_device(cfg, "ttq") == "cuda" and cell_device(cfg, "fgq") == "cpu"
    assert cell_device(BenchConfig(methods=("ttq",), executor="local", device="cpu"),
                       "ttq") == "cpu"
    assert cell_device(BenchConfig(methods=("ttq",), executor="ray"), "ttq") == "cpu"


@needs_fashion
@pytest.mark.training
def test_collapsed_cell_is_degraded_and_fails_the_run(tiny_profile, tmp_path, monkeypatch,
                                                      capsys, tmp_path_factory) -> None:
    """A method whose quantized model has all-zero weights answers one class: chance level."""
    from ternbench.bench.cli import main

    monkeypatch.setenv("TERNBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    real = tasks.create_method

    class Zeroed:
        def __init__(self, inner):
            self.inner, self.config = inner, inner.config

        def quantize(self, model, ctx):
            qm = self.inner.quantize(model, ctx)
            with torch.no_grad():
                for name, p in qm.module.named_parameters():
                    if name.endswith("weight") or name.endswith("bias"):
                        p.zero_()
            return qm

    def fake(name, overrides=None, **kw):
        m = real(name, overrides, **kw)
        return Zeroed(m) if name == "fgq" else m

    monkeypatch.setattr(tasks, "create_method", fake)
    args = ["run", "--methods", "fgq", "--profile", "tiny", "--executor", "local",
            "--targets", "", "--no-report", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 1
    out = capsys.readouterr().out
    assert "DEGRADED fgq/resnet8/fashion-mnist" in out and "chance level" in out
    import pandas as pd

    df = pd.read_parquet(tmp_path / "a" / "results.parquet")
    fgq = df[(df.method == "fgq") & (df.target == "-")]
    assert set(fgq.status) == {"degraded"} and fgq.error.str.contains("chance").all()
    fp = df[(df.method == "fp32") & (df.target == "-")]
    assert set(fp.status) == {"ok"}
    # resuming the finished run reports the collapse again; --allow-degraded exits 0
    assert main([*args, "--out", str(tmp_path / "a"), "--allow-degraded"]) == 0
    assert "DEGRADED fgq" in capsys.readouterr().out


def test_method_config_json_has_no_block_field() -> None:
    # the block is a run-level choice (plan), not a field of any method config
    assert "block" not in json.loads(create_method("rtn").config.to_json())


def test_preact_models_are_fx_traceable() -> None:
    """The whole-model latency path (and torch's FX INT8) trace the model RTN/STTN run on."""
    for name in ("sttn_resnet8", "sttn_resnet20"):
        m = create_model(name, in_chans=1, num_classes=10).eval()
        gm = torch.fx.symbolic_trace(m)
        x = torch.randn(2, 1, 28, 28)
        torch.testing.assert_close(gm(x), m(x))


def test_plateau_rule_drops_the_lr_then_stops_and_restores_the_best() -> None:
    from ternbench.core.train import PlateauRule, TrainCfg

    cfg = TrainCfg(schedule="plateau", val_fraction=0.1, plateau_patience=2, plateau_decays=1,
                   plateau_min_delta=0.5)
    rule = PlateauRule(cfg)
    net = torch.nn.Linear(2, 2)
    stops = []
    for i, v in enumerate((50.0, 60.0, 60.2, 60.3, 61.0, 60.9, 60.8)):
        with torch.no_grad():
            net.bias.fill_(i)
        stops.append(rule.observe(v, net))
    # 60.2, 60.3: two checks under +0.5 -> one lr drop; 61.0 gains; 60.9, 60.8 -> stop
    assert stops == [False] * 6 + [True] and rule.decays == 1 and rule.converged
    assert rule.factor(10**6) == pytest.approx(0.1)
    assert rule.top == 61.0 and rule.top_state is not None
    assert rule.top_state["bias"].tolist() == [4.0, 4.0]  # the weights of the best check
    with pytest.raises(ValueError, match="val_fraction"):
        TrainCfg(schedule="plateau")


@needs_fashion
def test_plateau_training_stops_before_its_cap_and_keys_keep_other_recipes() -> None:
    from ternbench.bench.cache import _hold_out, baseline_key
    from ternbench.core.train import TrainCfg, train

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x[:, 0] > 0).long()
    data = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 512, 32)]
    cfg = TrainCfg(epochs=200, lr=0.05, schedule="plateau", val_fraction=0.1, plateau_every=16,
                   plateau_patience=2, plateau_decays=1, label_smoothing=0.0)
    net = torch.nn.Linear(8, 2)
    hist = train(net, data, cfg, progress=False, val_loader=data[:4])
    assert hist["converged"] is True and hist["steps"] < 200 * len(data)
    assert hist["evals"] and hist["evals"][-1]["step"] == hist["steps"]
    assert hist["plateau"]["lr_drops"] == 1
    with pytest.raises(ValueError, match="val_loader"):
        train(torch.nn.Linear(8, 2), data, cfg, progress=False)
    # fixed-length recipes keep their cache keys (the plateau fields are not part of them)
    assert "val_fraction" not in TrainCfg().key_fields()
    assert baseline_key("resnet8", "fashion-mnist", TrainCfg()) == baseline_key(
        "resnet8", "fashion-mnist", TrainCfg(plateau_every=7))
    tr, held = _hold_out(torch.arange(1000).numpy(),
                         TrainCfg(schedule="plateau", val_fraction=0.08))
    assert len(held) == 80 and len(tr) == 920 and not set(tr) & set(held)
