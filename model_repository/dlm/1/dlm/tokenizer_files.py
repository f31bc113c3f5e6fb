"""A checkpoint's `tokenizer.json`, loaded with `tokenizers` the way transformers 5 loads the same files.

With a `tokenizer.json` present, transformers 5 (`TokenizersBackend` and the classes built on it) runs that file's
pipeline and post-processor as they are: `add_bos_token` / `add_eos_token` in `tokenizer_config.json` are dropped at
load, so whether plain text gets a BOS is the post-processor's decision alone (`dlm.special_tokens` checks the rest).
The one change it makes is Mistral's pre-tokenizer regex, replaced when `tokenizer_config.json` sets
`fix_mistral_regex` (and `config.json` does not mark the checkpoint as saved by transformers 5 or as a non-Mistral
model of an older one); without that flag it only warns, and so do we (`mistral_regex_warning`).

Model-specific classes (e.g. `LlamaTokenizer`) rebuild their normalizer, pre-tokenizer and decoder in code; a
repository written by `python -m export repository` holds the pipeline transformers built, so it runs as is here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

# transformers' `_patch_mistral_regex` (tokenization_utils_tokenizers.py): the corrected Split pattern
MISTRAL_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
MISTRAL_MODEL_TYPES = ("mistral", "mistral3", "voxtral", "ministral", "pixtral")
MISTRAL_REGEX_MIN_VOCAB = 100_000  # transformers only looks at tokenizers larger than this


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; {} when the file is missing. Files are read as UTF-8 whatever the locale (Triton's
    Python stub runs with an ASCII one, and real tokenizer files are not ASCII)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def mistral_regex_applies(directory: Path) -> bool:
    """Whether transformers would consider this checkpoint's regex for the Mistral fix (and warn about it)."""
    config = read_json(directory / "config.json")
    if not config:
        return False
    version = config.get("transformers_version")
    if version and _version_tuple(str(version)) >= (5, 0, 0):
        return False
    if version and config.get("model_type") not in MISTRAL_MODEL_TYPES:
        return False
    return True


def _fixed_pre_tokenizer(pre_tokenizer: dict[str, Any]) -> dict[str, Any]:
    split = {"type": "Split", "pattern": {"Regex": MISTRAL_REGEX}, "behavior": "Isolated", "invert": False}
    if pre_tokenizer.get("type") == "Sequence":
        return {**pre_tokenizer, "pretokenizers": [split, *pre_tokenizer["pretokenizers"][1:]]}
    if pre_tokenizer.get("type") == "Metaspace":  # as transformers does: Metaspace cannot follow a Split
        pre_tokenizer = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {"type": "Sequence", "pretokenizers": [split, pre_tokenizer]}


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """`directory/tokenizer.json` as transformers 5 runs it (see the module's docstring)."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}: the checkpoint's tokenizer files belong there")
    data = json.loads(path.read_text(encoding="utf-8"))
    settings = read_json(directory / "tokenizer_config.json")
    wants_fix = settings.get("fix_mistral_regex") is True
    if wants_fix and data.get("pre_tokenizer") and mistral_regex_applies(directory):
        vocab = Tokenizer.from_str(json.dumps(data)).get_vocab_size()
        if vocab > MISTRAL_REGEX_MIN_VOCAB:
            data["pre_tokenizer"] = _fixed_pre_tokenizer(data["pre_tokenizer"])
    return Tokenizer.from_str(json.dumps(data))


def mistral_regex_warning(directory: str | Path, tokenizer: Tokenizer) -> str | None:
    """transformers' warning for a large tokenizer it would patch if asked, when not asked (None otherwise)."""
    directory = Path(directory)
    settings = read_json(directory / "tokenizer_config.json")
    if "fix_mistral_regex" in settings or tokenizer.get_vocab_size() <= MISTRAL_REGEX_MIN_VOCAB:
        return None
    if not json.loads(tokenizer.to_str()).get("pre_tokenizer") or not mistral_regex_applies(directory):
        return None
    return (f"the tokenizer in {directory} may use the incorrect Mistral pre-tokenizer regex; transformers warns "
            f"and keeps it (as we do), and replaces it when tokenizer_config.json sets fix_mistral_regex: true")
