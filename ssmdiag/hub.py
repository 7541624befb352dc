"""Hugging Face Hub reachability, probed at most once per process and only when something needs the hub.

When the hub cannot be reached, the rest of the process runs in huggingface_hub's offline mode (local cache
only), so a missing network costs one short connect attempt instead of minutes of download retries.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 2.0

_reachable: bool | None = None  # the probe's answer, once asked
_wait_s = 0.0  # wall seconds spent probing and waiting on hub look-ups


def is_offline() -> bool:
    """Whether huggingface_hub is in offline mode (HF_HUB_OFFLINE, or switched on by a failed probe)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def endpoint() -> tuple[str, int]:
    """The (host, port) a hub request connects to: the proxy for its scheme when one is set, else the endpoint."""
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def _can_connect(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds (name lookup included)."""
    answer: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    worker = threading.Thread(target=attempt, daemon=True)  # a thread bounds a hanging DNS look-up too
    worker.start()
    worker.join(timeout)
    return bool(answer and answer[0])


def go_offline() -> None:
    """Switch huggingface_hub (and transformers, which asks it) to offline mode for the rest of the process."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"


def prepare() -> bool:
    """Call before a hub look-up: probe the hub once per process (never when offline); True if reachable."""
    global _reachable
    if is_offline():
        return False
    if _reachable is None:
        with waiting():
            _reachable = _can_connect(*endpoint())
        if not _reachable:
            go_offline()
    return _reachable


def why_offline() -> str | None:
    """Why hub look-ups are answered from the local cache only, or None when the hub is in reach."""
    if _reachable is False:
        host, port = endpoint()
        return f"the Hugging Face Hub ({host}:{port}) cannot be reached"
    return "HF_HUB_OFFLINE is set" if is_offline() else None


@contextlib.contextmanager
def waiting() -> Iterator[None]:
    """Count the wall time of a hub look-up (or the probe) into `waited_s`."""
    global _wait_s
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _wait_s += time.perf_counter() - t0


def waited_s() -> float:
    """Wall seconds this process has spent on hub probing and hub look-ups."""
    return _wait_s


def download(repo_id: str, preset=None) -> tuple[Path, str | None]:
    """Fetch a hub repo's config, weights and tokenizer into the local cache; return (dir, commit).

    Args:
        repo_id: the hub id.  preset: the ssmdiag preset of that id, if any (named in the offline hint).
    """
    from .errors import SsmdiagError

    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError)
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        raise SsmdiagError("huggingface_hub is missing", hint="pip install huggingface_hub") from None
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]
    prepare()
    try:
        with waiting():
            path = Path(snapshot_download(repo_id, allow_patterns=patterns))
            if not any(p.suffix == ".safetensors" for p in path.iterdir()):
                path = Path(snapshot_download(repo_id, allow_patterns=patterns + ["pytorch_model*.bin"]))
    except RepositoryNotFoundError:
        raise SsmdiagError(f"'{repo_id}' is not a local path and no hub repository of that name exists",
                           hint="check the spelling, or pass a local checkpoint directory") from None
    except (LocalEntryNotFoundError, EntryNotFoundError, OSError) as exc:
        hint = (f"the hub is offline or unreachable; `--init random` builds the {preset.name} architecture with "
                "fresh weights offline" if preset else "pass a local checkpoint directory, or allow hub access")
        why = why_offline()
        reason = f"{why} and it is not in the local cache" if why else type(exc).__name__
        raise SsmdiagError(f"cannot download '{repo_id}' ({reason})", hint=hint) from None
    commit = path.name if len(path.name) == 40 else None
    return path, commit
