"""The mLSTM cell (xLSTM's matrix-memory LSTM): a chunked exact form and its plain `_ref` loop twin.

Dimension letters as in docs/architecture.md: b batch, l time, h heads, n key (q/k) head dim, p value head dim.
Per head, with the input gate pre-activation ĩ_t and the forget gate f_t = σ(f̃_t) (Beck et al. 2024, "xLSTM",
Section 2.3 and Appendix A.2 (stabilised form); transformers' models/xlstm/modeling_xlstm.py, native kernels):

    m_t = max(log f_t + m_{t−1}, ĩ_t)                                      (the stabiliser, m_0 = 0)
    C_t = exp(log f_t + m_{t−1} − m_t) C_{t−1} + exp(ĩ_t − m_t) k_t v_tᵀ   (n × p)
    n_t = exp(log f_t + m_{t−1} − m_t) n_{t−1} + exp(ĩ_t − m_t) k_t        (n)
    h_t = C_tᵀ q̃_t / (max(|n_tᵀ q̃_t|, exp(−m_t)) + ε),   q̃_t = q_t / √n

The stored C, n are the true (unstabilised) sums times exp(−m_t): C_t^true = Σ_s Π_{s<r≤t} f_r · exp(ĩ_s) k_s v_sᵀ
(plus the carried history), so h_t = C_t^trueᵀ q̃_t / (max(|n_t^trueᵀ q̃_t|, 1) + ε exp(m_t)): m only moves ε.
The chunked form computes, chunk by chunk, each position's m_t as the max of every log weight reaching it (the
same max the loop builds), the intra-chunk part as a masked (c × c) product and the carried part from the state at
the chunk start (transformers' chunkwise kernel does the same; its loop and chunkwise paths agree to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backend import count_scan, log_once
from .ref import compute_dtype, normalize_positions

BACKENDS = ("auto", "torch", "ref", "cuda")
EPS = 1e-6  # transformers' default xLSTMConfig.eps


@dataclass
class MLSTMState:
    """One mLSTM layer's carried state: C (b, h, n, p), n (b, h, n), m (b, h) in the compute dtype."""

    C: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor

    def clone(self) -> "MLSTMState":
        return MLSTMState(self.C.clone(), self.n.clone(), self.m.clone())


@dataclass
class ScanOut:
    """What mlstm_scan returns: h (b, l, h, p) in q's dtype; last: the final MLSTMState; states: the stabilised C
    at the requested positions (b, l | k, h, n, p) or None; m, denom: (b, l, h) the stabiliser and the denominator
    max(|nᵀq̃|, exp(−m)) + ε each output was divided by (compute dtype)."""

    h: torch.Tensor
    last: MLSTMState
    states: torch.Tensor | None
    m: torch.Tensor
    denom: torch.Tensor


def _prepare(q, k, v, i_pre, log_f, initial):
    """(compute dtype, heads-first tensors (b, h, l, ·) with q scaled, and the initial C, n, m)."""
    if q.shape != k.shape or q.dim() != 4 or v.shape[:3] != q.shape[:3] or i_pre.shape != q.shape[:3] \
            or log_f.shape != q.shape[:3]:
        raise ValueError(f"mlstm: q, k (b, l, h, n), v (b, l, h, p), gates (b, l, h) expected; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(i_pre.shape)}, {tuple(log_f.shape)}")
    ct = compute_dtype(q)
    bsz, _, heads, n = q.shape
    p = v.shape[-1]
    qh, kh, vh = (t.to(ct).transpose(1, 2) for t in (q, k, v))                  # (b, h, l, ·)
    ih, fh = (t.to(ct).transpose(1, 2) for t in (i_pre, log_f))                  # (b, h, l)
    if initial is None:
        C, nv, m = (q.new_zeros(bsz, heads, n, p, dtype=ct), q.new_zeros(bsz, heads, n, dtype=ct),
                    q.new_zeros(bsz, heads, dtype=ct))
    else:
        C, nv, m = initial.C.to(ct), initial.n.to(ct), initial.m.to(ct).reshape(bsz, heads)
    return ct, qh * n ** -0.5, kh, vh, ih, fh, C, nv, m


def _gather(states_all, want, length):
    """The recorded states (b, l, h, n, p) at the requested positions, or None."""
    if want is None or states_all is None:
        return None
    if isinstance(want, str):
        return states_all
    return states_all[:, normalize_positions(want, length).to(states_all.device)]


