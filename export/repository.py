"""`python -m export repository`: a HuggingFace checkpoint directory → a Triton model repository that serves it.

    REPO/dlm/config.pbtxt        the project's config.pbtxt with the checkpoint's defaults (block length, context,
                                 slots) and a header naming the checkpoint, its end tokens and the command
    REPO/dlm/1/model.py, dlm/    the serving code (copied from this project's model_repository/dlm/1)
    REPO/dlm/1/engine/           the ONNX artifact and its manifest (exported, or reused when its manifest says it
                                 was built from these weights, this adapter, precision and limits)
    REPO/dlm/1/tokenizer/        config.json, generation_config.json, the tokenizer files and the chat template;
                                 tokenizer.json is the pipeline transformers builds from the checkpoint's files

The checkpoint may be laid out as NVIDIA publishes it: sharded safetensors with an index, `auto_map` and remote-code
`.py` files (ignored: nothing here runs them), `generation_config.json`, a draft-only LoRA in `linear_spec_lora/`.
Before it returns, the repository is loaded exactly as Triton's model will load it (`dlm.deployment`: tokenizer and
its checks, runtime, memory plan) and one short request is decoded through it; a bf16 or fp16 graph, which only
TensorRT runs, gets the tokenizer checks and the command that builds its plan.

Writing into this project's own `model_repository` (what `scripts/prepare_repository.sh` does) fills `1/engine` and
`1/tokenizer` and keeps the tracked code and `config.pbtxt`, whose empty parameters read the same defaults at load.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from export.adapter import adapter_sha256, find_adapter
from export.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "model_repository" / "dlm"  # the serving code and config.pbtxt template
CHECKPOINT_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# tokenizer classes that run tokenizer.json as it is; any other class rebuilds parts of the pipeline in code
PLAIN_TOKENIZER_CLASSES = (None, "TokenizersBackend", "PreTrainedTokenizerFast")
PARAMETER = re.compile(r'(\{ key: "(?P<key>[^"]+)", value: \{ string_value: )"(?P<value>[^"]*)"')


class RepositoryError(ValueError):
    """A checkpoint that cannot become a repository, or a repository that does not load; the message says why."""


def resolve_tokenizer(checkpoint: Path, log: Callable[[str], None]) -> str:
    """tokenizer.json as transformers runs it for the checkpoint's files: for a class that rebuilds its pipeline in
    code (e.g. LlamaTokenizer) that is transformers' output, not the file. The tokenizer files are loaded from a
    copy whose config.json has no `auto_map`, so no remote code is looked for."""
    source = (checkpoint / "tokenizer.json").read_text(encoding="utf-8")
    settings = json.loads((checkpoint / "tokenizer_config.json").read_text(encoding="utf-8")) \
        if (checkpoint / "tokenizer_config.json").is_file() else {}
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as transformers_logging
    except ImportError:
        if settings.get("tokenizer_class") not in PLAIN_TOKENIZER_CLASSES:
            log(f"warning: transformers is not installed, so the pipeline of tokenizer_class "
                f"{settings['tokenizer_class']} is taken from tokenizer.json as it is")
        return source
    with tempfile.TemporaryDirectory() as folder:
        for name in TOKENIZER_FILES:
            if (checkpoint / name).is_file():
                shutil.copy(checkpoint / name, folder)
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
        config.pop("auto_map", None)
        (Path(folder) / "config.json").write_text(json.dumps(config))
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # its notes on the model type; the loader reports what matters
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise RepositoryError(f"transformers cannot load the tokenizer of {checkpoint}: {e}") from e
        finally:
            transformers_logging.set_verbosity(verbosity)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise RepositoryError(f"transformers loads the tokenizer of {checkpoint} as {type(tokenizer).__name__}, "
                              f"which has no tokenizers pipeline to serve with")
    resolved: str = backend.to_str()
    if json.loads(resolved) != json.loads(source):
        log(f"tokenizer: {type(tokenizer).__name__} builds a pipeline that differs from tokenizer.json; the "
            f"repository holds transformers' (what the checkpoint's users get from AutoTokenizer)")
    return resolved


def write_tokenizer(checkpoint: Path, folder: Path, log: Callable[[str], None]) -> None:
    if not (checkpoint / "tokenizer.json").is_file():
        raise RepositoryError(f"{checkpoint} has no tokenizer.json: the server tokenizes with it")
    folder.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES + TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
        if (checkpoint / name).is_file():
            shutil.copy(checkpoint / name, folder / name)
    (folder / "tokenizer.json").write_text(resolve_tokenizer(checkpoint, log), encoding="utf-8")


def reusable_artifact(engine: Path, checkpoint: Path, precision: str, max_batch: int, max_context: int | None,
                      adapter: str | Path | None, structured: bool = False) -> bool:
    """Whether `engine` holds an artifact built from these weights and adapter, at this precision and these limits,
    with the allowed-token mask input exactly when `structured` (engine contract version 3)."""
    from dlm.artifact import ArtifactError
    from export.manifest import check

    try:
        entry = check(engine, "onnx", checkpoint).entry
    except (ArtifactError, OSError, ValueError):
        return False
    profile = entry["contract"]["profile"]
    wanted_adapter = adapter_sha256(find_adapter(checkpoint) if adapter == "auto" else adapter)
    return (entry.get("precision") == precision and profile["batch"][2] == max_batch
            and (max_context is None or profile["past_plus_tokens"][2] == max_context)
            and (entry.get("draft_adapter") or {}).get("sha256") == wanted_adapter
            and bool(entry["contract"].get("structured", False)) == structured)


def config_pbtxt(template: str, values: dict[str, str], header: str) -> str:
    """`template` with the given parameters' values replaced; every key must be in it."""
    missing = set(values)

    def replace(match: re.Match[str]) -> str:
        key = match.group("key")
        if key not in values:
            return match.group(0)
        missing.discard(key)
        return f'{match.group(1)}"{values[key]}"'

    text = PARAMETER.sub(replace, template)
    if missing:
        raise RepositoryError(f"config.pbtxt template has no parameter {', '.join(sorted(missing))}")
    return header + text


