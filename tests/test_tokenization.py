"""Prompts tokenized and chat templates rendered exactly as transformers 5 does it, on real tokenizers from package
registries (Mistral's Tekken converted by transformers, a Llama-class tokenizer converted by transformers, the
instruct variant of Tekken, the miniature's own): the server's encoding (`dlm.text.TextCodec` over the repository's
tokenizer folder that `python -m export repository` writes) against `AutoTokenizer` on the checkpoint's own files,
id for id; and the gateway's template rendering (`client.chat_template`) against `apply_chat_template`."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest

from client.chat_template import ChatTemplate, TemplateError
from conftest import MINIATURE
from dlm.special_tokens import check_special_tokens
from dlm.text import TextCodec
from export.repository import write_tokenizer
from published_checkpoint import instruct_tokenizer, llama_tokenizer, tekken_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")

TEXTS = [
    "Hello world", " leading space", "two  spaces\nand a line\n\n", "Grüße aus Köln, naïve café",
    "Привет, мир", "你好，世界。日本語のテキスト", "مرحبا بالعالم", "नमस्ते दुनिया", "🙂👍🏽 emoji 🇫🇷 flags", "x=1+2; y = x**2",
    "<s>special</s> in text", "tabs\tand\u00a0nbsp", "a",
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is 2+2?"}],
    "system": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Ünïcödé? 你好 🙂"}],
    "turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
              {"role": "user", "content": "Tell me a joke."}],
    "tool": [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [{"id": "call0abcd", "type": "function", "function": {
                 "name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "tool_call_id": "call0abcd", "name": "get_weather", "content": "18 °C, sunny"},
             {"role": "user", "content": "Thanks"}],
}


def miniature_tokenizer(directory: Path) -> Path:
    directory.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(MINIATURE / name, directory / name)
    return directory


def with_settings(directory: Path, **settings: object) -> Path:
    path = directory / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
    return directory


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    made = {
        "tekken": tekken_tokenizer(root / "tekken"),
        "llama": llama_tokenizer(root / "llama"),
        "instruct": instruct_tokenizer(root / "instruct"),
        "miniature": miniature_tokenizer(root / "miniature"),
    }
    # Tekken's files under settings transformers treats specially: an add_bos_token it ignores, and a Llama
    # class, which rebuilds the pipeline in code (Metaspace) and so tokenizes quite differently from the file
    made["tekken-add-bos"] = with_settings(shutil.copytree(made["tekken"], root / "tekken-add-bos"), add_bos_token=True)
    made["tekken-llama-class"] = with_settings(shutil.copytree(made["tekken"], root / "tekken-llama-class"),
                                               tokenizer_class="LlamaTokenizerFast")
    return made


@functools.lru_cache(maxsize=None)
def reference(directory: Path):
    """transformers' tokenizer for the files in `directory` (loaded once: Tekken's takes seconds)."""
    return transformers.AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)


@functools.lru_cache(maxsize=None)
def codec_of(directory: Path) -> TextCodec:
    return TextCodec(directory)


def served(directory: Path, tmp_path: Path) -> Path:
    """The tokenizer folder `python -m export repository` writes for the checkpoint in `directory`."""
    folder = tmp_path / "repository-tokenizer"
    write_tokenizer(directory, folder, log=lambda line: None)
    return folder


@pytest.mark.parametrize("name", ["tekken", "llama", "instruct", "miniature", "tekken-add-bos", "tekken-llama-class"])
def test_plain_text_ids_equal_transformers(tokenizers_dir, tmp_path, name):
    directory = tokenizers_dir[name]
    tokenizer, codec = reference(directory), TextCodec(served(directory, tmp_path))
    for text in TEXTS if name != "miniature" else ["12+34=", "HELLO", "a"]:
        assert codec.encode(text) == tokenizer(text).input_ids, text
        assert codec.encode(text, add_special_tokens=False) == tokenizer(text, add_special_tokens=False).input_ids
        assert codec.decode(codec.encode(text)) == tokenizer.decode(tokenizer(text).input_ids,
                                                                    skip_special_tokens=True), text


def test_plain_tokenizers_need_no_resolution(tokenizers_dir):
    """A TokenizersBackend checkpoint's files serve as they are: the server's codec over the checkpoint itself."""
    for name in ("tekken", "instruct", "tekken-add-bos"):
        tokenizer, codec = reference(tokenizers_dir[name]), codec_of(tokenizers_dir[name])
        assert all(codec.encode(t) == tokenizer(t).input_ids for t in TEXTS)


def test_bos_is_the_post_processors_decision(tokenizers_dir):
    """Tekken adds no BOS on plain text ([1097] for 'a', as transformers); the miniature's post-processor adds <s>.
    add_bos_token, which transformers 5 drops when tokenizer.json is present, is a warning, not a refusal."""
    assert TextCodec(tokenizers_dir["tekken"]).encode("a") == [1097]
    assert TextCodec(tokenizers_dir["miniature"]).encode("a")[0] == 1
    # transformers warns about Tekken's regex (a large tokenizer, config.json not saved by transformers 5): so do we
    warnings = check_special_tokens(TextCodec(tokenizers_dir["tekken"]).tokenizer, tokenizers_dir["tekken"])
    assert len(warnings) == 1 and "fix_mistral_regex" in warnings[0]
    warnings = check_special_tokens(TextCodec(tokenizers_dir["tekken-add-bos"]).tokenizer,
                                    tokenizers_dir["tekken-add-bos"])
    assert len(warnings) == 2 and "add_bos_token true" in warnings[0] and "adds no BOS" in warnings[0]
    assert check_special_tokens(TextCodec(tokenizers_dir["miniature"]).tokenizer, tokenizers_dir["miniature"]) == []


def test_a_real_contradiction_is_refused(tokenizers_dir, tmp_path):
    directory = Path(shutil.copytree(tokenizers_dir["miniature"], tmp_path / "contradiction"))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "bos_token_id": 3}))
    with pytest.raises(ValueError, match="names '<s>' as bos_token, which the tokenizer encodes as id 1, but "
                                         "config.json gives bos_token_id 3"):
        check_special_tokens(TextCodec(directory).tokenizer, directory)


@pytest.mark.parametrize("fix", [True, False, None])
def test_the_mistral_regex_is_fixed_only_when_asked_as_transformers_does(tokenizers_dir, tmp_path, fix):
    """A Tekken tokenizer.json whose Split regex is a wrong one: transformers replaces it when tokenizer_config.json
    sets fix_mistral_regex (and only warns otherwise); the server's loader does the same."""
    directory = Path(shutil.copytree(tokenizers_dir["tekken"], tmp_path / "regex"))
    data = json.loads((directory / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+|\s+"
    (directory / "tokenizer.json").write_text(json.dumps(data))
    if fix is not None:
        with_settings(directory, fix_mistral_regex=fix)
    tokenizer, codec = reference(directory), TextCodec(directory)
    texts = ["Hello World's x1.5", "don't STOP me now", "CamelCaseWords and 12345"]
    assert [codec.encode(t) for t in texts] == [tokenizer(t).input_ids for t in texts]
    fixed = TextCodec(tokenizers_dir["tekken"])  # its regex is the right one
    assert ([codec.encode(t) for t in texts] == [fixed.encode(t) for t in texts]) == bool(fix)
    warnings = check_special_tokens(codec.tokenizer, directory)
    assert any("fix_mistral_regex" in w for w in warnings) == (fix is None)


@functools.lru_cache(maxsize=None)
def template_of(directory: Path) -> ChatTemplate:
    return ChatTemplate.from_directory(directory)


def render_both(directory: Path, messages, **options):
    """(ours, transformers') rendered text, or the exception each raised."""
    ours_template = template_of(directory)
    tokenizer = reference(directory)
    results = []
    for render in (lambda: ours_template.render(messages, **options),
                   lambda: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                         **options)):
        try:
            results.append(render())
        except Exception as error:  # noqa: BLE001 - compared below
            results.append(error)
    return results


@pytest.mark.parametrize("name", ["instruct", "tekken"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_chat_prompts_equal_apply_chat_template(tokenizers_dir, name, conversation):
    directory = tokenizers_dir[name]
    messages = CONVERSATIONS[conversation]
    tokenizer, codec = reference(directory), codec_of(directory)
    for options in ({}, {"tools": TOOLS}, {"enable_thinking": True},
                    {"documents": [{"title": "Doc", "text": "Paris is in France."}]}):
        ours, theirs = render_both(directory, messages, **options)
        if isinstance(theirs, Exception):  # the template refused these messages: so must ours, with its message
            assert isinstance(ours, TemplateError), (options, theirs)
            continue
        assert ours == theirs, options
        expected = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **options)
        assert codec.encode(ours, add_special_tokens=False) == list(expected["input_ids"]), options


def test_the_instruct_template_renders_as_nvidias(tokenizers_dir):
    template = ChatTemplate.from_directory(tokenizers_dir["instruct"])
    assert template.render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think></think>")
    ids = TextCodec(tokenizers_dir["instruct"]).encode(template.render([{"role": "user", "content": "Hi"}]),
                                                       add_special_tokens=False)
    assert ids[0] == 10 and ids[-2:] == [12, 13] and 11 in ids  # <|im_start|> ... <think></think>


def test_chat_template_jinja_takes_priority_and_named_templates(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "chat_template": [
        {"name": "default", "template": "D{{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"}]}))
    template = ChatTemplate.from_directory(tmp_path)
    assert template.render([{"role": "user", "content": "x"}]) == "Dx"
    assert template.render([{"role": "user", "content": "x"}], tools=TOOLS) == "T1"
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}J")
    assert ChatTemplate.from_directory(tmp_path).render([{"role": "user", "content": "x"}]) == "<s>J"
