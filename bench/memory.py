"""Benchmark: peak RSS of `ssmdiag influence` / `smooth` against sequence length and width, both CPU engines.

    python bench/memory.py                       # the default grid, writes bench/memory_points.json
    python bench/memory.py --points "influence mamba-130m 2048 numba"
    python bench/memory.py --check               # compare stored points with ssmdiag.estimate's prediction
    python bench/memory.py --rate                # FLOP per CPU-second (the CPU time model's constant)
    python bench/memory.py --table               # docs/performance.md's table (estimates only, seconds)

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
import time
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
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for p in points:
        if "error" in p:
            print(f"| {p['command']} | {p['model']} | {p['seq_len']} | {p['engine']} | error: {p['error']} | | |")
            continue
        shape = shapes.setdefault(p["model"], model_shape(p["model"], init="random"))
        est = estimate_command(p["command"], shape, seq_len=p["seq_len"], samples=1, device="cpu",
                               engine=p["engine"], checkpoint="checkpoint" in p["extra"])
        ratio = est.peak_bytes / p["peak_bytes"]
        worst = max(worst, ratio, 1 / ratio)
        print(f"| {p['command']} | {p['model']} | {p['seq_len']} | {(p['engine'] + ' ' + p['extra']).strip()} "
              f"| {p['peak_bytes'] / 2**20:.0f} "
              f"| {est.peak_bytes / 2**20:.0f} | {ratio:.2f} |")
    print(f"\nworst factor between estimate and measurement: {worst:.2f}x")


def rate() -> None:
    """FLOP per CPU-second of a no-grad forward and of influence's forward + backward on mamba-130m (this process).

    CPU seconds (time.process_time) rather than wall seconds: other jobs on the machine take wall time, not the
    CPU time this process receives, so the figure transfers to an idle machine (times its cores).
    """
    import torch

    from ssmdiag.estimate import forward_flops, shape_of_model
    from ssmdiag.loading import load_model
    from ssmdiag.metrics.influence import compute_influence, prepare_for_gradients

    m = load_model("mamba-130m", init="random", device="cpu")
    shape = shape_of_model(m.model, "mamba-130m")
    for n in (512, 2048):
        ids = torch.randint(0, shape.vocab, (1, n), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            m.model(input_ids=ids[:, :64], use_cache=False)  # compile / warm up
            t0, w0 = time.process_time(), time.perf_counter()
            m.model(input_ids=ids, use_cache=False)
            cpu, wall = time.process_time() - t0, time.perf_counter() - w0
        print(json.dumps({"what": "forward", "tokens": n, "flops": forward_flops(shape, n), "cpu_s": cpu,
                          "wall_s": wall, "threads": torch.get_num_threads(),
                          "flop_per_cpu_s": forward_flops(shape, n) / cpu}))
    prepare_for_gradients(m.model)
    ids = torch.randint(0, shape.vocab, (1, 1024), generator=torch.Generator().manual_seed(0))
    t0, w0 = time.process_time(), time.perf_counter()
    compute_influence(m.adapter, ids, [1023])
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    flops = 3 * forward_flops(shape, 1024)
    print(json.dumps({"what": "influence (forward + 1 backward)", "tokens": 1024, "flops": flops, "cpu_s": cpu,
                      "wall_s": wall, "flop_per_cpu_s": flops / cpu}))


TABLE_MODELS = ("mamba-130m", "mamba-1.4b", "mamba-2.8b", "mamba-codestral-7b")
TABLE_BUDGETS = (("cpu", 24e9, "CPU, 24 GB"), ("cuda", 80e9, "GPU, 80 GB"))


def table() -> None:
    """docs/performance.md's table: influence and smooth at 2k/8k/32k tokens, fits on 24 GB CPU / 80 GB GPU."""
    from ssmdiag.estimate import estimate_command, model_shape

    cols = [f"{cmd} {label}" for cmd in ("influence", "smooth") for _, _, label in TABLE_BUDGETS]
    print("| model | tokens | " + " | ".join(cols) + " |")
    print("| --- | --- |" + " --- |" * len(cols))
    for name in TABLE_MODELS:
        shape = model_shape(name, init="random")
        for n in (2048, 8192, 32768):
            cells = []
            for cmd in ("influence", "smooth"):
                for device, budget, _ in TABLE_BUDGETS:
                    e = estimate_command(cmd, shape, seq_len=n, device=device, budget_bytes=int(budget),
                                         engine="torch:numba" if device == "cpu" else "torch:chunked")
                    opts = "checkpoint" if e.options.get("checkpoint_blocks") else ""
                    opts += "state blocks" if e.options.get("state_blocks") else ""
                    cells.append(f"{'yes' if e.fits else '**no**'}: {e.peak_bytes / 1e9:.1f} GB"
                                 + (f" ({opts})" if opts else "") + f", {_duration(e.seconds_per_unit)}")
            print(f"| {name} | {n // 1024}k | " + " | ".join(cells) + " |")


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="*", help='"COMMAND MODEL SEQ_LEN ENGINE [FLAGS]" (default: the grid)')
    ap.add_argument("--check", action="store_true", help="only compare the stored points with the estimate")
    ap.add_argument("--file", type=Path, default=POINTS_FILE)
    ap.add_argument("--table", action="store_true", help="print docs/performance.md's fits table and stop")
    ap.add_argument("--rate", action="store_true", help="measure FLOP per CPU-second on mamba-130m and stop")
    args = ap.parse_args()
    if args.rate:
        rate()
        return
    if args.table:
        table()
        return
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
