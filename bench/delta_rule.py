"""Benchmark: one gated-delta-rule layer on CPU, ssmdiag vs transformers' torch path, and the closed-form rows vs
Mamba-2's of the same width.  Prints ratios measured in one run (best of --reps), never absolute claims.

    python bench/delta_rule.py                 # T = 512, a Qwen3.5-shaped layer (hidden 1024, 16 heads of 128)
    python bench/delta_rule.py --seq-len 256 --reps 2

Rows:
    layer fwd+bwd   transformers' Qwen3_5GatedDeltaNet forward (its chunked torch fallback) vs ssmdiag's
                    gated_delta_mixer (chunked), both with the gradient w.r.t. the layer input
    kernel          ssmdiag's chunked gated_delta_rule vs its _ref loop (forward only)
    rows            delta_attention_rows (8 targets, per head) vs hidden_attention_row of a Mamba-2 layer with the
                    same width (d_inner = heads × 128, heads of 64, d_state 128), 8 targets
"""

from __future__ import annotations

import argparse
import time

import torch


def _best(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _layer(hidden: int, heads: int, dim: int):
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    cfg = Qwen3_5TextConfig(hidden_size=hidden, linear_num_key_heads=heads, linear_num_value_heads=heads,
                            linear_key_head_dim=dim, linear_value_head_dim=dim, num_hidden_layers=1,
                            layer_types=["linear_attention"])
    torch.manual_seed(0)
    layer = Qwen3_5GatedDeltaNet(cfg, 0)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    args = parser.parse_args()
    from ssmdiag.kernels.delta_mixer import Recorder, gated_delta_mixer
    from ssmdiag.kernels.delta_rule import gated_delta_rule, gated_delta_rule_ref
    from ssmdiag.metrics.delta_influence import delta_attention_rows
    from ssmdiag.metrics.hidden_attention import hidden_attention_row

    L, dim = args.seq_len, 128
    layer = _layer(args.hidden, args.heads, dim)
    x = torch.randn(1, L, args.hidden, requires_grad=True)

    def fwd_bwd(f):
        return lambda: torch.autograd.grad(f(x).sum(), x)

    t_hf = _best(fwd_bwd(layer), args.reps)
    t_us = _best(fwd_bwd(lambda h: gated_delta_mixer(layer, h)[0]), args.reps)
    print(f"layer fwd+bwd, T={L}: ssmdiag / transformers = {t_us / t_hf:.2f}")

    rec = Recorder(params=True)
    with torch.no_grad():
        gated_delta_mixer(layer, x, rec=rec)
    r = rec.layers[0]
    with torch.no_grad():
        t_chunk = _best(lambda: gated_delta_rule(r.q, r.k, r.v, r.g, r.beta), args.reps)
        t_ref = _best(lambda: gated_delta_rule_ref(r.q, r.k, r.v, r.g, r.beta), args.reps)
    print(f"kernel forward, T={L}: chunked / ref loop = {t_chunk / t_ref:.2f}")

    targets = [L - 1 - 64 * i for i in range(8) if L - 1 - 64 * i >= 0]
    t_rows = _best(lambda: delta_attention_rows(r.q, r.k, r.g, r.beta, targets, r.scale), args.reps)
    heads2, p2, n2 = args.heads * dim // 64, 64, 128
    g = torch.Generator().manual_seed(0)
    delta = torch.rand(1, L, heads2, generator=g) * 0.1
    A = -torch.rand(heads2, generator=g)
    B, C = torch.randn(1, L, 1, n2, generator=g), torch.randn(1, L, 1, n2, generator=g)
    t_m2 = _best(lambda: [hidden_attention_row(delta, A, B, C, t) for t in targets], args.reps)
    print(f"closed-form rows, {len(targets)} targets, T={L}: delta rule / Mamba-2 (d_inner {heads2 * p2}, "
          f"{heads2} heads of {p2}) = {t_rows / t_m2:.2f}")


if __name__ == "__main__":
    main()
