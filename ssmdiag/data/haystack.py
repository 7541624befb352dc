"""Haystacks for `ssmdiag needle`: seeded filler prose from a small grammar, or the user's own text files.

The built-in generator writes varied, deterministic prose (grammar-like templates filled from word lists
written for this project: no copyrighted text ships). It never mentions real places, people or numbers, so
it cannot accidentally contain, contradict or hint at a needle.

A `Haystack` is tokenised once, as a whole, with offsets: `boundaries` are the token indices where a
sentence starts, which is where a needle may be inserted (paper App. E.2; gkamradt's NIAH inserts at the
nearest sentence end too).
"""

from __future__ import annotations

import hashlib
import random
import re
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SsmdiagError

# --- the grammar ------------------------------------------------------------------------------------
_WORDS: dict[str, tuple[str, ...]] = {
    "person": ("the gardener", "a ferryman", "the weaver", "an old clockmaker", "the baker's apprentice",
               "a retired surveyor", "the lighthouse keeper", "a young potter", "the village scribe", "a shepherd",
               "the beekeeper", "a travelling tinker", "the miller", "a lamplighter", "the cartographer",
               "a boat builder", "the innkeeper", "a glassblower", "the archivist", "a stonemason"),
    "thing": ("the copper kettle", "a bundle of letters", "the wooden gate", "a basket of pears", "the brass lantern",
              "a length of rope", "the painted chest", "a jar of honey", "the iron key", "a folded map",
              "the cracked mirror", "a wheel of cheese", "the wool blanket", "a box of seeds", "the small compass",
              "a pair of boots", "the clay bowl", "a coil of wire", "the garden ledger", "a sack of flour"),
    "place": ("by the river", "in the orchard", "behind the mill", "near the harbour wall", "on the hill road",
              "inside the workshop", "at the edge of the marsh", "under the old bridge", "beside the well",
              "in the upper meadow", "along the towpath", "at the crossroads", "in the walled garden",
              "below the quarry", "on the eastern terrace", "in the market square", "past the chapel",
              "near the sheep pens", "on the shingle beach", "inside the granary"),
    "time": ("early in the morning", "after the first frost", "before the spring fair", "late one evening",
             "during the long rains", "at midday", "on the last day of harvest", "when the tide turned",
             "after supper", "in the grey hour before dawn", "once the snow had melted", "on market day",
             "while the bells were ringing", "in the middle of summer", "at dusk"),
    "verb": ("carried", "mended", "painted", "counted", "polished", "wrapped", "measured", "sorted", "repaired",
             "examined", "cleaned", "weighed", "hid", "traded", "sketched", "described", "moved", "labelled"),
    "adj": ("quiet", "weathered", "bright", "narrow", "patient", "crooked", "gentle", "heavy", "faded", "careful",
            "restless", "sturdy", "curious", "tidy", "windswept", "modest", "stubborn", "cheerful", "tired", "plain"),
    "adv": ("slowly", "carefully", "without a word", "with great care", "in a hurry", "almost absent-mindedly",
            "twice over", "as usual", "more thoroughly than before", "by lamplight", "with some reluctance"),
    "abstract": ("patience", "routine", "small repairs", "the weather", "good timber", "honest measures",
                 "the turning of the seasons", "old habits", "careful bookkeeping", "shared work",
                 "the price of wool", "a well-kept path", "the sound of the water", "quiet afternoons"),
    "feeling": ("pleased", "puzzled", "content", "uneasy", "amused", "surprised", "relieved", "doubtful"),
    "weather": ("A cold wind came down from the hills", "Rain drummed on the slate roofs",
                "The fog lifted slowly from the fields", "A pale sun broke through the clouds",
                "The air smelled of cut hay", "Thin snow settled on the fences", "The evening was still and warm",
                "Gulls circled over the water", "Smoke rose straight up from the chimneys"),
    "conn": ("Later", "Meanwhile", "After a while", "Even so", "In the end", "For a time", "Soon afterwards",
             "As it happened", "Before long", "All the same"),
}

_TEMPLATES: tuple[str, ...] = (
    "{Person} {verb} {thing} {place} {time}.",
    "{Time}, {person} {verb} {thing} {adv}.",
    "{Weather}, and {person} stayed {place}.",
    "{Conn}, {person} said that {abstract} mattered more than anyone admitted.",
    "Nobody {place} remembered who had first {verb} {thing}.",
    "{Person} was {feeling} to find {thing} {place}.",
    "It was {adj} work, but {person} {verb} {thing} {adv}.",
    "{Thing} had been {verb} {time}, and it looked {adj} ever since.",
    "{Conn}, the talk turned to {abstract} and to {abstract2}.",
    "Some said {person} was too {adj}; others said {person2} was worse.",
    "{Person} kept {thing} {place}, where it was safe from the damp.",
    "{Weather}. {Person} {verb} {thing} and went home.",
    "Why {person} {verb} {thing} {time} was never explained.",
    "{Person} and {person2} argued for an hour about {abstract}.",
    "The {adj} path {place} led, after many turns, back to the same gate.",
    "{Conn}, {person} wrote a short note about {abstract} in the margin of {thing}.",
    "Every {adj} season brings its own small troubles {place}.",
    "{Person} liked to say that {abstract} could not be hurried.",
    "{Time}, the {adj} light fell across {thing}.",
    "If {person} had not {verb} {thing}, {person2} would have done it {adv}.",
    "{Person} counted the days until {abstract2} would be settled.",
    "There was a {adj} silence {place} {time}.",
    "{Conn}, {person} {verb} {thing} once more, {adv}.",
    "Was it {abstract} or {abstract2} that kept {person} {place}?",
)

