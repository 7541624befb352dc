"""gated_delta_rule: the gated delta rule recurrence with states, differentiable (chunked) plus its `_ref` loop.

Dimension letters (docs/architecture.md): b batch, l time, h heads, n key dim (the state's rows: it plays Mamba's
state size), p value dim (the head dim), q chunk length, c chunks, t and s positions, k requested positions.

Per head, with the state S (n × p), keys k_t L2-normalised by the caller, α_t = exp(g_t):

    S_t = (I − β_t k_t k_tᵀ) Diag(α_t) S_{t−1} + β_t k_t v_tᵀ,      o_t = S_tᵀ (scale · q_t)

(Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks", eq. 10; the convention of transformers'
Qwen3NextGatedDeltaNet / Qwen3_5GatedDeltaNet / OlmoHybridGatedDeltaNet: decay first, then the delta correction
kv_mem = Sᵀk, S += β k (v − kv_mem)ᵀ, read with q / sqrt(n).)  g is one log-decay per head, (b, l, h), where the
order of decay and correction does not matter (α(I − βkkᵀ) = (I − βkkᵀ)α), or one per key channel, (b, l, h, n)
(Kimi-Linear's delta attention, "KDA"), where it does: the decay scales the state's rows before the correction.
q and k may have fewer heads than v (grouped value heads): key head i serves value heads i·r .. i·r + r − 1.

`gated_delta_rule` is the chunked (WY / "UT transform") form: inside a chunk of q steps, with u_t = β_t (v_t − S̃_tᵀ k_t)
the corrections (S̃_t the decayed state before step t's write),
1. A[t, s] = β_t Σ_c k_t,c k_s,c exp(Γ_t,c − Γ_s,c) for s < t (Γ the within-chunk cumulative log-decay),
   so (I + A) U = β V − β (K ⊙ e^Γ) S_0: one unit-lower-triangular solve per chunk for both parts;
2. outputs o_t = (q̃_t ⊙ e^Γ_t)ᵀ S_0 + Σ_{s≤t} [Σ_c q̃_t,c k_s,c exp(Γ_t,c − Γ_s,c)] u_s;
3. the state carried to the next chunk: S_q = e^Γ_q ⊙ S_0 + Σ_s (k_s ⊙ exp(Γ_q − Γ_s)) u_sᵀ (a loop over chunks).
Decays over a span come from a masked cumulative sum (ssd._segsum), never a difference of two long cumsums, so
strong gates stay exact.  Plain torch ops: autograd gives the backward.  Computation is float32 (float64 for float64
input); o comes back in q's dtype, states in the compute dtype, laid out (b, h, n, p) like transformers' cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import count_scan, log_once
from .ref import compute_dtype, normalize_positions, pick_states
from .ssd import _segsum

BACKENDS = ("auto", "torch", "cuda", "ref")


def _check(q, k, v, g, beta, initial_state):
    """Validate shapes: q, k (b, l, hk, n); v (b, l, h, p); g (b, l, h) or (b, l, h, n); beta (b, l, h)."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"gated_delta_rule: q, k must be (b, l, hk, n) and v (b, l, h, p) with the same b, l; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    bsz, length, hk, n = q.shape
    heads, p = v.shape[2:]
    if heads % hk:
        raise ValueError(f"gated_delta_rule: {heads} value heads are not a multiple of {hk} key heads")
    if tuple(g.shape) not in ((bsz, length, heads), (bsz, length, heads, n)):
        raise ValueError(f"gated_delta_rule: g has shape {tuple(g.shape)}, expected {(bsz, length, heads)} (per head) "
                         f"or {(bsz, length, heads, n)} (per key channel)")
    if tuple(beta.shape) != (bsz, length, heads):
        raise ValueError(f"gated_delta_rule: beta has shape {tuple(beta.shape)}, expected {(bsz, length, heads)}")
    if initial_state is not None and tuple(initial_state.shape) != (bsz, heads, n, p):
        raise ValueError(f"gated_delta_rule: initial_state has shape {tuple(initial_state.shape)}, "
                         f"expected {(bsz, heads, n, p)} (b, h, n, p)")


def _heads_first(q, k, v, g, beta, ct):
    """Value-head layout in the compute dtype: q, k, v (b, h, l, ·); g (b, h, l, m) with m = 1 or n; beta (b, h, l)."""
    rep = v.shape[2] // k.shape[2]
    if rep > 1:
        q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    gm = g[..., None] if g.dim() == 3 else g
    return (q.to(ct).transpose(1, 2), k.to(ct).transpose(1, 2), v.to(ct).transpose(1, 2), gm.to(ct).transpose(1, 2),
            beta.to(ct).transpose(1, 2))


