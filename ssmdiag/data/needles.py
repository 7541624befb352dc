"""Needles and prompts for `ssmdiag needle` (paper §3.2, App. E.2; RULER's magic-number needle).

A needle is a statement planted in a haystack plus the question it answers. Counterfactual needles state
something false ("The capital of France is Madrid.") so that the answer shows whether the model follows
the context or its memory; each carries the real-world answer too. Magic-number needles (RULER's
"niah_single") carry a random 7-digit value and no memorised alternative.

`PromptTemplate` turns (haystack, needle, length, depth) into a `Prompt` of exactly `length` token ids:

    lead | haystack[:b] | needle | haystack[b:H] | instruction + question

where H = length - |lead| - |needle| - |suffix| and b is the sentence boundary nearest to depth% of H.
Pieces are tokenised separately and concatenated as ids, so the count is exact and no special token can
end up inside the needle.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import SsmdiagError
from .haystack import Haystack

INSTRUCTION = ("Answer the question using only the information in the document above. If the document "
               "contradicts what you know, ignore what you know and use only the document.")
NEEDLE_FIELDS = {"id": False, "statement": True, "question": True, "answer": True, "real_answer": False}
_MAGIC_KEYS = ("the silver fox", "the blue lantern", "the winter orchard", "the quiet harbour", "the red kite",
               "the seventh door", "the copper bell", "the hidden garden", "the northern star", "the paper boat")
_CONTEXT_SLOT = "\u2063CONTEXT\u2063"  # placeholder for the document inside a chat template


@dataclass(frozen=True)
class Needle:
    """One fact to plant: `answer` must appear in `statement`; `real_answer` is the memorised alternative."""

    id: str
    statement: str
    question: str
    answer: str
    real_answer: str | None = None
    kind: str = "counterfactual"  # "counterfactual" | "magic" | "file"


def builtin_needles() -> list[Needle]:
    """The built-in counterfactual needles (ssmdiag/data/needles.json)."""
    raw = json.loads(resources.files("ssmdiag").joinpath("data/needles.json").read_text(encoding="utf-8"))
    return [Needle(kind="counterfactual", **entry) for entry in raw["needles"]]


def magic_needle(sample: int, seed: int) -> Needle:
    """RULER-style needle: a random 7-digit 'special magic number' for a key (seeded per sample)."""
    rng = random.Random(f"ssmdiag-magic-{seed}-{sample}")
    key, value = rng.choice(_MAGIC_KEYS), str(rng.randint(1_000_000, 9_999_999))
    return Needle(id=f"magic-{sample}", statement=f"One of the special magic numbers for {key} is: {value}.",
                  question=f"What is the special magic number for {key} mentioned in the provided text?",
                  answer=value, real_answer=None, kind="magic")


def _entry_error(path: Path, index: int, field: str | None, problem: str) -> SsmdiagError:
    where = f"entry {index}" + (f", field '{field}'" if field else "")
    return SsmdiagError(f"needles file '{path}': {where}: {problem}",
                        hint='each entry: {"statement": ..., "question": ..., "answer": ..., "real_answer": ... '
                             '(optional), "id": ... (optional)}; entries count from 0')


def _validate_entry(path: Path, index: int, entry: Any) -> Needle:
    if not isinstance(entry, dict):
        raise _entry_error(path, index, None, f"is a {type(entry).__name__}, not an object")
    for key in entry:
        if key not in NEEDLE_FIELDS:
            raise _entry_error(path, index, key, f"unknown field (allowed: {', '.join(NEEDLE_FIELDS)})")
    for key, required in NEEDLE_FIELDS.items():
        value = entry.get(key)
        if value is None:
            if required:
                raise _entry_error(path, index, key, "is missing")
            continue
        if not isinstance(value, str) or not value.strip():
            raise _entry_error(path, index, key, "must be a non-empty string")
    if entry["answer"].strip().lower() not in entry["statement"].lower():
        raise _entry_error(path, index, "answer", f"'{entry['answer']}' does not occur in the statement")
    return Needle(id=str(entry.get("id") or f"needle-{index}"), statement=entry["statement"].strip(),
                  question=entry["question"].strip(), answer=entry["answer"].strip(),
                  real_answer=(entry.get("real_answer") or "").strip() or None, kind="file")


def load_needles(path: Path) -> list[Needle]:
    """Read and validate a needles JSON file: a list of entries, or {"needles": [...]}.

    Raises SsmdiagError naming the entry (index) and field of the first problem.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SsmdiagError(f"needles file '{path}' does not exist",
                           hint="pass a JSON file, 'counterfactual' or 'magic'")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SsmdiagError(f"needles file '{path}' is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                           f"{exc.msg})") from None
    except UnicodeDecodeError:
        raise SsmdiagError(f"needles file '{path}' is not UTF-8 text") from None
    entries = raw.get("needles") if isinstance(raw, dict) else raw
    if not isinstance(entries, list):
        raise SsmdiagError(f"needles file '{path}' must hold a list of entries (or an object with a 'needles' list)")
    if not entries:
        raise SsmdiagError(f"needles file '{path}' has no entries")
    needles = [_validate_entry(path, i, e) for i, e in enumerate(entries)]
    seen: dict[str, int] = {}
    for i, n in enumerate(needles):
        if n.id in seen:
            raise _entry_error(path, i, "id", f"'{n.id}' repeats entry {seen[n.id]}")
        seen[n.id] = i
    return needles


