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


# --- UTF-8 deltas and stop words on byte-level tokenizers, whose tokens split multi-byte characters -----------------
@pytest.fixture(scope="module")
def one_byte_per_token(tmp_path_factory):
    """export/random_checkpoint.py's tokenizer (the real-vocabulary test checkpoint's): no merges, so real text is
    one token per byte and every multi-byte character spans several tokens; its other tokens are 2-4 random bytes."""
    from export.random_checkpoint import byte_level_tokenizer

    directory = tmp_path_factory.mktemp("one_byte_per_token")
    (directory / "tokenizer.json").write_text(byte_level_tokenizer(1024))
    return TextCodec(directory)


def stream_deltas(codec, tokens, chunk, stop_words=()):
    """Feed `tokens` `chunk` at a time: (the deltas, the stream, the tokens fed at its end)."""
    stream, deltas = TextStream(codec, list(stop_words)), []
    for end in range(chunk, len(tokens) + chunk, chunk):
        end = min(end, len(tokens))
        delta, stopped = stream.update(tokens[:end], end == len(tokens))
        deltas.append(delta)
        if stopped or end == len(tokens):
            return deltas, stream, tokens[:end]
    raise AssertionError("unreachable")


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("tokenizer", ["byte_level", "one_byte_per_token"])
def test_streamed_deltas_never_hold_half_a_character(request, tokenizer, chunk):
    codec = request.getfixturevalue(tokenizer)
    tokens = codec.encode(MULTI_BYTE)
    prefixes = [codec.decode(tokens[:end]) for end in range(chunk, len(tokens), chunk)]
    assert any(p.endswith("\ufffd") for p in prefixes), "no prefix ends inside a character: the test tests nothing"
    deltas, stream, _ = stream_deltas(codec, tokens, chunk, stop_words=["never in the text"])
    assert not [d for d in deltas if "\ufffd" in d], deltas
    assert "".join(deltas) == stream.text == MULTI_BYTE
    assert sum(1 for d in deltas if d) > 10


def test_deltas_of_random_bytes_only_ever_extend_the_final_text(one_byte_per_token):
    """Tokens of random bytes (invalid UTF-8 included) mixed with pieces of real multi-byte text: what has been sent
    is always the start of the final text, so a replacement character is sent only where the final text has one."""
    import random

    rng = random.Random(0)
    ids = range(16, 1024)  # the byte tokens and the random 2-4 byte ones, no special token
    real = one_byte_per_token.encode(MULTI_BYTE)[1:]  # without <s>
    held_back = 0
    for _ in range(200):
        tokens: list[int] = []
        while len(tokens) < rng.randint(1, 24):
            start = rng.randrange(len(real))
            tokens += [rng.choice(ids)] if rng.random() < 0.5 else real[start : start + rng.randint(1, 6)]
        final, chunk = one_byte_per_token.decode(tokens), rng.randint(1, 4)
        stream, sent = TextStream(one_byte_per_token), ""
        for end in range(chunk, len(tokens) + chunk, chunk):
            end = min(end, len(tokens))
            sent += stream.update(tokens[:end], end == len(tokens))[0]
            assert final.startswith(sent), (tokens, end, sent)
            held_back += len(sent) < len(one_byte_per_token.decode(tokens[:end]))
        assert sent == final == stream.text
    assert held_back > 50  # deltas did wait for the rest of a character


# a stop word that begins or ends inside a multi-character token: the text ends before it; the tokens delivered
# (and so the log probs sent) are those that start before the cut, the token the cut falls in included
STOPS = [("ascii wo", "plain "), ("n asc", "plai"), (" and", "plain ascii words"), ("lain", "p"),
         ("本", "naïve café, 日"), ("語", "naïve café, 日本"), ("ve c", "naï"), ("😀", "naïve café, 日本語のテキスト, emoji ")]


def covering(codec, tokens, text: str) -> int:
    """The fewest of `tokens` whose bytes hold all of `text`'s."""
    target, held = len(text.encode("utf-8")), b""
    for n, token in enumerate(tokens):
        if len(held) >= target:
            return n
        held += codec.text_bytes(token)
    return len(tokens)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
@pytest.mark.parametrize("stop, text", STOPS, ids=[s for s, _ in STOPS])
def test_a_stop_word_inside_a_token_cuts_the_text_and_delivers_the_token_it_falls_in(byte_level, stop, text, chunk):
    tokens = byte_level.encode("plain ascii words and more plain words" if stop.isascii() and "ve" not in stop
                               else MULTI_BYTE)
    stream, delivered = TextStream(byte_level, [stop]), 0
    deltas = []
    for end in range(min(chunk, len(tokens)), len(tokens) + 1, chunk):
        delta, stopped = stream.update(tokens[:end], end == len(tokens))
        deltas.append(delta)
        now = stream.delivered_tokens(tokens[:end])
        assert delivered <= now
        delivered = now
        if stopped:
            break
        sent = stream.text[: stream.sent].encode("utf-8")
        assert b"".join(byte_level.text_bytes(t) for t in tokens[:now]) == sent[: len(b"".join(
            byte_level.text_bytes(t) for t in tokens[:now]))]  # no token runs ahead of the text sent
    assert stopped and stream.text == "".join(deltas) == text
    n = covering(byte_level, tokens, text)
    assert delivered == n, (delivered, n, [byte_level.token_bytes(t) for t in tokens[: max(delivered, n) + 1]])
    joined = b"".join(byte_level.text_bytes(t) for t in tokens[:n])
    assert joined.startswith(text.encode("utf-8"))
    straddles = len(joined) > len(text.encode("utf-8"))  # the last delivered token runs past the cut
    assert straddles == (stop not in (" and", "😀"))


