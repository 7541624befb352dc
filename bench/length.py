"""Benchmark: `ssmdiag length`'s streamed pass against a plain full-sequence forward, tokens/s and peak memory.

    python bench/length.py                                   # mamba-130m, random init, 32k tokens, CPU
    python bench/length.py --length 4096 --threads 2         # smaller, 2 compute threads
    python bench/length.py --device cuda                     # the same code path on a GPU

Each configuration runs in its own process, so ru_maxrss (read with os.wait4) is that run's peak RSS; on CUDA
the peak allocated device memory is read too.  Three runs per configuration, one sample each:
  stream — metrics.length.measure_length (every view: state health, decay, global share, MMD; no remembrance),
           `--chunk` tokens at a time through the state carry;
  carry  — the same chunks through the carry with nothing recorded (what the views add on top of streaming);
  plain  — one `model(ids)` over the whole sequence (logits for every position, as a user would call it).
Timings exclude loading; "rss after load" is the process before the forward.  Ratios are stream / plain from the
same invocation (the machine's load shared); absolute seconds on a shared machine mean little.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def child(mode: str, args) -> None:
    """Run one configuration in this process and print a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from ssmdiag.loading import load_model
    from ssmdiag.metrics.length import LengthConfig, measure_length
    from ssmdiag.metrics.prefill import ModelRunner

    m = load_model(args.preset, init="random", device=args.device)
    ids = torch.randint(0, m.adapter.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    after_load = _rss_mb()
    if m.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        if mode == "stream":
            cfg = LengthConfig(lengths=[args.length], samples=1, chunk=args.chunk, remembrance=False)
            measure_length(m, ids, cfg, min(2048, args.length), "bench")
        elif mode == "carry":
            runner = ModelRunner(m.model, m.family, args.chunk)
            runner.feed(runner.new_cache(), ids[0].tolist(), need_logits=False)
        else:
            m.model(input_ids=ids.to(m.device), use_cache=False).logits.float().sum().item()
    if m.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"mode": mode, "seconds": seconds, "tokens_per_s": args.length / seconds, "rss_after_load_mb": after_load,
           "backend": m.backend}
    if m.device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def spawn(mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--preset", args.preset, "--length", str(args.length),
           "--chunk", str(args.chunk), "--device", args.device, "--threads", str(args.threads)]
    load = os.getloadavg()[0]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode(errors="replace")
    if status != 0:
        return {"mode": mode, "error": (err.strip().splitlines() or [f"status {status}"])[-1]}
    row = json.loads(out.strip().splitlines()[-1])
    row.update(maxrss_mb=usage.ru_maxrss / 1024, load1=load)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="mamba-130m")
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="stream,carry,plain")
    args = ap.parse_args()
    if args.child:
        child(args.child, args)
        return
    rows = [spawn(mode, args) for mode in args.modes.split(",")]
    print(f"{args.preset}, random init, {args.length} tokens, chunk {args.chunk}, {args.device}, "
          f"{args.threads} threads")
    print("| run | tokens/s | seconds | peak RSS MB | RSS after load MB | peak CUDA MB | load avg |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | failed: {r['error'][:120]} | | | | | |")
            continue
        print(f"| {r['mode']} | {r['tokens_per_s']:.1f} | {r['seconds']:.1f} | {r['maxrss_mb']:.0f} | "
              f"{r['rss_after_load_mb']:.0f} | {r.get('peak_cuda_mb', float('nan')):.0f} | {r['load1']:.1f} |")
    ok = {r["mode"]: r for r in rows if "error" not in r}
    if "stream" in ok and "plain" in ok:
        s, p = ok["stream"], ok["plain"]
        print(f"stream / plain: time {s['seconds'] / p['seconds']:.2f}x, peak RSS {s['maxrss_mb'] / p['maxrss_mb']:.2f}x"
              + (f", peak CUDA {s['peak_cuda_mb'] / p['peak_cuda_mb']:.2f}x" if "peak_cuda_mb" in s else ""))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
