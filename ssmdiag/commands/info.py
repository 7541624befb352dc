"""`ssmdiag info MODEL`: what the checkpoint is, and its A / Ā per layer."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import console
from ..loading import LoadOptions, describe_backend
from ..runtime import resolve_device
from ._load import load_models
from ..metrics.summary import summarize_model
from ..options import (DEFAULT_OUT, Backend, BackendOpt, DeviceOpt, Dtype, DtypeOpt, Init, InitOpt, JsonOpt, ModelArg,
                       OutOpt, QuietOpt, SeedOpt, TokenizerOpt, TrustRemoteCodeOpt)
from ..results import start_run
from ._report_layers import info_tables


def main(
    model: ModelArg, init: InitOpt = Init.pretrained, seed: SeedOpt = 0, dtype: DtypeOpt = Dtype.auto,
    device: DeviceOpt = "auto", tokenizer: TokenizerOpt = None, trust_remote_code: TrustRemoteCodeOpt = False,
    backend: BackendOpt = Backend.auto,
    delta: Annotated[Optional[float], typer.Option("--delta", help="Fixed Δ for Ā; default softplus(dt_bias).")] = None,
    out: OutOpt = DEFAULT_OUT, as_json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Describe a checkpoint. Presets are built on the meta device: no weights are allocated."""
    console.set_quiet(quiet)
    meta = init is Init.random  # a preset: shapes only
    opts = LoadOptions(init=init.value, dtype=dtype.value, device=device, tokenizer=tokenizer, seed=seed,
                       trust_remote_code=trust_remote_code, backend=backend.value)
    run = start_run(out, "info", [model], config={**vars(opts), "delta": delta}, seed=seed)
    with run.phase("load"):
        loaded = load_models([model], opts, meta=meta)[0]
    run.models = [loaded]
    summary = summarize_model(loaded.adapter, delta=delta)
    backend_used = loaded.backend if loaded.adapter.is_ssm else "n/a (not an SSM)"
    if meta and loaded.adapter.is_ssm:  # say what a real run on this device would pick
        backend_used = describe_backend(backend.value, resolve_device(device))
    doc = {"spec": model, "name": loaded.name, "source": loaded.source, "dtype": str(loaded.dtype).split(".")[-1],
           "device": "meta (shapes only)" if meta else str(loaded.device), "backend": backend_used,
           "tokenizer": loaded.describe_tokenizer(), "summary": summary}
    result = run.finish(doc, backend=backend_used)
    console.emit(result, info_tables(model, summary, doc), as_json=as_json)
