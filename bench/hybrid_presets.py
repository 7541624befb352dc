"""Each hybrid family's random-init preset at full depth and narrow width: the SSM view's figures on CPU.

The preset keeps its released layer pattern, depth, state size and transformers' own initialisation (A, Δ bias);
only the widths shrink (hidden 128, few heads) so that a 2-core CPU runs all seven in a few minutes.  Printed per
family: the layer pattern, ssmdiag's mixer path vs transformers' forward (relative logit error), the needle carry
check (segmented + rollback vs one-shot), polarize add (max |Δ logit|), and the closed-form influence decay rate of
the first / median / last SSM layer.  Usage: python bench/hybrid_presets.py [--seq-len 256] [--families a,b]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ssmdiag.adapters import get_adapter
from ssmdiag.kernels import mixer as mx
from ssmdiag.metrics.influence import per_layer_rows, summarize_layers
from ssmdiag.metrics.prefill import check_state_carry
from ssmdiag.polarize.surgery import polarize_model
from ssmdiag.presets import all_presets

VOCAB = 512
WIDTH = dict(vocab_size=VOCAB, hidden_size=128, pad_token_id=1, bos_token_id=0, eos_token_id=0)
_M2 = dict(mamba_n_heads=8, mamba_d_head=32, mamba_n_groups=1, mamba_chunk_size=64)
NARROW = {  # widths only: depth, pattern, d_state and the init rules stay the preset's
    "bamba": dict(intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, **_M2),
    "falcon_h1": dict(intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      mamba_d_ssm=256, **_M2),
    "granitemoehybrid": dict(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                             num_experts_per_tok=2, shared_intermediate_size=128, **_M2),
    "nemotron_h": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=256,
                       mamba_num_heads=8, mamba_head_dim=32, n_groups=1, chunk_size=64, moe_intermediate_size=64,
                       moe_shared_expert_intermediate_size=64, n_routed_experts=4),
    "zamba2": dict(num_attention_heads=4, num_key_value_heads=4, intermediate_size=256, n_mamba_heads=8,
                   mamba_headdim=32, mamba_ngroups=1, chunk_size=64),
    "jamba": dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=256, num_experts=4,
                  mamba_dt_rank=8),
    "zamba": dict(num_attention_heads=4, num_key_value_heads=4, attention_head_dim=64, attention_hidden_size=256,
                  intermediate_size=256, n_mamba_heads=2, mamba_dt_rank=8),
}


def build(family: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    preset = next(p for p in all_presets().values() if p.model_type == family)
    cfg = AutoConfig.for_model(preset.model_type, **{**preset.config, **WIDTH, **NARROW[family]})
    torch.manual_seed(seed)
    return preset.name, AutoModelForCausalLM.from_config(cfg).eval()


def measure(family: str, seq_len: int) -> dict:
    t0 = time.perf_counter()
    name, model = build(family)
    adapter = get_adapter(model)
    ids = torch.randint(3, VOCAB, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        mx.install(model, "auto")
        got = model(ids, use_cache=False).logits
    parity = float((got - ref).abs().max() / ref.abs().max())
    carry = check_state_carry(model, family, VOCAB, torch.float32, n=48, seg=16)
    _, rep = polarize_model(model, "both", "add", check_tokens=64)
    layers, rows = per_layer_rows(model, adapter, ids[:, :seq_len], [seq_len - 1])
    fits = summarize_layers(rows, [seq_len - 1], (1, seq_len // 2), layers=layers)
    rates = [f.decay_rate for f in fits]
    return dict(preset=name, pattern="".join(adapter.layer_pattern()), ssm_layers=len(layers), parity=parity,
                carry=carry.rel_error, carry_ok=carry.ok, dlogit=rep.max_abs_dlogit, rate_first=rates[0],
                rate_median=float(np.median(rates)), rate_last=rates[-1], seconds=time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--families", default=",".join(NARROW))
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| preset (narrow) | pattern | SSM layers | logits vs HF | carry check | polarize max abs Δ logit | "
          "decay/token first · median · last SSM layer | s |")
    print("|---|---|---|---|---|---|---|---|")
    for family in args.families.split(","):
        r = measure(family, args.seq_len)
        pattern = r["pattern"] if len(r["pattern"]) <= 24 else r["pattern"][:24] + "…"
        print(f"| {r['preset']} | `{pattern}` ({len(r['pattern'])}) | {r['ssm_layers']} | {r['parity']:.1e} | "
              f"{r['carry']:.1e} {'ok' if r['carry_ok'] else 'FAIL'} | {r['dlogit']:.1e} | "
              f"{r['rate_first']:.3g} · {r['rate_median']:.3g} · {r['rate_last']:.3g} | {r['seconds']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