_SENTENCE_END = re.compile(r"[.!?][\"'’”)\]]*(?=\s)")  # a sentence ends here; the whitespace after it is a boundary


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sentence(rng: random.Random) -> str:
    """One sentence from a random template, slots filled from the word lists."""
    template = rng.choice(_TEMPLATES)
    fills: dict[str, str] = {}
    for key, words in _WORDS.items():
        first, second = rng.sample(words, 2)
        fills[key], fills[key + "2"] = first, second
        fills[_cap(key)], fills[_cap(key) + "2"] = _cap(first), _cap(second)
    return template.format(**fills)


def generate_prose(n_sentences: int, seed: int = 0) -> str:
    """`n_sentences` sentences of seeded filler prose in paragraphs of 3-8 sentences.

    The stream is prefix-stable: more sentences for the same seed extend the same text.
    """
    rng = random.Random(f"ssmdiag-haystack-{seed}")
    paragraphs: list[str] = []
    done = 0
    while done < n_sentences:
        size = min(rng.randint(3, 8), n_sentences - done)
        paragraphs.append(" ".join(_sentence(rng) for _ in range(size)))
        done += size
    return "\n\n".join(paragraphs)


# --- tokenised haystack -------------------------------------------------------------------------------
@dataclass
class Haystack:
    """A tokenised haystack.

    Args:
        ids: the token ids of the whole text (no special tokens).
        boundaries: sorted token indices where a sentence starts (0 included).
        source: "generated(seed=N)" or the file paths it was read from.
        fingerprint: sha256 of the text (part of a run's identity for --resume).
        repeated: whether a too-short file was repeated (--allow-repeat).
    """

    ids: list[int]
    boundaries: list[int]
    source: str
    fingerprint: str
    repeated: bool = False

    def boundary_near(self, target: float, limit: int) -> int:
        """The sentence boundary in [0, limit] nearest to token position `target` (`limit` itself counts)."""
        k = bisect_left(self.boundaries, limit)  # boundaries[:k] lie inside the haystack
        i = bisect_left(self.boundaries, target, 0, k)
        cands = [limit] + [self.boundaries[j] for j in (i - 1, i) if 0 <= j < k]
        return min(cands, key=lambda b: (abs(b - target), b))

    def sentence_gap(self, position: int) -> int:
        """Token length of the sentence at `position` (for "within one sentence" checks)."""
        i = max(bisect_left(self.boundaries, position + 1) - 1, 0)
        nxt = self.boundaries[i + 1] if i + 1 < len(self.boundaries) else len(self.ids)
        return nxt - self.boundaries[i]


def tokenize_haystack(text: str, tokenizer: Any, source: str, repeated: bool = False) -> Haystack:
    """Tokenise `text` once with offsets and map sentence boundaries (char) to token indices."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    except NotImplementedError:
        raise SsmdiagError("the tokenizer gives no character offsets (a slow tokenizer)",
                           hint="pass a fast tokenizer (tokenizer.json) with --tokenizer") from None
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    starts = [s for s, _ in offsets]
    chars = [m.end() for m in _SENTENCE_END.finditer(text)]
    bounds = {0}
    for c in chars:
        i = bisect_left(starts, c)  # first token starting at or after the whitespace that ends a sentence
        if 0 < i < len(ids):
            bounds.add(i)
    fingerprint = "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
    return Haystack(ids=ids, boundaries=sorted(bounds), source=source, fingerprint=fingerprint, repeated=repeated)


def _read_files(path: Path) -> tuple[str, list[Path]]:
    if not path.exists():
        raise SsmdiagError(f"haystack path '{path}' does not exist", hint="pass a text file or a directory of them")
    files = ([path] if path.is_file() else
             sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts)))
    texts = [p.read_text(encoding="utf-8", errors="replace").strip() for p in files]
    text = "\n\n".join(t for t in texts if t)
    if not text:
        what = "file" if path.is_file() else f"directory ({len(files)} files)"
        raise SsmdiagError(f"haystack {what} '{path}' is empty", hint="pass text with at least a few paragraphs")
    return text, files


def build_haystack(tokenizer: Any, min_tokens: int, path: Path | None = None, seed: int = 0,
                   allow_repeat: bool = False) -> Haystack:
    """A haystack of at least `min_tokens` tokens: generated (seeded) or read from `path` (files in sorted order).

    Raises SsmdiagError when the path is missing, empty, or too short (with its token count) without
    `allow_repeat`.
    """
    if path is None:
        n = 64
        while True:  # the stream is prefix-stable, so growing n only extends the text
            text = generate_prose(n, seed)
            hay = tokenize_haystack(text, tokenizer, f"generated(seed={seed})")
            if len(hay.ids) >= min_tokens:
                return hay
            if not hay.ids:  # a tokenizer that encodes prose to nothing would loop forever
                raise SsmdiagError("the tokenizer encodes the generated haystack to no tokens",
                                   hint="pass a working tokenizer with --tokenizer")
            per_sentence = max(len(hay.ids) / n, 1.0)
            n = max(int(min_tokens / per_sentence * 1.1) + 8, n * 2)
    path = Path(path).expanduser()
    text, files = _read_files(path)
    source = ", ".join(str(f) for f in files)
    hay = tokenize_haystack(text, tokenizer, source)
    if len(hay.ids) >= min_tokens:
        return hay
    if not allow_repeat:
        raise SsmdiagError(f"haystack '{path}' has only {len(hay.ids)} tokens; the longest length needs {min_tokens}",
                           hint="add text, use shorter --lengths, or pass --allow-repeat to repeat it")
    copies = -(-min_tokens // max(len(hay.ids), 1)) + 1
    return tokenize_haystack("\n\n".join([text] * copies), tokenizer, source, repeated=True)
