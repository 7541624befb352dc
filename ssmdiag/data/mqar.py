"""Multi-query associative recall (MQAR) as Zoology defines it (Arora et al. 2023, §3; Wang et al. 2025, Table 2).

One example of length L with K key–value pairs (vocabulary V):

    [k_1 v_1 k_2 v_2 … k_K v_K | 0 … k_σ(1) 0 … k_σ(2) …]
     keys from [1, V/2), values from [V/2, V), all distinct within the example; then the queries:
     the K keys again, in random order, at even offsets 2·g of the remaining L - 2K positions, where the
     gaps g are drawn without replacement from a power law p(g) ∝ (g+1)^(a-1), a = 0.01 (most queries
     come soon after the pairs, a few far away). Filler tokens are 0 (`filler="zero"`, as the paper's script
     sets), or Zoology's default `filler="random"`: every 0 replaced by a uniform token of [0, V).

Labels are -100 everywhere except at a query position, whose label is the value of that key (the model
must output the value right after reading the key). `distance` is the query position minus its key's
position (the key–query distance), -1 elsewhere.

Everything is vectorised (Gumbel top-k gives weighted sampling without replacement) and seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SsmdiagError

IGNORE = -100


@dataclass
class MQARBatch:
    """inputs, labels, distance: (b, l) long."""

    inputs: torch.Tensor
    labels: torch.Tensor
    distance: torch.Tensor
    num_kv_pairs: int

    @property
    def seq_len(self) -> int:
        return int(self.inputs.shape[1])


def check_mqar(vocab_size: int, seq_len: int, num_kv_pairs: int) -> None:
    """Zoology's validity checks, as clear errors: even length, 4·pairs <= length, vocab > length."""
    if num_kv_pairs < 1:
        raise SsmdiagError(f"MQAR needs at least one key-value pair (got {num_kv_pairs})")
    if seq_len % 2:
        raise SsmdiagError(f"MQAR sequence length {seq_len} must be even (keys sit at even offsets)",
                           hint=f"use {seq_len + 1}")
    if 4 * num_kv_pairs > seq_len:
        raise SsmdiagError(f"MQAR cannot place {num_kv_pairs} key-value pairs in {seq_len} tokens: "
                           f"the pairs and their queries need 4 x {num_kv_pairs} = {4 * num_kv_pairs}",
                           hint=f"use at most {seq_len // 4} pairs, or a length of at least {4 * num_kv_pairs}")
    if vocab_size <= seq_len:
        raise SsmdiagError(f"MQAR vocabulary {vocab_size} is too small for length {seq_len} (Zoology needs vocab > length)",
                           hint=f"use a vocabulary of at least {seq_len + 1}")
    if num_kv_pairs > vocab_size // 2 - 1:
        raise SsmdiagError(f"MQAR vocabulary {vocab_size} holds only {vocab_size // 2 - 1} distinct keys, "
                           f"fewer than {num_kv_pairs} pairs", hint="use a larger vocabulary or fewer pairs")


