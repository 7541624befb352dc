"""Memory of ssmdiag's chunked gated delta rule on CPU: the numbers behind estimate_delta.py (DELTA_KEEP, DELTA_BWD,
DELTA_FWD).  Bytes, never times, so a loaded machine does not bias them.

    python bench/delta_memory.py saved            # autograd's saved tensors, counted by a hook (exact)
    python bench/delta_memory.py forward L H N P C    # peak RSS growth of one no-grad forward (C = 1: α per key
    python bench/delta_memory.py backward L H N P C   #   channel), or of one forward + backward: one process each

Every figure is also printed in the cost model's unit: floats per token and value head (q = 64 the chunk,
m = 1 or n).
"""

from __future__ import annotations

import resource
import sys

import torch
import torch.nn.functional as F

from ssmdiag.kernels.delta_rule import gated_delta_rule

Q = 64
SAVED_POINTS = [(256, 4, 32, 32, 0), (512, 4, 32, 32, 0), (512, 8, 32, 32, 0), (512, 4, 64, 32, 0),
                (512, 4, 32, 64, 0), (256, 4, 32, 32, 1), (512, 4, 32, 32, 1), (512, 4, 64, 32, 1),
                (512, 8, 32, 64, 1)]


def _inputs(l, h, n, p, per_channel, grad=True):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, l, h, n, generator=g), F.normalize(torch.randn(1, l, h, n, generator=g), dim=-1)
    v, beta = torch.randn(1, l, h, p, generator=g), torch.rand(1, l, h, generator=g)
    gg = -torch.rand(1, l, h, *([n] if per_channel else []), generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v, gg, beta)]


def saved_bytes(l, h, n, p, per_channel) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gated_delta_rule(*_inputs(l, h, n, p, per_channel), chunk_size=Q)
    return sum(seen.values())


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    torch.set_num_threads(1)
    if sys.argv[1:2] == ["saved"]:
        for l, h, n, p, c in SAVED_POINTS:
            b = saved_bytes(l, h, n, p, c)
            m = n if c else 1
            print(f"l={l} h={h} n={n} p={p} per_channel={c}: saved {b / 2**20:.2f} MiB = "
                  f"{b / (l * h * 4):.0f} floats per token and head (q·m = {Q * m})")
        return
    l, h, n, p, c = (int(x) for x in sys.argv[2:7])
    unit, base = l * h * 4, _rss()
    if sys.argv[1] == "forward":
        with torch.no_grad():
            gated_delta_rule(*_inputs(l, h, n, p, c, grad=False), chunk_size=Q)
        what = "no-grad forward"
    else:
        gated_delta_rule(*_inputs(l, h, n, p, c), chunk_size=Q).pow(2).sum().backward()
        what = f"forward + backward (saved {saved_bytes(l, h, n, p, c) / unit:.0f})"
    print(f"l={l} h={h} n={n} p={p} per_channel={c} (q·m = {Q * (n if c else 1)}): {what}: peak RSS growth "
          f"{(_rss() - base) / unit:.0f} floats per token and head")

if __name__ == "__main__":
    main()
