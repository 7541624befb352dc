"""ssmdiag.kernels: differentiable selective scans (Mamba-1, Mamba-2) that can return memory states.

selective_scan / ssd_scan run on the backend resolve_backend picks ("cuda": mamba-ssm, "torch": ours,
"ref": the plain loop); mixer.install computes transformers' SSM mixers with them, mixer.carry continues
a forward from ssmdiag's own per-layer state, and mixer.record captures Δ, B, C, Ā statistics and states.
"""

from .backend import BackendUnavailable, resolve_backend
from .ref import selective_scan_ref, ssd_scan_ref
from .scan import selective_scan
from .ssd import ssd_scan

__all__ = ["BackendUnavailable", "resolve_backend", "selective_scan", "selective_scan_ref", "ssd_scan",
           "ssd_scan_ref"]
