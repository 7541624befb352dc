"""`--dry-run` for the commands that cost: estimate from the configs (meta device), print, write result.json, stop.

Also the automatic choice of per-block checkpointing for a real influence run (the same estimate, on the
loaded model).  The cost model itself is ssmdiag/estimate.py.
"""

from __future__ import annotations

from pathlib import Path

from .. import console
from ..estimate import Estimate, estimate_command, model_shape, shape_of_model
from ..loading import LoadOptions
from ..results import start_run

GB = 1 << 30


def dry_run(command: str, specs: list[str], opts: LoadOptions, out: Path, as_json: bool, units: int,
            config: dict, **cfg) -> None:
    """Estimate `command` for each model from its config alone, print a table, write result.json['estimate'].

    Args:
        command: the estimate.py cost model (influence, smooth, robust, needle, polarize-train, length).
        specs: the models as given. opts: the load flags (init, dtype, device, backend).
        units: samples / cells / steps the run would do. config: the command's config for result.json.
        cfg: the numbers the cost model reads (seq_len, targets, lengths, …).
    """
    with console.status("estimating from the config (meta device, no weights)"):
        shapes = [model_shape(s, opts.init, opts.dtype, opts.trust_remote_code) for s in specs]
        estimates = [estimate_command(command, sh, device=opts.device, backend=opts.backend, units=units, **cfg)
                     for sh in shapes]
    run = start_run(out, command.split("-")[0], list(specs), config={**config, "dry_run": True}, seed=opts.seed)
    for e in estimates:
        for text in e.notes:
            run.note(text)
    summary = {"models": [e.as_dict() for e in estimates], "peak_bytes": max(e.peak_bytes for e in estimates),
               "seconds_total": sum(e.seconds_total for e in estimates),
               "fits": None if any(e.fits is None for e in estimates) else all(e.fits for e in estimates)}
    doc = run.finish({}, backend=estimates[0].backend, extra={"estimate": summary})
    console.emit(doc, [estimate_table(command, estimates)], as_json=as_json)


def estimate_table(command: str, estimates: list[Estimate]):
    """One row per model: device, backend, peak memory against the budget, options, time per unit and in all."""
    rows = []
    for e in estimates:
        budget = "—" if e.budget_bytes is None else f"{e.budget_bytes / GB:.1f}"
        fits = "—" if e.fits is None else ("yes" if e.fits else "NO")
        opts = ", ".join(f"{k}={v}" for k, v in e.options.items()) or "—"
        rows.append([e.model, e.device, e.backend, f"{e.peak_bytes / GB:.2f}", budget, fits, opts,
                     f"{e.seconds_per_unit:.3g}", f"{e.units} {e.unit}(s)", _duration(e.seconds_total)])
    cols = ["model", "device", "backend", "peak GiB", "memory GiB", "fits", "options", f"s/{estimates[0].unit}",
            "work", "expected time"]
    return console.table(f"{command} --dry-run: estimated cost (docs/performance.md)", cols, rows)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def plan_checkpoint(loaded, flag: bool | None, **cfg) -> tuple[bool, str | None]:
    """Whether influence checkpoints blocks on this loaded model (flag, or the estimate against the device's
    memory), and the note that says so when the estimate chose it.

    Args:
        loaded: a LoadedModel. flag: --checkpoint/--no-checkpoint (None: decide). cfg: seq_len, targets, draws,
            output.
    """
    if flag is not None:
        return flag, None
    shape = shape_of_model(loaded.model, loaded.name, weight_bytes=4)
    est = estimate_command("influence", shape, device=loaded.device.type, **cfg)
    use = bool(est.options["checkpoint_blocks"])
    if not use:
        return False, None
    return True, (f"{loaded.name}: per-block activation checkpointing on (estimated peak without it "
                  f"{est.inputs['no_checkpoint_peak'] / GB:.1f} GiB > {est.budget_bytes / GB:.1f} GiB of "
                  f"{est.device} memory; with it {est.peak_bytes / GB:.1f} GiB); --no-checkpoint turns it off")
