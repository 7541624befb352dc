"""Parity and timing of the scans on a device against the sequential references (run on CPU).

    python bench/gpu_parity.py                  # cuda when available, else cpu
    python bench/gpu_parity.py --device cpu     # the CPU-checkable part (bench/gpu_check.sh runs it first)

For selective_scan (Mamba-1, mamba-130m-sized layer: d 1536, n 16) and ssd_scan (Mamba-2, mamba2-130m-sized
layer: 24 heads of 64, n 128, one group), at T = 512 with an initial state: the outputs, the last state and
the gradients of every input on backend "torch" (GPU: the chunked engine; CPU: each engine) and, when
mamba-ssm imports, "cuda", against selective_scan_ref / ssd_scan_ref on CPU in float64-free float32.  Prints
one line per check with the max relative error and the seconds of one fwd+bwd; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ssmdiag.kernels import backend as kbackend
from ssmdiag.kernels import selective_scan, selective_scan_ref, ssd_scan, ssd_scan_ref

TOL = 2e-3  # max |a - b| / max |b| per tensor, float32 over 512 steps


def mamba1_inputs(length: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    b, d, n = 1, 1536, 16
    t = dict(u=torch.randn(b, d, length, generator=g), delta=torch.randn(b, d, length, generator=g) * 0.5,
             A=-torch.rand(d, n, generator=g) * 2 - 0.05, B=torch.randn(b, n, length, generator=g),
             C=torch.randn(b, n, length, generator=g), D=torch.randn(d, generator=g),
             z=torch.randn(b, d, length, generator=g), delta_bias=torch.randn(d, generator=g) * 0.3,
             initial_state=torch.randn(b, d, n, generator=g))
    return {k: v.to(device).requires_grad_(True) for k, v in t.items()}


def mamba2_inputs(length: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    b, h, p, gr, n = 1, 24, 64, 1, 128
    t = dict(x=torch.randn(b, length, h, p, generator=g), dt=torch.randn(b, length, h, generator=g) * 0.5,
             A=-torch.rand(h, generator=g) * 2 - 0.05, B=torch.randn(b, length, gr, n, generator=g),
             C=torch.randn(b, length, gr, n, generator=g), D=torch.randn(h, generator=g),
             z=torch.randn(b, length, h, p, generator=g), dt_bias=torch.randn(h, generator=g) * 0.3,
             initial_state=torch.randn(b, h, p, n, generator=g) * 0.1)
    return {k: v.to(device).requires_grad_(True) for k, v in t.items()}


def run(fn, t: dict, sync) -> tuple[list[torch.Tensor], float]:
    """Outputs and gradients of a fixed random projection of (y, last state); seconds of one fwd+bwd."""
    sync()
    t0 = time.perf_counter()
    y, last = fn(**t)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    gl = torch.randn(last.shape, generator=torch.Generator().manual_seed(2)).to(last.device, last.dtype)
    grads = torch.autograd.grad((y * gy).sum() + (last * gl).sum(), [v for v in t.values() if v is not None],
                                allow_unused=True)
    sync()
    seconds = time.perf_counter() - t0
    return [y.detach(), last.detach(), *grads], seconds


def rel_err(a, b) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def check(name: str, fn, ref, make, device: str, sync, length: int) -> bool:
    t_dev, t_cpu = make(length, device), make(length, "cpu")
    fn(**t_dev)  # warm-up (kernels compile / load)
    got, seconds = run(fn, t_dev, sync)
    want, _ = run(ref, t_cpu, lambda: None)
    labels = ["y", "last", *("d" + k for k, v in t_dev.items() if v is not None)]
    errs = {k: rel_err(a, b) for k, a, b in zip(labels, got, want)}
    worst = max(errs, key=errs.get)
    ok = all(v <= TOL for v in errs.values())
    print(f"{'ok  ' if ok else 'FAIL'} {name:<34} max rel err {errs[worst]:.1e} ({worst})  fwd+bwd {seconds:.3f}s",
          flush=True)
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--length", type=int, default=512)
    args = ap.parse_args()
    dev = args.device
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    sel = lambda bk: lambda **t: selective_scan(**t, delta_softplus=True, return_states="last", backend=bk)  # noqa: E731
    sel_ref = lambda **t: selective_scan_ref(**t, delta_softplus=True, return_states="last")  # noqa: E731
    ssd = lambda bk: lambda **t: ssd_scan(**t, dt_softplus=True, return_states="last", chunk_size=64, backend=bk)  # noqa: E731
    ssd_ref = lambda **t: ssd_scan_ref(**t, dt_softplus=True, return_states="last")  # noqa: E731
    engines = ["numba", "chunked"] if dev == "cpu" else [None]
    ok = True
    for engine in engines:
        kbackend.FORCE_ENGINE = engine
        label = f"torch/{kbackend.torch_engine(dev)}"
        ok &= check(f"selective_scan {label} {dev}", sel("torch"), sel_ref, mamba1_inputs, dev, sync, args.length)
        ok &= check(f"ssd_scan {label} {dev}", ssd("torch"), ssd_ref, mamba2_inputs, dev, sync, args.length)
    kbackend.FORCE_ENGINE = None
    if dev.startswith("cuda") and kbackend.mamba_ssm_available():
        # mamba-ssm's selective_scan_fn takes no initial state: compare it from zeros
        no_h0 = lambda make: lambda length, device: {**make(length, device), "initial_state": None}  # noqa: E731
        ok &= check(f"selective_scan cuda {dev}", sel("cuda"), sel_ref, no_h0(mamba1_inputs), dev, sync, args.length)
        ok &= check(f"ssd_scan cuda {dev}", ssd("cuda"), ssd_ref, mamba2_inputs, dev, sync, args.length)
    elif dev.startswith("cuda"):
        print("skip  backend 'cuda': mamba-ssm not importable", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
