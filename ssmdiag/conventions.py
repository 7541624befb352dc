"""Conventions a transformers release can change, measured on the loaded model instead of assumed per family.

`output_hidden_states` is the case in point: transformers 5.24's Mamba and Mamba-2 return block 0's output first
and the final norm's output last (L + 1 entries, no embedding), GPT-NeoX and 5.25's Mamba-2 the embedding output
first and the final norm's output in place of the last block's (L + 1 entries).  A two-token forward with hooks on
the blocks says which entry is which, once per model.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .errors import SsmdiagError


@dataclass(frozen=True)
class HiddenStatesLayout:
    """Where each entry of a model's `output_hidden_states` sits, measured on the loaded model.

    entries: per entry, the places whose value it equals: "in:i" (block i's input), "out:i" (block i's output),
        "norm" (the final norm's output; where ssmdiag finds no final norm, an unmatched last entry).  num_blocks: blocks hooked.  measured: False when no forward could be
        probed (meta device) or no hook matched; then the layout is inferred from the entry count alone.
    """

    entries: tuple[frozenset[str], ...]
    num_blocks: int
    measured: bool = True

    def _first(self, tag: str) -> int | None:
        return next((j for j, places in enumerate(self.entries) if tag in places), None)

    @property
    def has_embedding(self) -> bool:
        """Whether entry 0 is block 0's input (the embedding output, after any scaling the model applies)."""
        return bool(self.entries) and "in:0" in self.entries[0]

    def block_input(self, i: int) -> int | None:
        """The entry holding block i's input, or None (block 0 when the embedding output is left out)."""
        return self._first(f"in:{i}")

    def block_output(self, i: int) -> int:
        """The entry holding block i's output; for a block whose raw output is not kept (the last block of most
        models), the final norm's output."""
        j = self._first(f"out:{i}")
        if j is None and i == self.num_blocks - 1:
            j = self._first("norm")
        if j is None:
            raise SsmdiagError(f"output_hidden_states has no entry for block {i}'s output",
                               hint="this model's hidden_states do not follow its blocks; report it")
        return j


_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, HiddenStatesLayout]" = weakref.WeakKeyDictionary()


def cached_layout(model: nn.Module, blocks, final_norm, embedding) -> HiddenStatesLayout:
    """The model's hidden-states layout, probed on first use and kept for the model's lifetime.

    Args:
        model: the loaded model; blocks, final_norm, embedding: callables returning the adapter's modules.
    """
    layout = _LAYOUTS.get(model)
    if layout is None:
        layout = _LAYOUTS[model] = probe_hidden_states(model, blocks(), final_norm(), embedding())
    return layout


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return getattr(value, "last_hidden_state", None)


def _infer_layout(n_entries: int, starts_with_embedding: bool) -> HiddenStatesLayout:
    """The layout from the entry count alone: L + 1 entries, L = n_entries - 1 blocks, the final norm's output last."""
    num_blocks = n_entries - 1
    if starts_with_embedding:
        places = [{"in:0"}] + [{f"out:{i}", f"in:{i + 1}"} for i in range(num_blocks - 1)] + [{"norm"}]
    else:
        places = [{f"out:{i}", f"in:{i + 1}"} for i in range(num_blocks)] + [{"norm"}]
    return HiddenStatesLayout(tuple(frozenset(p) for p in places[:n_entries]), num_blocks, measured=False)


@torch.no_grad()
def probe_hidden_states(model: nn.Module, blocks: list[nn.Module], final_norm: nn.Module | None,
                        embedding: nn.Module | None) -> HiddenStatesLayout:
    """Measure how `output_hidden_states` lines up with the blocks: one forward of two tokens with hooks on every
    block (its input and output) and on the final norm; each entry is matched to the tensors it equals.

    Args:
        blocks: the residual blocks in order; final_norm / embedding: the model's (None: not found).
    """
    params = next(model.parameters(), None)
    if params is None or params.device.type == "meta":
        return _infer_layout(len(blocks) + 1, False)
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = torch.tensor([[1 % vocab, 2 % vocab]], device=params.device)
    seen: dict[str, torch.Tensor] = {}

    def keep(tag, value):
        t = _first_tensor(value)
        if t is not None and tag not in seen:
            seen[tag] = t.detach()

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, kw, i=i: keep(f"in:{i}", a[0] if a else kw.get("hidden_states")), with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: keep(f"out:{i}", o)))
    if final_norm is not None:
        handles.append(final_norm.register_forward_hook(lambda m, a, o: keep("norm", o)))
    try:
        try:
            hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        except TypeError:  # a forward without use_cache
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    hidden = tuple(hidden or ())
    same = (lambda a, b: a.shape == b.shape and torch.equal(a.float(), b.float()))
    entries = [frozenset(tag for tag, t in seen.items() if same(h, t)) for h in hidden]
    if entries and not entries[-1] and "norm" not in seen:  # a final norm the adapter does not know (LFM2, RWKV)
        entries[-1] = frozenset({"norm"})
    entries = tuple(entries)
    if not any(e - {"norm"} for e in entries):  # no hook matched: the blocks ssmdiag found are not the ones hidden_states follows
        emb = embedding(ids) if embedding is not None and hidden else None
        return _infer_layout(len(hidden), emb is not None and same(hidden[0], emb))
    return HiddenStatesLayout(entries, len(blocks))


@torch.no_grad()
def probe_norm_whole_width(norm: nn.Module, groups: int) -> bool | None:
    """Whether a Mamba-2 gated RMSNorm normalises over its whole width (True) or per B/C group (False), measured by
    calling it on groups whose scales differ 100-fold; None when a call cannot tell (one group, meta device, an
    unexpected signature or result).

    Args:
        norm: the mixer's gated norm, called as norm(x) with x (1, 2, d) (two tokens: some squeeze one).  groups: the mixer's B/C groups g.
    """
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or groups < 2 or weight.device.type == "meta" or weight.numel() % groups:
        return None
    d = weight.numel()
    scale = torch.logspace(0, 2, groups).repeat_interleave(d // groups)
    x = torch.randn(1, 2, d, generator=torch.Generator().manual_seed(0)) * scale  # (1, 2, d)
    try:
        out = norm(x.to(weight.device, weight.dtype)).float().cpu()
    except Exception:  # noqa: BLE001 - a norm that wants other arguments: fall back to reading its attributes
        return None
    w = weight.detach().float().cpu()
    whole = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
    xg = x.view(1, 2, groups, d // groups)
    per = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True))).view(1, 2, d)
    if out.shape != x.shape:
        return None
    err_whole, err_per = (out - w * whole).abs().max(), (out - w * per).abs().max()
    if min(err_whole, err_per) > 0.05 * out.abs().max():
        return None
    return bool(err_whole < err_per)
