"""The SSM views of `ssmdiag length`, per layer, fed one recorded chunk at a time: memory O(positions), not O(l).

- **State health** (Stuffed Mamba, Chen et al. 2024, `analysis/analyze_states.py`): the RMS sqrt(mean h²) and the
  max |entry| of the recurrent state, per head (Mamba-2) or per group of consecutive channels (Mamba-1 kinds),
  at chosen positions.
- **Decay against position** (Stuffed Mamba `get_dA.py`): the per-step decay α_t = exp(Δ_t·A) averaged over
  heads (Mamba-2) or, for Mamba-1 kinds, the per-channel geometric mean over its n states exp(Δ_t·mean_n A),
  and Δ_t itself, in position buckets.
- **Global channels** (LongMamba, Ye et al. 2025, `load_align_target.py`): per state channel ((d, n) pairs for
  Mamba-1 kinds, heads for Mamba-2) the product of the per-step decay over the first `train_len` tokens,
  ∏_t exp(Δ_t·A) = exp(A·Σ_t Δ_t); a channel is *global* when it stays ≥ the threshold θ (default 0.1: a token
  at the start of a training-length window still weighs ≥ 10% of a fresh one at its end), *local* otherwise.
- **Receptive field** (DeciMamba, Ben-Kish et al. 2024): the Mamba Mean Distance of the last position's hidden-
  attention row, MMD = Σ_s (t−s)|α_{t,s}| / Σ_s |α_{t,s}|, per channel (Mamba-1 kinds: an evenly spaced subset
  of channels) or per head (Mamba-2), from the closed form of metrics/hidden_attention.py, computed in blocks of
  sources so a 32k-token row never holds (l, d, n) at once.

Dimension letters (docs/architecture.md): l time, d channels, n state size, h heads, p head dim, g groups,
k requested state positions.  One sample (batch 1) at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GLOBAL_THRESHOLD = 0.1
SOURCE_BLOCK = 2048


def state_health(states: torch.Tensor, kind: str, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMS and max |entry| of recorded states, overall and per part.

    Args:
        states: (k, d, n) Mamba-1 kinds or (k, h, p, n) Mamba-2: states at k positions of one sample.
        kind: "mamba1" | "mamba2".  groups: channel groups of a Mamba-1 state (parts; Mamba-2: its heads).
    Returns: (rms (k,), max_abs (k,), rms per part (k, P)), float64.
    """
    s = states.double()
    k = s.shape[0]
    if kind == "mamba2":
        parts = s.reshape(k, s.shape[1], -1)                                      # (k, h, p·n)
    else:
        g = max(1, min(groups, s.shape[1]))
        d = s.shape[1] - s.shape[1] % g
        parts = s[:, :d].reshape(k, g, -1)                                        # (k, P, d/P·n)
    flat = s.reshape(k, -1)
    return flat.pow(2).mean(1).sqrt(), flat.abs().amax(1), parts.pow(2).mean(2).sqrt()


