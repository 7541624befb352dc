"""Which checkpoints ssmdiag can diagnose, judged from the `model_type` in config.json before any weights load.

ssmdiag diagnoses causal language models.  transformers lists some encoder families (BERT, RoBERTa, …) and
encoder-decoders (BART, …) among its causal LMs because each has a decoder-only variant; their checkpoints are
causal only when their config says so (`is_decoder`, XLM's `causal`), so any other is refused by name.
"""

from __future__ import annotations

from typing import Any

from .adapters import SUPPORTED_FAMILIES
from .errors import SsmdiagError


def _supported_hint() -> str:
    return (f"ssmdiag diagnoses causal language models: {', '.join(SUPPORTED_FAMILIES)} and any transformers "
            "…ForCausalLM checkpoint (for the views that need no SSM internals)")


def _mappings():
    from transformers.models.auto import modeling_auto as auto

    return (set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
            set(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES))


def check_causal_lm(model_type: str, settings: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint whose model_type is not a causal LM (or is an encoder / encoder-decoder not set up as a
    decoder), naming its model_type.

    Args:
        model_type: config.json's model_type.  settings: the config's values (a dict, or vars() of a config).
        where: the checkpoint, for the message.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type in SUPPORTED_FAMILIES:
        return
    auto_map = settings.get("auto_map") or {}
    if model_type not in CONFIG_MAPPING_NAMES:  # custom code: its auto_map says which classes it has
        if auto_map and "AutoModelForCausalLM" not in auto_map:
            raise SsmdiagError(f"unsupported architecture '{model_type}' in {where}: ssmdiag diagnoses causal "
                               "language models, and this checkpoint's code defines no AutoModelForCausalLM",
                               hint=_supported_hint())
        return
    causal, masked, seq2seq = _mappings()
    as_decoder = bool(settings.get("is_decoder") or settings.get("causal"))
    if model_type in causal and (as_decoder or model_type not in masked | seq2seq):
        return
    what = ("an encoder-decoder" if model_type in seq2seq else "an encoder (masked language model)"
            if model_type in masked else "not a causal language model")
    raise SsmdiagError(f"unsupported architecture '{model_type}' in {where}: ssmdiag diagnoses causal language "
                       f"models, and this {model_type} checkpoint is {what}", hint=_supported_hint())


def check_known_type(model_type: str | None, cfg: dict[str, Any], where: str, trust_remote_code: bool) -> None:
    """Refuse a model_type the installed transformers does not know, saying what to do: upgrade transformers, or
    pass --trust-remote-code for a checkpoint that ships its own code (an `auto_map` in config.json).

    Args:
        model_type: config.json's model_type (None: not stated; transformers' own error then applies).
        cfg: config.json as a dict.  where: the checkpoint, for the message.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type is None or model_type in CONFIG_MAPPING_NAMES:
        return
    if cfg.get("auto_map"):
        if trust_remote_code:
            return
        raise SsmdiagError(f"'{where}' has model_type '{model_type}', defined by the checkpoint's own Python code "
                           "(auto_map in config.json)", hint="review that code, then pass --trust-remote-code")
    import transformers

    raise SsmdiagError(f"'{where}' has model_type '{model_type}', which transformers {transformers.__version__} does "
                       "not know", hint="if it is newer than this transformers, upgrade transformers (ssmdiag is "
                       "tested up to the version pyproject.toml pins); if it is custom code, its config.json needs "
                       "an auto_map and the command --trust-remote-code")
