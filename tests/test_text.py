"""Text deltas and stop words (`dlm.text`) with the miniature's tokenizer."""

from __future__ import annotations

import pytest

from conftest import MINIATURE
from dlm.text import TextCodec, TextStream


@pytest.fixture(scope="module")
def codec():
    return TextCodec(MINIATURE)


def stream_all(codec, text, stop_words=(), chunk=3):
    """Feed `text`'s tokens a few at a time; return the deltas and whether a stop word ended it."""
    tokens = codec.encode(text)
    stream = TextStream(codec, list(stop_words))
    deltas, stopped = [], False
    for end in range(chunk, len(tokens) + chunk, chunk):
        final = end >= len(tokens)
        delta, stopped = stream.update(tokens[:end], final)
        deltas.append(delta)
        if stopped or final:
            break
    return deltas, stopped, stream


def test_deltas_add_up_to_the_text(codec):
    text = "HELLO+WORLD=42"
    deltas, stopped, stream = stream_all(codec, text)
    assert "".join(deltas) == codec.decode(codec.encode(text)) == stream.text and not stopped
    assert sum(1 for d in deltas if d) > 1


def test_stop_word_ends_the_text_before_it(codec):
    deltas, stopped, stream = stream_all(codec, "ABCDEFGHIJKL", stop_words=["GHI"])
    assert stopped and "".join(deltas) == "ABCDEF" == stream.text


def test_a_possible_stop_word_start_is_held_back_until_it_is_decided(codec):
    stream = TextStream(codec, ["XYZ"])
    tokens = codec.encode("ABXY")
    delta, stopped = stream.update(tokens, final=False)
    assert delta == "AB" and not stopped  # "XY" might begin "XYZ"
    delta, stopped = stream.update(codec.encode("ABXYQ"), final=False)
    assert delta == "XYQ" and not stopped


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        TextCodec(tmp_path)
