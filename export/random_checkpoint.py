"""A random-weight checkpoint at the real family's vocabulary, head size and KV heads, written at run time.

The shipped miniature has a 128-token vocabulary, which hides every per-pass cost that grows with the vocabulary.
This writes a checkpoint in the real format (config.json with every key, sharded bf16 safetensors with an index,
tokenizer.json) whose vocabulary (131,072), `head_dim` (128), query and KV heads (32 and 8) are the real ones and
whose depth and width are small, so it exports in about a minute here (DESIGN §6). Its tokenizer is a byte-level
BPE whose every id decodes: the 256 byte tokens and the special tokens, then filler tokens of two to four random
bytes, so decoded text splits multi-byte characters across tokens as real text does.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from dlm.text import byte_level_alphabet
from export.checkpoint import save_checkpoint
from export.config import ModelConfig
from export.model import DiffusionLM

REAL_VOCAB = 131072
SPECIAL_TOKENS = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "<pad>", 100: "<mask>"}
FIRST_BYTE_TOKEN = 1000  # Tekken-style: the first thousand ids are reserved for special tokens


def real_scale_config(num_hidden_layers: int = 2, hidden_size: int = 1024, intermediate_size: int = 3072,
                      vocab_size: int = REAL_VOCAB, max_position_embeddings: int = 4096) -> dict[str, Any]:
    """config.json of the family's layout with the given depth and width (head sizes and ids are the real ones)."""
    return {
        "architectures": ["NemotronLabsDiffusionModel"],
        "model_type": "nemotron_labs_diffusion",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0, "original_max_position_embeddings": 16384,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1,
        },
        "mask_token_id": 100,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "block_size": 32,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }


def byte_level_tokenizer(vocab_size: int, seed: int = 0) -> str:
    """tokenizer.json of a byte-level BPE in which every id below `vocab_size` is a token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    byte_of = byte_level_alphabet()
    alphabet = sorted(ByteLevel.alphabet(), key=byte_of.__getitem__)  # the 256 stand-ins of the bytes, in order
    vocab: dict[str, int] = {f"<special_{i}>": i for i in range(FIRST_BYTE_TOKEN) if i not in SPECIAL_TOKENS}
    vocab.update({token: i for i, token in SPECIAL_TOKENS.items()})
    vocab.update({ch: FIRST_BYTE_TOKEN + i for i, ch in enumerate(alphabet)})
    rng = random.Random(seed)
    next_id = FIRST_BYTE_TOKEN + len(alphabet)
    while next_id < vocab_size:
        piece = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 4)))
        if piece not in vocab:
            vocab[piece] = next_id
            next_id += 1
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS.values()))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer.to_str()


def write_random_checkpoint(directory: str | Path, config: dict[str, Any] | None = None, seed: int = 0,
                            dtype: str = "bfloat16", max_shard_bytes: int | None = 1 << 28) -> Path:
    """Write a seeded random-weight checkpoint (config, sharded weights, tokenizer) and return its directory."""
    directory = Path(directory)
    config = config or real_scale_config()
    torch.manual_seed(seed)
    model = DiffusionLM(ModelConfig.from_dict(config)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.endswith("layernorm.weight") and not name.endswith("norm.weight"):
                parameter.normal_(0.0, 0.02)
    save_checkpoint(model, directory, dtype=dtype, max_shard_bytes=max_shard_bytes)
    config_path = directory / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **config, "dtype": dtype},
                                      indent=2, sort_keys=True) + "\n")
    (directory / "tokenizer.json").write_text(byte_level_tokenizer(int(config["vocab_size"]), seed))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "mask_token": "<mask>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {**special, "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False},
        indent=2) + "\n")
    return directory
