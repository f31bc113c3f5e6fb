"""Checkpoint files as other people's tools write them, for the tests: Mistral's Tekken tokenizer (shipped in the
`mistral-common` wheel) converted by transformers' own `convert_tekken_tokenizer`, a Llama-class tokenizer converted
by transformers from the SentencePiece model in the same wheel, and a random-weight checkpoint in the layout NVIDIA
publishes its instruct models in (sharded bf16 with an index, `auto_map` and remote-code files, generation_config,
a PEFT draft adapter in linear_spec_lora/, the instruct special tokens and chat template)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

# NVIDIA's instruct ids (DESIGN §2a): the Tekken special slots they take
INSTRUCT_TOKENS = {10: "<|im_start|>", 11: "<|im_end|>", 12: "<think>", 13: "</think>", 100: "<mask>"}

# An instruct template of the family's shape: one user turn with thinking off renders as DESIGN §2a shows
INSTRUCT_TEMPLATE = (
    "{%- set thinking = enable_thinking is defined and enable_thinking -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] -}}{%- endif -%}"
    "{%- if tools -%}{{- '\\n# Tools\\n' -}}{%- for tool in tools -%}{{- tool | tojson -}}{{- '\\n' -}}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if documents -%}{{- '\\n# Documents\\n' -}}{%- for doc in documents -%}"
    "{{- doc['title'] ~ ': ' ~ doc['text'] ~ '\\n' -}}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- for message in messages -%}{%- if message['role'] != 'system' -%}"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' -}}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}{{- '<tool_call>' ~ (call['function'] | tojson) ~ '</tool_call>' -}}"
    "{%- endfor -%}{%- else -%}{{- message['content'] -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if thinking -%}{{- '<think>\\n' -}}{%- else -%}{{- '<think></think>' -}}{%- endif -%}{%- endif -%}"
)

BASE_CONFIG = {"model_type": "nemotron_labs_diffusion", "bos_token_id": 1, "eos_token_id": 2, "mask_token_id": 100}


def mistral_data(name: str) -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / name


def tekken_tokenizer(directory: Path) -> Path:
    """Tekken (tekken_240911.json, 131,072 ids) converted by transformers, saved as transformers saves it (with the
    chat template mistral-common generates), plus a config.json naming its BOS."""
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    convert_tekken_tokenizer(str(mistral_data("tekken_240911.json"))).save_pretrained(str(directory))
    (directory / "config.json").write_text(json.dumps(BASE_CONFIG))
    return directory


def llama_tokenizer(directory: Path) -> Path:
    """A Llama-class tokenizer: mistral-common's SentencePiece model of Mistral 7B v0.1 (LlamaTokenizer, 32,000
    ids) converted and saved by transformers; the SentencePiece file is then removed, so tokenizer.json is what
    both transformers and the server read."""
    from transformers import AutoTokenizer

    source = directory / "source"
    source.mkdir(parents=True)
    shutil.copy(mistral_data("tokenizer.model.v1"), source / "tokenizer.model")
    (source / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(directory))
    shutil.rmtree(source)
    (directory / "tokenizer.model").unlink(missing_ok=True)
    (directory / "config.json").write_text(json.dumps(BASE_CONFIG))
    return directory


def rename_tokens(directory: Path, names: dict[int, str]) -> None:
    """Give some of tokenizer.json's special ids new names (model vocabulary and added tokens alike)."""
    data = json.loads((directory / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    if isinstance(vocab, dict):
        by_id = {i: token for token, i in vocab.items()}
        for i, name in names.items():
            if i in by_id:
                vocab[name] = vocab.pop(by_id[i])
    for token in data["added_tokens"]:
        if token["id"] in names:
            token["content"] = names[token["id"]]
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))


def instruct_tokenizer(directory: Path) -> Path:
    """The Tekken tokenizer with NVIDIA's instruct special tokens and chat template (TokenizersBackend: it adds no
    BOS to plain text; the template writes `<|im_start|>` turns)."""
    tekken_tokenizer(directory)
    rename_tokens(directory, INSTRUCT_TOKENS)
    (directory / "chat_template.jinja").write_text(INSTRUCT_TEMPLATE)
    settings = json.loads((directory / "tokenizer_config.json").read_text())
    settings.update(eos_token="<|im_end|>", pad_token="<|im_end|>", mask_token="<mask>",
                    extra_special_tokens=["<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return directory


def write_published_checkpoint(directory: Path, layers: int = 1, hidden_size: int = 256,
                               intermediate_size: int = 512) -> Path:
    """A random-weight instruct checkpoint at the real vocabulary in NVIDIA's published layout."""
    from export.adapter import save_adapter
    from export.random_checkpoint import real_scale_config, write_random_checkpoint

    config: dict[str, Any] = {
        **real_scale_config(num_hidden_layers=layers, hidden_size=hidden_size, intermediate_size=intermediate_size),
        "eos_token_id": 11, "pad_token_id": 11,
        "auto_map": {"AutoConfig": "configuration_nemotron_labs_diffusion.NemotronLabsDiffusionConfig",
                     "AutoModel": "modeling_nemotron_labs_diffusion.NemotronLabsDiffusionModel"},
    }
    write_random_checkpoint(directory, config, max_shard_bytes=48 << 20)  # a few shards and an index
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).unlink(missing_ok=True)
    instruct_tokenizer(directory)
    (directory / "config.json").write_text(json.dumps(config, indent=2))  # instruct_tokenizer wrote a short one
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [11]}))
    for name in config["auto_map"].values():  # remote code: present, never run
        (directory / f"{name.split('.')[0]}.py").write_text("raise RuntimeError('remote code must not run')\n")
    generator = torch.Generator().manual_seed(1)
    heads, head_dim = config["num_attention_heads"], config["head_dim"]
    rank = 128
    lora_a = [torch.randn(rank, heads * head_dim, generator=generator) * 0.01 for _ in range(layers)]
    lora_b = [torch.randn(hidden_size, rank, generator=generator) * 0.01 for _ in range(layers)]
    save_adapter(directory / "linear_spec_lora", lora_a, lora_b, rank=rank, alpha=512.0)
    return directory