def test_the_tests_stop_words_fall_inside_multi_character_tokens(byte_level):
    """The cases above are what they claim: each cut but the two at a boundary falls inside a token of several
    characters or several bytes."""
    for stop, text in STOPS:
        tokens = byte_level.encode("plain ascii words and more plain words" if stop.isascii() and "ve" not in stop
                                   else MULTI_BYTE)
        n = covering(byte_level, tokens, text)
        last = byte_level.text_bytes(tokens[n - 1]) if n else b""
        assert len(last) > 1 or stop in (" and", "😀"), (stop, last)


# --- the log probs the model's responses carry (model.py's Responder, outside Triton) -------------------------------
@pytest.fixture(scope="module")
def triton_model():
    """model_repository/dlm/1/model.py imported with a stand-in for Triton's `triton_python_backend_utils` that
    records the tensors of each response."""
    import importlib.util
    import sys
    import types

    from conftest import ROOT

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.outputs = {t.name: t.array for t in output_tensors}
            self.error = error

    class TritonError:
        INVALID_ARG = UNAVAILABLE = CANCELLED = INTERNAL = 0

        def __init__(self, message, code=0):
            self.message = message

    stub = types.ModuleType("triton_python_backend_utils")
    stub.__dict__.update(Tensor=Tensor, InferenceResponse=InferenceResponse, TritonError=TritonError,
                         TRITONSERVER_RESPONSE_COMPLETE_FINAL=1)
    saved = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = stub
    try:
        spec = importlib.util.spec_from_file_location("dlm_triton_model", ROOT / "model_repository/dlm/1/model.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["triton_python_backend_utils"]
        else:
            sys.modules["triton_python_backend_utils"] = saved
    return module


def responses_for(model, codec, tokens, stop_words, chunk, stream=True):
    """model.py's Responder fed `tokens` `chunk` at a time as the scheduler's job commits them (the scheduler's own
    Job and Sequence), each token with log prob -i/100; the responses it sent, each a dict of its outputs."""
    from types import SimpleNamespace

    from dlm.refine import GenerationParams, Sequence, TokenSpec
    from dlm.scheduler import Job

    sent = []
    sender = SimpleNamespace(send=lambda response, flags=0: sent.append(response.outputs), is_cancelled=lambda: False)
    responder = model.Responder(sender, codec, stream, list(stop_words), later=None, logprobs=0)
    spec = TokenSpec(mask_token_id=0, eos_token_ids=frozenset({1}), block_size=32, max_position_embeddings=4096)
    seq = Sequence([2], GenerationParams(mode="ar", max_tokens=len(tokens), logprobs=0), spec)
    job = Job(seq, responder)
    for end in range(chunk, len(tokens) + chunk, chunk):
        end = min(end, len(tokens))
        seq.tokens, seq.forwards = tokens[:end], end
        seq.logprobs, seq.top_logprobs = [-i / 100 for i in range(end)], [[] for _ in range(end)]
        job.outcome = "length" if end == len(tokens) else None
        if responder.update(job):  # a stop word: the scheduler ends the job and asks for the final response
            job.outcome = "stop"
            responder.update(job)
            break
    return sent


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("stop, text", STOPS, ids=[s for s, _ in STOPS])
def test_responses_carry_the_log_probs_of_the_tokens_their_text_delivers(triton_model, byte_level, stop, text,
                                                                         chunk, stream):
    tokens = byte_level.encode("plain ascii words and more plain words" if stop.isascii() and "ve" not in stop
                               else MULTI_BYTE)
    sent = responses_for(triton_model, byte_level, tokens, [stop], chunk, stream)
    assert "".join(r["text_output"][0].decode() for r in sent) == text
    n = covering(byte_level, tokens, text)
    log_probs = [float(p) for r in sent for p in r["output_log_probs"]]
    assert log_probs == pytest.approx([-i / 100 for i in range(n)])  # each delivered token once, in order
    assert [b for r in sent for b in r["output_tokens"]] == [byte_level.token_bytes(t) for t in tokens[:n]]
    assert sent[-1]["finish_reason"][0] == b"stop"
    text_so_far, tokens_so_far = b"", b""
    for r in sent[:-1]:  # no response before the last carries a token its text (so far) does not hold
        text_so_far += r["text_output"][0]
        tokens_so_far += b"".join(r["output_tokens"])
        assert text_so_far.startswith(tokens_so_far)
