"""Benchmark: `ssmdiag influence` per 512-token sample, Mamba-2 against Mamba-1, and each one's peak RSS.

    python bench/influence.py                 # 2 interleaved repetitions, both SSD engines
    python bench/influence.py --reps 1 --ssd-engines numba

Every (SSD engine, model) runs `ssmdiag influence MODEL --init random --seq-len 512 --samples 2` in its own
process (so ru_maxrss is that model's peak RSS, read with os.wait4); the seconds are result.json's
`timings_s["influence MODEL"]` / samples (model loading excluded).  Repetitions interleave every
configuration, so they share whatever else loads the machine; the best time and the largest RSS are kept, and
the load average before each run is printed.  `--ssd-engines chunked` reproduces the state before the fused
kernel: only Mamba-2's SSD engine is switched (Mamba-1 keeps its numba kernel), by patching
`ssmdiag.kernels.ssd.torch_engine` in the child (SSMDIAG_SCAN_ENGINE would switch both).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

MODELS = ("mamba-130m", "mamba2-130m")


def child(engine: str, argv: list[str]) -> None:
    """Run the CLI in this process with Mamba-2's SSD engine forced to `engine`."""
    from ssmdiag.kernels import ssd

    ssd.torch_engine = lambda device: engine  # CPU only: this bench runs on CPU
    from ssmdiag.cli import app

    sys.argv = ["ssmdiag", *argv]
    app()


def spawn(engine: str, model: str, args) -> dict:
    """One influence run in a fresh process: seconds per sample and peak RSS (MB)."""
    out = tempfile.mkdtemp(prefix="bench-infl-")
    argv = ["influence", model, "--init", "random", "--seq-len", str(args.seq_len), "--samples", str(args.samples),
            "--out", out]
    load = os.getloadavg()
    proc = subprocess.Popen([sys.executable, __file__, "--child", engine, "--", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace")
    if status != 0:
        return {"error": err.strip().splitlines()[-1] if err.strip() else f"status {status}"}
    result = json.load(open(glob.glob(os.path.join(out, "influence", "*", "result.json"))[0]))
    seconds = result["timings_s"][f"influence {model}"] / args.samples
    return {"s_per_sample": seconds, "maxrss_mb": usage.ru_maxrss / 1024, "load1": load[0],
            "backend": result.get("backend")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ssd-engines", default="chunked,numba", help="Mamba-2 SSD engines to compare")
    args, rest = ap.parse_known_args()
    if args.child:
        child(args.child, rest[1:] if rest[:1] == ["--"] else rest)
        return
    results: dict[tuple[str, str], dict] = {}
    engines = args.ssd_engines.split(",")
    for rep in range(args.reps):
        for engine in engines:
            for model in MODELS:
                new = spawn(engine, model, args)
                print(f"rep {rep} ssd={engine:<8} {model:<12} {json.dumps(new)}", file=sys.stderr, flush=True)
                old = results.get((engine, model))
                if old is None or "error" in old:
                    results[(engine, model)] = new
                elif "error" not in new:
                    old.update(s_per_sample=min(old["s_per_sample"], new["s_per_sample"]),
                               maxrss_mb=max(old["maxrss_mb"], new["maxrss_mb"]))
    print(f"\nBest of {args.reps} interleaved repetitions, {args.samples} samples of {args.seq_len} tokens; "
          f"load average now {os.getloadavg()[0]:.2f}\n")
    print("| Mamba-2 SSD engine | Mamba-1 s/sample | Mamba-2 s/sample | Mamba-2 / Mamba-1 | Mamba-1 peak RSS (MB) "
          "| Mamba-2 peak RSS (MB) | RSS ratio |")
    print("|---|---|---|---|---|---|---|")
    for engine in engines:
        m1, m2 = results.get((engine, MODELS[0])), results.get((engine, MODELS[1]))
        if not m1 or not m2 or "error" in m1 or "error" in m2:
            print(f"| {engine} | error: {m1} {m2} |")
            continue
        print(f"| {engine} | {m1['s_per_sample']:.2f} | {m2['s_per_sample']:.2f} | "
              f"{m2['s_per_sample'] / m1['s_per_sample']:.2f}x | {m1['maxrss_mb']:.0f} | {m2['maxrss_mb']:.0f} | "
              f"{m2['maxrss_mb'] / m1['maxrss_mb']:.2f}x |")


if __name__ == "__main__":
    main()
