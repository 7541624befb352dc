"""`ssmdiag info MODEL`: what the checkpoint is, and its A / Ā per layer."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import console
from ..loading import LoadOptions, describe_backend, load_models, resolve_device
from ..metrics.summary import summarize_model
from ..options import (DEFAULT_OUT, BackendOpt, DeviceOpt, DtypeOpt, InitOpt, JsonOpt, ModelArg, OutOpt, QuietOpt,
                       SeedOpt, TokenizerOpt, TrustRemoteCodeOpt)
from ..results import start_run


def main(
    model: ModelArg,
    init: InitOpt = "pretrained",
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    tokenizer: TokenizerOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    backend: BackendOpt = "auto",
    delta: Annotated[Optional[float], typer.Option("--delta", help="Fixed Δ for Ā; default softplus(dt_bias).")] = None,
    out: OutOpt = DEFAULT_OUT,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Describe a checkpoint. Presets are built on the meta device: no weights are allocated."""
    console.set_quiet(quiet)
    opts = LoadOptions(init=init, dtype=dtype, device=device, tokenizer=tokenizer, seed=seed,
                       trust_remote_code=trust_remote_code, backend=backend)
    run = start_run(out, "info", [model], config={**vars(opts), "delta": delta}, seed=seed)
    with run.phase("load"):
        loaded = load_models([model], opts, meta=init == "random")[0]
    run.models = [loaded]
    summary = summarize_model(loaded.adapter, delta=delta)
    backend_used = loaded.backend if loaded.adapter.is_ssm else "n/a (not an SSM)"
    if init == "random" and loaded.adapter.is_ssm:  # meta build: say what a real run on this device would pick
        backend_used = describe_backend(backend, resolve_device(device))
    doc = {"spec": model, "name": loaded.name, "source": loaded.source, "dtype": str(loaded.dtype).split(".")[-1],
           "device": "meta (shapes only)" if init == "random" else str(loaded.device), "backend": backend_used,
           "tokenizer": loaded.describe_tokenizer(), "summary": summary}
    result = run.finish(doc, backend=backend_used)
    rows = [("family", summary.family), ("parameters", f"{summary.parameters:,}"), ("layers", summary.layers),
            ("hidden size", summary.hidden_size), ("d_inner", summary.d_inner), ("d_state", summary.d_state),
            ("heads (Mamba-2)", summary.heads), ("vocab", summary.vocab_size), ("dtype", doc["dtype"]),
            ("device", doc["device"]), ("scan backend", backend_used), ("tokenizer", doc["tokenizer"] or "none")]
    tables = [console.table(f"{model}", ["property", "value"], rows)]
    if summary.layers_a:
        f = console.fmt
        tables.append(console.table(
            f"A and Ā = exp(Δ·A) per layer ({summary.delta_rule})",
            ["layer", "A min", "A median", "A max", "Ā min", "Ā median", "Ā max"],
            [(la.layer, f(la.a_min), f(la.a_median), f(la.a_max), f(la.abar_min), f(la.abar_median), f(la.abar_max))
             for la in summary.layers_a]))
    console.emit(result, tables, as_json=as_json)
