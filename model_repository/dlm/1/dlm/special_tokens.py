"""The special tokens a checkpoint names, read the way HuggingFace reads them, and checked against its tokenizer.

- End tokens: the union of `eos_token_id` in `config.json` and in `generation_config.json` (an instruct model's
  end-of-turn id is often only in the latter; `generate` in transformers stops at either).
- BOS: the tokenizer must add the `bos_token_id` of `config.json` in front of every prompt when
  `tokenizer_config.json` says `add_bos_token` (its default when the key is absent), and must not when it says
  false; a tokenizer that disagrees would feed the model prompts it was never trained on, so loading refuses it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, list) else [value])}


def end_token_ids(directory: str | Path) -> frozenset[int]:
    """Every end-of-sequence id the checkpoint in `directory` names."""
    directory = Path(directory)
    ids = _ids(_read(directory / "config.json").get("eos_token_id"))
    ids |= _ids(_read(directory / "generation_config.json").get("eos_token_id"))
    if not ids:
        raise ValueError(f"neither config.json nor generation_config.json in {directory} names an eos_token_id")
    return frozenset(ids)


def check_bos(tokenizer: Any, directory: str | Path) -> None:
    """Refuse a tokenizer (a `tokenizers.Tokenizer`) that does not add the BOS the checkpoint asks for."""
    directory = Path(directory)
    bos = _read(directory / "config.json").get("bos_token_id")
    wanted = bool(_read(directory / "tokenizer_config.json").get("add_bos_token", True)) and bos is not None
    first = tokenizer.encode("a").ids[:1]
    adds = first == [int(bos)] if bos is not None else False
    if wanted and not adds:
        raise ValueError(
            f"the tokenizer in {directory} does not add the BOS token (bos_token_id {bos} in config.json) that "
            f"tokenizer_config.json's add_bos_token asks for: its encoding of 'a' starts with {first}; fix its "
            f"post_processor or set add_bos_token to false"
        )
    if not wanted and adds:
        raise ValueError(
            f"the tokenizer in {directory} adds the BOS token {bos} although tokenizer_config.json sets "
            f"add_bos_token to false; fix its post_processor or the setting"
        )
