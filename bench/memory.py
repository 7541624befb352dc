"""Benchmark: peak RSS of `ssmdiag influence` / `smooth` against sequence length and width, both CPU engines.

    python bench/memory.py                       # the default grid, writes bench/memory_points.json
    python bench/memory.py --points "influence mamba-130m 2048 numba"
    python bench/memory.py --check               # compare stored points with ssmdiag.estimate's prediction

Every point runs `ssmdiag COMMAND MODEL --init random --seq-len L --samples 1` in its own process, with the
torch backend's engine forced by SSMDIAG_SCAN_ENGINE (numba: the fused CPU kernels; chunked: the pure-torch
engine a GPU runs), so ru_maxrss (read with os.wait4) is that run's peak alone.  RSS does not depend on other
load on the machine; the seconds do (they are result.json's timing of the measuring phase, under whatever
else runs here) and are kept only to scale the FLOP model, said as such.  `--check` prints, per point, the
estimate of `ssmdiag.estimate.estimate_command` for the same command on the same engine, and the ratio.
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

HERE = Path(__file__).resolve().parent
POINTS_FILE = HERE / "memory_points.json"

# (command, preset, seq_len, engine, extra flags): lengths at one width, then a wider model at one length
GRID = [
    *(("influence", "mamba-130m", n, e, "") for e in ("numba", "chunked") for n in (512, 1024, 2048)),
    *(("influence", "mamba2-130m", n, e, "") for e in ("numba", "chunked") for n in (1024, 2048)),
    *(("influence", "mamba-370m", 1024, e, "") for e in ("numba", "chunked")),
    *(("smooth", m, n, e, "") for m in ("mamba-130m", "mamba2-130m") for e in ("numba", "chunked")
      for n in (1024, 2048)),
]

PHASE_PREFIX = {"influence": "influence ", "smooth": "measure:"}


def run_point(command: str, model: str, seq_len: int, engine: str, extra: str) -> dict:
    """One CLI run in a fresh process: peak RSS (bytes) and the measuring phase's seconds."""
    out = tempfile.mkdtemp(prefix="bench-mem-")
    argv = [sys.executable, "-m", "ssmdiag", command, model, "--init", "random", "--seq-len", str(seq_len),
            "--samples", "1", "--out", out, "--quiet", *extra.split()]
    if command == "smooth":
        argv.append("--no-spectrum")
    env = dict(os.environ, HF_HUB_OFFLINE="1", SSMDIAG_SCAN_ENGINE=engine)
    load = os.getloadavg()[0]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace")
    point = {"command": command, "model": model, "seq_len": seq_len, "engine": engine, "extra": extra,
             "load1": load}
    if status != 0:
        return {**point, "error": err.strip().splitlines()[-1] if err.strip() else f"status {status}"}
    result = json.load(open(glob.glob(os.path.join(out, command, "*", "result.json"))[0]))
    seconds = sum(v for k, v in result["timings_s"].items() if k.startswith(PHASE_PREFIX[command]))
    return {**point, "peak_bytes": usage.ru_maxrss * 1024, "seconds": seconds,
            "estimate": result.get("estimate"), "backends_used": result.get("backends_used")}


def check(points: list[dict]) -> None:
    """Print measured peak RSS against the estimate, per point, and the worst ratio."""
    from ssmdiag.estimate import estimate_command, model_shape

    shapes: dict[str, object] = {}
    worst = 1.0
    print("| command | model | tokens | engine | measured peak (MB) | estimate (MB) | estimate / measured |")
    print("|---|---|---|---|---|---|---|")
    for p in points:
        if "error" in p:
            print(f"| {p['command']} | {p['model']} | {p['seq_len']} | {p['engine']} | error: {p['error']} | | |")
            continue
        shape = shapes.setdefault(p["model"], model_shape(p["model"], init="random"))
        est = estimate_command(p["command"], shape, seq_len=p["seq_len"], samples=1, device="cpu",
                               engine=p["engine"], checkpoint="checkpoint" in p["extra"])
        ratio = est.peak_bytes / p["peak_bytes"]
        worst = max(worst, ratio, 1 / ratio)
        print(f"| {p['command']} | {p['model']} | {p['seq_len']} | {p['engine']} | {p['peak_bytes'] / 2**20:.0f} "
              f"| {est.peak_bytes / 2**20:.0f} | {ratio:.2f} |")
    print(f"\nworst factor between estimate and measurement: {worst:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="*", help='"COMMAND MODEL SEQ_LEN ENGINE [FLAGS]" (default: the grid)')
    ap.add_argument("--check", action="store_true", help="only compare the stored points with the estimate")
    ap.add_argument("--file", type=Path, default=POINTS_FILE)
    args = ap.parse_args()
    stored = json.loads(args.file.read_text()) if args.file.exists() else []
    if not args.check:
        grid = GRID if not args.points else [(*p.split()[:2], int(p.split()[2]), p.split()[3],
                                              " ".join(p.split()[4:])) for p in args.points]
        for point in grid:
            new = run_point(*point)
            print(json.dumps({k: v for k, v in new.items() if k not in ("estimate", "backends_used")}),
                  file=sys.stderr, flush=True)
            key = lambda q: (q["command"], q["model"], q["seq_len"], q["engine"], q.get("extra", ""))  # noqa: E731
            stored = [q for q in stored if key(q) != key(new)] + [new]
            args.file.write_text(json.dumps(stored, indent=1) + "\n")
    check(stored)


if __name__ == "__main__":
    main()
