"""wkv: RWKV-4's time-mix recurrence with states, differentiable (chunked) plus its `_ref` loop.

Dimension letters (docs/architecture.md): b batch, l time, d channels (the attention width), q chunk length,
t and s positions (targets, sources), k requested positions.

Per channel, with w = −exp(time_decay) (so the per-step decay factor is exp(w) ∈ (0, 1), fixed: it depends on no
input) and u = time_first (the bonus of the current token):

    wkv_t = (Σ_{s<t} e^{(t−1−s)w + k_s} v_s + e^{u + k_t} v_t) / (Σ_{s<t} e^{(t−1−s)w + k_s} + e^{u + k_t})

(Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era", eq. 14-16; transformers'
`rwkv_linear_attention_cpu`).  The state after token t is the two sums over s ≤ t, a = Σ e^{(t−s)w + k_s} v_s and
β = Σ e^{(t−s)w + k_s}, kept as (num, den, max): a = num·e^max, β = den·e^max, max the largest exponent seen, so
nothing overflows.  States are stacked on a last axis of 3, (…, d, 3) = [num, den, max], float32 (float64 for
float64 input), like transformers' state[2:5]; a fresh state is num = den = 0, max = −1e38.

`wkv_ref` is the plain loop (transformers' order of operations); `wkv_chunked` the chunked form: inside a chunk of q
tokens every target's weights over the chunk's sources and the incoming state are one masked (q × q) table of
exponents, combined with their running max in one logsumexp-style pass, so a chunk costs O(q²·d) with no loop over
tokens.  It does q times the loop's exponentials but builds a graph q times smaller.  Measured in one run (CPU, one
thread, 512 tokens; noisy, the machine was shared): a forward alone took 0.07-0.23 s by the loop against 0.07-0.37 s
chunked (q = 8) for d = 256 ... 2560, the chunked form losing as d grows; a backward 0.64 / 0.60 / 0.99 s after the
loop against 0.13 / 0.37 / 0.85 s chunked at d = 256 / 1024 / 2560.  So `wkv` with backend "auto" runs the chunked
form where a gradient will flow (or on CUDA, where one step of the loop is a dozen kernel launches: reasoned, not
measured here) and the loop otherwise.  Plain torch ops: autograd gives the backward.
"""

from __future__ import annotations

import torch

from .ref import compute_dtype, normalize_positions

CHUNK = 8  # O(q²·d) memory per chunk; 8 was the fastest with a backward (module docstring)
FRESH_MAX = -1e38  # the max of an empty state (transformers' rwkv_linear_attention_cpu)
MAX_RATE = 1e30
BACKENDS = ("auto", "torch", "cuda", "ref")


