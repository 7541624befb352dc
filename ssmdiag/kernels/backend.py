"""Which scan implementation runs: detection once, an override for tests, one stderr line on fallback.

Backends (user-facing names):
    "cuda"  mamba-ssm's fused kernels (selective_scan_fn / mamba_chunk_scan_combined); CUDA tensors only,
            cannot return every state or states at positions.
    "torch" ours: a fused numba kernel on CPU, a chunked pure-torch formulation elsewhere.
    "ref"   the plain sequential loop (ground truth, slow).
    "auto"  "cuda" where it can serve the request, else "torch".
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import os
import sys

import torch

from ..errors import SsmdiagError

BACKENDS = ("auto", "torch", "cuda", "ref")

# Tests (or a user) may force a backend for every call: one of BACKENDS minus "auto", or None.
FORCE_BACKEND: str | None = os.environ.get("SSMDIAG_SCAN_BACKEND") or None
# Device types mamba-ssm's kernels run on.  Tests add "cpu" (with stand-ins for mamba-ssm) to run the cuda
# backend's call sites without a GPU (tests/test_cuda_standin.py); nothing else changes it.
CUDA_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
# Force the engine behind backend="torch": "numba" (CPU only) or "chunked" (pure torch), or None.
FORCE_ENGINE: str | None = os.environ.get("SSMDIAG_SCAN_ENGINE") or None

_logged: set[str] = set()

# What really ran, process-wide: "cuda" | "ref" | "torch:numba" | "torch:chunked" -> scans, and the calls
# `auto` moved off cuda -> count.  Commands read them per phase (usage_snapshot / usage_since).
_USED: collections.Counter = collections.Counter()
_SWITCHED: collections.Counter = collections.Counter()


class BackendUnavailable(SsmdiagError):
    """An explicitly requested backend cannot run here (a user error: `Error:` line, exit 1)."""


def log_once(message: str) -> None:
    """One line on stderr, at most once per process per message."""
    if message not in _logged:
        _logged.add(message)
        print(f"ssmdiag: {message}", file=sys.stderr)


@functools.lru_cache(maxsize=None)
def mamba_ssm_available() -> bool:
    """True when mamba-ssm's compiled ops import (checked once; importing needs its CUDA extension)."""
    if importlib.util.find_spec("mamba_ssm") is None:
        return False
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # noqa: F401
    except Exception:  # broken or CPU-only install: treat as absent
        return False
    return True


@functools.lru_cache(maxsize=None)
def numba_available() -> bool:
    """True when numba imports (the CPU engine of the torch backend)."""
    try:
        import numba  # noqa: F401
    except Exception:
        return False
    return True


def _needs_states(need_states) -> bool:
    """Whether a return_states request needs more than the last state (which cuda can give)."""
    if need_states is None or need_states is False:
        return False
    return not (isinstance(need_states, str) and need_states == "last")


def resolve_backend(requested: str, device, need_states=None, *, need_initial_state: bool = False,
                    op: str = "selective") -> str:
    """Pick the scan backend for one call.

    Args:
        requested: "auto" | "torch" | "cuda" | "ref".
        device: torch.device (or str) of the tensors.
        need_states: the call's return_states (None | "last" | "all" | tensor) or a bool (True = every state).
        need_initial_state: the call passes an initial state (mamba-ssm's selective_scan_fn cannot take one).
        op: "selective" (Mamba-1) or "ssd" (Mamba-2).
    Returns: "cuda" | "torch" | "ref".
    """
    if isinstance(need_states, bool):
        need_states = "all" if need_states else None
    req = FORCE_BACKEND or requested
    if req not in BACKENDS:
        raise BackendUnavailable(f"unknown scan backend '{req}'", hint=f"use one of {', '.join(BACKENDS)}")
    dev = torch.device(device)
    on_gpu = dev.type in CUDA_DEVICE_TYPES
    cuda_ok = on_gpu and mamba_ssm_available()
    cuda_serves = not _needs_states(need_states) and not (op == "selective" and need_initial_state)
    if req == "cuda":
        if not cuda_ok:
            raise BackendUnavailable(
                "scan backend 'cuda' needs mamba-ssm and tensors on a CUDA device",
                hint="pip install 'ssmdiag[cuda]' on a GPU machine, or use --backend torch")
        if not cuda_serves:
            log_once("mamba-ssm cannot return every state / states at positions / take an initial state; "
                     "using ssmdiag's torch scan for those calls")
            return "torch"
        return "cuda"
    if req != "auto":
        return req
    if cuda_ok and cuda_serves:
        return "cuda"
    if cuda_ok:  # auto on a GPU with mamba-ssm, but this call needs states or (Mamba-1) an initial state
        _SWITCHED["auto: cuda -> torch (states or initial state requested)"] += 1
        log_once("--backend auto: scans that record states or carry an initial state run on ssmdiag's torch scan "
                 "(mamba-ssm cannot); result.json's backends_used counts them")
    if on_gpu and not cuda_ok:
        log_once("mamba-ssm is not importable: SSM scans use ssmdiag's torch backend (chunked)")
    return "torch"


def torch_engine(device) -> str:
    """The implementation behind backend="torch" on `device`: "numba" (CPU) or "chunked" (pure torch)."""
    dev = torch.device(device)
    if FORCE_ENGINE is not None:
        if FORCE_ENGINE == "numba" and dev.type != "cpu":
            return "chunked"
        return FORCE_ENGINE
    if dev.type == "cpu" and numba_available():
        return "numba"
    if dev.type == "cpu":
        log_once("numba is not importable: the CPU scan uses the slower chunked torch engine")
    return "chunked"


def describe(backend: str, device, op: str = "selective") -> str:
    """A short label of what actually runs, e.g. 'torch (numba CPU kernel)', for result.json.

    Args:
        backend: as resolve_backend returned it. device: of the tensors. op: "selective" | "ssd".
    """
    if backend != "torch":
        return backend
    numba = torch_engine(device) == "numba"
    if op == "ssd":
        return "torch (numba CPU SSD kernel)" if numba else "torch (chunked SSD)"
    return "torch (numba CPU kernel)" if numba else "torch (chunked scan)"


# --- what ran -----------------------------------------------------------------------------------------------
def engine_label(backend: str, device) -> str:
    """The label one scan is counted under: "cuda" | "ref" | "torch:numba" | "torch:chunked"."""
    return f"torch:{torch_engine(device)}" if backend == "torch" else backend


def count_scan(label: str) -> None:
    """Count one scan call under `label` (called by every scan entry point once it knows what runs)."""
    _USED[label] += 1


def usage_snapshot() -> tuple[dict, dict]:
    """The process-wide counters now: ({label: scans}, {switch reason: calls})."""
    return dict(_USED), dict(_SWITCHED)


def usage_since(snapshot: tuple[dict, dict]) -> tuple[dict, dict]:
    """Scans and auto switches counted since `snapshot` (usage_snapshot's value): what one phase ran."""
    used, switched = usage_snapshot()
    diff = lambda now, then: {k: v - then.get(k, 0) for k, v in sorted(now.items()) if v > then.get(k, 0)}  # noqa: E731
    return diff(used, snapshot[0]), diff(switched, snapshot[1])


def reset_usage() -> None:
    """Zero the counters (tests)."""
    _USED.clear()
    _SWITCHED.clear()
