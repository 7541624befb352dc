"""Run directories and result.json: atomic writes, provenance, per-phase timings.

Schema: docs/results.md. Bump SCHEMA_VERSION when a field changes meaning.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from .errors import SsmdiagError
from .files import atomic_path, output_error
from .hub import waited_s
from .naming import slugify  # noqa: F401 - part of results' API (run folder names)

SCHEMA_VERSION = 1


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, tensors, numpy values and paths into plain JSON values (NaN/inf -> None)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # torch tensors and numpy arrays/scalars
        return to_jsonable(obj.tolist())
    return str(obj)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename: an interrupt never leaves half a file."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:  # the file closes before atomic_path renames it
        json.dump(to_jsonable(obj), f, indent=2, allow_nan=False)
        f.write("\n")


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes the numbers ("absent" when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("ssmdiag", "torch", "transformers", "accelerate", "numba", "mamba-ssm", "causal-conv1d"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def git_hash() -> str | None:
    """The ssmdiag source tree's commit, if it is a git checkout."""
    here = Path(__file__).resolve().parent.parent
    try:
        res = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def model_provenance(loaded: Any) -> dict[str, Any]:
    """The model fields of result.json, from a LoadedModel (or a plain string for model-free runs)."""
    if isinstance(loaded, str):
        return {"spec": loaded}
    return {
        "spec": loaded.spec,
        "name": loaded.name,
        "source": loaded.source,
        "revision": loaded.revision,
        "weights_hash": loaded.weights_hash,
        "family": loaded.family,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "device": str(loaded.device),
        "backend": loaded.backend,
    }


