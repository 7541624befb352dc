"""Benchmark: one 512-token `influence --per-layer` sample of each recurrent family against a Mamba-2 of the same width.

Each family is built at the same hidden size (--width, default 256) with its tiny test pattern (tests/tinyfamilies.py:
one recurrent layer and, for hybrids, one attention layer; 2-4 blocks), random weights, fp32, saved with
save_pretrained and loaded back through ssmdiag's loader.  A Mamba-2 with the same hidden size and block count is the
reference.  Timed in one run, in this process, best of --reps after one warm-up call:
    end-to-end   the model-agnostic gradient influence of one sample (metrics.influence.compute_influence)
    per-layer    the closed-form rows of every recurrent layer (hidden_attention.per_layer_rows), 8 targets
Printed as ratios to the Mamba-2 of the same width; absolute seconds only for the Mamba-2 row (this machine, this run).
Also per family: ssmdiag's path vs transformers' own forward (max |Δ logit| / max |logit| on the timed sequence, fp32)
and the needle carry check (segments of 16 and a rollback vs one shot on 48 tokens; the mode says how state is carried).

    python bench/families.py                       # T = 512, width 256
    python bench/families.py --seq-len 128 --families qwen3_5_text,rwkv --reps 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

# per family: the width keys that follow --width (besides hidden_size), and the head sizes that keep it consistent
WIDTHS = {
    "qwen3_5_text": lambda w: dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=w // 4,
                                   linear_value_head_dim=w // 4, head_dim=w // 4, intermediate_size=2 * w),
    "qwen3_next": lambda w: dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=w // 4,
                                 linear_value_head_dim=w // 4, head_dim=w // 4, intermediate_size=2 * w,
                                 moe_intermediate_size=w, shared_expert_intermediate_size=w),
    "olmo_hybrid": lambda w: dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=w // 4,
                                  linear_value_head_dim=w // 4, intermediate_size=2 * w),
    "kimi_linear": lambda w: dict(linear_num_heads=4, linear_head_dim=w // 4, intermediate_size=2 * w,
                                  moe_intermediate_size=w),
    "recurrent_gemma": lambda w: dict(lru_width=w, head_dim=w // 4, intermediate_size=2 * w),
    "rwkv": lambda w: dict(attention_hidden_size=w, intermediate_size=2 * w),
    "xlstm": lambda w: dict(embedding_dim=w, num_heads=4),
    "lfm2": lambda w: dict(intermediate_size=2 * w, head_dim=w // 4),
}
DEFAULT = ("qwen3_5_text", "qwen3_next", "olmo_hybrid", "kimi_linear", "recurrent_gemma", "rwkv", "xlstm", "lfm2")


def _build(family: str, width: int, blocks: int | None):
    from transformers import AutoModelForCausalLM

    from tinyfamilies import make_tiny_config
    from tinymodels import make_config

    if family == "mamba2":
        cfg = make_config("mamba2", hidden_size=width, num_heads=2 * width // 64, head_dim=64, state_size=64,
                          n_groups=1, expand=2, num_hidden_layers=blocks or 2, chunk_size=64)
    else:
        cfg = make_tiny_config(family)
        for key, value in {"hidden_size": width, **WIDTHS.get(family, lambda w: {})(width)}.items():
            setattr(cfg, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).float().eval()


def _time(fn, reps: int) -> float:
    fn()  # warm-up (first-call allocations, kernel selection)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _measure(family: str, width: int, seq_len: int, reps: int, blocks: int | None, tmp: Path):
    from ssmdiag.loading import load_model, quiet_transformers

    quiet_transformers()
    from ssmdiag.metrics.influence import compute_influence, per_layer_rows

    model = _build(family, width, blocks)
    path = tmp / family
    model.save_pretrained(path)
    loaded = load_model(str(path), backend="auto")
    n_blocks = len(loaded.adapter.blocks())
    ids = torch.randint(3, loaded.adapter.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    targets = sorted({seq_len - 1 - k for k in (0, 8, 32, 64, 128, 256, 384, 511) if k < seq_len})
    e2e = _time(lambda: compute_influence(loaded.adapter, ids, targets, "grad", 4, "hidden", 0, label=family,
                                          grad_dtype="float32"), reps)
    layers = loaded.adapter.ssm_layers() if loaded.adapter.is_ssm else []
    rows = _time(lambda: per_layer_rows(loaded.model, loaded.adapter, ids, targets), reps) if layers else None
    return n_blocks, "".join(loaded.adapter.layer_pattern()), len(layers), e2e, rows, _parity(loaded, ids)


def _parity(loaded, ids: torch.Tensor) -> tuple[float, str]:
    """(max relative logit error of ssmdiag's path vs transformers' own forward on ids, the carry check's verdict)."""
    from ssmdiag.kernels import mixer as mx
    from ssmdiag.metrics.prefill import check_state_carry

    with torch.no_grad():
        ours = loaded.model(input_ids=ids, use_cache=False).logits
        backend = mx.installed_backend(loaded.model)
        mx.uninstall(loaded.model)
        theirs = loaded.model(input_ids=ids, use_cache=False).logits
        mx.install(loaded.model, backend or "auto")
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    carry = check_state_carry(loaded.model, loaded.family, loaded.adapter.vocab_size, torch.float32, n=48, seg=16)
    return err, f"{carry.rel_error:.1e} {'ok' if carry.ok else 'FAILED'} ({carry.mode})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--families", default=",".join(DEFAULT))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import CONFIG_MAPPING

    families = [f for f in args.families.split(",") if f in CONFIG_MAPPING or f.removesuffix("_text") in CONFIG_MAPPING]
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for family in families:
            try:
                results[family] = _measure(family, args.width, args.seq_len, args.reps, None, Path(tmp))
            except Exception as exc:  # a family this transformers cannot build at this width: said, not hidden
                print(f"{family}: not measured ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})",
                      file=sys.stderr)
        ref = {}
        print(f"One {args.seq_len}-token influence sample at width {args.width}, fp32, CPU "
              f"({torch.get_num_threads()} threads), best of {args.reps}; ratio = family / Mamba-2 of the same "
              "width and block count (one run).\n")
        print("| family | blocks | pattern | recurrent layers | logits vs transformers | carry check | end-to-end vs "
              "Mamba-2 | per-layer rows vs Mamba-2 |")
        print("|---|---|---|---|---|---|---|---|")
        for family, (n_blocks, pattern, n_rec, e2e, rows, (err, carry)) in results.items():
            if n_blocks not in ref:
                ref[n_blocks] = _measure("mamba2", args.width, args.seq_len, args.reps, n_blocks, Path(tmp))
            m2 = ref[n_blocks]
            per = f"{rows / m2[4]:.2f}x" if rows is not None else "no recurrent layer read"
            print(f"| {family} | {n_blocks} | `{pattern}` | {n_rec} | {err:.1e} | {carry} | {e2e / m2[3]:.2f}x | {per} |")
        for n_blocks, m2 in sorted(ref.items()):
            print(f"\nMamba-2 reference, {n_blocks} blocks: end-to-end {m2[3]:.2f} s, per-layer rows {m2[4]:.2f} s "
                  "(this machine, this run).")


if __name__ == "__main__":
    main()