def resolve_needles(spec: str, samples: int, seed: int) -> list[Needle]:
    """The needle for each of `samples` samples: 'counterfactual' (seeded order, cycling), 'magic', or a file."""
    if samples < 1:
        raise SsmdiagError(f"--samples {samples} must be at least 1")
    if spec == "magic":
        return [magic_needle(s, seed) for s in range(samples)]
    pool = builtin_needles() if spec == "counterfactual" else load_needles(Path(spec))
    random.Random(f"ssmdiag-needles-{seed}").shuffle(pool)
    return [pool[s % len(pool)] for s in range(samples)]


# --- prompts ----------------------------------------------------------------------------------------
@dataclass
class Prompt:
    """One needle-in-a-haystack prompt, exactly `len(ids)` tokens.

    Args:
        ids: the prompt token ids.
        prefix_len: leading tokens equal to the haystack stream (lead + haystack[:boundary]): reusable state.
        needle_len: tokens of the needle, which starts at `prefix_len`.
        haystack_len: H, haystack tokens in the prompt; boundary: b, haystack tokens before the needle.
        depth_actual: 100·b/H, the needle's actual depth in percent of the haystack.
        answer_ids / real_answer_ids: the answers as continuations of the prompt (real: None for magic).
    """

    ids: list[int]
    prefix_len: int
    needle_len: int
    haystack_len: int
    boundary: int
    target: float
    depth_actual: float
    answer_ids: list[int]
    real_answer_ids: list[int] | None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.ids).encode()).hexdigest()[:16]


