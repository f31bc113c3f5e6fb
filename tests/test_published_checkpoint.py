"""End to end on a checkpoint in the layout NVIDIA publishes (tests/published_checkpoint.py: real vocabulary,
Tekken-derived tokenizer with the instruct special tokens and chat template, sharded bf16 with an index, `auto_map`
and remote-code files, generation_config.json, a PEFT draft adapter): `python -m export repository` → tritonserver
→ the OpenAI gateway → the `openai` package's chat and completions, streamed and not, in every mode, and tool calls
(the artifact is exported with --structured, so `tool_choice` "required" is decoded under the calls' grammar).

Random weights never pick the end token by themselves, so the fixture plants one: the head's row of `<|im_end|>`
(id 11) is set to the embedding of the third token the model answers the chat prompt with, so greedy decoding says
two tokens, then 11, and must stop there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import openai
import pydantic
import pytest
import torch
from safetensors.torch import load_file, save_file

from dlm.refine import Generation, GenerationParams, generate
from export.__main__ import main
from export.inprocess import InProcessGenerator
from published_checkpoint import write_published_checkpoint
from triton_server import Gateway, start_server

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")

END = 11  # <|im_end|>, the instruct end token (config.json and generation_config.json)
MESSAGES = [{"role": "system", "content": "Réponds en français, s'il te plaît."},
            {"role": "user", "content": "Grüße! 你好，世界 🙂 Привет — what is 2+2?"}]
MODES = ["ar", "diffusion", "speculative"]


def plant_end_token(checkpoint: Path, prompt: list[int]) -> list[int]:
    """Make greedy `ar` answer `prompt` with two tokens and then the end token; returns those two tokens."""
    def greedy(ignore_eos: bool = False) -> Generation:
        generator = InProcessGenerator(checkpoint)
        return generate(generator.runtime, [prompt], GenerationParams(mode="ar", max_tokens=4, ignore_eos=ignore_eos),
                        generator.spec)[0]

    answer = greedy(ignore_eos=True).tokens
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    embedding = load_file(str(checkpoint / index["encoder.embed_tokens.weight"]))["encoder.embed_tokens.weight"]
    shard = checkpoint / index["diffusion_head.weight"]
    tensors = load_file(str(shard))
    head = tensors["diffusion_head.weight"].float()
    direction = embedding[answer[1]].float()
    # a unit row: its logit is the normed hidden state's length (~16) times its cosine with that embedding, large
    # where the last token is answer[1], small elsewhere (random rows give logits of about ±0.3)
    head[END] = direction / direction.norm()
    tensors["diffusion_head.weight"] = head.to(torch.bfloat16)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    planted = greedy()
    assert (planted.tokens, planted.num_tokens, planted.finish_reason) == (answer[:2], 3, "eos"), (answer, planted)
    return answer[:2]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    checkpoint = write_published_checkpoint(root / "checkpoint")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint), trust_remote_code=False)
    prompt_ids = list(tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)["input_ids"])
    # the prompt as the gateway sends it: rendered text, tokenized without special tokens
    assert InProcessGenerator(checkpoint).tokenizer.encode(
        tokenizer.decode(prompt_ids), add_special_tokens=False).ids == prompt_ids
    answer = plant_end_token(checkpoint, prompt_ids)
    repository = root / "repository"
    assert main(["repository", "--checkpoint", str(checkpoint), "--out", str(repository), "--max-batch", "4",
                 "--max-context", "256", "--structured"]) == 0
    server = start_server(root / "server.log", repository=repository)
    gateway = Gateway(server.grpc_url, root / "gateway.log", tokenizer=repository / "dlm" / "1" / "tokenizer")
    try:
        gateway.wait_ready()
        yield {"gateway": gateway, "prompt_ids": prompt_ids, "answer": answer, "tokenizer": tokenizer,
               "repository": repository}
    finally:
        gateway.stop()
        server.stop()


@pytest.fixture(scope="module")
def client(deployment):
    with openai.OpenAI(base_url=f"{deployment['gateway'].url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_the_repository_holds_what_triton_needs(deployment):
    model = deployment["repository"] / "dlm"
    config = (model / "config.pbtxt").read_text()
    assert "end tokens [11]" in config and 'key: "block_length", value: { string_value: "32" }' in config
    tokenizer_files = {p.name for p in (model / "1" / "tokenizer").iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= tokenizer_files
    entry = json.loads((model / "1" / "engine" / "manifest.json").read_text())["artifacts"]["model.onnx"]
    assert entry["draft_adapter"]["rank"] == 128 and entry["draft_adapter"]["alpha"] == 512
    assert not any(p.suffix == ".py" and "nemotron" in p.name for p in (model / "1").rglob("*.py"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "streamed"])
def test_chat_in_every_mode(deployment, client, mode, stream):
    request = {"model": "dlm", "messages": MESSAGES, "max_tokens": 16, "extra_body": {"mode": mode}}
    if stream:
        chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
        deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        text, usage = "".join(deltas), chunks[-1].usage
        finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
        assert not any("\ufffd" in d for d in deltas), deltas
    else:
        completion = client.chat.completions.create(**request)
        text, usage, finish = completion.choices[0].message.content, completion.usage, completion.choices[0].finish_reason
    assert usage is not None and usage.prompt_tokens == len(deployment["prompt_ids"])  # transformers' count
    expected = deployment["tokenizer"].decode(deployment["answer"], skip_special_tokens=True)
    if mode != "diffusion":  # speculative equals ar: two tokens, then <|im_end|>, counted and not shown
        assert (text, finish, usage.completion_tokens) == (expected, "stop", 3)
    else:  # the block's passes commit in another order; whatever it says ends at the end token or the limit
        assert finish in ("stop", "length") and usage.completion_tokens <= 16 and "<|im_end|>" not in text


@pytest.mark.parametrize("mode", MODES)
def test_completions_in_every_mode_streamed_and_not(deployment, client, mode):
    prompt = "Ünïcödé 日本語 🙂 ναι"
    unary = client.completions.create(model="dlm", prompt=prompt, max_tokens=12, extra_body={"mode": mode})
    chunks = list(client.completions.create(model="dlm", prompt=prompt, max_tokens=12, extra_body={"mode": mode},
                                            stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == unary.choices[0].text  # deltas join to the whole text: no character broken across them
    assert not any("\ufffd" in c.choices[0].text for c in chunks if c.choices) or "\ufffd" in unary.choices[0].text
    # a completion prompt gets what the tokenizer adds (Tekken: nothing), as transformers encodes it
    assert unary.usage is not None and unary.usage.prompt_tokens == len(deployment["tokenizer"](prompt).input_ids)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city", "unit"],
    "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}}}}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "streamed"])
def test_a_required_tool_call_round_trips_through_the_openai_package(deployment, client, mode, stream):
    request = {"model": "dlm", "messages": MESSAGES, "max_tokens": 64, "tools": [WEATHER], "tool_choice": NAMED,
               "parallel_tool_calls": False, "extra_body": {"mode": mode}}
    if stream:
        chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
        deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
        usage = chunks[-1].usage
        assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].type == "function"
        call_id, name, arguments = deltas[0].id, deltas[0].function.name, deltas[0].function.arguments
    else:
        completion = client.chat.completions.create(**request)
        message, finish, usage = completion.choices[0].message, completion.choices[0].finish_reason, completion.usage
        content = message.content or ""
        assert message.tool_calls is not None and len(message.tool_calls) == 1
        call = message.tool_calls[0]
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
    assert finish == "tool_calls" and content == ""
    assert name == "get_weather" and isinstance(arguments, str)
    parsed = json.loads(arguments)
    assert parsed["city"] in ("Paris", "Oslo") and parsed["unit"] in ("C", "F")
    # the tools reached the prompt as the checkpoint's template renders them (transformers counts the same tokens)
    expected = deployment["tokenizer"].apply_chat_template(MESSAGES, tools=[WEATHER], tokenize=True,
                                                           add_generation_prompt=True)["input_ids"]
    assert usage is not None and usage.prompt_tokens == len(expected)
    # the call and its result go back in the conversation, rendered by the template
    follow_up = client.chat.completions.create(model="dlm", max_tokens=4, tools=[WEATHER], messages=[
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "18 degrees"}])
    assert follow_up.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_choice_auto_leaves_an_answer_without_calls_as_text(deployment, client):
    # random weights never write <tool_call>: what they write comes back as content
    completion = client.chat.completions.create(model="dlm", messages=MESSAGES, max_tokens=16, tools=[WEATHER],
                                                extra_body={"mode": "ar"})
    choice = completion.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    assert choice.message.content and "<tool_call>" not in choice.message.content


def test_a_named_function_not_in_tools_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="which is not in tools"):
        client.chat.completions.create(model="dlm", messages=MESSAGES, max_tokens=4, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})


class Weather(pydantic.BaseModel):
    """What the openai package turns into a strict json_schema response_format, and parses the answer into."""

    model_config = pydantic.ConfigDict(extra="forbid")
    city: Literal["Paris", "Oslo"]
    unit: Literal["C", "F"]
    rain: bool


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_structured_outputs_round_trip_through_the_openai_packages_parse(client, mode, temperature):
    completion = client.chat.completions.parse(model="dlm", messages=MESSAGES, max_tokens=48, response_format=Weather,
                                               temperature=temperature, seed=7, extra_body={"mode": mode})
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice  # the grammar ends the answer: the end token, not the limit
    assert isinstance(choice.message.parsed, Weather)  # the package validated the answer against the model
    assert choice.message.parsed == Weather.model_validate_json(choice.message.content or "")
