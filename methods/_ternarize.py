"""Ternarization solvers shared by the methods (FGQ, TWN, and later TRN's residual edges).

All solvers work on rows of groups: ``w`` [rows, n] -> ``(codes, alpha)`` with codes in
{-1, 0, +1} [rows, n] and one scale per row [rows, 1], minimising (or approximating the minimum of)
``||w - alpha * codes||^2``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["Solver", "ternarize_exact", "ternarize_twn", "ternarize_rows", "group_rows"]

Solver = Literal["exact", "twn"]


def ternarize_exact(w: Tensor) -> tuple[Tensor, Tensor]:
    """L2-optimal ternarization of every row.

    For a fixed support I with codes sign(w_i), the best scale is mean(|w_I|) and the error is
    ``||w||^2 - (sum_I |w|)^2 / |I|``; so the optimum keeps the top-k |w| for the k maximising
    ``(prefix sum of sorted |w|)^2 / k``. O(n log n) per row.

    Example:
        >>> codes, a = ternarize_exact(torch.tensor([[0.9, -1.0, 0.05, 0.0]]))
        >>> codes.tolist(), round(float(a), 3)
        ([[1.0, -1.0, 0.0, 0.0]], 0.95)
    """
    a = w.abs()
    # Score each row in units of its own max|w|: the support does not depend on the row's
    # scale, but csum^2 under/overflows float32 for |w| below ~1e-19 or above ~1e19.
    peak = a.amax(dim=1, keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    srt, idx = torch.sort(a / peak, dim=1, descending=True)
    csum = torch.cumsum(srt, dim=1)
    k = torch.arange(1, w.shape[1] + 1, device=w.device, dtype=w.dtype)
    score = csum * csum / k
    best = torch.argmax(score, dim=1, keepdim=True)  # first maximum: the smallest optimal support
    alpha = torch.gather(csum, 1, best) / (best + 1).to(w.dtype) * peak
    keep_sorted = torch.arange(w.shape[1], device=w.device)[None, :] <= best
    keep = torch.zeros_like(keep_sorted).scatter(1, idx, keep_sorted)
    codes = torch.sign(w) * keep
    return codes, alpha


def ternarize_twn(w: Tensor, ratio: float = 0.7) -> tuple[Tensor, Tensor]:
    """TWN rule per row: ``delta = ratio * mean|w|``, alpha = mean of the surviving |w|.

    Example:
        >>> codes, a = ternarize_twn(torch.tensor([[0.9, -1.0, 0.05, 0.0]]))
        >>> codes.tolist()
        [[1.0, -1.0, 0.0, 0.0]]
    """
    a = w.abs()
    delta = ratio * a.mean(dim=1, keepdim=True)
    keep = a > delta
    codes = torch.sign(w) * keep
    n = keep.sum(dim=1, keepdim=True).clamp_min(1)
    alpha = (a * keep).sum(dim=1, keepdim=True) / n
    return codes, alpha


def group_rows(w2d: Tensor, group_size: int) -> tuple[Tensor, int]:
    """[out, fan_in] -> [out * G, group_size] (last group zero-padded), and G."""
    out, fan_in = w2d.shape
    g = -(-fan_in // group_size)
    pad = g * group_size - fan_in
    if pad:
        w2d = torch.nn.functional.pad(w2d, (0, pad))
    return w2d.reshape(out * g, group_size), g


def ternarize_rows(
    w2d: Tensor, group_size: int, solver: Solver, ratio: float = 0.7
) -> tuple[Tensor, Tensor]:
    """Ternarize ``w2d`` [out, fan_in] in contiguous groups along the fan-in.

    Returns codes [out, fan_in] and scales [out, G]. Zero padding of a partial last group never
    enters a support chosen by the exact solver (it would only lower the score); for the TWN rule
    the padded group's mean uses its real entries only.
    """
    out, fan_in = w2d.shape
    rows, g = group_rows(w2d, group_size)
    if solver == "exact":
        codes, alpha = ternarize_exact(rows)
    elif solver == "twn":
        pad = g * group_size - fan_in
        if pad:
            # the TWN threshold is a mean over the real entries: solve the last group apart
            full = rows.reshape(out, g, group_size)
            c_main, a_main = ternarize_twn(full[:, :-1].reshape(-1, group_size), ratio)
            c_last, a_last = ternarize_twn(full[:, -1, : group_size - pad], ratio)
            c_last = torch.nn.functional.pad(c_last, (0, pad))
            codes = torch.cat([c_main.reshape(out, g - 1, group_size), c_last[:, None]], 1)
            alpha = torch.cat([a_main.reshape(out, g - 1), a_last], 1)
            codes, alpha = codes.reshape(out * g, group_size), alpha.reshape(out * g, 1)
        else:
            codes, alpha = ternarize_twn(rows, ratio)
    else:
        raise ValueError(f"solver must be 'exact' or 'twn', got {solver!r}")
    codes = codes.reshape(out, g * group_size)[:, :fan_in]
    return codes, alpha.reshape(out, g)