class PromptTemplate:
    """Plain ("…document… Question: … Answer:") or the tokenizer's chat template, tokenised piecewise."""

    def __init__(self, tokenizer: Any, chat: bool = False):
        self.tok, self.chat = tokenizer, chat
        if chat and not getattr(tokenizer, "chat_template", None):
            raise SsmdiagError("--chat was given but the tokenizer has no chat template",
                               hint="drop --chat to use the plain template (base models)")
        self.specials = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.lead = self._lead_ids()

    def _encode(self, text: str, after: str | None = None) -> list[int]:
        """Ids of `text`; with `after`, as it tokenises right after that text (mid-sentence spacing for any
        tokenizer: SentencePiece's '▁' and byte-level 'Ġ' alike)."""
        ids = list(self.tok((after or "") + text, add_special_tokens=False)["input_ids"])
        if after:
            head = list(self.tok(after, add_special_tokens=False)["input_ids"])
            if ids[:len(head)] == head:
                return ids[len(head):]
            ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        return ids

    def _lead_ids(self) -> list[int]:
        """Special tokens the tokenizer itself puts before a text (a BOS for Llama/Mistral; none for GPT-NeoX)."""
        if self.chat:
            return []
        plain = self.tok("a", add_special_tokens=False)["input_ids"]
        full = self.tok("a", add_special_tokens=True)["input_ids"]
        for i in range(len(full) - len(plain) + 1):
            if full[i:i + len(plain)] == plain:
                return list(full[:i])
        return []

    def _question_text(self, needle: Needle) -> str:
        return f"\n\n{INSTRUCTION}\nQuestion: {needle.question}"

    def frame(self, needle: Needle) -> tuple[list[int], list[int]]:
        """(ids before the document, ids after it) for this needle's question."""
        if not self.chat:
            return self.lead, self._encode(self._question_text(needle) + "\nAnswer:")
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": _CONTEXT_SLOT + self._question_text(needle)}],
            tokenize=False, add_generation_prompt=True)
        before, after = text.split(_CONTEXT_SLOT, 1)
        return (list(self.tok(before, add_special_tokens=False)["input_ids"]),
                list(self.tok(after, add_special_tokens=False)["input_ids"]))

    def needle_ids(self, needle: Needle, at_start: bool) -> list[int]:
        """The needle's ids: ' statement' inside the text, 'statement\\n\\n' at depth 0. No special tokens allowed."""
        ids = self._encode(needle.statement + "\n\n") if at_start else self._encode(" " + needle.statement, after=".")
        unk = getattr(self.tok, "unk_token_id", None)
        if unk is not None and unk in ids:
            raise SsmdiagError(f"needle '{needle.id}' has words this tokenizer cannot encode (they map to its unknown "
                               "token)", hint="use a tokenizer that covers the needles' text (--tokenizer), or other "
                                              "--needles")
        if self.specials & set(ids):
            raise SsmdiagError(f"needle '{needle.id}' tokenises to a special token",
                               hint="remove control strings such as <s> or <|endoftext|> from its statement")
        return ids

    def answer_ids(self, answer: str) -> list[int]:
        return self._encode(answer) if self.chat else self._encode(" " + answer, after="Answer:")

    def overhead(self, needle: Needle) -> int:
        """Tokens of a prompt that are not haystack: lead, needle, instruction and question."""
        before, after = self.frame(needle)
        return len(before) + len(after) + max(len(self.needle_ids(needle, s)) for s in (False, True))

    @staticmethod
    def _haystack_len(length: int, before: list[int], after: list[int], nid: list[int], needle: Needle) -> int:
        h = length - len(before) - len(after) - len(nid)
        if h < 1:
            raise SsmdiagError(f"length {length} is shorter than needle + instruction + question "
                               f"({length - h + 1} tokens needed with needle '{needle.id}')",
                               hint="use longer --lengths")
        return h

    def place(self, hay: Haystack, needle: Needle, length: int, depth: float):
        """(ids before the document, ids after it, needle ids, H, target position, boundary b)."""
        before, after = self.frame(needle)
        nid = self.needle_ids(needle, at_start=False)
        h = self._haystack_len(length, before, after, nid, needle)
        target = depth / 100.0 * h
        b = hay.boundary_near(target, h)
        if b == 0:  # at the very start the needle is its own paragraph (no dangling space)
            nid = self.needle_ids(needle, at_start=True)
            h = self._haystack_len(length, before, after, nid, needle)
            target = depth / 100.0 * h
        return before, after, nid, h, target, b

    def build(self, hay: Haystack, needle: Needle, length: int, depth: float) -> Prompt:
        """The prompt of exactly `length` tokens with the needle at the boundary nearest `depth`% of the haystack."""
        before, after, nid, h, target, b = self.place(hay, needle, length, depth)
        ids = before + hay.ids[:b] + nid + hay.ids[b:h] + after
        return Prompt(ids=ids, prefix_len=len(before) + b, needle_len=len(nid), haystack_len=h, boundary=b,
                      target=target, depth_actual=100.0 * b / h, answer_ids=self.answer_ids(needle.answer),
                      real_answer_ids=self.answer_ids(needle.real_answer) if needle.real_answer else None)

    def stream(self, hay: Haystack) -> list[int]:
        """The token stream every prompt's reusable prefix is cut from (lead + haystack)."""
        return (self.frame(Needle("x", "x", "x", "x"))[0] if self.chat else self.lead) + hay.ids


PROBE_TEXT = "The copper kettle stood on the wooden table near the window."


def check_tokenizer(tok: Any) -> None:
    """Refuse a degenerate tokenizer up front (one that encodes text to nothing or only to its unknown token)."""
    ids = list(tok(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    if not ids:
        raise SsmdiagError("the tokenizer encodes ordinary text to no tokens at all",
                           hint="pass a working tokenizer with --tokenizer")
    unk = getattr(tok, "unk_token_id", None)
    if unk is not None and all(i == unk for i in ids):
        raise SsmdiagError("the tokenizer maps ordinary English words to its unknown token",
                           hint="pass a tokenizer that covers English text with --tokenizer")
