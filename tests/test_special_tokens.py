"""End tokens from config.json and generation_config.json, and the BOS check at load (`dlm.special_tokens`)."""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import Tokenizer

from conftest import MINIATURE
from dlm.special_tokens import check_bos, end_token_ids


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


def test_the_tokenizer_must_add_the_bos_the_checkpoint_asks_for(checkpoint):
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    check_bos(tokenizer, checkpoint)  # the miniature's adds <s> (id 1), as its config asks
    settings = json.loads((checkpoint / "tokenizer_config.json").read_text())
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({**settings, "add_bos_token": False}))
    with pytest.raises(ValueError, match="adds the BOS token 1 although tokenizer_config.json sets add_bos_token"):
        check_bos(tokenizer, checkpoint)
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(settings))
    tokenizer.post_processor = None  # a tokenizer.json without its post-processor adds nothing
    with pytest.raises(ValueError, match=r"does not add the BOS token \(bos_token_id 1 in config.json\)"):
        check_bos(tokenizer, checkpoint)


def test_the_random_real_scale_tokenizer_adds_its_bos(tmp_path):
    from export.random_checkpoint import byte_level_tokenizer

    (tmp_path / "tokenizer.json").write_text(byte_level_tokenizer(2000))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    check_bos(Tokenizer.from_file(str(tmp_path / "tokenizer.json")), tmp_path)
