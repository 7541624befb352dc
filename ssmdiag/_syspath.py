"""Keep the source checkout's `kernels/` folder from shadowing the Hugging Face `kernels` package.

`python -m …` run from the repository root puts the root on sys.path, which makes our `kernels/` folder (packaged
as `ssmdiag.kernels`) importable as a top-level `kernels`; transformers probes for the Hub package of that name
and would import ours. The installed package never needs the root on sys.path, so we drop it.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def drop_repo_root() -> None:
    """Remove the checkout root ('' or its path) from sys.path when it holds our kernels/ folder."""
    if not (_ROOT / "kernels" / "__init__.py").exists():
        return
    keep = []
    for entry in sys.path:
        try:
            same = Path(entry or ".").resolve() == _ROOT
        except OSError:
            same = False
        if not same:
            keep.append(entry)
    sys.path[:] = keep
