"""The only code that turns a model spec into (model, tokenizer, adapter).

A spec is a local directory (HF format or the original state-spaces format), a hub id, or a built-in
preset name (`--init random`: the published architecture with fresh weights, no download).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hub, model_types, original_format
from .adapters import Adapter, family_of, get_adapter
from .errors import SsmdiagError
from .kinds import kind_of_family
from .presets import Preset, all_presets, build_config, find_preset
from .runtime import resolve_device
from .naming import slugify

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class LoadedModel:
    """A model ready for diagnosis, with where it came from; a hub tokenizer loads on first use of `tokenizer`."""

    model: nn.Module
    adapter: Adapter
    spec: str
    name: str
    family: str
    source: str  # "local" | "original" | "hub" | "preset"
    revision: str | None
    weights_hash: str | None
    dtype: torch.dtype
    device: torch.device
    config: Any
    backend: str = "hf"
    notes: list[str] = field(default_factory=list)
    tokenizer_source: str | None = None  # a directory or hub id
    tokenizer_explicit: bool = False  # given with --tokenizer: failing to load it is an error
    load_s: float = 0.0  # wall seconds spent loading the model and its tokenizer

    @cached_property
    def tokenizer(self) -> Any | None:
        """The tokenizer, loaded on first use (None when it cannot be had); its load time adds to `load_s`."""
        t0 = time.perf_counter()
        try:
            return _load_tokenizer(self.tokenizer_source, quiet_missing=not self.tokenizer_explicit)
        finally:
            self.load_s += time.perf_counter() - t0

    def describe_tokenizer(self) -> str | None:
        """The tokenizer's class name, or the hub id it will load from when a command needs it; None if none."""
        if "tokenizer" not in self.__dict__ and self.tokenizer_source is not None:
            return f"{self.tokenizer_source} (hub, loaded on use)"
        return type(self.tokenizer).__name__ if self.tokenizer is not None else None


def quiet_transformers() -> None:
    """transformers' own progress bars and kernel-fallback warnings would drown our stderr; ssmdiag reports its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# --- devices and dtypes -----------------------------------------------------------------------
def resolve_dtype(dtype: str, config: Any = None) -> torch.dtype:
    """'auto' -> the checkpoint's own dtype when it states one, else float32."""
    dtype = (dtype or "auto").lower()
    if dtype == "auto":
        stated = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) if config is not None else None
        if isinstance(stated, torch.dtype):
            return stated
        return DTYPES.get(str(stated).replace("torch.", ""), torch.float32)
    if dtype not in DTYPES:
        raise SsmdiagError(f"unknown dtype '{dtype}'", hint="use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


# --- spec resolution --------------------------------------------------------------------------
def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))


def _weights_fingerprint(directory: Path) -> str | None:
    """sha256 over each weight file's name, size and first/last MiB (fast even for 14 GB checkpoints)."""
    files = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return "sha256-fp:" + h.hexdigest()[:32]


