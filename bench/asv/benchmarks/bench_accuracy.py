"""Top-1 accuracy of every method on a fixed 500-image Fashion-MNIST test subset.

Starts from the shipped FP32 ResNet-8 checkpoint (the profile "default" recipe) and runs the
same task functions as ``ternbench run`` (``quantize_cell`` then ``eval_shard``) in process:
no Ray inside asv. Calibration and fine-tuning budgets are cut (``common.accuracy_profile``),
so the numbers are a regression signal, not the paper-level accuracy of a full run.

asv treats every number as lower-is-better, so a drop in ``track_top1`` would be reported as
an improvement; ``track_top1_error`` (100 - top-1) is the series that ``asv continuous`` and
the regressions page flag when accuracy falls.
"""

from __future__ import annotations

import traceback

import torch

from . import common

_SKIP = "__skip__"


def _checkpoint_present() -> bool:
    from ternbench.bench.cache import baseline_key, cache_dir, shipped_dir
    from ternbench.bench.config import PROFILES

    key = baseline_key(common.MODEL, common.DATASET, PROFILES["default"].fp32)
    return any((d / f"{key}.safetensors").is_file() for d in (cache_dir(), shipped_dir()))


def _top1(method: str, state: dict[str, torch.Tensor]) -> float:
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


class Top1:
    """Top-1 (%) per method and its complement; deterministic (fixed seeds, one thread).

    Both ``track_`` benchmarks read one ``setup_cache`` that evaluates every method once.
    """

    params = [common.methods()]
    param_names = ["method"]
    unit = "%"
    timeout = 600

    def setup_cache(self) -> dict[str, float | str]:
        """``{method: top-1, or the error text}``, or ``{_SKIP: reason}``."""
        # never train a baseline inside asv (minutes): commits without a shipped one are skipped
        if not _checkpoint_present():
            return {_SKIP: "no cached or shipped FP32 baseline checkpoint"}
        from ternbench.bench.cache import load_or_train_fp32
        from ternbench.bench.config import PROFILES
        from ternbench.bench.data import load_dataset

        try:
            load_dataset(common.DATASET, "test")
        except FileNotFoundError as e:  # DatasetMissingError: says how to install the data
            return {_SKIP: str(e)}
        net, _ = load_or_train_fp32(common.MODEL, common.DATASET, PROFILES["default"].fp32)
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        out: dict[str, float | str] = {}
        for method in common.methods():
            try:
                out[method] = _top1(method, state)
            except Exception as e:  # one broken method must not hide the others' numbers
                traceback.print_exc()
                out[method] = f"{type(e).__name__}: {e}"
        return out

    def setup(self, results: dict[str, float | str], method: str) -> None:
        if _SKIP in results:
            raise common.skip(str(results[_SKIP]))
        if method not in results:
            raise common.skip(f"method {method!r} is not registered in this commit")

    @staticmethod
    def _value(results: dict[str, float | str], method: str) -> float:
        value = results[method]
        if isinstance(value, str):
            raise RuntimeError(f"{method}: {value}")
        return value

    def track_top1(self, results: dict[str, float | str], method: str) -> float:
        return self._value(results, method)

    def track_top1_error(self, results: dict[str, float | str], method: str) -> float:
        return 100.0 - self._value(results, method)
