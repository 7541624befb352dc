"""Haystack, needles and prompt placement for `ssmdiag needle` (no model needed)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from ssmdiag.data.haystack import build_haystack, generate_prose
from ssmdiag.data.needles import PromptTemplate, builtin_needles, load_needles, magic_needle, resolve_needles
from ssmdiag.errors import SsmdiagError
from ssmdiag.parse import parse_depths, parse_lengths


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def hay(tok):
    return build_haystack(tok, 2000, seed=0)


def test_prose_is_seeded_varied_and_prefix_stable():
    a, b = generate_prose(300, seed=1), generate_prose(300, seed=2)
    assert a == generate_prose(300, seed=1) and a != b
    sentences = [s for s in a.replace("\n", " ").split(". ") if s]
    assert len(set(sentences)) > 0.9 * len(sentences)  # not one repeated line
    assert generate_prose(600, seed=1).startswith(a)


def test_builtin_needles_are_counterfactual():
    needles = builtin_needles()
    assert len(needles) >= 20 and len({n.id for n in needles}) == len(needles)
    for n in needles:
        assert n.answer.lower() in n.statement.lower() and n.real_answer
        assert n.real_answer.lower() not in n.statement.lower()
    magic = magic_needle(0, seed=0)
    assert len(magic.answer) == 7 and magic.answer.isdigit() and magic.answer in magic.statement
    assert magic_needle(0, seed=0) == magic and magic_needle(1, seed=0).answer != magic.answer


@pytest.mark.parametrize("depth", [0, 10, 33, 50, 77, 100])
@pytest.mark.parametrize("length", [300, 777])
def test_needle_placed_once_at_recorded_depth_with_exact_length(tok, hay, length, depth):
    template = PromptTemplate(tok)
    for needle in resolve_needles("counterfactual", 3, seed=0) + [magic_needle(0, 0)]:
        p = template.build(hay, needle, length, depth)
        assert len(p.ids) == length
        text = tok.decode(p.ids)
        assert text.count(needle.statement) == 1
        # the needle's ids sit exactly at the recorded position, and the rest is haystack + the question
        assert p.ids[p.prefix_len:p.prefix_len + p.needle_len] == template.needle_ids(needle, p.boundary == 0)
        assert p.ids[:p.prefix_len] == template.stream(hay)[:p.prefix_len]
        assert tok.decode(p.ids[p.prefix_len:p.prefix_len + p.needle_len]).strip() == needle.statement
        assert text.rstrip().endswith("Answer:") and needle.question in text
        # at a sentence boundary, within one sentence of the requested depth
        assert p.boundary in hay.boundaries or p.boundary == p.haystack_len
        assert abs(p.boundary - p.target) <= hay.sentence_gap(min(p.boundary, int(p.target)))
        assert p.depth_actual == pytest.approx(100 * p.boundary / p.haystack_len)
        assert not set(p.ids[p.prefix_len:p.prefix_len + p.needle_len]) & set(tok.all_special_ids)
    if depth == 0:
        assert p.boundary == 0 and p.depth_actual == 0
    if depth == 100:
        assert p.boundary == p.haystack_len and p.depth_actual == 100


def test_chat_template_frames_the_document(tok, hay):
    with pytest.raises(SsmdiagError, match="no chat template"):
        PromptTemplate(tok, chat=True)
    tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok.chat_template = ("{% for m in messages %}<|pad|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|pad|>assistant:{% endif %}")
    template = PromptTemplate(tok, chat=True)
    needle = builtin_needles()[0]
    p = template.build(hay, needle, 400, 50)
    assert len(p.ids) == 400 and p.ids[0] == tok.pad_token_id
    assert tok.decode(p.ids).count(needle.statement) == 1 and p.ids[-1] != tok.pad_token_id


def test_length_too_short_is_a_clear_error(tok, hay):
    template = PromptTemplate(tok)
    with pytest.raises(SsmdiagError, match="shorter than needle"):
        template.build(hay, builtin_needles()[0], 40, 50)


def _write(tmp_path, obj) -> str:
    path = tmp_path / "needles.json"
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


GOOD = {"statement": "The moon is made of cheese.", "question": "What is the moon made of?", "answer": "cheese",
        "real_answer": "rock"}


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ({"needles": []}, "no entries"),
    ({"x": 1}, "must hold a list"),
    ([GOOD, {**GOOD, "answer": "butter"}], "entry 1, field 'answer': 'butter' does not occur"),
    ([GOOD, 3], "entry 1: is a int"),
    ([{k: v for k, v in GOOD.items() if k != "question"}], "entry 0, field 'question': is missing"),
    ([{**GOOD, "anwser": "x"}], "entry 0, field 'anwser': unknown field"),
    ([{**GOOD, "statement": ""}], "entry 0, field 'statement': must be a non-empty string"),
    ([{**GOOD, "id": "a"}, {**GOOD, "id": "a"}], "entry 1, field 'id': 'a' repeats entry 0"),
])
def test_needles_file_errors_name_entry_and_field(tmp_path, content, message):
    with pytest.raises(SsmdiagError, match=message):
        load_needles(_write(tmp_path, content))


def test_needles_file_loads_and_cycles(tmp_path):
    needles = resolve_needles(_write(tmp_path, [GOOD, {**GOOD, "real_answer": None}]), 5, seed=0)
    assert len(needles) == 5 and {n.kind for n in needles} == {"file"}
    assert resolve_needles("counterfactual", 3, 0) == resolve_needles("counterfactual", 3, 0)


def test_haystack_files_sorted_empty_and_too_short(tmp_path, tok):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "b.txt").write_text("Second file. It follows.")
    (d / "a.txt").write_text("First file. It comes first.")
    with pytest.raises(SsmdiagError, match=r"has only \d+ tokens; the longest length needs 500"):
        build_haystack(tok, 500, d)
    hay = build_haystack(tok, 500, d, allow_repeat=True)
    assert hay.repeated and len(hay.ids) >= 500 and tok.decode(hay.ids).startswith("First file.")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SsmdiagError, match="is empty"):
        build_haystack(tok, 10, tmp_path / "empty")
    with pytest.raises(SsmdiagError, match="does not exist"):
        build_haystack(tok, 10, tmp_path / "missing.txt")


def test_grid_parsing():
    assert parse_lengths("1k, 2k,512,1K") == [512, 1024, 2048]
    assert parse_depths("5x") == [0, 25, 50, 75, 100] and parse_depths("11X") == [10.0 * i for i in range(11)]
    assert parse_depths("1x") == [50]
    assert parse_depths("0,50,100") == [0, 50, 100] and parse_depths("30%") == [30]
    # a bare number is a percent, never a count: --depths 50 is one cell at 50%, not fifty depths
    assert parse_depths("50") == [50] and parse_depths("5") == [5] and parse_depths("100") == [100]
    for bad in ("0,101", "0,-5", "x", "0x", "5x,50", "ax"):
        with pytest.raises(SsmdiagError):
            parse_depths(bad)
    with pytest.raises(SsmdiagError) as err:
        parse_depths("101")
    assert "101x" in err.value.hint  # a count above 100 written the old way is pointed to the new spelling
    with pytest.raises(SsmdiagError):
        parse_lengths("2q")
