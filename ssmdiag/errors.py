"""The one exception type for problems the user can fix."""

from __future__ import annotations


class SsmdiagError(Exception):
    """A user-fixable problem: shown as one `Error:` line (and a `Hint:` line), exit code 1.

    Args:
        message: what went wrong, one line.
        hint: what to do about it, one line (optional).
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message
