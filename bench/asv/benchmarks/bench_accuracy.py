"""Top-1 accuracy of every method on a fixed 500-image Fashion-MNIST test subset.

Starts from the shipped FP32 ResNet-8 checkpoint (the profile "default" recipe) and runs the
same task functions as ``ternbench run`` (``quantize_cell`` then ``eval_shard``) in process:
no Ray inside asv. Calibration and fine-tuning budgets are cut (``common.accuracy_profile``),
so the numbers are a regression signal, not the paper-level accuracy of a full run.
"""

from __future__ import annotations

import torch

from . import common


def _checkpoint_present() -> bool:
    from ternbench.bench.cache import baseline_key, cache_dir, shipped_dir
    from ternbench.bench.config import PROFILES

    key = baseline_key(common.MODEL, common.DATASET, PROFILES["default"].fp32)
    return any((d / f"{key}.safetensors").is_file() for d in (cache_dir(), shipped_dir()))


class Top1:
    """Top-1 (%) per method; deterministic (fixed seeds, one thread)."""

    params = [common.methods()]
    param_names = ["method"]
    unit = "%"
    timeout = 300

    def setup_cache(self) -> dict[str, torch.Tensor] | None:
        # never train a baseline inside asv (minutes): commits without a shipped one are skipped
        if not _checkpoint_present():
            return None
        from ternbench.bench.cache import load_or_train_fp32
        from ternbench.bench.config import PROFILES

        net, _ = load_or_train_fp32(common.MODEL, common.DATASET, PROFILES["default"].fp32)
        return {k: v.detach().clone() for k, v in net.state_dict().items()}

    def setup(self, state: dict[str, torch.Tensor] | None, method: str) -> None:
        if state is None:
            raise common.skip("no cached or shipped FP32 baseline checkpoint")
        common.require_method(method)
        from ternbench.bench.data import load_dataset

        try:
            load_dataset(common.DATASET, "test")
        except FileNotFoundError as e:  # DatasetMissingError: says how to install the data
            raise common.skip(str(e)) from None

    def track_top1(self, state: dict[str, torch.Tensor], method: str) -> float:
        from ternbench.bench.tasks import CellSpec, eval_indices, eval_shard, quantize_cell

        spec = CellSpec(
            key=f"asv-{method}",
            method=method,
            overrides={},
            method_config="",
            model=common.MODEL,
            dataset=common.DATASET,
            seed=common.SEED,
            prof=common.accuracy_profile(),
            threads=1,
        )
        module, _info = quantize_cell(spec, state)
        counts = eval_shard(spec, module, eval_indices(spec))
        return 100.0 * counts["correct1"] / counts["n"]
