"""Process-level runtime: CPU thread counts, and this process's place among several (accelerate launch)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import SsmdiagError


def set_threads(threads: int | None) -> None:
    """Set torch's and numba's CPU thread counts (None: leave them)."""
    if threads is None:
        return
    if threads < 1:
        raise SsmdiagError(f"--threads {threads} must be at least 1")
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # pragma: no cover - numba is a dependency
        pass


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if available else cpu; refuse cuda without a GPU."""
    device = (device or "auto").lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SsmdiagError(f"unknown device '{device}'", hint="use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SsmdiagError(f"device '{device}' requested but no CUDA GPU is available",
                               hint="use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SsmdiagError(f"device '{device}' does not exist ({torch.cuda.device_count()} GPU(s) visible)")
    elif dev.type != "cpu":
        raise SsmdiagError(f"unsupported device '{device}'", hint="use auto, cpu, cuda or cuda:N")
    return dev


@dataclass
class Dist:
    """This process's place among the processes `accelerate launch` started (rank 0 of 1 otherwise)."""

    rank: int = 0
    world: int = 1
    state: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, value: Any) -> Any:
        """The main process's `value`, on every process."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def wait(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()


def distributed() -> Dist:
    """Dist from accelerate's environment; a plain single process when not launched by several processes.

    On a machine without GPUs, `accelerate launch --multi_gpu --num_processes N` starts N CPU processes
    (torchrun); they talk over gloo.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    state = PartialState(cpu=cpu, timeout=timedelta(hours=24))  # processes wait for the slowest at the end
    return Dist(rank=state.process_index, world=state.num_processes, state=state)


def is_main_process() -> bool:
    """Whether this is the main process of an accelerate launch (True for a plain single process)."""
    from accelerate import PartialState

    return PartialState().is_main_process