def _prepare(q, k, v, g, beta, scale, initial_state):
    """Shared entry of both twins: checks, the compute dtype, q's scale, heads-first tensors and the start state."""
    _check(q, k, v, g, beta, initial_state)
    ct = compute_dtype(v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    heads_first = _heads_first(q, k, v, g, beta, ct)
    kh, vh = heads_first[1], heads_first[2]
    S = vh.new_zeros(kh.shape[0], kh.shape[1], kh.shape[3], vh.shape[-1]) if initial_state is None \
        else initial_state.to(ct)
    return ct, scale, heads_first, S


def gated_delta_rule_ref(q, k, v, g, beta, scale=None, initial_state=None, return_states=None, chunk_size=64):
    """The gated delta rule one step at a time (transformers' recurrent form), vectorised over batch and heads.

    Args:
        q, k: (b, l, hk, n), keys L2-normalised by the caller.  v: (b, l, h, p), h a multiple of hk.
        g: log α ≤ 0, (b, l, h) per head or (b, l, h, n) per key channel.  beta: (b, l, h).
        scale: the query scale (default n ** -0.5).  initial_state: (b, h, n, p).
        return_states: None | "last" | "all" | LongTensor of k positions (negative = from the end).
        chunk_size: ignored (the loop has no chunks); kept so the signature matches gated_delta_rule.
    Returns: o (b, l, h, p) in q's dtype; with return_states also states (b, h, n, p) / (b, l, h, n, p) /
        (b, k, h, n, p) in the compute dtype.
    """
    ct, scale, (qh, kh, vh, gh, bh), S = _prepare(q, k, v, g, beta, scale, initial_state)
    bsz, heads, length, n = kh.shape
    outs, states = [], []
    for t in range(length):
        S = S * gh[:, :, t, :, None].exp()                              # decay the rows: (b, h, n, p)
        kt = kh[:, :, t]                                                # (b, h, n)
        delta = bh[:, :, t, None] * (vh[:, :, t] - torch.einsum("bhnp,bhn->bhp", S, kt))
        S = S + kt[..., None] * delta[:, :, None, :]
        outs.append(torch.einsum("bhnp,bhn->bhp", S, qh[:, :, t] * scale))
        states.append(S)
    o = torch.stack(outs, dim=1).to(q.dtype)                            # (b, l, h, p)
    return o if return_states is None else (o, pick_states(states, return_states))


def _positions(return_states, length: int):
    """Sorted unique positions to store and the gather index back to the caller's order (None: as stored)."""
    if return_states is None:
        return None, None
    if isinstance(return_states, str):
        if return_states == "last":
            return torch.tensor([length - 1]), None
        if return_states == "all":
            return torch.arange(length), None
        raise ValueError(f"return_states must be None, 'last', 'all' or a tensor of positions, got {return_states!r}")
    pos = normalize_positions(return_states, length).cpu()
    uniq, gather = torch.unique(pos, sorted=True, return_inverse=True)
    return uniq, gather


def _pair_weights(a, b, decay):
    """W[t, s] = Σ_c a_t,c b_s,c decay[t, s, c].  a, b: (..., q, n); decay: (..., q, q, m), m = 1 or n."""
    if decay.shape[-1] == 1:
        return (a @ b.transpose(-1, -2)) * decay[..., 0]
    return torch.einsum("...tn,...sn,...tsn->...ts", a, b, decay)


BLOCK_BYTES = 64 * 2**20  # chunks whose decay tensors (b, h, c, q, q, m) take at most this many bytes are built at once


def _chunk_terms(qc, kc, vc, a, bc):
    """Steps 1-2 of the module docstring for a block of chunks: qc, kc (b, h, c, q, n), vc (b, h, c, q, p),
    a (b, h, c, m, q) log-decays, bc (b, h, c, q, 1).  Returns wv, wk (the solve), P, q_start, k_end, end_decay,
    decay (b, h, c, q, q, m) and cum (b, h, c, q, m)."""
    q, p, n = qc.shape[-2], vc.shape[-1], kc.shape[-1]
    seg = _segsum(a).movedim(-3, -1)                                    # (b, h, c, q, q, m): Σ_{s<j≤t} g_j
    decay = seg.exp()                                                   # 0 above the diagonal
    cum = seg[..., :, 0, :] + a[..., :1].movedim(-2, -1)                # (b, h, c, q, m): Γ_t, inclusive
    strict = torch.ones(q, q, dtype=torch.bool, device=qc.device).tril(-1)
    # 1. the corrections' linear system, both right-hand sides at once
    A = _pair_weights(kc * bc, kc, decay) * strict
    eye = torch.eye(q, dtype=A.dtype, device=A.device)
    rhs = torch.cat([vc * bc, kc * bc * cum.exp()], dim=-1)            # (b, h, c, q, p + n)
    wv, wk = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True).split([p, n], dim=-1)
    # 2. intra-chunk read weights and the start state's read
    P = _pair_weights(qc, kc, decay)                                    # (b, h, c, q, q), lower incl. diagonal
    q_start = qc * cum.exp()                                            # (b, h, c, q, n)
    k_end = kc * decay[..., -1, :, :]                                   # (b, h, c, q, n): k_s ⊙ exp(Γ_q − Γ_s)
    end_decay = cum[..., -1, :].exp()[..., None]                        # (b, h, c, m, 1)
    return wv, wk, P, q_start, k_end, end_decay, decay, cum


