"""The gated delta rule's share of the cost model (estimate.py): one engine, the chunked torch form.

Per token and value head, in floats (letters of docs/architecture.md: h value heads, n key dim, p value dim,
q = the kernel's chunk, m = 1 with one α per head or n with one α per key channel, Kimi-Linear's KDA), for
kernels/delta_rule.py's `gated_delta_rule`:

    kept for the backward     DELTA_KEEP: 5.0·q·m + 10.5·n + 3.5·p     autograd's saved tensors, counted exactly
    backward transient        DELTA_BWD:  3.2·q·m + 3.3·(n + p)        above the kept; CPU peak RSS
    no-grad forward           DELTA_FWD:  5.0·q·m + 5.1·(n + p)        CPU peak RSS

(in the transients the q·m term is one block of chunks' decays at most, as the kernel builds BLOCK_BYTES of them at
a time: its bytes are min(l·h·q·m·4, BLOCK_BYTES) times the coefficient), and around the kernel (projections, conv, gated norm) estimate.KEEP["delta" | "delta_channel"] floats per token
and value channel (h·p).  The measurements: docs/performance.md, "Gated delta rule".
"""

from __future__ import annotations

CHUNK = 64  # kernels.delta_mixer.CHUNK (the cost model imports no kernels)
BLOCK_BYTES = 64 * 2**20  # kernels.delta_rule.BLOCK_BYTES
DELTA_KEEP = (5.0, 10.5, 3.5)
DELTA_BWD = (3.2, 3.3)
DELTA_FWD = (5.0, 5.1)


def is_delta(s) -> bool:
    """Whether a ModelShape's recurrent layers are gated delta rules."""
    return bool(s.ssm_kind) and s.ssm_kind.startswith("delta")


def shape_kind(adapter, mixer) -> str:
    """The cost model's kind of a delta model: "delta_channel" with one α per key channel, else "delta"."""
    return "delta_channel" if hasattr(mixer, "forget_gate") else "delta"


def delta_bytes(s, coef: tuple, l: int, block: bool = False) -> float:
    """One delta layer's kernel term in bytes: l·h·4·(c0·q·m + c1·n + c2·p); two coefficients: c1·(n + p).

    Args:
        s: the ModelShape (d_inner = h·p, d_state = n, heads = h, chunk = q).  coef: DELTA_*.  l: tokens.
        block: a transient: the q·m term is at most BLOCK_BYTES (one block of chunks).
    """
    p, qm = s.d_inner // max(s.heads, 1), max(1, min(s.chunk, l)) * (s.d_state if s.ssm_kind == "delta_channel" else 1)
    decays = l * s.heads * 4 * qm
    return coef[0] * (min(decays, BLOCK_BYTES) if block else decays) + l * s.heads * 4 * (
        coef[1] * s.d_state + coef[-1] * p)


def delta_scan_flops(s, l: int) -> float:
    """FLOPs of the chunked recurrence over l tokens in every delta layer: the pair weights (k·k and q·k within a
    chunk, 3 per entry with a per-channel α), the triangular solve, the chunk reads and the state updates."""
    p, q = s.d_inner // max(s.heads, 1), max(1, min(s.chunk, l))
    pair = (3 if s.ssm_kind == "delta_channel" else 2) * q * s.d_state
    return s.ssm_layers * l * s.heads * 2.0 * (2 * pair + q * (s.d_state + 2 * p) + 3 * s.d_state * p)
