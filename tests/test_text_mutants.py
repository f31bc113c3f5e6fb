"""`dlm.text` behaviours that mutation testing (scripts/mutation.sh, docs/mutation.md) found unguarded: the byte
alphabet itself, SentencePiece-style byte-fallback tokenizers (a Llama-class checkpoint's), a tokenizer that is
neither, the refusal of an unknown id, encoding without special tokens, a new stream, and a held-back tail that is
not half the text. Each test builds its own codec, so every mutant of `TextCodec` meets it (a module fixture's
construction is charged to the first test that uses it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from conftest import MINIATURE
from dlm.text import TextCodec, TextStream, byte_level_alphabet


def test_the_byte_alphabet_is_gpt2s_one_character_per_byte() -> None:
    alphabet = byte_level_alphabet()
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(alphabet.values()) == list(range(256))
    # printable bytes stand for themselves; the others, in order, for U+0100 on ('Ġ' is the space, 'Ń' 0xAD)
    assert (alphabet["!"], alphabet["~"], alphabet["¡"], alphabet["®"], alphabet["ÿ"]) == (33, 126, 161, 174, 255)
    assert (alphabet["Ā"], alphabet["Ġ"], alphabet["Ń"]) == (0, 32, 173)


# a SentencePiece-style vocabulary: byte tokens <0xNN> for what it cannot spell, a Sequence decoder as Llama's
BYTE_FALLBACK_VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x41>": 3, "<0xE6>": 4, "<0x97>": 5, "<0xA5>": 6,
                       "<0xAB>": 7, "é": 8, "▁": 9, "x": 10}


def ids_of(codec: TextCodec) -> dict[str, int]:
    ids = {piece: codec.tokenizer.token_to_id(piece) for piece in BYTE_FALLBACK_VOCAB}
    return {piece: i for piece, i in ids.items() if i is not None}


def write_tokenizer(directory: Path, tokenizer: Tokenizer) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tokenizer.to_str())
    return directory


@pytest.fixture
def byte_fallback(tmp_path: Path) -> TextCodec:
    tokenizer = Tokenizer(models.BPE(vocab=BYTE_FALLBACK_VOCAB, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    return TextCodec(write_tokenizer(tmp_path / "byte_fallback", tokenizer))


def test_byte_fallback_tokens_give_their_byte_inside_a_sequence_decoder(byte_fallback: TextCodec) -> None:
    decoder = json.loads(byte_fallback.tokenizer.to_str())["decoder"]
    assert decoder["type"] == "Sequence"  # ByteFallback is found inside it
    assert byte_fallback.byte_fallback and not byte_fallback.byte_level
    ids = ids_of(byte_fallback)
    assert [byte_fallback.token_bytes(ids[p]) for p in ("<0x41>", "<0xE6>", "<0x97>", "<0xA5>", "<0xAB>")] == \
        [b"A", b"\xe6", b"\x97", b"\xa5", b"\xab"]
    # a piece of characters is their UTF-8, not their bytes in the byte-level alphabet ('é' is 0xE9 there)
    assert byte_fallback.token_bytes(ids["é"]) == "é".encode("utf-8")
    assert byte_fallback.token_bytes(ids["</s>"]) == b"</s>" and byte_fallback.text_bytes(ids["</s>"]) == b""


def test_a_character_spelled_in_byte_fallback_tokens_is_streamed_whole(byte_fallback: TextCodec) -> None:
    ids = ids_of(byte_fallback)
    tokens = [ids["x"], ids["<0xE6>"], ids["<0x97>"], ids["<0xA5>"], ids["x"]]  # x日x
    stream, deltas, delivered = TextStream(byte_fallback), [], []
    for end in range(1, len(tokens) + 1):
        deltas.append(stream.update(tokens[:end], final=end == len(tokens))[0])
        delivered.append(stream.delivered_tokens(tokens[:end]))
    assert deltas == ["x", "", "", "日", "x"]
    assert delivered == [1, 1, 1, 4, 5]  # the character's byte tokens wait for its last byte


def test_a_vocabulary_token_that_only_looks_like_a_byte_token_is_written_as_it_is(tmp_path: Path) -> None:
    """Without a ByteFallback decoder, "<0x41>" is five characters, not the byte 0x41."""
    tokenizer = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "<0x41>": 1}, unk_token="[UNK]"))
    codec = TextCodec(write_tokenizer(tmp_path / "word_level", tokenizer))
    assert not codec.byte_fallback and not codec.byte_level
    assert codec.token_bytes(1) == b"<0x41>"


def test_an_id_outside_the_vocabulary_is_refused_by_name() -> None:
    codec = TextCodec(MINIATURE)
    with pytest.raises(ValueError, match="token id 1000000 is not in the tokenizer's vocabulary"):
        codec.token_bytes(1_000_000)


def test_special_tokens_add_no_text_bytes() -> None:
    codec = TextCodec(MINIATURE)
    bos, a = codec.encode("A")
    assert codec.token_bytes(bos) == b"<s>" and codec.text_bytes(bos) == b"" and codec.text_bytes(a) == b"A"


def test_encoding_without_special_tokens_leaves_out_the_bos() -> None:
    codec = TextCodec(MINIATURE)
    with_bos, without = codec.encode("AB"), codec.encode("AB", add_special_tokens=False)
    assert with_bos[1:] == without and len(without) == 2 and codec.decode(without) == "AB"


def test_a_new_stream_has_sent_nothing() -> None:
    codec = TextCodec(MINIATURE)
    stream = TextStream(codec, ["AB"])
    assert (stream.text, stream.sent, stream.final, stream.stopped) == ("", 0, False, False)
    assert stream.final is False and stream.stopped is False
    assert stream.delivered_tokens(codec.encode("XY")[1:]) == 0


def test_a_special_token_before_any_text_counts_as_delivered() -> None:
    """It holds no text, so the text sent so far (none: 'AB' may begin the stop word) holds all of it."""
    codec = TextCodec(MINIATURE)
    tokens = codec.encode("AB")  # <s> A B
    stream = TextStream(codec, ["ABC"])
    assert stream.update(tokens, final=False) == ("", False)
    assert stream.delivered_tokens(tokens) == 1


def test_the_held_back_tail_is_only_the_possible_start_of_a_stop_word() -> None:
    codec = TextCodec(MINIATURE)
    stream = TextStream(codec, ["XYZ"])
    assert stream.update(codec.encode("ABCXY"), final=False) == ("ABC", False)
    assert stream.update(codec.encode("ABCXYZ"), final=False) == ("", True)
    assert stream.text == "ABC"