def fresh_state(bsz: int, d: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The state before any token, (b, d, 3) = [num 0, den 0, max −1e38]."""
    s = torch.zeros(bsz, d, 3, dtype=dtype, device=device)
    s[..., 2] = FRESH_MAX
    return s


def _check(time_decay, time_first, k, v, state):
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"wkv: k and v must both be (b, l, d); got k {tuple(k.shape)}, v {tuple(v.shape)}")
    d = k.shape[-1]
    if time_decay.shape != (d,) or time_first.shape != (d,):
        raise ValueError(f"wkv: time_decay and time_first must be ({d},); got {tuple(time_decay.shape)}, "
                         f"{tuple(time_first.shape)}")
    if state is not None and tuple(state.shape) != (k.shape[0], d, 3):
        raise ValueError(f"wkv: state must be (b, d, 3) = [num, den, max]; got {tuple(state.shape)}")


def _decay(time_decay: torch.Tensor, ct) -> torch.Tensor:
    """w = −exp(time_decay), floored at −1e30 (an overflow to −inf would make 0·w a NaN; e^{−1e30} is 0 just the
    same)."""
    return -torch.exp(time_decay.to(ct)).clamp(max=MAX_RATE)


def _pick(states: torch.Tensor, return_states):
    """(b, l, d, 3) states after every token -> what return_states asks for."""
    if return_states == "last":
        return states[:, -1]
    if return_states == "all":
        return states
    return states[:, normalize_positions(return_states, states.shape[1]).to(states.device)]


def wkv_ref(time_decay, time_first, k, v, state=None, return_states=None):
    """The wkv recurrence as a plain loop over tokens (transformers' running-max order).

    Args:
        time_decay, time_first: (d,) parameters (w = −exp(time_decay)).  k, v: (b, l, d).
        state: (b, d, 3) [num, den, max] after the previous tokens, or None (no history).
        return_states: None | "last" | "all" | positions (LongTensor; negative from the end).
    Returns: wkv (b, l, d) in v's dtype, and with return_states the states after those tokens, (b, [k,] d, 3).
    """
    _check(time_decay, time_first, k, v, state)
    ct = compute_dtype(v)
    w, u = _decay(time_decay, ct), time_first.to(ct)
    st = fresh_state(k.shape[0], k.shape[-1], ct, k.device) if state is None else state.to(ct)
    num, den, mx = st.unbind(-1)
    outs, kept = [], []
    for t in range(k.shape[1]):
        kt, vt = k[:, t].to(ct), v[:, t].to(ct)
        top = torch.maximum(mx, kt + u)
        e1, e2 = torch.exp(mx - top), torch.exp(kt + u - top)
        outs.append((e1 * num + e2 * vt) / (e1 * den + e2))
        top = torch.maximum(mx + w, kt)
        e1, e2 = torch.exp(mx + w - top), torch.exp(kt - top)
        num, den, mx = e1 * num + e2 * vt, e1 * den + e2, top
        if return_states is not None:
            kept.append(torch.stack([num, den, mx], dim=-1))
    out = torch.stack(outs, dim=1).to(v.dtype)
    if return_states is None:
        return out
    return out, _pick(torch.stack(kept, dim=1), return_states)


def _combine(lw: torch.Tensor, v: torch.Tensor, s_lw: torch.Tensor, num0, den0):
    """Σ_s e^{lw_s} v_s + e^{s_lw}·num0 and Σ_s e^{lw_s} + e^{s_lw}·den0, as (num, den, max) with max the top exponent.

    Args: lw (b, q, q, d) exponents of each target's sources (−inf where masked); v (b, q, d);
        s_lw (b, q, d) the incoming state's exponent at each target; num0, den0 (b, d).
    """
    top = torch.maximum(lw.amax(dim=2), s_lw)                                   # (b, q, d)
    e = torch.exp(lw - top[:, :, None])                                          # (b, q, q, d)
    es = torch.exp(s_lw - top)                                                   # (b, q, d)
    num = torch.einsum("btsd,bsd->btd", e, v) + es * num0[:, None]
    den = e.sum(dim=2) + es * den0[:, None]
    return num, den, top


def resolve_path(backend: str, device, grad: bool = False) -> str:
    """"ref" (the loop) or "torch" (chunked) for a backend: "ref" -> loop, "torch" / "cuda" -> chunked, "auto" ->
    chunked on CUDA or when a gradient will flow (`grad`), the loop otherwise (module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"wkv: backend {backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "torch" if grad or torch.device(device).type == "cuda" else "ref"
    return "ref" if backend == "ref" else "torch"


def needs_grad(*tensors) -> bool:
    """Whether autograd will record an op on these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def wkv(time_decay, time_first, k, v, state=None, return_states=None, backend="auto", chunk: int = CHUNK):
    """The wkv recurrence (module docstring) by the path `backend` resolves to (resolve_path).

    Args:
        time_decay, time_first: (d,).  k, v: (b, l, d).  state: (b, d, 3) [num, den, max] or None.
        return_states: None | "last" | "all" | positions.  backend: "auto" | "torch" | "cuda" | "ref".
        chunk: q, tokens per chunk of the chunked path.
    Returns: as wkv_ref.
    """
    if resolve_path(backend, k.device, needs_grad(time_decay, time_first, k, v)) == "ref":
        return wkv_ref(time_decay, time_first, k, v, state, return_states)
    return wkv_chunked(time_decay, time_first, k, v, state, return_states, chunk)


def wkv_chunked(time_decay, time_first, k, v, state=None, return_states=None, chunk: int = CHUNK):
    """The wkv recurrence chunked: q tokens at a time, no loop inside a chunk (memory O(b·q²·d)).  Args as wkv."""
    _check(time_decay, time_first, k, v, state)
    ct = compute_dtype(v)
    bsz, length, d = k.shape
    w, u = _decay(time_decay, ct), time_first.to(ct)
    st = fresh_state(bsz, d, ct, k.device) if state is None else state.to(ct)
    q = max(1, min(chunk, length))
    idx = torch.arange(q, device=k.device)
    gap = (idx[:, None] - idx[None, :])[..., None]                              # (t, s, 1): t − s
    never = torch.full((), -torch.inf, dtype=ct, device=k.device)
    # outputs: e^{(t−1−s)w} for s < t, the bonus e^{u} at s = t, nothing for s > t
    before = torch.where(gap > 0, (gap - 1).clamp(min=0) * w, never)
    before = torch.where(gap == 0, u.expand(q, q, d), before)                   # (t, s, d)
    # the state after token t: sources s ≤ t decayed t − s times
    after = torch.where(gap >= 0, gap.clamp(min=0) * w, never)                  # (t, s, d)
    outs, kept = [], []
    for c0 in range(0, length, q):
        kc, vc = k[:, c0:c0 + q].to(ct), v[:, c0:c0 + q].to(ct)
        n = kc.shape[1]
        num0, den0, mx0 = st.unbind(-1)
        steps = torch.arange(n, device=k.device, dtype=ct)[None, :, None]
        # outputs: target t reads the incoming state decayed t times, its earlier sources, and itself with the bonus
        lw = before[:n, :n] + kc[:, None]                                          # (b, t, s, d)
        num, den, _ = _combine(lw, vc, mx0[:, None] + steps * w, num0, den0)
        outs.append(num / den)
        # the state after token t: the incoming state decayed t + 1 times and sources s ≤ t decayed t − s times
        lw = after[:n, :n] + kc[:, None]
        num, den, top = _combine(lw, vc, mx0[:, None] + (steps + 1) * w, num0, den0)
        states = torch.stack([num, den, top], dim=-1)                             # (b, n, d, 3)
        st = states[:, -1]
        if return_states is not None and return_states != "last":
            kept.append(states)
    out = torch.cat(outs, dim=1).to(v.dtype)
    if return_states is None:
        return out
    return out, (st if return_states == "last" else _pick(torch.cat(kept, dim=1), return_states))