@dataclass
class Run:
    """One command invocation: its folder, config, timings and (at the end) metrics."""

    path: Path
    command: str
    argv: list[str]
    config: dict[str, Any]
    models: list[Any]
    seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    resumable: bool = False  # an unfinished run is kept (marked INCOMPLETE) for --resume, not deleted
    created: list[Path] = field(default_factory=list)  # folders start_run made, outermost first
    backends_used: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> {scan label: scans}
    usage_at_start: tuple[dict, dict] = field(default_factory=lambda: _scan_usage())

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase of the run (wall seconds, accumulated under `name`) and count the scans it ran."""
        t0 = time.perf_counter()
        before = _scan_usage()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
            self._count_scans(name, before)

    def scans_by_phase(self) -> dict[str, dict[str, int]]:
        """backends_used of result.json: per phase {scan label: scans}, and "all" for the whole run so far."""
        kernels = sys.modules.get("ssmdiag.kernels.backend")
        total = kernels.usage_since(self.usage_at_start)[0] if kernels is not None else {}
        return {**self.backends_used, **({"all": total} if total else {})}

    def _count_scans(self, name: str, before: tuple[dict, dict]) -> None:
        """Add the scans a phase ran to backends_used; note each time `--backend auto` moved scans off cuda."""
        kernels = sys.modules.get("ssmdiag.kernels.backend")
        if kernels is None:  # no scan module loaded: nothing ran
            return
        used, switched = kernels.usage_since(before)
        if used:
            mine = self.backends_used.setdefault(name, {})
            for label, count in used.items():
                mine[label] = mine.get(label, 0) + count
        for why, count in switched.items():
            self.note(f"{name}: {count} scan call(s) switched by {why}; see backends_used")

    def add_plot(self, name: str) -> Path:
        """Register a plot file name and return its full path inside the run folder."""
        self.plots.append(name)
        return self.path / name

    def note(self, text: str) -> None:
        """Record a fallback or caveat (also printed on stderr by the caller)."""
        self.notes.append(text)

    def payload(self, metrics: Any, backend: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The result.json document."""
        timings = dict(self.timings)
        load_s = [m.load_s for m in self.models if hasattr(m, "load_s")]
        if load_s and "load" not in timings:
            timings["load"] = sum(load_s)  # models + tokenizers; outside `total` when loaded before start_run
        timings["hub_wait"] = waited_s()
        timings["total"] = time.perf_counter() - self.started
        doc = {
            "schema_version": SCHEMA_VERSION,
            "command": self.command,
            "argv": self.argv,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": self.config,
            "models": [model_provenance(m) for m in self.models],
            "backend": backend,
            "backends_used": self.scans_by_phase(),
            "seed": self.seed,
            "versions": library_versions(),
            "git_hash": git_hash(),
            "timings_s": timings,
            "notes": self.notes,
            "plots": self.plots,
            "metrics": metrics,
        }
        if extra:
            doc.update(extra)
        return to_jsonable(doc)

    def finish(self, metrics: Any, backend: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write result.json atomically and return what was written."""
        doc = self.payload(metrics, backend=backend, extra=extra)
        write_json_atomic(self.path / "result.json", doc)
        (self.path / INCOMPLETE).unlink(missing_ok=True)
        _open_runs[:] = [r for r in _open_runs if r is not self]  # nothing left to clean up after it
        return doc


def _scan_usage() -> tuple[dict, dict]:
    """The kernels' scan counters now (empty when no scan module is loaded yet: importing it is not our job)."""
    kernels = sys.modules.get("ssmdiag.kernels.backend")
    return kernels.usage_snapshot() if kernels is not None else ({}, {})


def fresh_run_path(out: Path, command: str, names: list[str]) -> Path:
    """`<out>/<command>/<slug>-<UTC timestamp>`: the folder of a new run (not created here)."""
    slug = "+".join(slugify(n) for n in names or ["run"])[:80]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return Path(out) / command / f"{slug}-{stamp}"


def check_resume_dir(resume: Path, command: str, marker: str) -> Path:
    """The folder of an earlier `command` run to continue, or an SsmdiagError naming what is wrong with it.

    Args:
        resume: the --resume RUN_DIR the user gave.
        marker: a file every run of this command writes first (e.g. needle's grid.json).
    """
    resume = Path(resume)
    if not resume.exists():
        raise SsmdiagError(f"--resume '{resume}' does not exist", hint=f"pass the folder of an earlier `{command}` run")
    if not resume.is_dir() or not (resume / marker).is_file():
        raise SsmdiagError(f"--resume '{resume}' is not a {command} run directory (no {marker})",
                           hint=f"pass the folder of an earlier `{command}` run, e.g. runs/{command}/<name>-<stamp>")
    return resume


INCOMPLETE = "INCOMPLETE"  # marker file in a run folder until its result.json is written
_open_runs: list[Run] = []  # runs this process opened and has not finished; abandon_runs() cleans them up


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p `path`; returns the folders it created, outermost first (an OS error becomes an SsmdiagError)."""
    missing = [p for p in [path, *path.parents] if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        for p in reversed(missing):  # undo what was made before the failure
            with contextlib.suppress(OSError):
                p.rmdir()
        raise output_error(exc, path) from None
    return missing


def start_run(
    out: Path, command: str, models: list[Any], argv: list[str] | None = None, config: dict[str, Any] | None = None,
    seed: int | None = None, resume: Path | None = None, resumable: bool = False,
) -> Run:
    """The one maker of run folders: `<out>/<command>/<model-slug>-<UTC timestamp>/`, or `resume` to continue one.

    Call it after validating inputs. Until `Run.finish` writes result.json the folder holds an INCOMPLETE marker;
    if the process fails first, `abandon_runs` deletes a fresh folder (and the parents it made) or, for a
    `resumable` run (needle, polarize --train, the grid), keeps it marked for `--resume`.
    """
    if resume is None:
        path = fresh_run_path(out, command, [m if isinstance(m, str) else m.name for m in models])
        created = _make_dirs(path)
    else:
        path, created = Path(resume), []
    run = Run(path=path, command=command, argv=list(argv if argv is not None else sys.argv), config=config or {},
              models=list(models), seed=seed, resumable=resumable or resume is not None, created=created)
    _open_runs.append(run)
    try:
        (path / INCOMPLETE).write_text(f"This `ssmdiag {command}` run has not finished (no result.json yet).\n")
    except OSError as exc:
        raise output_error(exc, path / INCOMPLETE) from None
    return run


def abandon_runs() -> list[Path]:
    """After a failure: delete the unfinished fresh runs of this process; return the resumable ones kept."""
    kept = []
    while _open_runs:
        run = _open_runs.pop()
        if run.resumable and any(p.name != INCOMPLETE for p in run.path.iterdir()):
            kept.append(run.path)
            continue
        if run.created:  # a folder this process made: remove it and the parents it made, if empty
            shutil.rmtree(run.path, ignore_errors=True)
            for folder in reversed(run.created[:-1]):
                with contextlib.suppress(OSError):
                    folder.rmdir()
        else:
            (run.path / INCOMPLETE).unlink(missing_ok=True)
    return kept
