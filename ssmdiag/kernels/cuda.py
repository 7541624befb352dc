"""The "cuda" backend: mamba-ssm's fused kernels, imported only when called (they need CUDA).

mamba-ssm returns no per-step states and its selective_scan_fn takes no initial state;
backend.resolve_backend never routes such calls here.

The calls follow the kernels' own input contract (mamba-ssm csrc/selective_scan/selective_scan.cpp,
`selective_scan_fwd`): u, delta, variable B and C and z share one dtype (float32, float16 or bfloat16), A, D
and delta_bias are float32, the last dimension is contiguous.  ssmdiag's mixers may hand a float32 Δ with a
half-precision u (Δ computed in float32 for recording, Zamba's per-head Δ): such a call runs in float32 and
its output is cast back to u's dtype, as the torch backend does.  tests/test_cuda_standin.py runs these call
sites against stand-ins with mamba-ssm's signatures and checks.
"""

from __future__ import annotations

import torch


def _common_dtype(*tensors) -> torch.dtype:
    """The input dtype the selective-scan kernel gets: u's, or float32 when the inputs disagree."""
    kinds = {t.dtype for t in tensors if t is not None}
    return kinds.pop() if len(kinds) == 1 else torch.float32


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_states=None):
    """mamba-ssm's selective_scan_fn; return_states may be None or "last" (returned in float32).

    Args: as kernels.selective_scan (u, delta, z (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d,)).
    """
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    if return_states not in (None, "last"):
        raise ValueError("the cuda backend returns only the last state")
    it = _common_dtype(u, delta, B, C, z)
    cast = lambda t: None if t is None else t.to(it).contiguous()  # noqa: E731
    out = selective_scan_fn(cast(u), cast(delta), A.float().contiguous(), cast(B), cast(C),
                            None if D is None else D.float().contiguous(), cast(z),
                            None if delta_bias is None else delta_bias.float().contiguous(), delta_softplus,
                            return_last_state=return_states == "last")
    if return_states is None:
        return out.to(u.dtype)
    y, last = out
    return y.to(u.dtype), last.float()


def ssd_scan_cuda(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None,
                  initial_state=None, return_states=None, chunk_size=256):
    """mamba-ssm's mamba_chunk_scan_combined; return_states may be None or "last".

    Args: as kernels.ssd_scan (x, z (b, l, h, p); dt (b, l, h); A, dt_bias (h,); B, C (b, l, g, n);
        initial_state (b, h, p, n)).
    """
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    if return_states not in (None, "last"):
        raise ValueError("the cuda backend returns only the last state")
    out = mamba_chunk_scan_combined(
        x, dt, A.float(), B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
        initial_states=None if initial_state is None else initial_state.float(), dt_softplus=dt_softplus,
        dt_limit=(0.0, float("inf")) if dt_limit is None else tuple(dt_limit),
        return_final_states=return_states == "last")
    if return_states is None:
        return out
    y, last = out
    return y, last.to(torch.float32)