def mlstm_scan_ref(q, k, v, i_pre, log_f, initial: MLSTMState | None = None, eps: float = EPS,
                   states=None) -> ScanOut:
    """The mLSTM cell as a plain loop over time, step by step as in the module docstring.

    Args:
        q, k: (b, l, h, n).  v: (b, l, h, p).  i_pre: input-gate pre-activations ĩ (b, l, h) (after any soft cap).
        log_f: log f = logsigmoid(f̃), (b, l, h).  initial: the state after earlier tokens, or None (zeros, m = 0).
        eps: ε of the denominator.  states: None | "all" | LongTensor of positions: record the stabilised C there.
    """
    ct, qh, kh, vh, ih, fh, C, nv, m = _prepare(q, k, v, i_pre, log_f, initial)
    length = qh.shape[2]
    hs, ms, dens, Cs = [], [], [], []
    for t in range(length):
        m_new = torch.maximum(fh[:, :, t] + m, ih[:, :, t])                       # (b, h)
        fa, ia = torch.exp(fh[:, :, t] + m - m_new), torch.exp(ih[:, :, t] - m_new)
        kt, vt, qt = kh[:, :, t], vh[:, :, t], qh[:, :, t]
        C = fa[..., None, None] * C + ia[..., None, None] * kt[..., :, None] * vt[..., None, :]
        nv = fa[..., None] * nv + ia[..., None] * kt
        m = m_new
        den = torch.maximum((qt * nv).sum(-1).abs(), torch.exp(-m)) + eps          # (b, h)
        hs.append((qt[..., :, None] * C).sum(-2) / den[..., None])                 # (b, h, p)
        ms.append(m)
        dens.append(den)
        if states is not None:
            Cs.append(C)
    every = torch.stack(Cs, dim=1) if states is not None else None                 # (b, l, h, n, p)
    return ScanOut(torch.stack(hs, dim=1).to(q.dtype), MLSTMState(C, nv, m), _gather(every, states, length),
                   torch.stack(ms, dim=1), torch.stack(dens, dim=1))


def _chunk(qc, kc, vc, ic, fc, C, nv, m, eps, want_states):
    """One chunk (b, h, c, ·) from the state (C, n, m) at its start: (h, m_t, denominators, C's, new C, n, m)."""
    c = qc.shape[2]
    cum = fc.cumsum(-1)                                                            # Σ_{r≤t} log f_r in the chunk
    causal = torch.ones(c, c, dtype=torch.bool, device=qc.device).tril()
    log_d = (cum[..., :, None] - cum[..., None, :] + ic[..., None, :]).masked_fill(~causal, -float("inf"))
    inter = cum + m[..., None]                                                     # log weight of the carried state
    mt = torch.maximum(inter, log_d.amax(-1))                                      # (b, h, c)
    D = torch.exp(log_d - mt[..., None])                                           # (b, h, c, c)
    g = torch.exp(inter - mt)                                                      # (b, h, c)
    S = (qc @ kc.transpose(-1, -2)) * D
    num = g[..., None] * (qc @ C) + S @ vc                                         # (b, h, c, p)
    den = torch.maximum((g * (qc @ nv[..., None])[..., 0] + S.sum(-1)).abs(), torch.exp(-mt)) + eps
    every = None
    if want_states:
        every = g[..., None, None] * C[:, :, None] + torch.einsum("bhts,bhsn,bhsp->bhtnp", D, kc, vc)
    m_new = mt[..., -1]
    w = torch.exp(log_d[..., -1, :] - m_new[..., None])                            # (b, h, c) weights of the writes
    carry = torch.exp(cum[..., -1] + m - m_new)                                    # (b, h)
    C = carry[..., None, None] * C + (kc * w[..., None]).transpose(-1, -2) @ vc
    nv = carry[..., None] * nv + (kc * w[..., None]).sum(-2)
    return num / den[..., None], mt, den, every, C, nv, m_new


def mlstm_scan(q, k, v, i_pre, log_f, initial: MLSTMState | None = None, eps: float = EPS, states=None,
               chunk_size: int = 64, backend: str = "auto") -> ScanOut:
    """The mLSTM cell, chunked (exact: the same stabiliser and denominator as the loop); arguments as mlstm_scan_ref.

    Args:
        chunk_size: chunk length c (memory per chunk: c² per head, c·n·p with recorded states).
        backend: "auto" | "torch" (this chunked form) | "ref" (the loop) | "cuda" (the chunked torch form, said
            once on stderr: ssmdiag has no fused mLSTM kernel).
    """
    if backend not in BACKENDS:
        raise ValueError(f"mlstm: backend must be one of {BACKENDS}, not {backend!r}")
    count_scan("ref" if backend == "ref" else "torch:chunked")
    if backend == "ref":
        return mlstm_scan_ref(q, k, v, i_pre, log_f, initial, eps, states)
    if backend == "cuda":
        log_once("mLSTM: no fused CUDA kernel in ssmdiag; running the chunked torch form")
    ct, qh, kh, vh, ih, fh, C, nv, m = _prepare(q, k, v, i_pre, log_f, initial)
    length = qh.shape[2]
    hs, ms, dens, Cs = [], [], [], []
    for s in range(0, length, chunk_size):
        cut = slice(s, s + chunk_size)
        h, mt, den, every, C, nv, m = _chunk(qh[:, :, cut], kh[:, :, cut], vh[:, :, cut], ih[:, :, cut],
                                             fh[:, :, cut], C, nv, m, eps, states is not None)
        hs.append(h)
        ms.append(mt)
        dens.append(den)
        Cs.append(every)
    every = torch.cat(Cs, dim=2).transpose(1, 2) if states is not None else None  # (b, l, h, n, p)
    return ScanOut(torch.cat(hs, dim=2).transpose(1, 2).to(q.dtype), MLSTMState(C, nv, m),
                   _gather(every, states, length), torch.cat(ms, dim=2).transpose(1, 2),
                   torch.cat(dens, dim=2).transpose(1, 2))


def log_forget(f_pre: torch.Tensor) -> torch.Tensor:
    """log f = logsigmoid(f̃): the forget gate of transformers' native mLSTM kernels."""
    return F.logsigmoid(f_pre)
