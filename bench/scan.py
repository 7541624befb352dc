"""Benchmark: ssmdiag's scan vs transformers' own CPU path and mambapy, with the non-scan floor.

    python bench/scan.py            # everything; (a) fwd+bwd measured on 2 layers and scaled to 24
    python bench/scan.py --quick    # also (a) fwd T=2048 and train step at reduced size, scaled
    python bench/scan.py --a-layers 24   # measure (a) on the whole model (~7 min per sample here)

Implementations (rows):
    a  transformers' own torch path (sequential loop; use_mambapy=False)
    b  transformers with mambapy's parallel scan (use_mambapy=True)
    c  ssmdiag: kernels.mixer.install(model, "torch") (ssmdiag's mixer path, numba scan)
    floor  ssmdiag's mixer path with the scan replaced by a pointwise stand-in: everything but the scan
           (in/x/dt/out projections, conv, norms), i.e. what no scan implementation can go below.

Cases (columns): fwd+bwd at T=512 on a random mamba-130m-shaped backbone (gradient of the last
position's final hidden state, projected on a fixed vector, w.r.t. the input embeddings); forward at
T=2048 (no grad); one AdamW training step of a 2-layer d_model-64 Mamba (vocab 256) on 64 x 256 tokens;
peak RSS of the fwd+bwd process.  Every (implementation, case) runs in its own subprocess; the time is
one warm-up then one timed run; `--reps` repetitions of all implementations are interleaved (they share
whatever else loads the machine) and the best is kept; (a) is timed once, without warm-up.  Wall and CPU
time are both reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

IMPLS = ("a", "b", "c", "floor")
CASES = ("fwdbwd512", "fwd2048", "train")


def build_backbone(layers: int, use_mambapy: bool):
    """Random mamba-130m-shaped MambaModel (hidden 768, d_state 16, vocab 50280) with `layers` layers."""
    import torch
    from transformers import MambaConfig, MambaModel

    torch.manual_seed(0)
    cfg = MambaConfig(hidden_size=768, num_hidden_layers=layers, state_size=16, vocab_size=50280, expand=2,
                      conv_kernel=4, time_step_rank=48, use_mambapy=use_mambapy)
    return MambaModel(cfg).eval()


def build_small_lm(batch_impl: str):
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    cfg = MambaConfig(hidden_size=64, num_hidden_layers=2, state_size=16, vocab_size=256, expand=2, conv_kernel=4,
                      use_mambapy=batch_impl == "b")
    return MambaForCausalLM(cfg).train()


def apply_impl(model, impl: str) -> None:
    """Route the model's scans to the implementation under test."""
    if impl in ("c", "floor"):
        from ssmdiag.kernels import mixer
        mixer.install(model, "torch")
    if impl == "floor":
        import torch.nn.functional as F
        from ssmdiag.kernels import mixer

        def stand_in(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                     return_states=None, backend="auto"):
            # pointwise, same shapes, keeps Δ, B, C in the graph so their projections run backward too
            y = (u + delta) * F.silu(z) + (B + C).sum(1, keepdim=True)
            return y if return_states is None else (y, None)

        mixer.selective_scan = stand_in


def time_best(fn, reps: int, warmup: bool = True) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds of this process) over `reps` runs."""
    if warmup:  # first call: numba kernels load from cache, allocator warms up
        fn()
    wall = cpu = float("inf")
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu


def run_case(impl: str, case: str, reps: int, a_layers: int, a_scale_batch: int) -> dict:
    """One measurement in this process; returns {"seconds", "scale", "note", "maxrss_mb"}."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    scale, note = 1.0, ""
    if case in ("fwdbwd512", "fwd2048"):
        layers = a_layers if impl == "a" else 24
        if layers != 24:
            scale, note = 24 / layers, f"measured on {layers} layers, x{24 / layers:g}"
        model = build_backbone(layers, use_mambapy=impl == "b")
        apply_impl(model, impl)
        length = 512 if case == "fwdbwd512" else 2048
        emb = torch.randn(1, length, 768) * 0.02
        probe = torch.randn(768)

        if case == "fwdbwd512":
            def step():
                x = emb.clone().requires_grad_(True)
                h = model(inputs_embeds=x, use_cache=False).last_hidden_state[0, -1]
                (grad,) = torch.autograd.grad(h @ probe, x)
                return grad
        else:
            def step():
                with torch.no_grad():
                    return model(inputs_embeds=emb, use_cache=False).last_hidden_state
        seconds, cpu = time_best(step, 1 if impl == "a" else reps, warmup=impl != "a")
    else:
        model = build_small_lm(impl)
        apply_impl(model, impl)
        batch = 64
        if impl == "a" and a_scale_batch > 1:
            batch, scale, note = 64 // a_scale_batch, a_scale_batch, f"measured at batch {64 // a_scale_batch}, x{a_scale_batch}"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, 256, (batch, 256), generator=torch.Generator().manual_seed(0))

        def step():
            opt.zero_grad(set_to_none=True)
            model(ids, labels=ids, use_cache=False).loss.backward()
            opt.step()
        seconds, cpu = time_best(step, 1 if impl == "a" else reps, warmup=impl != "a")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds * scale, "cpu_seconds": cpu * scale, "measured_seconds": seconds, "scale": scale,
            "note": note, "maxrss_mb": rss}


