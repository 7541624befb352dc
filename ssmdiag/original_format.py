"""The original state-spaces checkpoint format (config.json with d_model/n_layer/ssm_cfg, pytorch_model.bin).

`state-spaces/mamba-130m` … `mamba-2.8b` and `mamba2-*` ship this format; we convert it in memory to the
matching transformers class (MambaForCausalLM / Mamba2ForCausalLM) by renaming a handful of keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import SsmdiagError

# original name -> transformers name; every other key is identical in both formats
_RENAMES = {"backbone.embedding.weight": "backbone.embeddings.weight"}


def _padded_vocab(cfg: dict[str, Any]) -> int:
    vocab, multiple = int(cfg["vocab_size"]), int(cfg.get("pad_vocab_size_multiple", 8) or 1)
    return vocab + (-vocab) % multiple


def to_hf_config(cfg: dict[str, Any]):
    """A MambaConfig or Mamba2Config equivalent to an original config.json."""
    from transformers import Mamba2Config, MambaConfig

    ssm = dict(cfg.get("ssm_cfg") or {})
    if not cfg.get("rms_norm", True):
        raise SsmdiagError("original checkpoint uses LayerNorm (rms_norm=false), which transformers' Mamba lacks",
                           hint="convert it with a LayerNorm-capable tool; only rms_norm=true is supported")
    common = dict(
        hidden_size=int(cfg["d_model"]), num_hidden_layers=int(cfg["n_layer"]), vocab_size=_padded_vocab(cfg),
        expand=int(ssm.get("expand", 2)), conv_kernel=int(ssm.get("d_conv", 4)),
        use_bias=bool(ssm.get("bias", False)), use_conv_bias=bool(ssm.get("conv_bias", True)),
        residual_in_fp32=bool(cfg.get("residual_in_fp32", True)), layer_norm_epsilon=float(cfg.get("norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(cfg.get("tie_embeddings", True)), pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )
    if ssm.get("layer", "Mamba1") == "Mamba2":
        headdim = int(ssm.get("headdim", 64))
        return Mamba2Config(
            **common, state_size=int(ssm.get("d_state", 128)), head_dim=headdim,
            num_heads=common["expand"] * common["hidden_size"] // headdim, n_groups=int(ssm.get("ngroups", 1)),
            chunk_size=int(ssm.get("chunk_size", 256)),
        )
    return MambaConfig(**common, state_size=int(ssm.get("d_state", 16)), time_step_rank=ssm.get("dt_rank", "auto"))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    st = sorted(path.glob("*.safetensors"))
    try:
        if st:
            from safetensors.torch import load_file

            sd: dict[str, torch.Tensor] = {}
            for f in st:
                sd.update(load_file(f))
            return sd
        bins = sorted(path.glob("pytorch_model*.bin")) or sorted(path.glob("*.bin"))
        if not bins:
            raise SsmdiagError(f"'{path}' has no pytorch_model.bin or *.safetensors")
        sd = {}
        for f in bins:  # weights_only: a .bin must never run code
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
        return sd
    except SsmdiagError:
        raise
    except Exception as exc:  # noqa: BLE001 - pickle/zip/safetensors errors all mean a bad file
        raise weights_error(exc, path) from None


def weights_error(exc: Exception, path: Path) -> SsmdiagError:
    """The user-facing error for weights that would not load: unsafe pickles named as such, never a hint to unpickle."""
    text = str(exc)
    if "Weights only load failed" in text or "weights_only" in text:
        return SsmdiagError(f"refused to load the weights in '{path}': they contain pickled objects that are not "
                            "plain tensors (unsafe to unpickle)",
                            hint="convert the checkpoint to safetensors where it was made, or use a trusted copy")
    first = (text.strip().splitlines() or [type(exc).__name__])[0][:200]
    if isinstance(exc, ImportError) or "pip install" in text:  # e.g. transformers 5.25 without the `kernels` package
        import transformers

        return SsmdiagError(f"transformers {transformers.__version__} could not load '{path}': {first}",
                            hint="install the package it names, or use a transformers release in pyproject.toml's "
                                 "range (tested; docs/install.md says why it stops below 5.25)")
    if "size mismatch" in text or "shape" in first or "mismatched_sizes" in text:
        return SsmdiagError(f"the weights in '{path}' do not match its config.json: {first}",
                            hint="check that config.json belongs to these weights")
    return SsmdiagError(f"cannot load the weights in '{path}': {first}",
                        hint="the weights file may be corrupt or truncated; re-download or re-save it")


def load(path: Path, dtype: torch.dtype):
    """Load an original-format dir as a transformers model: (model, config, family)."""
    from transformers import AutoModelForCausalLM

    cfg = json.loads((path / "config.json").read_text())
    config = to_hf_config(cfg)
    sd = {_RENAMES.get(k, k): v for k, v in _read_state_dict(path).items()}
    rows = sd.get("backbone.embeddings.weight")
    if rows is not None and rows.shape[0] < int(cfg["vocab_size"]):  # ids the tokenizer emits would have no row
        raise SsmdiagError(f"the embedding in '{path}' has {rows.shape[0]} rows but its config.json says vocab_size "
                           f"{cfg['vocab_size']}: token ids {rows.shape[0]}-{int(cfg['vocab_size']) - 1} would have no "
                           "embedding", hint="check that config.json belongs to these weights (a truncated "
                           "embedding or another model's config)")
    if rows is not None and rows.shape[0] != config.vocab_size:  # more rows than the vocab: padding varies, rows win
        config.vocab_size = int(rows.shape[0])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()
        raise SsmdiagError(f"'{path}' does not match its config: {(first[1] if len(first) > 1 else first[0]).strip()}",
                           hint="check that config.json belongs to these weights") from None
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SsmdiagError(f"'{path}' does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.to(dtype), config, config.model_type


def save(model, path: Path) -> None:
    """Write a transformers Mamba/Mamba-2 model in the original state-spaces format (inverse of `load`)."""
    config = model.config
    path.mkdir(parents=True, exist_ok=True)
    ssm: dict[str, Any] = {"d_state": config.state_size, "d_conv": config.conv_kernel, "expand": config.expand,
                           "bias": config.use_bias, "conv_bias": config.use_conv_bias}
    if config.model_type == "mamba2":
        ssm.update(layer="Mamba2", headdim=config.head_dim, ngroups=config.n_groups, chunk_size=config.chunk_size)
    else:
        ssm["dt_rank"] = config.time_step_rank
    cfg = {"d_model": config.hidden_size, "n_layer": config.num_hidden_layers, "vocab_size": config.vocab_size,
           "ssm_cfg": ssm, "rms_norm": True, "residual_in_fp32": bool(getattr(config, "residual_in_fp32", True)),
           "fused_add_norm": True, "pad_vocab_size_multiple": 8 if config.vocab_size % 8 == 0 else 1, "tie_embeddings": config.tie_word_embeddings}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    inverse = {v: k for k, v in _RENAMES.items()}
    sd = {inverse.get(k, k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, path / "pytorch_model.bin")
