"""Grammar-constrained decoding (issue 26 parts 1-2) in every mode: guides compiled by llguidance against
the checkpoint's tokenizer (bad ones refused with the compiler's message), every output accepted by the grammar and
valid against its schema (from the trained miniature and from a random model of the real vocabulary, whose best
tokens are never the allowed ones), constrained `speculative` equal to constrained `ar` at temperature 0, and
constrained diffusion committing its frontier and the forced tokens."""

from __future__ import annotations

import json
import re

import pytest

from dlm.grammar import Compiler, GrammarError
from dlm.refine import GenerationParams, TokenSpec, generate
from dlm.text import TextCodec

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["sum", "ok", "tag"],
          "properties": {"sum": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"},
                         "tag": {"enum": ["a", "bc"]}}}


def validate(value: dict) -> None:
    assert set(value) == {"sum", "ok", "tag"}
    assert isinstance(value["sum"], int) and 0 <= value["sum"] <= 999
    assert isinstance(value["ok"], bool) and value["tag"] in ("a", "bc")


def compiler_for(directory, config: dict) -> Compiler:
    return Compiler(TextCodec(directory), int(config["vocab_size"]), int(config["eos_token_id"]),
                    int(config["mask_token_id"]))


@pytest.fixture(scope="module")
def miniature_compiler(miniature):
    from conftest import MINIATURE

    return compiler_for(MINIATURE, json.loads((MINIATURE / "config.json").read_text())), TextCodec(MINIATURE)


@pytest.mark.parametrize("guide_type, guide, words", [
    ("json_schema", '{"type": "objekt"}', "objekt"),
    ("json_schema", '{"type": "object", "properties": ', "not valid JSON"),
    ("regex", "[a-", "unclosed character class"),
    ("lark", "start: foo", 'unknown name: "foo"'),
    ("ebnf", "x", "unknown: expected one of json, json_schema, regex, lark"),
])
def test_a_bad_guide_is_refused_with_the_compilers_message(miniature_compiler, guide_type, guide, words):
    compiler, _ = miniature_compiler
    with pytest.raises(GrammarError, match=re.escape(words)):
        compiler.compile(guide_type, guide)


def decode(runtime, spec, prompt, params) -> list[int]:
    result = generate(runtime, [prompt], params, spec)[0]
    return result.tokens


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_miniature_answers_the_schema_in_every_mode(miniature, miniature_compiler, temperature):
    compiler, codec = miniature_compiler
    grammar = compiler.compile("json_schema", json.dumps(SCHEMA))
    prompts = [miniature.encode(p) for p in ("93+17=", "upper:abc=")]
    outputs = {}
    for mode in ("ar", "speculative", "diffusion"):
        params = GenerationParams(mode, 48, temperature=temperature, seed=3, guide=grammar)
        outputs[mode] = [decode(miniature.runtime, miniature.spec, p, params) for p in prompts]
        for tokens in outputs[mode]:
            validate(json.loads(codec.decode(tokens)))
    if temperature == 0.0:
        assert outputs["ar"] == outputs["speculative"]


def test_a_regex_and_a_json_object_constrain_the_miniature(miniature, miniature_compiler):
    compiler, codec = miniature_compiler
    prompt = miniature.encode("93+17=")
    regex = compiler.compile("regex", r"(yes|no), [0-9]{2}")
    for mode in ("ar", "speculative"):
        text = codec.decode(decode(miniature.runtime, miniature.spec, prompt, GenerationParams(mode, 16, guide=regex)))
        assert re.fullmatch(r"(yes|no), [0-9]{2}", text), text
    anything = compiler.compile("json", "")
    tokens = decode(miniature.runtime, miniature.spec, prompt, GenerationParams("ar", 24, guide=anything))
    text = codec.decode(tokens)
    assert text.startswith("{")  # a JSON object, or a prefix of one at max_tokens


def test_remasking_and_ignore_eos_with_a_guide_are_refused(miniature_compiler):
    grammar = miniature_compiler[0].compile("json", "")
    with pytest.raises(ValueError, match="remask_threshold"):
        GenerationParams("diffusion", guide=grammar, remask_threshold=0.5).validate()
    with pytest.raises(ValueError, match="ignore_eos"):
        GenerationParams("ar", guide=grammar, ignore_eos=True).validate()


@pytest.fixture(scope="module")
def real_vocabulary(tmp_path_factory):
    return build_real_vocabulary(tmp_path_factory.mktemp("real_vocab"))


def build_real_vocabulary(directory):
    """A random checkpoint of the real vocabulary (131,072 ids), one narrow layer, and its byte-level tokenizer,
    written into `directory`: its runtime, token spec, grammar compiler and codec."""
    import dataclasses

    from dlm.runtime import CacheLayout, TorchRuntime
    from export.checkpoint import load_checkpoint
    from export.random_checkpoint import real_scale_config, write_random_checkpoint

    config = real_scale_config(num_hidden_layers=1, hidden_size=64, intermediate_size=128)
    directory = write_random_checkpoint(directory, config, dtype="float32")
    model = load_checkpoint(directory)
    runtime = TorchRuntime(model.float().eval(), CacheLayout.from_config(config))
    spec = dataclasses.replace(TokenSpec.from_config(config))
    return runtime, spec, compiler_for(directory, config), TextCodec(directory)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_random_weights_of_the_real_vocabulary_still_answer_valid_json(real_vocabulary, temperature):
    runtime, spec, compiler, codec = real_vocabulary
    grammar = compiler.compile("json_schema", json.dumps(SCHEMA))
    prompt = codec.encode("Give me JSON:")
    outputs = {}
    for mode in ("ar", "speculative", "diffusion"):
        outputs[mode] = decode(runtime, spec, prompt, GenerationParams(mode, 48, temperature=temperature, seed=3,
                                                                       guide=grammar))
        validate(json.loads(codec.decode(outputs[mode])))
    if temperature == 0.0:
        assert outputs["ar"] == outputs["speculative"]
    unconstrained = codec.decode(decode(runtime, spec, prompt, GenerationParams("ar", 16)))
    with pytest.raises(ValueError):
        json.loads(unconstrained)  # the grammar did the work, not the weights


@pytest.mark.slow
def test_diffusion_commits_the_frontier_and_forced_tokens_without_a_pass(miniature, miniature_compiler):
    """A schema whose keys are fixed forces most of its characters: constrained diffusion commits them without a
    pass, so it takes fewer forwards than tokens (tokens per forward > 1) and fewer than ar, and its answer is
    valid; every pass's first open position is chosen under the allowed-token mask."""
    from dlm.refine import Sequence

    compiler, codec = miniature_compiler
    grammar = compiler.compile("json_schema", json.dumps(SCHEMA))
    prompt = miniature.encode("93+17=")
    diffusion = generate(miniature.runtime, [prompt], GenerationParams("diffusion", 48, guide=grammar),
                         miniature.spec)[0]
    ar = generate(miniature.runtime, [prompt], GenerationParams("ar", 48, guide=grammar), miniature.spec)[0]
    validate(json.loads(codec.decode(diffusion.tokens)))
    assert diffusion.num_tokens / diffusion.num_forwards >= 2.0, (diffusion.num_tokens, diffusion.num_forwards)
    assert diffusion.num_forwards < ar.num_forwards
    seq = Sequence(prompt, GenerationParams("diffusion", 48, guide=grammar), miniature.spec)
    assert seq.constraint is not None