def read_parameters(pbtxt: str) -> dict[str, str]:
    return {m.group("key"): m.group("value") for m in PARAMETER.finditer(pbtxt)}


def check_tokenizer(folder: Path, log: Callable[[str], None]) -> None:
    """What the server checks of the tokenizer at load: the special tokens against config.json, the end tokens."""
    from dlm.special_tokens import check_special_tokens, end_token_ids
    from dlm.text import TextCodec

    for warning in check_special_tokens(TextCodec(folder).tokenizer, folder):
        log(f"  warning: {warning}")
    log(f"tokenizer checked: end tokens {sorted(end_token_ids(folder))}")


def check_loads(version_dir: Path, parameters: dict[str, str], log: Callable[[str], None]) -> None:
    """Load the repository as Triton's model does and decode one short request through it."""
    from dlm.deployment import load_deployment
    from dlm.refine import GenerationParams, generate

    deployment = load_deployment(version_dir, parameters, log=lambda line: log(f"  {line}"))
    prompt = deployment.codec.encode("Hello")
    result = generate(deployment.runtime, [prompt], GenerationParams(mode="ar", max_tokens=2), deployment.spec,
                      deployment.pass_limits)[0]
    log(f"loaded: {deployment.runtime_name} runtime, {deployment.max_live} slots of {deployment.context} positions, "
        f"end tokens {sorted(deployment.spec.eos_token_ids)}; a 2-token request ran ({result.num_forwards} passes)")


def build_repository(checkpoint: str | Path, out: str | Path, *, precision: str = "fp32", max_batch: int = 16,
                     max_context: int | None = None, max_tokens: int | None = None, max_block: int | None = None,
                     top_k: int | None = None, draft_adapter: str | Path | None = "auto",
                     log: Callable[[str], None] = print, structured: bool = False) -> Path:
    """Write (or update) the repository `out` for `checkpoint`; returns the model's folder (out/dlm)."""
    from export.onnx_export import export_onnx

    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / "config.json").is_file():
        raise RepositoryError(f"{checkpoint} has no config.json: give a HuggingFace checkpoint directory")
    config = ModelConfig.from_file(checkpoint)  # the weights are checked against it by the export
    model_dir = out / "dlm"
    version_dir = model_dir / "1"
    in_place = version_dir.resolve() == (SOURCE / "1").resolve()
    version_dir.mkdir(parents=True, exist_ok=True)

    engine = version_dir / "engine"
    if reusable_artifact(engine, checkpoint, precision, max_batch, max_context, draft_adapter, structured):
        log(f"reusing the artifact in {engine}: its manifest matches the checkpoint, adapter, precision and limits")
    else:
        shutil.rmtree(engine, ignore_errors=True)
        options: dict[str, Any] = {"top_k": top_k} if top_k is not None else {}
        export_onnx(checkpoint, engine, precision=precision, max_batch=max_batch, max_context=max_context,
                    max_tokens=max_tokens, max_block=max_block, draft_adapter=draft_adapter, log=log,
                    structured=structured, **options)
    write_tokenizer(checkpoint, version_dir / "tokenizer", log)

    template = (SOURCE / "config.pbtxt").read_text(encoding="utf-8")
    if in_place:
        parameters = read_parameters(template)
    else:
        for name in [Path("model.py"), *(p.relative_to(SOURCE / "1") for p in (SOURCE / "1" / "dlm").glob("*.py"))]:
            (version_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(SOURCE / "1" / name, version_dir / name)
        manifest = json.loads((engine / "manifest.json").read_text(encoding="utf-8"))
        profile = next(iter(manifest["artifacts"].values()))["contract"]["profile"]
        budget = int(read_parameters(template).get("max_num_tokens") or profile["tokens"][2])
        from dlm.special_tokens import end_token_ids

        ends = sorted(end_token_ids(version_dir / "tokenizer"))
        header = (f"# Written by `python -m export repository --checkpoint {checkpoint} --out {out} --precision "
                  f"{precision} --max-batch {max_batch}`:\n# block length {config.block_size}, context "
                  f"{profile['past_plus_tokens'][2]}, end tokens {ends} (config.json and generation_config.json), "
                  f"mask id {config.mask_token_id}.\n")
        values = {"block_length": str(config.block_size), "context": str(profile["past_plus_tokens"][2]),
                  "max_live": str(max_batch), "max_num_tokens": str(min(budget, profile["tokens"][2]))}
        text = config_pbtxt(template, values, header)
        (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
        parameters = read_parameters(text)
    try:
        if precision == "fp32":
            log(f"checking that {model_dir} loads as Triton will load it")
            check_loads(version_dir, parameters, log)
        else:  # ONNX Runtime's CPU kernels have no bf16/fp16 graph to run: the tokenizer is checked, the rest waits
            check_tokenizer(version_dir / "tokenizer", log)
            log(f"a {precision} graph runs under TensorRT: build its plan on the GPU host with `python -m export "
                f"engine --onnx {engine / 'model.onnx'} --precision {precision} --out {version_dir / 'plan'}` and "
                f"set config.pbtxt's artifact parameter to plan; the server checks the rest when it loads")
    except (ValueError, MemoryError, OSError, RuntimeError) as e:
        raise RepositoryError(f"the repository {out} does not load: {e}") from e
    log(f"wrote {model_dir}: serve it with scripts/serve.sh --model-repository {out}")
    return model_dir
