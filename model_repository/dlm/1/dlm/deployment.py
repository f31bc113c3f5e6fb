"""One deployment loaded from a model version folder and its `config.pbtxt` parameters: the tokenizer (checked
against the checkpoint's config), the runtime over the artifact, the request defaults and limits, the pass planner's
limits and the memory plan. Triton's `model.py` builds its scheduler on it; `python -m export repository` loads the
same thing to check a repository before it hands it over, so the check is what Triton will do."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dlm.inputs import Defaults, Limits
from dlm.memory_plan import MemoryPlan, plan_for_runtime
from dlm.planner import PassLimits
from dlm.refine import TokenSpec
from dlm.runtime import ServingRuntime, choose_runtime, load_runtime
from dlm.special_tokens import check_special_tokens, end_token_ids
from dlm.text import TextCodec


@dataclass
class Deployment:
    codec: TextCodec
    spec: TokenSpec
    defaults: Defaults
    runtime: ServingRuntime
    runtime_name: str
    model_config: dict[str, Any]
    context: int
    max_live: int  # slots: config.pbtxt's max_live, lowered to what the memory plan fits
    limits: Limits
    pass_limits: PassLimits
    plan: MemoryPlan
    warnings: list[str]
    prefix_caching: bool = True  # reuse the keys and values finished requests left in their slots


def _flag(parameters: dict[str, str], key: str, default: bool) -> bool:
    value = parameters.get(key, "").strip().lower()
    if not value:
        return default
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"config.pbtxt {key} = '{value}' is not valid: expected true or false")
    return value in ("true", "1", "yes")


def _integer(parameters: dict[str, str], key: str) -> int | None:
    return int(parameters[key]) if parameters.get(key, "").strip() else None


def load_deployment(version_dir: str | Path, parameters: dict[str, str], device: str | None = None,
                    log: Callable[[str], None] = print, warn: Callable[[str], None] | None = None) -> Deployment:
    """Everything the model instance needs before its scheduler starts; `log` gets the memory plan, `warn` (default
    `log`) what transformers would warn about and a lowered max_live."""
    version_dir = Path(version_dir)
    tokenizer_dir = version_dir / parameters.get("tokenizer", "tokenizer")  # an absolute value replaces version_dir
    artifact_dir = version_dir / parameters.get("artifact", "engine")
    model_config = json.loads((tokenizer_dir / "config.json").read_text(encoding="utf-8"))
    codec = TextCodec(tokenizer_dir)
    warnings = check_special_tokens(codec.tokenizer, tokenizer_dir)
    spec = TokenSpec.from_config(model_config, end_token_ids(tokenizer_dir))
    defaults = Defaults.from_parameters(parameters)
    name = parameters.get("runtime", "auto") or "auto"
    name = choose_runtime(artifact_dir) if name == "auto" else name
    options: dict[str, Any] = {}
    if name == "onnxruntime":
        spin = parameters.get("runtime_spin", "").strip().lower() in ("1", "true", "yes")
        options = {"threads": _integer(parameters, "runtime_threads"), "spin": spin}
    runtime = load_runtime(name, artifact_dir, model_config, device=device, **options)
    profile = runtime.contract.profile
    context = _integer(parameters, "context") or profile.max_context
    max_live = _integer(parameters, "max_live") or 16
    if max_live > profile.batch[2]:
        raise ValueError(
            f"config.pbtxt max_live = {max_live} exceeds the {profile.batch[2]} rows {artifact_dir} was built "
            f"for; lower max_live or rebuild the artifact with --max-batch {max_live}"
        )
    limits = Limits(context=context, max_block_length=min(profile.max_block, context - 2),
                    top_k=runtime.contract.top_k)
    # what one engine pass may hold: the artifact's profile, and a token budget (B x T, padding included)
    pass_limits = PassLimits.from_profile(profile, _integer(parameters, "max_num_tokens"),
                                          _integer(parameters, "prefill_chunk"))
    # the memory plan: weights, engine memory, cache and staging against what the device has free
    fraction = float(parameters.get("free_memory_fraction") or 0.9)
    slots, plan = plan_for_runtime(runtime, model_config, max_live, context, pass_limits.token_budget, fraction)
    for line in plan.lines():
        log(f"dlm memory plan: {line}")
    if slots < max_live:
        warnings.append(f"max_live lowered from {max_live} to {slots} slots, what free_memory_fraction "
                        f"{fraction} of the free memory holds")
        max_live = slots
    for warning in warnings:
        (warn or log)(f"dlm: {warning}")
    return Deployment(codec, spec, defaults, runtime, name, model_config, context, max_live, limits, pass_limits,
                      plan, warnings, _flag(parameters, "prefix_caching", True))
