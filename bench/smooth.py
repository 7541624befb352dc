"""Benchmark: `smooth`'s measuring against its floor (forward + the state Gram GEMMs), in one process.

    python bench/smooth.py                       # mamba-130m, random init, 1024 tokens, 1 sample, 3 reps
    python bench/smooth.py --model mamba2-130m --reps 2
    python bench/smooth.py --profile             # plus a cProfile of one measurement (top 25 by own time)

Rows, interleaved per repetition (they share whatever else loads the machine; the best is kept):
    smooth   metrics.smoothing.measure_smoothing (what `ssmdiag smooth` times as measure:MODEL): a recorded
             forward keeping every state, sharpness at five places per block, the Ā spectrum
    forward  the same forward without recording (no grad)
    gram     one float32 GEMM X Xᵀ per SSM layer, X = (l, d_inner·d_state) (Mamba-2: per head, the same flops)
    floor    forward + gram: no exact all-pairs state sharpness can go below it
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mamba-130m")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from ssmdiag.loading import load_model
    from ssmdiag.metrics.smoothing import measure_smoothing

    m = load_model(args.model, init="random", backend="auto")
    model, adapter = m.model, m.adapter
    ids = torch.randint(0, adapter.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    width = adapter.d_inner * adapter.d_state
    gram_x = torch.randn(args.seq_len, width, generator=torch.Generator().manual_seed(0))

    def smooth():
        measure_smoothing(model, adapter, ids)

    def forward():
        with torch.no_grad():
            adapter.base()(input_ids=ids, use_cache=False)

    def gram():
        for _ in range(adapter.num_layers):
            torch.mm(gram_x, gram_x.T)

    rows = {"smooth": smooth, "forward": forward, "gram": gram}
    smooth()  # warm-up: numba kernels load, allocator warms
    best = dict.fromkeys(rows, float("inf"))
    per_rep = []  # smooth / floor within one repetition (the three rows ran back to back)
    for rep in range(args.reps):
        load = os.getloadavg()[0]
        took = {}
        for name, fn in rows.items():
            t0 = time.perf_counter()
            fn()
            took[name] = time.perf_counter() - t0
            best[name] = min(best[name], took[name])
        per_rep.append(took["smooth"] / (took["forward"] + took["gram"]))
        print(f"rep {rep} load {load:.2f} " + " ".join(f"{k} {v:.2f}s" for k, v in took.items())
              + f"  smooth/floor {per_rep[-1]:.2f}x", file=sys.stderr, flush=True)
    floor = best["forward"] + best["gram"]
    print(f"{args.model}, random init, {args.seq_len} tokens, 1 sample, {torch.get_num_threads()} threads; best of "
          f"{args.reps} interleaved repetitions; load average now {os.getloadavg()[0]:.2f}\n")
    print("| row | seconds | vs floor |\n|---|---|---|")
    for name, sec in [*best.items(), ("floor (forward + gram)", floor)]:
        print(f"| {name} | {sec:.2f} | {sec / floor:.2f}x |")
    print(f"\nsmooth / floor per repetition: {', '.join(f'{r:.2f}x' for r in per_rep)}; median "
          f"{sorted(per_rep)[len(per_rep) // 2]:.2f}x")
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(smooth)
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
