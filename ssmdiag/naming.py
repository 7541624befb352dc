"""File-system-safe names for models and runs."""

from __future__ import annotations

import re


def slugify(text: str) -> str:
    """Turn a model spec into a short file-system-safe slug ('state-spaces/mamba-130m-hf' -> 'mamba-130m-hf')."""
    text = str(text).rstrip("/\\")
    text = text.split("/")[-1] or text
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"
