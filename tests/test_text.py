"""Text deltas and stop words (`dlm.text`) with the miniature's tokenizer."""

from __future__ import annotations

import pytest

from conftest import MINIATURE
from dlm.text import TextCodec, TextStream, byte_level_alphabet


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


# --- each token's raw bytes -------------------------------------------------------------------------------------
MULTI_BYTE = "naïve café, 日本語のテキスト, emoji 😀 and plain ascii words " * 3


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    """A byte-level BPE trained here on ASCII-heavy text, so the rare multi-byte characters stay split into
    byte tokens (half a character each), as a real vocabulary splits rare characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["plain ascii words and more plain words " * 50, MULTI_BYTE], trainer)
    directory = tmp_path_factory.mktemp("byte_level")
    tokenizer.save(str(directory / "tokenizer.json"))
    return TextCodec(directory)


def test_byte_level_token_bytes_are_exact_even_for_half_characters(byte_level):
    tokens = byte_level.encode(MULTI_BYTE)
    pieces = [byte_level.token_bytes(t) for t in tokens]
    assert b"".join(pieces) == MULTI_BYTE.encode("utf-8")
    halves = [p for p in pieces if not _is_utf8(p)]
    assert halves, "the trained vocabulary should split some character across tokens"
    assert byte_level.token_bytes(byte_level.tokenizer.token_to_id("</s>")) == b"</s>"


def test_other_tokenizers_give_the_decoded_piece(codec):
    tokens = codec.encode("AB+7=")
    assert [codec.token_bytes(t) for t in tokens[1:]] == [b"A", b"B", b"+", b"7", b"="]
    assert codec.token_bytes(tokens[0]) == b"<s>" and codec.text_bytes(tokens[0]) == b""  # special: not in text


def test_delivered_tokens_follow_the_text_and_a_half_character_waits(byte_level):
    tokens = byte_level.encode(MULTI_BYTE)
    tokens = tokens[: max(n for n in range(40) if _is_utf8(b"".join(map(byte_level.token_bytes, tokens[:n]))))]
    stream = TextStream(byte_level)
    delivered, received, waited = 0, b"", False
    for end in range(1, len(tokens) + 1):
        final = end == len(tokens)
        delta, _ = stream.update(tokens[:end], final)
        received_text = stream.text[: stream.sent]
        now = stream.delivered_tokens(tokens[:end])
        assert delivered <= now <= end
        received += b"".join(byte_level.token_bytes(t) for t in tokens[delivered:now])
        delivered = now
        assert received_text.encode("utf-8").startswith(received)  # no token runs ahead of the text
        if not _is_utf8(b"".join(byte_level.token_bytes(t) for t in tokens[:end])):
            assert now < end  # a token that ends mid-character waits for the rest of the character
            waited = True
    assert delivered == len(tokens) and received == stream.text.encode("utf-8") and waited


def test_delivered_tokens_stop_at_a_stop_word(codec):
    tokens = codec.encode("ABCDEFGHIJ")[1:]
    stream = TextStream(codec, ["EF"])
    stream.update(tokens, final=False)
    assert stream.text == "ABCD" and stream.delivered_tokens(tokens) == 4
    stream = TextStream(codec, ["A"])
    stream.update(tokens, final=True)
    assert stream.text == "" and stream.delivered_tokens(tokens) == 0


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_delivered_tokens_never_run_ahead_of_text_with_invalid_utf8(byte_level):
    char_of = {b: c for c, b in byte_level_alphabet().items()}
    pieces = [b"a", b"\x80", b"b", b"\xc3", b"\xa9", b"\xe6", b"\x97", b"c", b"\xff", b"\xe6\x97", b"\xa5", b"d"]
    tokens = [byte_level.tokenizer.token_to_id("".join(char_of[b] for b in p)) for p in pieces]
    assert None not in tokens and [byte_level.token_bytes(t) for t in tokens] == pieces
    stream = TextStream(byte_level)
    for end in range(1, len(tokens) + 1):
        stream.update(tokens[:end], final=end == len(tokens))
        delivered = stream.delivered_tokens(tokens[:end])
        covered = b"".join(pieces[:delivered]).decode("utf-8", errors="replace")
        assert stream.text[: stream.sent].startswith(covered), (end, delivered)
        if end == 5:
            assert delivered == 5  # "é" complete: every token so far
        if end == 6:
            assert delivered == 5  # 0xe6 opens a character that has not ended
    assert delivered == len(tokens) and stream.text == b"".join(pieces).decode("utf-8", errors="replace")
