"""Closed-form per-layer influence of a short-convolution layer (LFM2, LFM2-MoE, LFM3), and its hard window.

With the gates B and C held at the values a forward produced, a short-conv layer (kernels/shortconv.py) is linear
in its values x, and diagonal over channels d:

    y_t[d] = C_t[d] · Σ_{j=0..L−1} W[d, L−1−j] · B_{t−j}[d] · x_{t−j}[d]      (+ C_t[d] · bias[d])
    ∂y_t[d] / ∂x_s[d] = C_t[d] · W[d, L−1−(t−s)] · B_s[d]   for 0 ≤ t − s ≤ L − 1,   0 otherwise

— the same read as Mamba's hidden attention (Ali et al. 2024, eq. 9-11: the influence of the scan input u_s on the
scan output y_t per channel, the gates held) and the delta rule's effective attention (metrics/delta_influence.py).
A row is the norm over channels, ‖C_t ⊙ W[:, L−1−(t−s)] ⊙ B_s‖₂: the Frobenius norm of the (diagonal) Jacobian
∂y_t / ∂x_s.  It is exactly 0 for t − s ≥ L: no exponential (Ā-style) bound applies, the window is the bound
(`WindowBound`, checked on every measured row by `measure_window_bounds`).

Dimension letters (docs/architecture.md): b batch, l time, d channels, T targets; L the window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..kernels.shortconv import ShortConvRecord
from .layer_rows import register_bounds, register_rows


def _targets(targets, length: int) -> torch.Tensor:
    t = torch.as_tensor(list(targets), dtype=torch.long).reshape(-1)
    if t.numel() == 0 or int(t.min()) < 0 or int(t.max()) >= length:
        raise ValueError(f"targets must lie in [0, {length}), got {t.tolist()}")
    return t


def short_conv_rows(B: torch.Tensor, C: torch.Tensor, weight: torch.Tensor, targets) -> torch.Tensor:
    """‖∂y_t / ∂x_s‖ over channels for each target t and every source s (0 outside the window), float64.

    Args:
        B, C: (b, l, d) the input and output gates.  weight: (d, L) the conv taps (tap L − 1: the current token).
        targets: T positions.
    Returns: (b, T, l).
    """
    B, C, weight = B.double(), C.double(), weight.double().to(B.device)
    bsz, length, _ = B.shape
    taps = weight.shape[-1]
    tg = _targets(targets, length)
    out = B.new_zeros(bsz, len(tg), length)
    for i, t in enumerate(tg.tolist()):
        for lag in range(min(taps, t + 1)):  # s = t − lag
            out[:, i, t - lag] = (C[:, t] * weight[:, taps - 1 - lag] * B[:, t - lag]).norm(dim=-1)
    return out


def short_conv_rows_ref(B: torch.Tensor, C: torch.Tensor, weight: torch.Tensor, targets) -> torch.Tensor:
    """short_conv_rows by autograd through the layer's map x -> y = C ⊙ conv(B ⊙ x) alone (B, C held), per pair.

    The Jacobian of y_t with respect to x_s, (d, d), and its Frobenius norm; slow (tests only).
    """
    from ..kernels.shortconv import short_conv

    B, C, weight = B.double(), C.double(), weight.double()
    bsz, length, d = B.shape
    tg = _targets(targets, length)
    out = B.new_zeros(bsz, len(tg), length)
    for b in range(bsz):
        def layer(x):  # (l, d) -> (l, d)
            u = (B[b] * x).T[None]                                               # (1, d, l)
            return C[b] * short_conv(u, weight, None)[0].T
        jac = torch.autograd.functional.jacobian(layer, torch.zeros(length, d, dtype=torch.float64))  # (l, d, l, d)
        for i, t in enumerate(tg.tolist()):
            out[b, i] = jac[t].permute(1, 0, 2).flatten(1).norm(dim=-1)
    return out


def shortconv_layer_rows(record: ShortConvRecord, targets) -> torch.Tensor:
    """The rows of one recorded short-conv layer (kernels.mixer.record with params=True): (b, T, l)."""
    if record.B is None:
        raise ValueError("short-conv rows need the recorded gates: record(model, params=True)")
    return short_conv_rows(record.B, record.C, record.weight, targets)


register_rows(ShortConvRecord, shortconv_layer_rows)


@dataclass
class WindowBound:
    """A short-conv layer's hard window, for `influence --per-layer`: the rows are exactly 0 beyond L − 1 tokens back.

    Args:
        window: L.  rows_within: every measured row entry at distance ≥ L is exactly 0.
        beyond_max: the largest measured row entry at distance ≥ L (0.0 when rows_within).
        note: what the bound is, in words.
        lag_mean: inside the window, the mean row entry at each distance 0 … L − 1 (over samples and the targets
            that reach it): how the layer spreads a token's influence over its window.
    """

    layer: int
    window: int
    rows_within: bool
    beyond_max: float
    note: str
    lag_mean: list[float] = field(default_factory=list)
    head: str = "bound (window)"  # the per-layer table's column header
    shape: str = "window"  # the layer's shape in place of a fitted one
    fit_applies: bool = False  # no decay: influence.py leaves the layer's rate and exponent empty (NaN / None)

    @property
    def cell(self) -> str:
        """The per-layer table's cell."""
        return f"0 at ≥ {self.window} back" + (" ok" if self.rows_within else " VIOLATED")


WINDOW_NOTE = ("no decay, no exponential bound: a hard window of L tokens; influence through the layer is exactly 0 "
               "from L tokens back, inside it ‖C_t ⊙ W_(t−s) ⊙ B_s‖ with the gates at their recorded values")


def window_bound(layer: int, window: int, rows: np.ndarray, targets) -> WindowBound:
    """Check one layer's rows (samples, T, l) against its window: every entry with t − s ≥ L must be 0."""
    worst = 0.0
    by_lag: list[list[float]] = [[] for _ in range(window)]
    for j, t in enumerate(targets):
        far = rows[:, j, : max(0, t - window + 1)]
        if far.size:
            worst = max(worst, float(np.abs(far).max()))
        for lag in range(min(window, t + 1)):
            by_lag[lag].extend(rows[:, j, t - lag].tolist())
    lag_mean = [float(np.mean(v)) if v else float("nan") for v in by_lag]
    return WindowBound(layer=layer, window=window, rows_within=worst == 0.0, beyond_max=worst, note=WINDOW_NOTE,
                       lag_mean=lag_mean)


def measure_window_bounds(model, adapter, ids, targets, layers: list[int], layer_rows) -> dict[int, WindowBound]:
    """The window bound of every short-conv layer among `layers`, checked on its measured rows (no forward).

    Args as metrics.delta_influence.measure_delta_bounds: layer_rows (layers, samples, T, l) in `layers` order.
    """
    from ..kinds import kind_of_module

    out = {}
    for k, layer in enumerate(layers):
        module = adapter.ssm_mixer(adapter.blocks()[layer])
        kind = kind_of_module(module) if module is not None else None
        if kind is not None and kind.kind == "shortconv":
            out[layer] = window_bound(layer, kind.sizes(module)["window"], np.asarray(layer_rows[k]), targets)
    return out


register_bounds("shortconv", measure_window_bounds)
