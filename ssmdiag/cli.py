"""The `ssmdiag` command line: registers one command per module, and is the ONLY place errors become exit codes.

User-fixable problems (SsmdiagError) print `Error: …` and `Hint: …` on stderr and exit 1; usage errors exit 2
with Typer's own message (an unknown flag, a value outside its Enum, a count below its `min=`: ssmdiag.options);
anything else is a bug and keeps its traceback. `SSMDIAG_DEBUG=1` shows tracebacks always.
"""

from __future__ import annotations

import errno
import functools
import importlib
import os
import sys
from typing import Annotated, Callable, Optional

import typer

from . import __version__
from .errors import SsmdiagError

# (command name, module under ssmdiag.commands, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    ("info", "info", "Describe a checkpoint: family, sizes, A and Ā = exp(Δ·A) per layer."),
    ("presets", "presets", "List the built-in architecture presets usable with --init random."),
    ("smooth", "smooth", "Layerwise sharpness, memory-state smoothing and the Ā spectrum (over-smoothing)."),
    ("influence", "influence", "Influence-score decay with distance: per-distance curves, exponential fit, plots."),
    ("needle", "needle", "Needle in a haystack: counterfactual needles over lengths × depths, resumable grids."),
    ("polarize", "polarize",
     "Polarize state channels (Ā ≡ 1 / Ā ≡ 0): patch a checkpoint, fine-tune it, or train the MQAR grid."),
    ("robust", "robust", "Corrupt leading vs trailing tokens: how much each hurts the next-token output (§3.3)."),
    ("length", "length", "Past the training length: loss by position, state health, global channels, MMD, remembrance."),
    ("report", "report", "Every diagnostic of one or two models on one self-contained page (report.html)."),
]

app = typer.Typer(
    name="ssmdiag",
    help="Diagnose recency and over-smoothing in state-space-model checkpoints (Mamba, Mamba-2, Pythia baselines).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def report_error(exc: SsmdiagError) -> None:
    """Print a user error as one `Error:` line and an optional `Hint:` line on stderr."""
    message = " ".join(str(exc.message).split())
    print(f"Error: {message}", file=sys.stderr)
    if exc.hint:
        print(f"Hint: {' '.join(str(exc.hint).split())}", file=sys.stderr)


FATAL_OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # always about the output, wherever they arise


def _abandon() -> None:
    """Clean up after a failed command: unfinished fresh run folders go; resumable ones stay, marked INCOMPLETE."""
    from .results import abandon_runs

    for path in abandon_runs():
        print(f"Hint: the unfinished run is kept in {path} (marked INCOMPLETE); add --resume {path} to finish it",
              file=sys.stderr)


def handle_errors(func: Callable) -> Callable:
    """Wrap a command so SsmdiagError exits 1 with a clean message (traceback with SSMDIAG_DEBUG=1).

    A full disk or a read-only file system met anywhere becomes such an error too; whatever the failure, the
    command leaves no half-written run behind (see results.abandon_runs).
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except SsmdiagError as exc:
            _abandon()
            if os.environ.get("SSMDIAG_DEBUG") == "1":
                raise
            report_error(exc)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            _abandon()
            print("Interrupted.", file=sys.stderr)
            raise typer.Exit(130) from None
        except OSError as exc:
            _abandon()
            if exc.errno not in FATAL_OUTPUT_ERRNOS or os.environ.get("SSMDIAG_DEBUG") == "1":
                raise
            from .files import output_error

            report_error(output_error(exc, exc.filename))
            raise typer.Exit(1) from None
        except BaseException:
            _abandon()
            raise

    return wrapper


def _register() -> None:
    """Add every command in COMMANDS, each wrapped by handle_errors."""
    for name, module, help_text in COMMANDS:
        mod = importlib.import_module(f"ssmdiag.commands.{module}")
        app.command(name, help=help_text)(handle_errors(mod.main))


def _version(value: bool) -> None:
    """--version: print the version and stop."""
    if value:
        print(f"ssmdiag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
) -> None:
    """Diagnose recency and over-smoothing in state-space-model checkpoints."""


_register()


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":  # `python -m ssmdiag.cli`
    main()
