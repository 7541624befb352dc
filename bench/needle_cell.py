"""Benchmark: one `ssmdiag needle` cell per model, split into prefill and scoring.

    python bench/needle_cell.py                          # mamba-130m and mamba2-130m, 2k tokens, 1 depth
    python bench/needle_cell.py --length 4k --models mamba2-130m --reps 2

Each (repetition, model) runs `ssmdiag needle MODEL --init random --lengths L --depths 50 --samples 1` in its
own process, interleaved, with a byte-level BPE tokenizer trained offline (tests/tinymodels.py; vocab 384,
so the haystack costs more tokens per word than GPT-NeoX's, but a cell is L tokens either way) so the bench
needs no hub access.  From the run folder: setup (load, grid, state-carry check) and cells (result.json
timings_s), and per cell the prefill seconds (the prompt's forward, in --prefill-chunk segments) and scoring
seconds (greedy decoding of max-new-tokens plus the answers' log-probabilities) from cells.jsonl.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def tokenizer_dir() -> str:
    path = Path(tempfile.gettempdir()) / "ssmdiag-bench-tokenizer"
    if not (path / "tokenizer.json").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tinymodels import train_tokenizer

        train_tokenizer(path)
    return str(path)


def run_cell(model: str, length: str, tok: str, extra: list[str]) -> dict:
    out = tempfile.mkdtemp(prefix="bench-needle-")
    cmd = ["ssmdiag", "needle", model, "--init", "random", "--tokenizer", tok, "--lengths", length, "--depths", "50",
           "--samples", "1", "--out", out, "--quiet", *extra]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    run = glob.glob(os.path.join(out, "needle", "*"))[0]
    timings = json.load(open(os.path.join(run, "result.json")))["timings_s"]
    cells = [json.loads(line) for line in open(os.path.join(run, "cells.jsonl")) if line.strip()]
    samples = [s for c in cells for s in c["samples"]]
    return {"load1": load, "setup_s": timings.get("setup"), "cells_s": timings.get("cells"),
            "prefill_s": sum(s["prefill_s"] for s in samples), "score_s": sum(s["score_s"] for s in samples),
            "prefill_tokens": sum(s["prefill_tokens"] for s in samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mamba-130m,mamba2-130m")
    ap.add_argument("--length", default="2k")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("extra", nargs="*", help="more needle flags after --, e.g. -- --device cuda")
    args = ap.parse_args()
    tok = tokenizer_dir()
    best: dict[str, dict] = {}
    for rep in range(args.reps):
        for model in args.models.split(","):
            r = run_cell(model, args.length, tok, args.extra)
            print(f"rep {rep} {model} {json.dumps(r)}", file=sys.stderr, flush=True)
            if model not in best or "error" in best[model] or ("error" not in r and r["cells_s"] < best[model]["cells_s"]):
                best[model] = r
    print(f"One needle cell of {args.length} tokens (best of {args.reps}); load average now {os.getloadavg()[0]:.2f}\n")
    print("| model | setup (s) | cell (s) | prefill (s) | scoring (s) | prefill share | prefill tok/s |")
    print("|---|---|---|---|---|---|---|")
    for model, r in best.items():
        if "error" in r:
            print(f"| {model} | error: {r['error'][:60]} |")
            continue
        cell = r["cells_s"]
        print(f"| {model} | {r['setup_s']:.1f} | {cell:.2f} | {r['prefill_s']:.2f} | {r['score_s']:.2f} | "
              f"{r['prefill_s'] / cell:.0%} | {r['prefill_tokens'] / max(r['prefill_s'], 1e-9):.0f} |")


if __name__ == "__main__":
    main()
