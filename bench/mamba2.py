"""Benchmark: Mamba-2 (SSD) on CPU: ssmdiag's engines vs transformers' own Mamba-2 path, with the non-scan floor.

    python bench/mamba2.py                   # every row and case, 3 interleaved repetitions
    python bench/mamba2.py --only numba,floor --cases fwdbwd512 --reps 2

Implementations (rows):
    hf       transformers' own Mamba2Mixer torch path (its chunked SSD in plain torch)
    chunked  ssmdiag's mixer path, SSD on the chunked torch engine (SSMDIAG_SCAN_ENGINE=chunked)
    numba    ssmdiag's mixer path, SSD on the fused numba CPU kernel (the CPU default)
    floor    ssmdiag's mixer path with ssd_scan replaced by a pointwise stand-in: everything but the scan
             (in/out projections, conv, gated norm), i.e. what no SSD implementation can go below.

Cases (columns): fwd+bwd at T=512 on a random mamba2-130m-shaped backbone (hidden 768, 24 layers, 24 heads
of 64, d_state 128, one group; gradient of the last position's final hidden state, projected on a fixed
vector, w.r.t. the input embeddings; the core of `influence`); forward at T=2048 (no grad); peak RSS of the
fwd+bwd process.  Each (implementation, case) runs in its own subprocess (one warm-up, one timed run);
repetitions interleave the implementations and the best is kept (bench/scan.py's protocol).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from scan import merge, time_best

IMPLS = ("hf", "chunked", "numba", "floor")
CASES = ("fwdbwd512", "fwd2048")
NAMES = {"hf": "transformers Mamba-2 (torch path)", "chunked": "ssmdiag, chunked SSD engine",
         "numba": "ssmdiag, numba SSD kernel (default)", "floor": "floor: everything but the scan"}


def build_backbone(layers: int = 24):
    """Random mamba2-130m-shaped Mamba2Model."""
    import torch
    from transformers import Mamba2Config, Mamba2Model

    torch.manual_seed(0)
    cfg = Mamba2Config(hidden_size=768, num_hidden_layers=layers, state_size=128, vocab_size=50288, expand=2,
                       head_dim=64, num_heads=24, n_groups=1, conv_kernel=4, chunk_size=256)
    return Mamba2Model(cfg).eval()


def apply_impl(model, impl: str) -> None:
    """Route the model's SSD scans to the implementation under test."""
    if impl == "hf":
        return
    from ssmdiag.kernels import backend, mixer

    backend.FORCE_ENGINE = "chunked" if impl == "chunked" else None
    mixer.install(model, "torch")
    if impl == "floor":
        import torch.nn.functional as F

        def stand_in(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None,
                     initial_state=None, return_states=None, chunk_size=256, backend="auto"):
            # pointwise, same shapes; keeps Δ, B, C in the graph so their producers run backward too
            y = x * dt[..., None] + (B + C).sum(-1).mean(-1)[..., None, None]
            y = y if D is None else y + D[:, None] * x
            y = y if z is None else y * F.silu(z)
            return y if return_states is None else (y, None)

        mixer.ssd_scan = stand_in


def run_case(impl: str, case: str, reps: int) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = build_backbone()
    apply_impl(model, impl)
    length = 512 if case == "fwdbwd512" else 2048
    emb = torch.randn(1, length, 768, generator=torch.Generator().manual_seed(0)) * 0.02
    probe = torch.randn(768, generator=torch.Generator().manual_seed(1))

    if case == "fwdbwd512":
        def step():
            x = emb.clone().requires_grad_(True)
            h = model(inputs_embeds=x, use_cache=False).last_hidden_state[0, -1]
            return torch.autograd.grad(h @ probe, x)[0]
    else:
        def step():
            with torch.no_grad():
                return model(inputs_embeds=emb, use_cache=False).last_hidden_state
    seconds, cpu = time_best(step, reps)
    return {"seconds": seconds, "cpu_seconds": cpu, "scale": 1.0, "note": "",
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def spawn(impl: str, case: str) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--impl", impl, "--reps", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def format_table(results: dict, impls: list[str], cases: list[str], key: str = "seconds") -> str:
    unit = "s" if key == "seconds" else "CPU s"
    head = "| implementation | " + " | ".join(f"{c} ({unit}) | vs numba | vs floor" for c in cases) + " | peak RSS fwd+bwd (MB) |"
    lines = [head, "|---" * (2 + 3 * len(cases)) + "|"]
    for impl in impls:
        row = [NAMES[impl]]
        for case in cases:
            r, ours, floor = (results.get((i, case)) for i in (impl, "numba", "floor"))
            if r is None or "error" in r:
                row += ["n/a" if r is None else f"error: {r['error'][:40]}", "", ""]
                continue
            ratio = lambda o: f"{r[key] / o[key]:.2f}x" if o and key in o else "n/a"  # noqa: E731
            row += [f"{r[key]:.2f}", ratio(ours), ratio(floor)]
        r = results.get((impl, "fwdbwd512"))
        row.append(f"{r['maxrss_mb']:.0f}" if r and "maxrss_mb" in r else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=CASES)
    ap.add_argument("--impl", choices=IMPLS)
    ap.add_argument("--only", default=",".join(IMPLS))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.impl, args.case, args.reps)))
        return
    impls, cases = args.only.split(","), args.cases.split(",")
    results: dict = {}
    for case in cases:
        for rep in range(args.reps):
            for impl in impls:
                t0, load = time.time(), os.getloadavg()[0]
                new = spawn(impl, case)
                results[(impl, case)] = merge(results.get((impl, case)), new)
                print(f"{impl:>8} {case:<10} load {load:.2f} {json.dumps(new)} ({time.time() - t0:.0f}s)",
                      file=sys.stderr, flush=True)
    print(f"Wall time (best of {args.reps} interleaved repetitions; load average now {os.getloadavg()[0]:.2f}):\n\n"
          + format_table(results, impls, cases) + "\n\nCPU time of the process:\n\n"
          + format_table(results, impls, cases, "cpu_seconds"))


if __name__ == "__main__":
    main()
