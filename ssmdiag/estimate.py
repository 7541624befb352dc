"""What a command will cost before it runs: peak memory and seconds, from the model's config alone.

API (used by every `--dry-run` and by `ssmdiag length`):

    shape = model_shape("mamba-codestral-7b", init="random")           # meta device: no weights read
    est = estimate_command("influence", shape, seq_len=16384, device="cuda")
    est.peak_bytes, est.seconds_per_unit, est.unit, est.fits, est.options, est.inputs

`estimate_command(command, shape, **cfg)` knows influence, smooth, robust, needle, polarize-train and length;
`cfg` are the command's own numbers (seq_len, samples, targets, …; see each `_cost_*`); every number the formula
used is in `est.inputs`, so a user (and docs/performance.md) can redo the sum.

The memory model (bytes; letters of docs/architecture.md, L_s SSM layers, L blocks, f = 4 float32 bytes):

    peak = R0 + W + stored + transient (+ outputs)
    W          = parameters × bytes per weight (influence upcasts to float32)
    stored     = influence / training: what autograd keeps for the backward,
                 L_s · l · KEEP · d · f   (+ the numba engines' state checkpoints, L_s · l/K · d · n · 4;
                 + the chunked SSD's decay matrices, L_s · KEEP_SSD · l · h · q · 4);
                 with per-block activation checkpointing only the block inputs, L · l · e · f, plus one block's
    transient  = the largest single-layer scan intermediate (delta rule: estimate_delta.py): numba ~ l·d·f·TRN_NUMBA;
                 chunked Mamba-1: T_M1 · l · d · n · 4; chunked SSD: T_SSD · l · h · q · 4 (q = SSD chunk)
    influence  = the larger of that and the Ā bound's pass: R0 + W + L_s · l · d · 4 (every layer's Δ; Mamba-2: h)
                 + one layer's forward
    smooth     = one layer's forward + its recorded states (S positions · d · n · 4 · STATES_K) + pairwise
                 sharpness (l² · 4 · PAIR_K up to 4096 tokens)

KEEP, T_M1, T_SSD, TRN_NUMBA, STATES_K, PAIR_K and R0 were fitted to peak RSS measured on CPU with both
engines (bench/memory.py; docs/performance.md gives the points and the fit error).  Seconds: FLOPs (2 per
parameter per token forward, ×3 with a backward, plus the scans and the pairwise distances) divided by a
rate: on CPU the FLOP per CPU-second measured with `bench/memory.py --rate` (CPU time, so other jobs on the
machine do not bias it) times the threads, at an assumed parallel efficiency; on a GPU an ASSUMPTION,
GPU_FLOPS below, never measured here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from . import estimate_delta as ed
from .errors import SsmdiagError

GiB = 1 << 30
# --- fitted on CPU peak RSS (bench/memory.py, docs/performance.md) -------------------------------------------
R0 = 0.45 * GiB  # the process before a model: python, torch, transformers, numba, matplotlib
KEEP = {"mamba1": 9.5, "mamba2": 10.0, "attention": 12.0,  # floats kept for backward per layer, token and d
        "delta": 10.0, "delta_channel": 14.0}  # delta: around its kernel (estimate_delta.py has the kernel's), d = h·p
TRN_NUMBA = 8.0  # one layer's backward transient in floats per token and channel (numba engines, cuda)
T_M1 = 6.7  # (l, d, n) float32 tensors alive at once in the chunked Mamba-1 backward
CKPT_KEEP = 1.0  # floats per block, token and e kept with per-block checkpointing (the block input; CPU: checkpoint.py)
KEEP_SSD = 3.5  # (l, h, q) float32 tensors the chunked SSD keeps per layer for the backward
T_SSD = 7.0  # (l, h, q) float32 tensors alive at once in the chunked SSD backward
FWD_K = 6.0  # one layer's no-grad forward transient, floats per token and channel
STATES_K = 3.0  # recorded states held at once while smooth reduces them (states, centred copy, norms)
PAIR_K = 3.0  # (l, l) float32 matrices of the exact pairwise sharpness
NUMBA_CKPT = {"mamba1": 32, "mamba2": 64}  # the numba backward's checkpoint interval K (steps)
STATE_BUDGET = 4 * GiB  # metrics.smoothing.STATE_BUDGET: one layer's recorded states
EXACT_MAX_TOKENS = 4096  # metrics.smoothing: exact pairs up to here
SSD_STATE_BLOCK = 1 * GiB  # kernels.ssd: positions' states are computed in blocks under this many bytes
# --- time ---------------------------------------------------------------------------------------------------
CPU_FLOPS_PER_CORE = 4.5e10  # FLOP per CPU-second, float32 forward / influence on mamba-130m (bench/memory.py --rate)
CPU_PARALLEL = 0.75  # ASSUMED efficiency of torch's intra-op threads: wall rate = per-core × threads × this
CHUNKED_CPU_SLOWDOWN = 10.0  # chunked / numba seconds, influence on mamba-130m at 512 tokens (one run, same load)
GPU_FLOPS = {"float32": 2.0e13, "half": 8.0e13}  # ASSUMED effective rates (TF32 / bf16 on an A100/H100-class GPU)
ASSUMED_GPU_MEMORY = 80 * 10**9  # an "80 GB" GPU, for a `--device cuda` plan made on a machine without one
GPU_CONTEXT = 1.0 * GiB  # ASSUMED CUDA context and allocator slack
SCAN_FLOPS = 10.0  # per token, channel and state entry (exp, multiply, add, the C contraction)
GEN_OVERHEAD_S = {"cpu": 0.004, "cuda": 0.0015}  # ASSUMED seconds per generated token per block (Python loop)


@dataclass
class ModelShape:
    """The sizes a cost depends on, read from a config (meta device, no weights)."""

    name: str
    model_type: str
    params: int
    embed_params: int
    layers: int  # blocks L
    ssm_layers: int  # L_s
    attn_layers: int
    hidden: int  # e
    d_inner: int  # d (0 without SSM layers; delta: h·p)
    d_state: int  # n (delta: the key dim)
    heads: int  # Mamba-2 h (0 for Mamba-1 kinds; delta: value heads)
    chunk: int  # Mamba-2 SSD chunk q (delta: its kernel's chunk)
    vocab: int
    ssm_kind: str | None  # "mamba1" | "mamba2" | "delta" (gated delta rule, α per head) | "delta_channel" | None
    weight_bytes: int  # bytes per weight as loaded (--dtype auto: the checkpoint's own; presets float32)
    recurrence: str | None = None  # a registered kind (kinds/), costed as "mamba1"


@dataclass
class Estimate:
    """A command's predicted cost on one device: what `--dry-run` prints and result.json's `estimate`."""

    command: str
    model: str
    device: str  # "cpu" | "cuda"
    backend: str  # "cuda" | "torch:numba" | "torch:chunked" | "ref"
    peak_bytes: int
    unit: str  # "sample" | "cell" | "step"
    units: int
    seconds_per_unit: float
    seconds_total: float
    budget_bytes: int | None
    fits: bool | None
    options: dict = field(default_factory=dict)  # what the run turns on, e.g. {"checkpoint_blocks": True}
    inputs: dict = field(default_factory=dict)  # every number the formula used
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        doc = asdict(self)
        doc[f"seconds_per_{self.unit}"] = self.seconds_per_unit
        return doc


# --- the shape --------------------------------------------------------------------------------------------
def model_shape(spec: str, init: str = "pretrained", dtype: str = "auto", trust_remote_code: bool = False) -> ModelShape:
    """A model's sizes from its config alone: built on the meta device (no weights are read or allocated).

    Args:
        spec: preset name, local checkpoint dir, or hub id (only its config.json is fetched).
        init: "random" builds a preset; "pretrained" reads the checkpoint's config (a preset's own for presets).
        dtype: the --dtype the run would use ("auto": the checkpoint's, float32 for presets).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .loading import quiet_transformers
    from .presets import build_config, find_preset

    quiet_transformers()
    preset = find_preset(spec)
    if preset is not None and (init == "random" or not _is_dir(spec)):
        config = build_config(preset)
        default_bytes = 4
    else:
        try:
            config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - offline hub, bad dir: the user's to fix
            raise SsmdiagError(f"--dry-run cannot read the config of '{spec}': {str(exc).splitlines()[0]}",
                               hint="pass a preset name, a local checkpoint dir, or run with hub access") from None
        default_bytes = _dtype_bytes(str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return shape_of_model(model, spec, default_bytes if dtype == "auto" else _dtype_bytes(dtype))


def shape_of_model(model, name: str, weight_bytes: int | None = None) -> ModelShape:
    """The ModelShape of a built model (real or meta device).  weight_bytes: default its parameters' dtype."""
    from .adapters import get_adapter

    ad = get_adapter(model)
    pattern = ad.layer_pattern()
    emb = ad.embedding()
    params = sum(p.numel() for p in model.parameters())
    head = ad.lm_head()
    embed = emb.weight.numel() + (head.weight.numel() if head is not None and head.weight is not emb.weight else 0)
    mixer = ad.ssm_mixer(ad.blocks()[ad.ssm_layers()[0]]) if ad.is_ssm else None
    if weight_bytes is None:
        weight_bytes = next(model.parameters()).element_size()
    return ModelShape(
        name=name, model_type=ad.model_type, params=int(params), embed_params=int(embed), layers=len(pattern),
        ssm_layers=len(ad.ssm_layers()), attn_layers=sum(k in "APS" for k in pattern), hidden=ad.hidden_size,
        d_inner=int(ad.d_inner or 0), d_state=int(ad.d_state or 0), heads=int(ad.n_heads or 0),
        chunk=int(getattr(mixer, "chunk_size", 256) or 256) if ad.ssm_kind == "mamba2" else
        ed.CHUNK if ad.ssm_kind == "delta" else 0,
        vocab=int(emb.num_embeddings), ssm_kind=None if not ad.is_ssm else ed.shape_kind(ad, mixer) if
        ad.ssm_kind == "delta" else ("mamba2" if ad.ssm_kind == "mamba2" else "mamba1"), weight_bytes=int(weight_bytes),
        recurrence=ad.recurrent_kind.kind if ad.recurrent_kind is not None else None)


def _is_dir(spec: str) -> bool:
    from pathlib import Path

    return Path(spec).expanduser().is_dir()


def _dtype_bytes(name: str) -> int:
    return 2 if any(k in name for k in ("bfloat16", "float16", "half")) else 4


# --- the device -------------------------------------------------------------------------------------------
def device_and_backend(device: str = "auto", backend: str = "auto") -> tuple[str, str]:
    """("cpu" | "cuda", scan label) a run with these flags would use on this machine (or, for an explicit
    `--device cuda` on a machine without one, on a GPU: cuda if mamba-ssm imports here, else torch:chunked)."""
    import torch

    from .kernels import backend as kb

    dev = (device or "auto").lower()
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev.split(":")[0]
    if backend in ("ref", "hf"):
        return kind, backend
    if kind == "cuda":
        return kind, "cuda" if backend in ("auto", "cuda") and kb.mamba_ssm_available() else "torch:chunked"
    return kind, f"torch:{kb.torch_engine('cpu')}"


def memory_budget(device: str) -> int | None:
    """Bytes available on this machine's `device` (None when that device is not here)."""
    import torch

    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None
    try:
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return None


# --- the pieces -------------------------------------------------------------------------------------------
def _scan_transient(s: ModelShape, l: int, engine: str, backward: bool) -> float:
    """Bytes of the largest single-layer scan intermediate."""
    if s.ssm_kind is None:
        return FWD_K * l * s.hidden * 4
    if ed.is_delta(s):  # one engine: the chunked torch form
        return ed.delta_bytes(s, ed.DELTA_BWD if backward else ed.DELTA_FWD, l, block=True)
    if engine == "torch:chunked" and s.ssm_kind == "mamba1":
        return (T_M1 if backward else T_M1 / 2) * l * s.d_inner * s.d_state * 4
    if engine == "torch:chunked":
        q = max(1, min(s.chunk, l))
        return (T_SSD if backward else T_SSD / 2) * l * s.heads * q * 4
    return (TRN_NUMBA if backward else FWD_K) * l * s.d_inner * 4


def _stored(s: ModelShape, l: int, engine: str, f: int, layers_ssm: int, layers_attn: int) -> float:
    """Bytes autograd keeps for the backward over `layers_*` layers."""
    width = s.d_inner or 2 * s.hidden
    total = layers_ssm * l * KEEP.get(s.ssm_kind or "attention", KEEP["attention"]) * width * f
    total += layers_attn * l * KEEP["attention"] * s.hidden * f
    if ed.is_delta(s):
        return total + layers_ssm * ed.delta_bytes(s, ed.DELTA_KEEP, l)
    if engine == "torch:numba" and s.ssm_kind:
        total += layers_ssm * math.ceil(l / NUMBA_CKPT[s.ssm_kind]) * s.d_inner * s.d_state * 4
    if engine == "torch:chunked" and s.ssm_kind == "mamba2":  # autograd keeps the chunk-local decay matrices
        total += layers_ssm * KEEP_SSD * l * s.heads * max(1, min(s.chunk, l)) * 4
    return total


def forward_flops(s: ModelShape, l: int) -> float:
    """FLOPs of one forward over l tokens: 2 per weight per token, the scans, attention's l² term."""
    dense = 2.0 * (s.params - s.embed_params + s.vocab * s.hidden) * l
    scans = ed.delta_scan_flops(s, l) if ed.is_delta(s) else s.ssm_layers * l * s.d_inner * s.d_state * SCAN_FLOPS
    attn = s.attn_layers * 2.0 * l * l * s.hidden
    return dense + scans + attn


def _rate(device: str, dtype_bytes: int) -> float:
    """FLOP/s: on CPU per-core × this process's threads (an idle machine), on a GPU the assumed rate."""
    if device == "cpu":
        import torch

        return CPU_FLOPS_PER_CORE * torch.get_num_threads() * CPU_PARALLEL
    return GPU_FLOPS["half" if dtype_bytes == 2 else "float32"]


def _base(device: str) -> float:
    return R0 if device == "cpu" else GPU_CONTEXT


# --- per command ------------------------------------------------------------------------------------------
def _cost_influence(s, device, engine, seq_len=512, targets=1, draws=1, output="hidden", checkpoint=None,
                    budget=None, **_):
    """influence: float32 weights, one forward with grad, targets × draws backward passes (retain_graph)."""
    l, f = seq_len, 4
    w = s.params * 4
    out = l * (s.vocab if output == "logits" else s.hidden) * f * 2
    trans = _scan_transient(s, l, engine, backward=True)
    full = _stored(s, l, engine, f, s.ssm_layers, s.attn_layers)
    one_block = _stored(s, l, engine, f, min(1, s.ssm_layers), min(1, s.attn_layers) if not s.ssm_layers else 0)
    ckpt = s.layers * l * s.hidden * f * CKPT_KEEP + one_block  # what stays per block + the block recomputed
    plain = _base(device) + w + full + trans + out
    lean = _base(device) + w + ckpt + trans + out
    # the Ā bound (pure SSMs): a no-grad forward recording u, Δ, B, C of every layer, then exp(ΔA) layer by layer
    bound = 0.0
    if s.ssm_kind is not None and not s.attn_layers:
        rec = s.ssm_layers * l * (s.d_inner if s.ssm_kind == "mamba1" else s.heads) * 4  # every layer's Δ
        bound = _base(device) + w + rec + FWD_K * l * s.d_inner * 4
        plain, lean = max(plain, bound), max(lean, bound)
    use = checkpoint if checkpoint is not None else bool(budget and plain > budget)
    passes = targets * draws
    flops = forward_flops(s, l) * (1 + 2 * passes + (1 if use else 0)) + forward_flops(s, l)  # + the Ā bound
    inputs = dict(weights=w, stored_activations=ckpt if use else full, scan_transient=trans, outputs=out, bound_peak=bound,
                  base=_base(device), no_checkpoint_peak=plain, checkpoint_peak=lean, passes=passes, flops=flops)
    return (lean if use else plain), flops, {"checkpoint_blocks": use}, inputs


def _cost_smooth(s, device, engine, seq_len=1024, pairs=None, **_):
    """smooth: no-grad forward per sample; one layer's states recorded and reduced at a time; pairwise sharpness."""
    l, fa = seq_len, s.weight_bytes
    w = s.params * s.weight_bytes
    token_state = s.d_inner * s.d_state * 4
    kept = l if not token_state or l * token_state <= STATE_BUDGET else max(2, STATE_BUDGET // token_state)
    states = STATES_K * kept * token_state
    if engine == "torch:chunked" and s.ssm_kind == "mamba2" and kept < l:  # positions in blocks (kernels.ssd)
        states += min(SSD_STATE_BLOCK, kept * max(1, min(s.chunk, l)) * s.d_inner * 4) * 2
    exact = pairs is None and l <= EXACT_MAX_TOKENS
    pair = PAIR_K * l * l * 4 if exact else 8.0 * (pairs or 1_000_000) * 3
    fwd = FWD_K * l * (s.d_inner or s.hidden) * fa + _scan_transient(s, l, engine, backward=False)
    peak = _base(device) + w + fwd + states + pair
    n_pairs = l * (l - 1) / 2 if exact else (pairs or 1_000_000)
    flops = forward_flops(s, l) + 4 * s.layers * n_pairs * 2 * s.hidden + s.ssm_layers * n_pairs * 2 * (
        kept / l) ** 2 * s.d_inner * s.d_state
    inputs = dict(weights=w, forward_transient=fwd, recorded_states=states, state_positions=kept, pairwise=pair,
                  base=_base(device), flops=flops)
    return peak, flops, {"state_positions": kept, "state_blocks": engine == "torch:chunked" and s.ssm_kind == "mamba2"
                                       and kept < l}, inputs


def _cost_robust(s, device, engine, seq_len=1024, regions=2, **_):
    """robust: no-grad forwards of the clean and each corrupted copy, logits kept for the effect."""
    l = seq_len
    w = s.params * s.weight_bytes
    logits = l * s.vocab * 4 * 2
    fwd = FWD_K * l * (s.d_inner or s.hidden) * s.weight_bytes + _scan_transient(s, l, engine, backward=False)
    flops = forward_flops(s, l) * (1 + regions)
    return _base(device) + w + fwd + logits, flops, {}, dict(weights=w, forward_transient=fwd, logits=logits,
                                                             forwards_per_sample=1 + regions, flops=flops)


def _cost_needle(s, device, engine, lengths=(1024,), prefill_chunk=2048, max_new_tokens=16, cells=1, **_):
    """needle: per cell a segmented no-grad prefill (segments of prefill_chunk tokens) and greedy generation."""
    seg = min(prefill_chunk, max(lengths))
    w = s.params * s.weight_bytes
    fwd = FWD_K * seg * (s.d_inner or s.hidden) * s.weight_bytes + _scan_transient(s, seg, engine, backward=False)
    logits = seg * s.vocab * 4
    kv = s.attn_layers * max(lengths) * s.hidden * 2 * s.weight_bytes  # hybrids' attention cache
    mean_len = sum(lengths) / len(lengths)
    flops = forward_flops(s, int(mean_len)) + forward_flops(s, 1) * max_new_tokens
    extra = max_new_tokens * s.layers * GEN_OVERHEAD_S[device]
    inputs = dict(weights=w, forward_transient=fwd, logits=logits, attention_cache=kv, segment=seg, cells=cells,
                  mean_length=mean_len, flops=flops, generation_overhead_s=extra)
    return _base(device) + w + fwd + logits + kv, flops, {}, inputs


def _cost_train(s, device, engine, seq_len=256, batch_size=8, trainable_fraction=1.0, checkpoint=None, **_):
    """polarize --train: float32 weights, their gradients and AdamW's two moments, activations of one batch."""
    l, f = seq_len * batch_size, 4
    w = s.params * 4
    opt = 3 * s.params * trainable_fraction * 4
    stored = _stored(s, l, engine, f, s.ssm_layers, s.attn_layers)
    trans = _scan_transient(s, l, engine, backward=True)
    logits = l * s.vocab * f * 3
    flops = 3 * forward_flops(s, l)
    inputs = dict(weights=w, grads_and_adam=opt, stored_activations=stored, scan_transient=trans, logits=logits,
                  tokens_per_step=l, flops=flops)
    return _base(device) + w + opt + stored + trans + logits, flops, {}, inputs


def _cost_length(s, device, engine, seq_len=4096, segment=2048, **_):
    """length: the sample streamed through the state carry in segments, no grad, per-position loss."""
    return _cost_needle(s, device, engine, lengths=(seq_len,), prefill_chunk=segment, max_new_tokens=0)


_COSTS = {"influence": (_cost_influence, "sample"), "smooth": (_cost_smooth, "sample"),
          "robust": (_cost_robust, "sample"), "needle": (_cost_needle, "cell"),
          "polarize-train": (_cost_train, "step"), "length": (_cost_length, "sample")}


def estimate_command(command: str, shape: ModelShape, *, device: str = "auto", backend: str = "auto",
                     engine: str | None = None, units: int = 1, budget_bytes: int | None = None, **cfg) -> Estimate:
    """Predicted peak memory and time of `command` on `shape`.

    Args:
        command: influence | smooth | robust | needle | polarize-train | length.
        device: "auto" | "cpu" | "cuda" (a plan for a GPU may be made on a CPU machine).
        backend: the --backend flag.  engine: force the scan label ("torch:numba", "numba", "chunked", "cuda").
        units: samples (steps, cells) the run does.  budget_bytes: memory to fit in (default: this machine's).
        cfg: the command's numbers (seq_len, targets, checkpoint, pairs, lengths, prefill_chunk, batch_size …).
    """
    if command not in _COSTS:
        raise SsmdiagError(f"no cost model for '{command}'", hint=f"known: {', '.join(_COSTS)}")
    kind, label = device_and_backend(device, backend)
    if engine is not None:
        label = engine if ":" in engine or engine in ("cuda", "ref") else f"torch:{engine}"
    if (ed.is_delta(shape) or shape.recurrence) and label not in ("ref", "hf"):
        label = "torch:chunked"  # one engine: the chunked / parallel torch form (no numba, no fused CUDA kernel)
    budget = budget_bytes if budget_bytes is not None else memory_budget(kind)
    assumed = budget is None and kind == "cuda"
    budget = ASSUMED_GPU_MEMORY if assumed else budget
    fn, unit = _COSTS[command]
    peak, flops, options, inputs = fn(shape, kind, label, budget=budget, **cfg)
    rate = _rate(kind, 4 if command in ("influence", "polarize-train") else shape.weight_bytes)
    if kind == "cpu" and label == "torch:chunked":  # the GPU's engine is memory-bound on a CPU
        rate /= CHUNKED_CPU_SLOWDOWN
    seconds = flops / rate + inputs.get("generation_overhead_s", 0.0)
    notes = ([f"CPU seconds assume an idle machine ({rate:.1e} FLOP/s); other jobs on it stretch them"]
             if kind == "cpu" else [f"GPU seconds assume {rate:.1e} FLOP/s (unmeasured)"])
    if assumed:
        notes.append(f"no GPU here: fits/options are for {ASSUMED_GPU_MEMORY / 1e9:.0f} GB of GPU memory")
    notes += [f"{shape.recurrence} layers costed as a Mamba-1 scan of their width (unmeasured)"] * bool(shape.recurrence)
    inputs.update(shape=asdict(shape), rate_flops_per_s=rate, R0=R0, engine=label)
    return Estimate(command=command, model=shape.name, device=kind, backend=label, peak_bytes=int(peak), unit=unit,
                    units=units, seconds_per_unit=seconds, seconds_total=seconds * units, budget_bytes=budget,
                    fits=None if budget is None else bool(peak <= budget), options=options, inputs=inputs,
                    notes=notes)