def spawn(impl: str, case: str, args) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--impl", impl, "--reps", "1",
           "--a-layers", str(args.a_layers), "--a-scale-batch", str(args.a_scale_batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def merge(best: dict | None, new: dict) -> dict:
    """Keep the minimum wall and CPU time and the maximum RSS over repetitions."""
    if best is None or "error" in best:
        return new
    if "error" in new:
        return best
    return dict(best, seconds=min(best["seconds"], new["seconds"]), cpu_seconds=min(best["cpu_seconds"],
                new["cpu_seconds"]), maxrss_mb=max(best["maxrss_mb"], new["maxrss_mb"]))


def format_table(results: dict, key: str = "seconds") -> str:
    """Markdown table of `key` (wall or CPU seconds) and the ratio to ours per case, peak RSS of fwd+bwd."""
    unit = "s" if key == "seconds" else "CPU s"
    lines = [f"| implementation | fwd+bwd T=512 ({unit}) | vs ours | fwd T=2048 ({unit}) | vs ours "
             f"| train step ({unit}) | vs ours | peak RSS fwd+bwd (MB) |", "|---|---|---|---|---|---|---|---|"]
    names = {"a": "(a) transformers, sequential", "b": "(b) transformers + mambapy pscan",
             "c": "(c) ssmdiag torch backend", "floor": "floor: everything but the scan"}
    for impl in IMPLS:
        row = [names[impl]]
        for case in CASES:
            r, ours = results.get((impl, case)), results.get(("c", case))
            if r is None or "error" in r:
                row += ["n/a" if r is None else f"error: {r['error'][:40]}", ""]
                continue
            mark = "*" if r["scale"] != 1 else ""
            ratio = r[key] / ours[key] if ours and key in ours else float("nan")
            row += [f"{r[key]:.2f}{mark}", f"{ratio:.2f}x"]
        r = results.get((impl, "fwdbwd512"))
        row.append(f"{r['maxrss_mb']:.0f}{'*' if r['scale'] != 1 else ''}" if r and "maxrss_mb" in r else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_notes(results: dict) -> str:
    notes = sorted({f"{impl}/{case}: {r['note']}" for (impl, case), r in results.items() if r.get("note")})
    return "\n".join(f"* {n}" for n in notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=CASES)
    ap.add_argument("--impl", choices=IMPLS)
    ap.add_argument("--only", default=",".join(IMPLS), help="comma-separated implementations to run")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated cases to run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--a-layers", type=int, default=2, help="layers (a) is measured on (scaled to 24)")
    ap.add_argument("--a-scale-batch", type=int, default=8, help="(a) train step measured at batch 64/N, xN")
    ap.add_argument("--quick", action="store_true", help="reps=1 and (a) on 1 layer / batch 4")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.a_layers, args.a_scale_batch = 1, 1, 16
    if args.case:
        print(json.dumps(run_case(args.impl, args.case, args.reps, args.a_layers, args.a_scale_batch)))
        return
    results = {}
    for case in args.cases.split(","):
        for rep in range(args.reps):  # repetitions interleave the implementations: they share the load
            for impl in args.only.split(","):
                if impl == "a" and rep:  # one sample of the slow path is enough
                    continue
                t0 = time.time()
                new = spawn(impl, case, args)
                results[(impl, case)] = merge(results.get((impl, case)), new)
                print(f"{impl:>5} {case:<10} {json.dumps(new)} ({time.time() - t0:.0f}s)", file=sys.stderr)
    if args.json:
        print(json.dumps({f"{i}/{c}": r for (i, c), r in results.items()}, indent=2))
    else:
        print("Wall time (best of the repetitions):\n\n" + format_table(results) + "\n\nCPU time of the process "
              "(both threads; less sensitive to other load on the machine):\n\n" + format_table(results, "cpu_seconds")
              + "\n\n" + format_notes(results))

if __name__ == "__main__":
    main()