def _sample_without_replacement(logits: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct indices per row, drawn with probabilities softmax(logits) (Gumbel top-k): (b, k)."""
    u = torch.rand(logits.shape, generator=gen).clamp_(min=1e-20)
    return (logits - torch.log(-torch.log(u))).topk(k, dim=-1).indices


def power_law_logits(space: int, power_a: float = 0.01) -> torch.Tensor:
    """log p(g) for gaps g = 0 … space-1 with p ∝ (g+1)^(a-1) (unnormalised): (space,)."""
    return (power_a - 1.0) * torch.log(torch.arange(1, space + 1, dtype=torch.float64))


FILLERS = ("zero", "random")  # --filler


def generate_mqar(vocab_size: int, seq_len: int, num_kv_pairs: int, num_examples: int, seed: int,
                  power_a: float = 0.01, filler: str = "zero") -> MQARBatch:
    """`num_examples` MQAR sequences (Zoology's definition), deterministic for a seed.

    Args:
        filler: "zero" (the paper's script) or "random" (Zoology's `random_non_queries`: the zeros become
            uniform tokens of [0, V), keys and values included).
    """
    if filler not in FILLERS:
        raise SsmdiagError(f"unknown --filler '{filler}'", hint="use zero or random")
    check_mqar(vocab_size, seq_len, num_kv_pairs)
    b, k, half = num_examples, num_kv_pairs, vocab_size // 2
    gen = torch.Generator().manual_seed(int(seed))
    keys = 1 + _sample_without_replacement(torch.zeros(b, half - 1), k, gen)  # (b, k) in [1, V/2)
    values = half + _sample_without_replacement(torch.zeros(b, vocab_size - half), k, gen)  # (b, k) in [V/2, V)
    context = 2 * k
    space = (seq_len - context) // 2
    gaps = _sample_without_replacement(power_law_logits(space, power_a).expand(b, space).float(), k, gen)  # (b, k)
    inputs = torch.zeros(b, seq_len, dtype=torch.long)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    qpos = context + 2 * gaps  # (b, k): query j asks for key j
    inputs.scatter_(1, qpos, keys)
    labels = torch.full((b, seq_len), IGNORE, dtype=torch.long)
    labels.scatter_(1, qpos, values)
    distance = torch.full((b, seq_len), -1, dtype=torch.long)
    distance.scatter_(1, qpos, qpos - 2 * torch.arange(k)[None, :])
    if filler == "random":
        zero = inputs == 0
        inputs[zero] = torch.randint(0, vocab_size, inputs.shape, generator=gen)[zero]
    return MQARBatch(inputs=inputs, labels=labels, distance=distance, num_kv_pairs=k)


@dataclass(frozen=True)
class MQARSegment:
    """One part of a training or test mixture: `examples` sequences of `seq_len` tokens with `num_kv_pairs`."""

    seq_len: int
    num_kv_pairs: int
    examples: int


def check_segments(vocab_size: int, segments: list[MQARSegment]) -> None:
    for s in segments:
        check_mqar(vocab_size, s.seq_len, s.num_kv_pairs)
        if s.examples < 1:
            raise SsmdiagError(f"MQAR segment {s} needs at least one example")


def mixture_batch(vocab_size: int, segments: list[MQARSegment], batch_size: int, seed: int, step: int,
                  power_a: float = 0.01, filler: str = "zero") -> MQARBatch:
    """The training batch of one step: a segment drawn in proportion to its size, then fresh examples.

    Deterministic in (seed, step), so a resumed run sees exactly the batches it would have seen.
    Each batch holds one sequence length (no padding); the mixture mixes lengths across steps.
    """
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    weights = torch.tensor([float(s.examples) for s in segments])
    seg = segments[int(torch.multinomial(weights, 1, generator=gen))]
    sub_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return generate_mqar(vocab_size, seg.seq_len, seg.num_kv_pairs, batch_size, sub_seed, power_a, filler)


class FixedMQARData:
    """A fixed training set, segment after segment, read in the same order every epoch (the paper's code).

    Each segment's examples are generated once (seeded apart per segment) and cut into consecutive batches of
    `batch_size` (the last one of a segment may be smaller); an epoch is all batches of segment 0, then of
    segment 1, …, with no shuffling. `batch(step)` is a pure function of the step, so a resumed run is exact.
    """

    def __init__(self, vocab_size: int, segments: list[MQARSegment], batch_size: int, seed: int,
                 filler: str = "zero", power_a: float = 0.01):
        check_segments(vocab_size, segments)
        self.vocab_size, self.segments, self.batch_size = vocab_size, list(segments), batch_size
        self.seed, self.filler, self.power_a = seed, filler, power_a
        self.index = [(i, start) for i, s in enumerate(self.segments) for start in range(0, s.examples, batch_size)]
        self._cache: dict[int, MQARBatch] = {}

    @property
    def steps_per_epoch(self) -> int:
        return len(self.index)

    @property
    def examples(self) -> int:
        return sum(s.examples for s in self.segments)

    def _segment(self, i: int) -> MQARBatch:
        if i not in self._cache:
            s = self.segments[i]
            self._cache[i] = generate_mqar(self.vocab_size, s.seq_len, s.num_kv_pairs, s.examples,
                                           int(self.seed) * 1_000_003 + 104_729 * (i + 1), self.power_a, self.filler)
        return self._cache[i]

    def batch(self, step: int) -> MQARBatch:
        """The batch of global step `step` (epoch = step // steps_per_epoch)."""
        i, start = self.index[step % len(self.index)]
        b = self._segment(i)
        sl = slice(start, start + self.batch_size)
        return MQARBatch(b.inputs[sl], b.labels[sl], b.distance[sl], b.num_kv_pairs)