def _chunked(qh, kh, vh, gh, bh, S, chunk_size, stored):
    """The chunked recurrence on head-first tensors (see the module docstring); S (b, h, n, p) the start state.

    The chunks' terms are built a block of chunks at a time (BLOCK_BYTES of decay per block), so a forward without
    gradients holds one block's (b, h, q, q, m) decays, not the whole sequence's (q·n floats per token and head
    with a per-key-channel α).
    Returns o (b, h, l, p), the final state, and the states at the sorted positions `stored` (or None).
    """
    bsz, heads, length, n = kh.shape
    q = max(1, min(int(chunk_size), length))
    pad = (-length) % q
    if pad:  # padded steps: α = 1, β = 0, k = v = q = 0, so the state after them equals the last real one
        qh, kh, vh, gh = (F.pad(x, (0, 0, 0, pad)) for x in (qh, kh, vh, gh))
        bh = F.pad(bh, (0, pad))
    nc = qh.shape[2] // q
    qc, kc, vc = (x.reshape(bsz, heads, nc, q, x.shape[-1]) for x in (qh, kh, vh))
    a = gh.reshape(bsz, heads, nc, q, -1).movedim(-1, -2)               # (b, h, c, m, q)
    bc = bh.reshape(bsz, heads, nc, q, 1)
    per_chunk = bsz * heads * q * q * a.shape[-2] * qh.element_size()
    block = max(1, min(nc, BLOCK_BYTES // max(per_chunk, 1)))
    outs, kept = [], []
    stored_chunks = None if stored is None else stored // q
    for c0 in range(0, nc, block):
        cs = slice(c0, min(nc, c0 + block))
        wv, wk, P, q_start, k_end, end_decay, decay, cum = _chunk_terms(qc[:, :, cs], kc[:, :, cs], vc[:, :, cs],
                                                                        a[:, :, cs], bc[:, :, cs])
        for j, i in enumerate(range(cs.start, cs.stop)):
            u = wv[:, :, j] - wk[:, :, j] @ S                           # (b, h, q, p)
            outs.append(q_start[:, :, j] @ S + P[:, :, j] @ u)
            if stored is not None and bool((stored_chunks == i).any()):
                rows = stored[stored_chunks == i] - i * q
                spec = "bhtsm,bhsn,bhsp->bhtnp" if decay.shape[-1] == 1 else "bhtsn,bhsn,bhsp->bhtnp"
                inner = torch.einsum(spec, decay[:, :, j, rows], kc[:, :, i], u)
                kept.append(inner + cum[:, :, j, rows].exp()[..., None] * S[:, :, None])
            S = end_decay[:, :, j] * S + k_end[:, :, j].transpose(-1, -2) @ u
    o = torch.cat(outs, dim=2)[:, :, :length]                           # (b, h, l, p)
    states = None if stored is None else torch.cat(kept, dim=2).transpose(1, 2)   # (b, k, h, n, p)
    return o, S, states


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, return_states=None, chunk_size=64,
                     backend="auto"):
    """The gated delta rule (see the module docstring), chunked; same arguments as gated_delta_rule_ref.

    Args:
        q, k: (b, l, hk, n), keys L2-normalised by the caller.  v: (b, l, h, p), h a multiple of hk.
        g: log α ≤ 0, (b, l, h) per head or (b, l, h, n) per key channel.  beta: (b, l, h).
        scale: the query scale (default n ** -0.5).  initial_state: (b, h, n, p).
        return_states: None | "last" | "all" | LongTensor of k positions (negative = from the end).
        chunk_size: chunk length q (memory per chunk: q² per head, q²·n with per-channel decay).
        backend: "auto" | "torch" (this chunked form) | "ref" (the loop) | "cuda" (no fused kernel: the
            chunked form, said once on stderr).
    Returns: o (b, l, h, p) in q's dtype; with return_states also states (b, h, n, p) / (b, l, h, n, p) /
        (b, k, h, n, p) in the compute dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"gated_delta_rule: backend must be one of {BACKENDS}, not {backend!r}")
    count_scan("ref" if backend == "ref" else "torch:chunked")
    if backend == "ref":
        return gated_delta_rule_ref(q, k, v, g, beta, scale, initial_state, return_states)
    if backend == "cuda":
        log_once("gated delta rule: no fused CUDA kernel in ssmdiag; running the chunked torch form")
    ct, scale, (qh, kh, vh, gh, bh), S = _prepare(q, k, v, g, beta, scale, initial_state)
    bsz, heads, length, n = kh.shape
    stored, gather = _positions(return_states, length)
    o, last, states = _chunked(qh * scale, kh, vh, gh, bh, S, chunk_size,
                               None if stored is None or return_states == "last" else stored.to(qh.device))
    o = o.transpose(1, 2).to(q.dtype)                                   # (b, l, h, p)
    if return_states is None:
        return o
    if isinstance(return_states, str):
        return o, (last if return_states == "last" else states)
    return o, states[:, gather.to(states.device)]
