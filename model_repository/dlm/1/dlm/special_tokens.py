"""The special tokens a checkpoint names, read the way transformers 5 reads them, and checked against its tokenizer.

- End tokens: the union of `eos_token_id` in `config.json` and in `generation_config.json` (an instruct model's
  end-of-turn id is often only in the latter; `generate` in transformers stops at either).
- BOS: with a `tokenizer.json`, transformers 5 adds to plain text what that file's post-processor adds, whatever
  `tokenizer_config.json`'s `add_bos_token` says (it drops that key at load), and a chat prompt rendered from the
  template is encoded with no special tokens added. We do the same. Loading refuses only a real contradiction: a
  named special token (`bos_token`, `mask_token` in `tokenizer_config.json`) whose id in the tokenizer differs
  from the id `config.json` gives it, or a post-processor that puts a token other than `config.json`'s BOS in
  front of plain text. A setting transformers ignores is reported as a warning that says what it does instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dlm.tokenizer_files import mistral_regex_warning, read_json as _read


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


def _named_token(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer configs
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def added_prefix(tokenizer: Any) -> list[int]:
    """The ids the post-processor puts in front of plain text (e.g. [1] for a BOS), found by encoding with and
    without special tokens."""
    text = "a"
    plain, full = tokenizer.encode(text, add_special_tokens=False).ids, tokenizer.encode(text).ids
    return full[: len(full) - len(plain)] if full[len(full) - len(plain):] == plain else full[:1]


def check_special_tokens(tokenizer: Any, directory: str | Path) -> list[str]:
    """Refuse a tokenizer (a `tokenizers.Tokenizer`) that contradicts the checkpoint's config; return warnings
    about settings transformers 5 ignores or warns about."""
    directory = Path(directory)
    config = _read(directory / "config.json")
    settings = {**_read(directory / "special_tokens_map.json"), **_read(directory / "tokenizer_config.json")}
    for name in ("bos", "mask"):  # the ids a template writes or the loop treats apart; end and pad ids may differ
        token, wanted = _named_token(settings.get(f"{name}_token")), config.get(f"{name}_token_id")
        if token is None or not isinstance(wanted, int):
            continue
        found = tokenizer.token_to_id(token)
        if found is not None and found != wanted:
            raise ValueError(
                f"{directory}: tokenizer_config.json names {token!r} as {name}_token, which the tokenizer encodes as "
                f"id {found}, but config.json gives {name}_token_id {wanted}; the chat template would write one id "
                f"and the model expect the other. Fix one of the two files")
    prefix, bos = added_prefix(tokenizer), config.get("bos_token_id")
    if prefix and (len(prefix) != 1 or prefix[0] != bos):
        raise ValueError(
            f"{directory}: tokenizer.json's post-processor puts {prefix} in front of plain text, but config.json's "
            f"bos_token_id is {bos}; fix the post-processor or bos_token_id")
    warnings = []
    explicit = settings.get("add_bos_token")
    if isinstance(explicit, bool) and explicit != bool(prefix):
        does = f"adds the BOS {prefix[0]}" if prefix else "adds no BOS"
        warnings.append(
            f"tokenizer_config.json sets add_bos_token {str(explicit).lower()}, but transformers 5 ignores that key "
            f"when tokenizer.json is present and, like this server, follows tokenizer.json's post-processor, which "
            f"{does} to plain text")
    if message := mistral_regex_warning(directory, tokenizer):
        warnings.append(message)
    return warnings