def _check_local_dir(path: Path) -> str:
    """Classify a directory: 'hf' or 'original'; raise a clear error if it is neither."""
    if not path.exists():
        raise SsmdiagError(f"path '{path}' does not exist", hint="pass a checkpoint directory, hub id or preset name")
    if not path.is_dir():
        raise SsmdiagError(f"'{path}' is a file, not a checkpoint directory",
                           hint="pass the directory holding config.json and the weights")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SsmdiagError(f"'{path}' is not a checkpoint: it has no config.json",
                           hint="pass a directory written by save_pretrained or an original state-spaces checkpoint")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SsmdiagError(f"'{cfg_file}' is not valid JSON ({exc})") from None
    if not any(p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json") for p in path.iterdir()):
        raise SsmdiagError(f"'{path}' has a config.json but no weights (*.safetensors or *.bin)")
    if "model_type" in cfg:
        return "hf"
    if "d_model" in cfg and "n_layer" in cfg:
        return "original"
    raise SsmdiagError(f"'{path}/config.json' is neither a transformers config (no model_type) "
                       "nor an original state-spaces config (no d_model/n_layer)")


def _check_family(config: Any, spec: str) -> str:
    model_types.check_causal_lm(str(getattr(config, "model_type", "?")), config.to_dict(), spec)
    return family_of(config)


def _is_local(source: str | Path | None) -> bool:
    """Whether a tokenizer source is absent or a local directory (loading it needs no network)."""
    return source is None or Path(str(source)).expanduser().is_dir()


def _load_tokenizer(source: str | Path | None, quiet_missing: bool = True):
    """A tokenizer from a dir or hub id (cache only when the hub is offline); None if it cannot be had.

    Args:
        source: a tokenizer directory or hub id (None: no tokenizer).
        quiet_missing: return None instead of raising when it cannot be loaded.
    """
    if source is None:
        return None
    from transformers import AutoTokenizer

    local = _is_local(source)
    if not local:
        hub.prepare()
    timer = contextlib.nullcontext() if local else hub.waiting()
    try:
        with timer:
            return AutoTokenizer.from_pretrained(str(source))
    except Exception as exc:  # noqa: BLE001 - any failure means "no tokenizer here"
        if quiet_missing:
            return None
        why = None if local else hub.why_offline()
        reason = f"{why} and it is not in the local cache" if why else type(exc).__name__
        raise SsmdiagError(f"cannot load tokenizer '{source}' ({reason})",
                           hint="pass a local tokenizer directory, or allow hub access") from None


def _from_pretrained_dir(path: Path, dtype: str, device_map: str | None, trust_remote_code: bool):
    """Load an HF-format checkpoint directory (safetensors first, sharded included)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((path / "config.json").read_text())  # judged before transformers reads it (model_types.py)
    model_types.check_known_type(raw.get("model_type"), raw, str(path), trust_remote_code)
    model_types.check_causal_lm(str(raw.get("model_type")), raw, str(path))
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise SsmdiagError(f"'{path}' needs its own Python code to load",
                               hint="review that code, then pass --trust-remote-code") from None
        raise SsmdiagError(f"cannot read the config in '{path}': {str(exc).splitlines()[0]}") from None
    family = _check_family(config, str(path))
    torch_dtype = resolve_dtype(dtype, config)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - safetensors/pickle/shape errors: the files, not our code
        raise original_format.weights_error(exc, path) from None
    return model, config, family


def _from_preset(preset: Preset, seed: int, dtype: str, meta: bool):
    """Build a preset's architecture with transformers' own initialisation (seeded) or on the meta device."""
    from transformers import AutoModelForCausalLM

    config = build_config(preset)
    torch_dtype = resolve_dtype(dtype if dtype != "auto" else "float32")
    if meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        _materialize_ssm_parameters(model, seed)
    else:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    return model, config, family_of(config)


# the SSM parameters `info` reads (A, D, Δ bias; Mamba-1's dt_proj.bias below); the rest stays on the meta device
_SSM_SMALL_PARAMS = ("A_log", "D", "dt_bias", "dt_proj_bias")


def _materialize_ssm_parameters(model: nn.Module, seed: int) -> None:
    """On a meta-device model, give each SSM mixer real A_log / D / Δ-bias values from its own init (small).

    The mixer's own init method when it has one (Mamba, Mamba-2, FalconMamba, Bamba, Falcon-H1), else the
    model's `_init_weights` on just that mixer (Jamba, Zamba, Zamba2, Nemotron-H, Granite-4.0-H): the same
    values `from_config` would give those parameters.
    """
    torch.manual_seed(seed)
    _materialize_kind_decays(model)
    for mixer in model.modules():
        if not isinstance(getattr(mixer, "A_log", None), nn.Parameter):
            continue
        owners = [(mixer, name) for name in _SSM_SMALL_PARAMS]
        if isinstance(getattr(mixer, "dt_proj", None), nn.Linear):
            owners.append((mixer.dt_proj, "bias"))  # its weight's init is a no-op on the meta device
        for owner, pname in owners:
            param = getattr(owner, pname, None)
            if isinstance(param, nn.Parameter):
                setattr(owner, pname, nn.Parameter(torch.empty(param.shape, dtype=torch.float32)))
        own = [getattr(mixer, n) for n in dir(type(mixer)) if n.startswith("init_") and n.endswith("_weights")]
        if own:
            own[0]()
            continue
        with torch.no_grad():
            model._init_weights(mixer)
            if isinstance(getattr(mixer, "dt_proj", None), nn.Linear):
                model._init_weights(mixer.dt_proj)


def load_model(
    spec: str,
    *,
    init: str = "pretrained",
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    tokenizer: str | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    meta: bool = False,
    backend: str = "auto",
) -> LoadedModel:
    """Turn a spec into a model in eval mode, its tokenizer (or None) and its adapter.

    Args:
        spec: local directory, hub id, or preset name / preset hub id (with init="random").
        init: "pretrained" loads weights; "random" builds a built-in preset with fresh weights.
        meta: build on the meta device (shapes only, no memory) — for `info` on huge presets.
        backend: scan backend for SSM mixers ("auto" | "torch" | "cuda" | "ref" | "hf" = transformers' own).
    """
    t0 = time.perf_counter()
    quiet_transformers()
    if init not in ("pretrained", "random"):
        raise SsmdiagError(f"unknown --init '{init}'", hint="use pretrained or random")
    if device_map not in (None, "auto"):
        raise SsmdiagError(f"unsupported --device-map '{device_map}'", hint="use --device-map auto")
    if device_map and importlib.util.find_spec("accelerate") is None:
        raise SsmdiagError("--device-map needs the accelerate package", hint="pip install accelerate")
    dev = resolve_device(device) if not meta else torch.device("meta")
    tok_source: Any = tokenizer
    revision = None
    path = Path(spec).expanduser()
    if init == "random":
        preset = find_preset(spec)
        if preset is None:
            raise SsmdiagError(f"unknown preset '{spec}'",
                               hint=f"presets: {', '.join(all_presets())} (or drop --init random to load weights)")
        if device_map:
            raise SsmdiagError("--device-map needs pretrained weights", hint="drop --device-map with --init random")
        model, config, family = _from_preset(preset, seed, dtype, meta)
        source, name, weights_hash, revision = "preset", preset.name, f"random:{preset.name}:seed={seed}", "random-init"
        tok_source = tokenizer or preset.tokenizer
    else:
        if path.exists() or spec.startswith((".", "/", "~")) or not _looks_like_hub_id(spec):
            if not path.exists() and find_preset(spec):
                preset = find_preset(spec)
                path, revision = hub.download(preset.hub_id, preset)
            else:
                _check_local_dir(path)
        else:
            path, revision = hub.download(spec, find_preset(spec))
        kind = _check_local_dir(path)
        if kind == "original":
            model, config, family = original_format.load(path, resolve_dtype(dtype))
            source = "original"
        else:
            model, config, family = _from_pretrained_dir(path, dtype, device_map, trust_remote_code)
            source = "hub" if revision else "local"
            tok_source = tokenizer or path
        name = slugify(spec)
        weights_hash = _weights_fingerprint(path)
    if not meta and not device_map:
        model.to(dev)
    model.eval()
    loaded = LoadedModel(
        model=model, adapter=get_adapter(model), spec=spec, name=name, family=family, source=source,
        revision=revision, weights_hash=weights_hash, dtype=next(model.parameters()).dtype,
        device=next(model.parameters()).device, config=config,
        tokenizer_source=None if tok_source is None else str(tok_source), tokenizer_explicit=tokenizer is not None,
    )
    if tokenizer is not None or _is_local(tok_source):
        _ = loaded.tokenizer  # local or asked for: load now; a preset's hub tokenizer waits until a command needs it
    if loaded.adapter.is_ssm and not meta:
        loaded.backend = install_kernels(model, backend)
        if loaded.backend != "hf":
            from .kernels.mlstm_layer import lift_piecewise_inference

            loaded.notes += lift_piecewise_inference(model)
    loaded.load_s = time.perf_counter() - t0
    return loaded


def install_kernels(model: nn.Module, backend: str) -> str:
    """Route SSM mixers through ssmdiag's scan kernels (unless backend == 'hf'); return the backend used."""
    if backend == "hf":
        return "hf"
    from .kernels import mixer  # local import: numba is loaded only when a scan runs

    return mixer.install(model, backend=backend)


def describe_backend(backend: str, device: torch.device) -> str:
    """The scan backend an SSM on `device` would run with."""
    if backend == "hf":
        return "hf"
    from .kernels import resolve_backend

    return resolve_backend(backend, device, need_states=False)


def require_tokenizer(loaded: LoadedModel):
    """The model's tokenizer (loaded now if it comes from the hub), or a clear error saying how to supply one.

    Args:
        loaded: the model whose tokenizer the command needs.
    """
    if loaded.tokenizer is not None:
        return loaded.tokenizer
    why = None if _is_local(loaded.tokenizer_source) else hub.why_offline()
    if why:
        raise SsmdiagError(f"{loaded.spec} needs the tokenizer '{loaded.tokenizer_source}', but {why} and it is "
                           "not in the local cache", hint="pass --tokenizer DIR (a local copy of the tokenizer), "
                           "or run once with hub access to cache it")
    hint = "pass --tokenizer ID_OR_DIR (the Mamba family uses the GPT-NeoX tokenizer, EleutherAI/gpt-neox-20b)"
    raise SsmdiagError(f"{loaded.spec} has no tokenizer and this command needs one", hint=hint)


@dataclass
class LoadOptions:
    """The model-loading flags every command shares."""

    init: str = "pretrained"
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    tokenizer: str | None = None
    seed: int = 0
    trust_remote_code: bool = False
    backend: str = "auto"


def _materialize_kind_decays(model: nn.Module) -> None:
    """A registered kind's decay parameters (kinds.RecurrentKind.decay_params) from the model's own `_init_weights`."""
    kind = kind_of_family(getattr(model.config, "model_type", ""))
    if kind is None or not kind.decay_params:
        return
    for layer in [m for m in model.modules() if type(m).__name__ in kind.classes]:
        for dotted in kind.decay_params:
            path, _, name = dotted.rpartition(".")
            owner = layer.get_submodule(path) if path else layer
            param = getattr(owner, name)
            if param.is_meta:
                setattr(owner, name, nn.Parameter(torch.empty(param.shape, dtype=torch.float32)))
                with torch.no_grad():
                    model._init_weights(owner)
