"""The "cuda" backend: mamba-ssm's fused kernels, imported only when called (they need CUDA).

mamba-ssm returns no per-step states and its selective_scan_fn takes no initial state;
backend.resolve_backend never routes such calls here.
"""

from __future__ import annotations

import torch


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_states=None):
    """mamba-ssm's selective_scan_fn; return_states may be None or "last" (returned in float32)."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    if return_states not in (None, "last"):
        raise ValueError("the cuda backend returns only the last state")
    out = selective_scan_fn(u.contiguous(), delta.contiguous(), A.float().contiguous(), B.contiguous(),
                            C.contiguous(), None if D is None else D.float(),
                            None if z is None else z.contiguous(),
                            None if delta_bias is None else delta_bias.float(), delta_softplus,
                            return_last_state=return_states == "last")
    if return_states is None:
        return out
    y, last = out
    return y, last.float()


def ssd_scan_cuda(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None,
                  initial_state=None, return_states=None, chunk_size=256):
    """mamba-ssm's mamba_chunk_scan_combined; return_states may be None or "last"."""
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
