"""How kernels/mixer.py installs, runs and carries the registered recurrent kinds (RG-LRU, RWKV, mLSTM, short conv).

Mamba-1, Mamba-2 and the gated delta rule are wired in kernels/mixer.py directly.  Every other kind is one
`KernelKind`, registered by its own kernel module (e.g. kernels/rglru.py) and imported by kernels/mixer.py:

- `classes`: the transformers module class names whose forward ssmdiag replaces (matched by name: nothing of
  transformers is imported);
- `call(args, kwargs) -> (hidden (b, l, e), cache or None, attention mask or None, extra kwargs for compute)`: reads
  the module's own forward arguments;
- `compute(module, hidden, state, mask, backend, recorder, want_state, **extra) -> (out, new state or None)`: the
  layer from its parameters, continuing from `state` (the kind's own state object, with a `clone()` method, or None:
  zero history); it stores its record in `recorder.layers[module._ssmdiag_layer]` when a recorder is given;
- `wrap(out, module, args, kwargs)`: what the module's forward returns (e.g. a tuple), from compute's output;
- `layer`: False for a companion module that carries state but is not a recurrent layer of its own (RWKV's channel
  mix keeps the previous token for its shift): installed and carried (under the key (layer, kind)), never listed by
  find_mixers, recorded or counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def _same(out, module, args, kwargs):
    return out


@dataclass(frozen=True)
class KernelKind:
    kind: str
    classes: tuple[str, ...]
    compute: Callable
    call: Callable
    wrap: Callable = _same
    layer: bool = True


KERNEL_KINDS: dict[str, KernelKind] = {}


def register(kind: KernelKind) -> KernelKind:
    """Add a kind (each kernel module calls this once at import)."""
    KERNEL_KINDS[kind.kind] = kind
    return kind


def kernel_kind_of(class_name: str) -> KernelKind | None:
    """The registered kind computing modules of this class name, or None."""
    return next((k for k in KERNEL_KINDS.values() if class_name in k.classes), None)
