"""Wall time of the quantize and pack paths (asv's own timer; CPU, one thread).

``time_quantize`` runs ``create_method(name).quantize(model, ctx)`` for every registered method
on the same seeded ResNet-8 and the same seeded calibration batch; ``Pack`` times the 2-bit
packing and the ``.npz`` serialisation of an export.
"""

from __future__ import annotations

import numpy as np
import torch

from . import common


class Quantize:
    """``create_method(name).quantize(model, ctx)`` per registered method."""

    params = [common.methods()]
    param_names = ["method"]
    timeout = 180
    # one call takes 0.1-5 s: no inner loop, 2-5 samples in one process, and a short warm-up
    # (at least one call) so one-time costs (lazy imports, caches) stay out of the samples
    number = 1
    repeat = (2, 5, 4.0)
    rounds = 1
    warmup_time = 0.1

    def setup(self, method: str) -> None:
        common.require_method(method)
        from ternbench.methods import create_method

        torch.set_num_threads(1)
        self.model = common.small_model()
        self.ctx = common.synthetic_context()
        self.method = create_method(method)

    def time_quantize(self, method: str) -> None:
        self.method.quantize(self.model, self.ctx)


class Pack:
    """2-bit packing of ternary codes and serialisation of a whole model's export."""

    timeout = 120
    repeat = (3, 10, 4.0)
    rounds = 1
    warmup_time = 0.2

    def setup_cache(self) -> dict:
        from ternbench.methods import create_method

        torch.set_num_threads(1)
        # fgq is the ternary method present in every commit the suite tracks
        qm = create_method("fgq").quantize(common.small_model(), common.synthetic_context())
        return qm.export()

    def setup(self, exports: dict) -> None:
        rng = np.random.default_rng(common.SEED)
        # the largest ResNet-18 conv (512 x 512*3*3): ~2.4 M codes
        self.codes = rng.integers(-1, 2, (512, 4608)).astype(np.int8)

    def time_pack_ternary(self, exports: dict) -> None:
        _export_io().pack_ternary(self.codes)

    def time_exports_to_bytes(self, exports: dict) -> None:
        _export_io().exports_to_bytes(exports)


def _export_io():
    """The export file format module: ``ternbench.core.export_io``, or on commits before the
    core package ``ternbench.methods._export_io`` (asv runs this tree against older commits)."""
    try:
        from ternbench.core import export_io
    except ImportError:
        from ternbench.methods import _export_io as export_io
    return export_io
