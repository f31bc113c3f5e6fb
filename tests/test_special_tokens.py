"""End tokens from config.json and generation_config.json, and the special-token checks at load (`dlm.special_tokens`;
the same rules held against transformers on real tokenizers: tests/test_tokenization.py)."""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import Tokenizer

from conftest import MINIATURE
from dlm.special_tokens import check_special_tokens, end_token_ids


@pytest.fixture
def checkpoint(tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MINIATURE / name, tmp_path / name)
    return tmp_path


def test_end_tokens_are_the_union_of_config_and_generation_config(checkpoint):
    assert end_token_ids(checkpoint) == {2}
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 11], "bos_token_id": 1}))
    assert end_token_ids(checkpoint) == {2, 11}
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "eos_token_id": None}))
    assert end_token_ids(checkpoint) == {2, 11}
    (checkpoint / "generation_config.json").unlink()
    with pytest.raises(ValueError, match="names an eos_token_id"):
        end_token_ids(checkpoint)


def test_the_post_processor_decides_the_bos_and_add_bos_token_only_warns(checkpoint):
    """transformers 5 drops add_bos_token when tokenizer.json is present: a disagreeing setting is a warning that
    says what happens instead, never a refusal; a tokenizer without a post-processor adds nothing, and loads."""
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    assert check_special_tokens(tokenizer, checkpoint) == []  # the miniature's adds <s> (id 1), its bos_token_id
    settings = json.loads((checkpoint / "tokenizer_config.json").read_text())
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({**settings, "add_bos_token": False}))
    [warning] = check_special_tokens(tokenizer, checkpoint)
    assert "add_bos_token false" in warning and "adds the BOS 1 to plain text" in warning
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({**settings, "add_bos_token": True}))
    tokenizer.post_processor = None
    [warning] = check_special_tokens(tokenizer, checkpoint)
    assert "add_bos_token true" in warning and "adds no BOS" in warning


def test_a_post_processor_that_adds_another_token_than_the_bos_is_refused(checkpoint):
    from tokenizers import processors

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tokenizer.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    with pytest.raises(ValueError, match=r"puts \[2\] in front of plain text, but config.json's bos_token_id is 1"):
        check_special_tokens(tokenizer, checkpoint)


def test_the_random_real_scale_tokenizer_adds_its_bos(tmp_path):
    from export.random_checkpoint import byte_level_tokenizer

    (tmp_path / "tokenizer.json").write_text(byte_level_tokenizer(2000))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tokenizer.encode("a").ids[0] == 1 and check_special_tokens(tokenizer, tmp_path) == []
