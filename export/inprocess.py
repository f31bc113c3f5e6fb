"""Generate from a checkpoint in this process: the shared decoding loop (`dlm.refine`) over the PyTorch runtime.

Used by the demo, the quality harness and the tests; Triton runs the same `dlm` code around its own runtime.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from dlm.refine import GenerationParams, TokenSpec, generate
from dlm.runtime import CacheLayout, TorchRuntime, load_runtime
from dlm.special_tokens import check_special_tokens, end_token_ids
from export.adapter import attach_adapter
from export.checkpoint import load_checkpoint, load_tokenizer


@dataclass
class TextGeneration:
    text: str
    tokens: list[int]
    num_tokens: int
    num_forwards: int
    finish_reason: str
    seconds: float
    verify_passes: int = 0  # speculative: verifying passes, and the tokens they committed
    verified_tokens: int = 0

    @property
    def tokens_per_forward(self) -> float:
        """Committed tokens (end token included) per forward after the prompt's prefill."""
        return self.num_tokens / max(self.num_forwards - 1, 1)


class InProcessGenerator:
    """Eager PyTorch over the checkpoint by default; with `artifact`, a built artifact (ONNX graph, torch.export
    program, TensorRT plan) through `dlm.runtime.load_runtime`, checked against the checkpoint's config."""

    def __init__(
        self,
        checkpoint: str | Path,
        dtype: str = "float32",
        device: str = "cpu",
        artifact: str | Path | None = None,
        runtime: str = "auto",
        draft_adapter: str | Path | None = "auto",
    ):
        """`draft_adapter` (eager PyTorch only; an artifact carries its own or none): "auto" attaches the
        checkpoint's `linear_spec_lora/` when there is one, a path that adapter, None none."""
        checkpoint = Path(checkpoint)
        config = json.loads((checkpoint / "config.json").read_text())
        self.tokenizer = load_tokenizer(checkpoint)
        check_special_tokens(self.tokenizer, checkpoint)
        self.spec = TokenSpec.from_config(config, end_token_ids(checkpoint))
        if artifact is None:
            model = load_checkpoint(checkpoint, dtype=dtype)
            attach_adapter(model, checkpoint, draft_adapter)
            model = model.to(device)
            self.runtime = TorchRuntime(model, CacheLayout.from_config(config), device=device)
        else:
            self.runtime = load_runtime(runtime, artifact, config)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def generate(self, prompts: list[str], params: GenerationParams) -> list[TextGeneration]:
        """Decode all prompts as one batch; `seconds` is the batch's wall time."""
        start = time.perf_counter()
        results = generate(self.runtime, [self.encode(p) for p in prompts], params, self.spec)
        seconds = time.perf_counter() - start
        return [
            TextGeneration(self.decode(r.tokens), r.tokens, r.num_tokens, r.num_forwards, r.finish_reason, seconds,
                           r.verify_passes, r.verified_tokens)
            for r in results
        ]

