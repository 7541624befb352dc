"""Loading models for a command: the loader behind a spinner on stderr."""

from __future__ import annotations

from .. import console
from ..loading import LoadedModel, LoadOptions, load_model


def load_models(specs: list[str], opts: LoadOptions, meta: bool = False) -> list[LoadedModel]:
    """Load several models with the same options, with a spinner on stderr while each loads."""
    loaded = []
    for spec in specs:
        with console.status(f"loading {spec} ({'random init' if opts.init == 'random' else 'weights'}) …"):
            loaded.append(load_model(
                spec, init=opts.init, dtype=opts.dtype, device=opts.device, device_map=opts.device_map,
                tokenizer=opts.tokenizer, seed=opts.seed, trust_remote_code=opts.trust_remote_code, meta=meta,
                backend=opts.backend))
        for message in loaded[-1].notes:  # what loading changed for ssmdiag's path (e.g. xLSTM's inference pieces)
            console.log(message)
    return loaded
