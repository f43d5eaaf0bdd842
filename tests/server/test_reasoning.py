"""The think-tag parser. Oracle: str.partition on the whole text, for every way of cutting it into stream pieces."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsinfer.server.reasoning import ReasoningParser, prompt_opens_thinking, split_reasoning


def oracle(text: str) -> tuple[str, str]:
    body = text.lstrip()[len("<think>"):] if text.lstrip().startswith("<think>") else text
    reasoning, tag, content = body.partition("</think>")
    return reasoning, content


def feed_pieces(pieces: list[str], in_reasoning: bool = True) -> tuple[str, str]:
    parser = ReasoningParser(in_reasoning)
    out_r, out_c = [], []
    for piece in pieces + [None]:
        r, c = parser.feed(piece) if piece is not None else parser.flush()
        assert not (c and parser.in_reasoning), "content must not appear before </think>"
        out_r.append(r)
        out_c.append(c)
    return "".join(out_r), "".join(out_c)


TEXTS = ["Let me think.</think>The answer is 4.", "</think>direct", "no close tag at all", "",
         "a</think>b</think>c", "x </thin", "x </think", "x </think>", "<think>\nreason</think>answer",
         "half <thi", "<", "</", "</think", "</think>", "<think>", "<think>only", "ends with <"]


@pytest.mark.parametrize("text", TEXTS)
def test_whole_text(text):
    assert split_reasoning(text) == oracle(text)


@pytest.mark.parametrize("text", TEXTS)
def test_every_two_piece_cut(text):
    for cut in range(len(text) + 1):
        assert feed_pieces([text[:cut], text[cut:]]) == oracle(text), cut


@pytest.mark.parametrize("text", ["abc</think>xyz", "<think>ab</think>cd"])
def test_one_character_at_a_time(text):
    assert feed_pieces(list(text)) == oracle(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", " ", "\n", "<", "/", "think", ">", "</think>", "<think>", "</th", "ink>"]),
                max_size=12).map("".join), st.lists(st.integers(0, 40), max_size=5))
def test_random_texts_and_cuts(text, cuts):
    bounds = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0] + bounds, bounds + [len(text)])]
    assert feed_pieces(pieces) == oracle(text)


def test_tag_split_across_deltas_streams_reasoning_first():
    parser = ReasoningParser()
    assert parser.feed("I ponder") == ("I ponder", "")
    assert parser.feed(" more</th") == (" more", "")           # "</th" held back: it may be the tag
    assert parser.feed("ink>Answer") == ("", "Answer")
    assert parser.feed(" here") == ("", " here")
    assert parser.flush() == ("", "")


def test_held_prefix_that_is_not_the_tag_is_released():
    parser = ReasoningParser()
    assert parser.feed("a </t") == ("a ", "")
    assert parser.feed("ea") == ("</tea", "")


def test_not_in_reasoning_passes_everything_through():
    assert feed_pieces(["a</think>", "b"], in_reasoning=False) == ("", "a</think>b")


@pytest.mark.parametrize("prompt, expected", [
    ("<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>\n", True),            # R1
    ("<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>", True),              # V3.1 thinking
    ("<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜></think>", False),            # V3.1 non-thinking
    ("<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>", False),                     # V3
    ("<｜User｜>q<｜Assistant｜><think>r</think>a<｜end▁of▁sentence｜><｜User｜>q2<｜Assistant｜>", False),
    ("<｜User｜>say <think><｜Assistant｜>KING.\n", False),
    ("plain prompt ending <think>", True),
])
def test_prompt_opens_thinking(prompt, expected):
    assert prompt_opens_thinking(prompt) is expected