def per_token_decay(delta: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean Δ and mean per-step decay α over channels, per token.

    Args:
        delta: (l, d) or (l, h).  A: (d, n) Mamba-1 kinds or (h,) Mamba-2.
    Returns: (mean Δ (l,), mean α (l,)); Mamba-1 kinds: α of a channel = exp(Δ·mean_n A), the geometric mean
        of its n states' decays.
    """
    dlt = delta.float()
    rate = A.float() if A.dim() == 1 else A.float().mean(-1)                      # (h,) | (d,)
    return dlt.mean(-1).double(), torch.exp(dlt * rate).mean(-1).double()


def global_share(sum_delta: torch.Tensor, A: torch.Tensor, threshold: float = GLOBAL_THRESHOLD) -> float:
    """Share of state channels whose decay product over the summed window, exp(A·ΣΔ), stays ≥ threshold.

    Args:
        sum_delta: (d,) or (h,): Σ_t Δ_t over the window.  A: (d, n) or (h,).
    """
    S, A = sum_delta.double(), A.double()
    prod = torch.exp(A * S) if A.dim() == 1 else torch.exp(A * S[:, None])
    return float((prod >= threshold).double().mean())


def mmd_of_row(alpha: torch.Tensor) -> torch.Tensor:
    """Mamba Mean Distance of one hidden-attention row per channel.

    Args:
        alpha: (s, c): α_{t,s} for sources s = 0..t (t = s − 1 at the last row), c channels or heads.
    Returns: (c,) Σ_s (t−s)|α| / Σ_s |α| (NaN where the row is all zero).
    """
    a = alpha.abs().double()
    dist = torch.arange(a.shape[0] - 1, -1, -1, dtype=torch.float64, device=a.device)[:, None]
    return (dist * a).sum(0) / a.sum(0)


def mmd_closed_form(abar: float, t: int) -> float:
    """MMD of a row α_{t,s} = abar^(t−s), s = 0..t (constant decay, B = C = Δ = 1): the known answer."""
    k = torch.arange(t + 1, dtype=torch.float64)
    w = torch.tensor(abar, dtype=torch.float64) ** k
    return float((k * w).sum() / w.sum())


def last_row_mmd(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C_t: torch.Tensor, heads_of=None,
                 block: int = SOURCE_BLOCK) -> torch.Tensor:
    """MMD of row t = l − 1 of the hidden attention per channel, in blocks of sources (O(l·c·n) time).

    α_{t,s}[c] = Δ_s[c] · Σ_n C_t[n] B_s[n] exp(A[c,n]·(S_t − S_s)), S the running sum of Δ (Ali et al. 2024,
    eq. 9-11; Mamba-2: A and Δ per head, C_t·B_s of the head's group).

    Args:
        delta: (l, c) Δ of the chosen channels / heads, sources 0..t.
        A: (c, n) Mamba-1 kinds, (c,) Mamba-2.
        B: (l, n) Mamba-1, (l, c, n) per channel (Zamba's per-head B, gathered), (l, g, n) Mamba-2.
        C_t: (n,), (c, n) or (g, n): C at the target.
        heads_of: Mamba-2: (c,) the group each head reads.
    Returns: (c,) float64.
    """
    dlt = delta.double()
    S = torch.cumsum(dlt, 0)                                                      # (l, c)
    t = dlt.shape[0] - 1
    num = torch.zeros(dlt.shape[1], dtype=torch.float64, device=dlt.device)
    den = torch.zeros_like(num)
    Ad = A.double().clamp(min=-1e300)
    for s0 in range(0, t + 1, block):
        s1 = min(t + 1, s0 + block)
        x = (S[t] - S[s0:s1]).clamp(min=0.0)                                      # (s, c): Σ_{k=s+1..t} Δ_k
        if A.dim() == 1:
            cb = torch.einsum("sgn,gn->sg", B[s0:s1].double(), C_t.double())[:, heads_of]  # (s, c)
            alpha = cb * torch.exp(x * Ad) * dlt[s0:s1]
        elif B.dim() == 3:                                                        # per-channel B (Zamba)
            w = torch.exp(x[..., None] * Ad) * B[s0:s1].double() * C_t.double()   # (s, c, n)
            alpha = w.sum(-1) * dlt[s0:s1]
        else:
            w = torch.exp(x[..., None] * Ad)                                      # (s, c, n)
            alpha = torch.einsum("scn,sn->sc", w, B[s0:s1].double() * C_t.double()) * dlt[s0:s1]
        dist = (t - torch.arange(s0, s1, dtype=torch.float64, device=dlt.device))[:, None]
        num += (dist * alpha.abs()).sum(0)
        den += alpha.abs().sum(0)
    return num / den


@dataclass
class LayerAccumulator:
    """What one SSM layer's recorded chunks leave behind for one sample (batch 1).

    Args:
        kind: "mamba1" | "mamba2".  channels: the MMD channels (Mamba-1 kinds) or None (every head).
        bucket_edges: position buckets of the decay statistics (token positions, increasing).
        targets: positions t whose hidden-attention row gives an MMD (the last position of each length).
    """

    kind: str
    channels: torch.Tensor | None
    bucket_edges: list[int]
    targets: list[int]
    train_len: int
    groups: int
    head_of_channel: torch.Tensor | None = None  # Zamba: the B/C head of each channel
    seen: int = 0
    A: torch.Tensor | None = None
    sum_delta: torch.Tensor | None = None  # Σ Δ over the first train_len tokens, (d,) | (h,)
    decay_sums: torch.Tensor | None = None  # (buckets, 3): count, Σ mean Δ, Σ mean α
    state_rows: list = field(default_factory=list)  # (position, rms, max_abs, rms per part)
    deltas: list = field(default_factory=list)  # MMD inputs, chunk by chunk
    Bs: list = field(default_factory=list)
    Cs: dict = field(default_factory=dict)  # target -> C_t

    def add(self, rec, state_positions: list[int]) -> None:
        """Take one chunk's LayerRecord (params recorded; states at `state_positions`, absolute)."""
        delta, B, C = rec.delta[0], rec.B[0], rec.C[0]                            # (l, d|h), (l, ...) x 2
        length, start = delta.shape[0], self.seen
        self.A = rec.A
        if self.kind == "mamba1" and B.dim() == 3 and self.head_of_channel is None:   # Zamba: B per head
            self.head_of_channel = torch.arange(delta.shape[1]) // (delta.shape[1] // B.shape[1])
        self._add_decay(delta, start)
        self._add_sum(delta, start)
        if state_positions:
            rms, mx, parts = state_health(rec.states[0], self.kind, self.groups)
            self.state_rows += [(p, float(r), float(m), pr.tolist()) for p, r, m, pr in zip(state_positions, rms, mx,
                                                                                             parts)]
        if self.targets:
            cols = delta if self.channels is None else delta[:, self.channels]
            self.deltas.append(cols.float())
            self.Bs.append(self._pick_B(B).float())
            for t in self.targets:
                if start <= t < start + length:
                    self.Cs[t] = self._pick_B(C[t - start:t - start + 1])[0].float()
        self.seen += length

    def _pick_B(self, B: torch.Tensor) -> torch.Tensor:
        if self.head_of_channel is not None and B.dim() == 3 and self.kind == "mamba1":   # Zamba: (l, heads, n)
            return B[:, self.head_of_channel[self.channels]]                      # (l, c, n)
        return B

    def _add_decay(self, delta, start) -> None:
        edges = torch.tensor(self.bucket_edges)
        pos = torch.arange(start, start + delta.shape[0])
        which = torch.bucketize(pos, edges, right=True) - 1                       # bucket of each position
        ok = (which >= 0) & (which < len(self.bucket_edges) - 1)
        mean_delta, mean_alpha = per_token_decay(delta, self.A)
        if self.decay_sums is None:
            self.decay_sums = torch.zeros(len(self.bucket_edges) - 1, 3, dtype=torch.float64)
        rows = torch.stack([torch.ones_like(mean_delta), mean_delta, mean_alpha], 1).cpu()[ok]
        self.decay_sums.index_add_(0, which[ok], rows)

    def _add_sum(self, delta, start) -> None:
        take = max(0, min(delta.shape[0], self.train_len - start))
        part = delta[:take].double().sum(0).cpu()
        self.sum_delta = part if self.sum_delta is None else self.sum_delta + part

    def finish(self, threshold: float) -> dict:
        """The sample's summaries: decay per bucket, global share, states per position, MMD per target."""
        count = self.decay_sums[:, 0].clamp(min=1)
        out = {"decay_delta": (self.decay_sums[:, 1] / count).tolist(),
               "decay_alpha": (self.decay_sums[:, 2] / count).tolist(),
               "global_share": global_share(self.sum_delta, self.A.cpu(), threshold),
               "global_window": min(self.seen, self.train_len),
               "states": self.state_rows, "mmd": {}}
        if self.targets:
            delta, B = torch.cat(self.deltas), torch.cat(self.Bs)
            A = self.A if self.channels is None or self.A.dim() == 1 else self.A[self.channels]
            heads_of = None
            if self.kind == "mamba2":
                heads_of = torch.arange(A.shape[0]) // (A.shape[0] // B.shape[1])
            for t in self.targets:
                per = last_row_mmd(delta[:t + 1], A, B[:t + 1], self.Cs[t], heads_of)
                out["mmd"][t] = per.tolist()
            self.deltas, self.Bs = [], []
        return out
