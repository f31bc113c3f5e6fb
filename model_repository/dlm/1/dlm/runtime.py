"""Runtimes: one interface over the engine contract of DESIGN §4 (version 2), whatever executes the denoiser.

A runtime owns the KV cache: `allocate` reserves one slot of `context` positions per live sequence, once;
`claim` picks a free slot for a new request (with prefix caching, the one whose resident keys and values share the
longest prefix with its prompt, `dlm.kv_cache`) and `retain` keeps what a leaving request's slot holds.
`forward` gathers each row's cache (its first `cache_lengths[i]` positions), runs the pass and returns the
candidates at the positions each row asked for (`dlm.candidates.Candidates`: [B, N, K] ids and logits, [B, N]
logsumexp; never full-vocabulary logits); the keys and values of the pass stay inside the runtime until `commit`
appends the first `counts[i]` new columns of row i to its slot (speculative decoding keeps only the accepted
prefix, a bidirectional pass nothing).

`EngineRuntime` holds what every runtime shares (the profile check, the host inputs of a pass, the staging
buffers, the cache bookkeeping of `dlm.kv_cache`, the reading of the outputs); each implementation keeps only its
engine call: `TorchRuntime` (an nn.Module, for tests and tools), and over built artifacts, each checked against
its manifest at load (`dlm.artifact`): `TensorRTRuntime` (model.plan), `OnnxRuntime` (model.onnx) and
`TorchExportRuntime` (model.pt2). `load_runtime` picks one by name or `auto`. torch, onnxruntime and tensorrt are
imported only by the runtime that needs them, so the serving environment installs just the one it runs.
"""

from __future__ import annotations

import importlib.util
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, Sequence

import numpy as np

from dlm.artifact import FILES, ArtifactError, load_artifact, rebuild_command
from dlm.candidates import Candidates
from dlm.contract import EngineContract, Profile
from dlm.kv_cache import KVCache

RUNTIMES = ("tensorrt", "onnxruntime", "torch")
OUTPUTS = ("top_tokens", "top_logits", "logsumexp")  # what a pass hands back to the loop


@dataclass(frozen=True)
class CacheLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CacheLayout":
        """From a checkpoint's config.json content."""
        return cls(config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"])

    def cache_shape(self, slots: int, context: int) -> tuple[int, ...]:
        return (slots, self.num_layers, 2, self.num_kv_heads, context, self.head_dim)

    @property
    def per_position(self) -> int:
        """Elements one position of one row takes in the cache."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim


class Runtime(Protocol):
    layout: CacheLayout
    slots: int
    context: int

    def allocate(self, slots: int, context: int, pass_tokens: int | None = None) -> None: ...

    def forward(
        self,
        slots: np.ndarray,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        new_mask: np.ndarray,
        cache_lengths: np.ndarray,
        causal: np.ndarray,
        logit_positions: np.ndarray,
        draft: np.ndarray | None = None,
        token_bitmask: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Candidates: ...

    def commit(self, slots: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None: ...


class ServingRuntime(Runtime, Protocol):
    """What the scheduler needs besides the passes: slots claimed for new requests and retained when they leave
    (prefix caching; `EngineRuntime` provides both for every runtime)."""

    def claim(self, free: Sequence[int], prompt: Sequence[int] | None) -> tuple[int, int]: ...

    def retain(self, slot: int, tokens: Sequence[int]) -> None: ...


def attention_mask(cache_lengths: np.ndarray, new_mask: np.ndarray) -> np.ndarray:
    """`[B, P+T]` int64 key mask: a row's first `cache_lengths[i]` cached keys and its real new tokens."""
    p = int(cache_lengths.max(initial=0))
    cached = np.arange(p)[None, :] < cache_lengths[:, None]
    return np.concatenate([cached, new_mask.astype(bool)], axis=1).astype(np.int64)


def check_context(profile: Profile | None, context: int) -> None:
    """Refuse a cache longer than the artifact's profile allows."""
    if profile is not None and context > profile.max_context:
        raise ValueError(
            f"a cache of {context} positions exceeds the {profile.max_context} this artifact was built for; "
            f"rebuild it with a larger --max-context"
        )


def layout_of(contract: EngineContract) -> CacheLayout:
    return CacheLayout(contract.num_layers, contract.num_kv_heads, contract.head_dim)


class EngineRuntime(ABC):
    """The shared part of every runtime. A subclass provides `_zeros`/`_empty` (cache and staging memory on its
    device) and `_run` (the engine call); everything else, the cache bookkeeping included, lives here once."""

    layout: CacheLayout
    profile: Profile | None = None  # None: no artifact profile to respect (a plain module in tests)
    max_block: int | None = None  # positions a pass may predict from (the profile's N), None: unbounded
    has_draft_adapter: bool = False  # the engine takes `draft [B]` and runs the draft-only LoRA on those rows
    # engine contract version 3: the engine takes `token_bitmask [B, N, W]` (W int32 words per position)
    structured: bool = False
    bitmask_words: int = 0
    _allowed: np.ndarray | None = None  # host runtimes: all-allowed words (-1), constrained rows written per pass

    def __init__(self) -> None:
        self.slots = 0
        self.context = 0
        self.cache: KVCache | None = None
        self._present: Any = None

    # --- what a subclass provides ----------------------------------------------------------------------------
    @abstractmethod
    def _zeros(self, shape: tuple[int, ...]) -> Any:
        """A zeroed cache of this shape and the cache dtype, on the runtime's device."""

    @abstractmethod
    def _empty(self, size: int) -> Any:
        """A flat staging buffer of the cache dtype, viewed with each pass's shape."""

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray], past: Any, shape: tuple[int, int, int, int]) -> tuple[dict[str, Any], Any]:
        """Run one pass: host `feeds` (every input but the cache), the gathered `past`, and (B, T, P, N); return
        the three candidate outputs (arrays the loop reads on the host) and `present_key_values` (left on the
        device until `commit`)."""

    # --- shared ----------------------------------------------------------------------------------------------
    activation_bytes: int | None = None  # the engine's own working memory, where the engine says it

    def free_memory(self) -> int | None:
        """Bytes free where the cache and the staging go: host memory here, device memory for a GPU runtime."""
        from dlm.memory_plan import host_available_bytes

        return host_available_bytes()

    def weight_bytes(self) -> int:
        """Bytes of the artifact's files (the weights, for every artifact kind)."""
        artifact = getattr(self, "artifact", None)
        if artifact is None:
            return sum(p.numel() * p.element_size() for p in self.module.parameters())  # type: ignore[attr-defined]
        directory = artifact.path.parent
        return sum((directory / name).stat().st_size for name in artifact.entry["files"])

    def pass_tokens(self, slots: int, context: int, pass_tokens: int | None) -> int:
        """New tokens one pass may carry in all (the pass planner's budget); by default every row at its most."""
        rows = self.profile.batch[2] if self.profile else slots
        return pass_tokens or rows * min(context, self.profile.tokens[2] if self.profile else context)

    def allocate(self, slots: int, context: int, pass_tokens: int | None = None) -> None:
        """The cache of `slots` × `context` positions and the staging for passes of at most `pass_tokens` new
        tokens in all (`dlm.memory_plan` accounts the same sizes)."""
        check_context(self.profile, context)
        # a pass may hold more rows than there are slots (re-masking's verifying rows share their sequence's slot):
        # the staging is for the most rows one pass can have
        rows = self.profile.batch[2] if self.profile else slots
        self.cache = KVCache(self._zeros(self.layout.cache_shape(slots, context)))
        self._past = self._empty(rows * context * self.layout.per_position)  # the largest past a pass can read
        self.slots, self.context = slots, context

    def forward(
        self,
        slots: np.ndarray,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        new_mask: np.ndarray,
        cache_lengths: np.ndarray,
        causal: np.ndarray,
        logit_positions: np.ndarray,
        draft: np.ndarray | None = None,
        token_bitmask: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Candidates:
        """`draft [B]`: the rows that run the draft-only LoRA; ignored by an engine without one (those rows then
        draft with the base weights, as without an adapter). `token_bitmask`: (rows [R], masks [R, N', W] int32,
        N' <= N) the allowed tokens of the constrained rows only (DESIGN §4a); every other row is all-allowed. An
        engine of contract version 2 runs passes without constrained rows and refuses one with them."""
        assert self.cache is not None, "allocate the cache before the first pass"
        b, t = input_ids.shape
        p = int(cache_lengths.max(initial=0))
        n = int(logit_positions.shape[1])
        if self.profile is not None:
            self.profile.check(b, t, p, n)
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
            "attention_mask": attention_mask(cache_lengths, new_mask),
            "causal": np.ascontiguousarray(causal, dtype=bool).reshape(b),
            "logit_positions": np.ascontiguousarray(logit_positions, dtype=np.int64),
        }
        if self.has_draft_adapter:
            feeds["draft"] = (np.zeros(b, dtype=bool) if draft is None
                              else np.ascontiguousarray(draft, dtype=bool).reshape(b))
        if token_bitmask is not None and len(token_bitmask[0]) and not self.structured:
            raise Unconstrained(self.rebuild_structured())
        self._constrained = token_bitmask if token_bitmask is not None and len(token_bitmask[0]) else None
        if self.structured and self._host_bitmask:
            feeds["token_bitmask"] = self._bitmask_feed(b, n)
        size = b * p * self.layout.per_position
        if size > len(self._past):  # only without a profile (a plain module): grow to this pass's rows
            self._past = self._empty(size)
        past = self._past[:size].reshape(self.layout.cache_shape(b, p))
        self.cache.gather(slots, p, past)
        try:
            outputs, self._present = self._run(feeds, past, (b, t, p, n))
        finally:
            if self._constrained is not None and "token_bitmask" in feeds:
                feeds["token_bitmask"][self._constrained[0]] = -1  # all-allowed again for the next pass
        return Candidates.from_outputs(outputs)

    _host_bitmask = True  # the mask goes in the feeds (ONNX Runtime, PyTorch); TensorRT keeps it on the device
    _constrained: tuple[np.ndarray, np.ndarray] | None = None

    def _bitmask_feed(self, b: int, n: int) -> np.ndarray:
        """[B, N, W] int32, all-allowed (-1: every bit set) but the constrained rows, from a buffer kept between
        passes (grown when a pass needs more)."""
        size = b * n * self.bitmask_words
        if self._allowed is None or len(self._allowed) < size:
            self._allowed = np.full(size, -1, dtype=np.int32)
        view = self._allowed[:size].reshape(b, n, self.bitmask_words)
        if self._constrained is not None:
            rows, masks = self._constrained
            view[rows, : masks.shape[1]] = masks
        return view

    def rebuild_structured(self) -> str:
        """The refusal of a constrained pass on an engine of contract version 2, with the command that rebuilds it."""
        artifact = getattr(self, "artifact", None)
        how = "export the graph with --structured"
        if artifact is not None:
            command = rebuild_command(artifact.path.parent, _kind_of(artifact.path), artifact.entry)
            how = (f"export the ONNX graph with --structured, then rebuild the engine with `{command}`"
                   if "export engine" in command else f"rebuild it with `{command} --structured`")
        return (f"a constrained request (structured outputs) is not valid on this engine: it was built for engine "
                f"contract version 2, without the allowed-token mask; {how}")

    def commit(self, slots: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
        assert self.cache is not None
        self.cache.commit(slots, starts, counts, self._present)

    def weights_version(self) -> object:
        """What identifies the weights the cache's keys and values were computed with. An artifact's runtime runs the
        files it verified at load for its whole life (another artifact, or another adapter, is another runtime with
        another cache), so None; a PyTorch module can be changed in place (`TorchRuntime`)."""
        return None

    def claim(self, free: Sequence[int], prompt: Sequence[int] | None) -> tuple[int, int]:
        """A free slot for a request and the prompt tokens its cache already holds (`KVCache.claim`; `prompt`
        None: prefix caching off). Content computed with other weights is dropped first."""
        assert self.cache is not None, "allocate the cache before claiming a slot"
        if prompt is not None:
            self.cache.check_weights(self.weights_version())
        return self.cache.claim(free, prompt)

    def retain(self, slot: int, tokens: Sequence[int]) -> None:
        """`slot` is free again and its first positions hold the keys and values of `tokens` (empty: nothing)."""
        assert self.cache is not None
        self.cache.retain(slot, tokens)


class Unconstrained(ValueError):
    """A constrained pass asked of an engine of contract version 2 (no `token_bitmask` input)."""


def _kind_of(path: Path) -> str:
    return {file: kind for kind, file in FILES.items()}.get(path.name, "onnx")


class TorchRuntime(EngineRuntime):
    """Runs a PyTorch module with the engine contract (`forward(input_ids, position_ids, attention_mask,
    past_key_values, causal, logit_positions) -> (top_tokens, top_logits, logsumexp, present_key_values)`) on CPU
    or CUDA; the cache stays on that device."""

    def __init__(self, module: Any, layout: CacheLayout, device: str = "cpu", dtype: Any = None):
        import torch  # lazily: the serving environment may run another runtime without torch

        super().__init__()
        self._torch = torch
        self.module = module
        self.layout = layout
        self.device = torch.device(device)
        self.dtype = dtype or next(module.parameters()).dtype
        self.has_draft_adapter = bool(getattr(module, "has_draft_adapter", False))
        config = getattr(module, "config", None)  # a DiffusionLM's forward always takes token_bitmask
        if config is not None and hasattr(config, "vocab_size"):
            self.structured, self.bitmask_words = True, -(-int(config.vocab_size) // 32)

    def _zeros(self, shape: tuple[int, ...]) -> Any:
        return self._torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _empty(self, size: int) -> Any:
        return self._torch.empty(size, dtype=self.dtype, device=self.device)

    def _run(self, feeds: dict[str, np.ndarray], past: Any, shape: tuple[int, int, int, int]) -> tuple[dict[str, Any], Any]:
        torch = self._torch
        inputs = {name: torch.as_tensor(array, device=self.device) for name, array in feeds.items()}
        with torch.inference_mode():
            draft = (inputs["draft"],) if "draft" in inputs else ()
            bitmask = {"token_bitmask": inputs["token_bitmask"]} if "token_bitmask" in inputs else {}
            tokens, logits, lse, present = self.module(
                inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"], past, inputs["causal"],
                inputs["logit_positions"], *draft, **bitmask,
            )
        outputs = {"top_tokens": tokens.cpu().numpy(), "top_logits": logits.float().cpu().numpy(),
                   "logsumexp": lse.float().cpu().numpy()}
        return outputs, present

    def weights_version(self) -> object:
        """The parameters' identities and in-place version counters: any change of a weight (an adapter trained
        or loaded in place, `load_state_dict`) moves one, and the resident keys and values are dropped. A write
        through `.data` bypasses the counters: after one, `cache.forget()`."""
        return tuple((id(p), p._version) for p in self.module.parameters())


class TorchExportRuntime(TorchRuntime):
    """Runs `model.pt2` (a `torch.export` program) on CPU or CUDA: PyTorch without the model's Python source."""

    def __init__(self, artifact_dir: str | Path, config: dict[str, Any] | None = None, device: str = "cpu",
                 verify_files: bool = True):
        import torch

        self.artifact = load_artifact(artifact_dir, "torch_export", config=config, verify_files=verify_files)
        self.contract = self.artifact.contract
        program = torch.export.load(str(self.artifact.path))
        if torch.device(device).type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        super().__init__(program.module(), layout_of(self.contract), device, getattr(torch, self.contract.cache_dtype))
        self.profile = self.contract.profile
        self.has_draft_adapter = self.contract.draft_adapter
        self.structured, self.bitmask_words = self.contract.structured, self.contract.bitmask_words


class OnnxRuntime(EngineRuntime):
    """Runs `model.onnx` with ONNX Runtime through IO binding. The cache, the gathered past of a pass and every
    output live in numpy buffers allocated once by `allocate`; each pass binds views of them, so no step
    allocates cache-sized memory. The returned candidates are views, valid until the next `forward`."""

    def __init__(self, artifact_dir: str | Path, config: dict[str, Any] | None = None,
                 providers: list[str] | None = None, threads: int | None = None, verify_files: bool = True,
                 spin: bool = True):
        import onnxruntime as ort

        super().__init__()
        self.artifact = load_artifact(artifact_dir, "onnx", config=config, verify_files=verify_files)
        self.contract = self.artifact.contract
        self.profile = self.contract.profile
        self.has_draft_adapter = self.contract.draft_adapter
        self.structured, self.bitmask_words = self.contract.structured, self.contract.bitmask_words
        self.layout = layout_of(self.contract)
        self.dtype = np.dtype(self.contract.cache_dtype)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spin:  # idle threads sleep at once instead of spinning: fair when other work shares the cores
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(self.artifact.path), options, providers=providers or ["CPUExecutionProvider"]
        )
        self._binding = self.session.io_binding()

    def _zeros(self, shape: tuple[int, ...]) -> Any:
        return np.zeros(shape, self.dtype)

    def _empty(self, size: int) -> Any:
        return np.empty(size, self.dtype)

    def allocate(self, slots: int, context: int, pass_tokens: int | None = None) -> None:
        super().allocate(slots, context, pass_tokens)
        contract, rows = self.contract, self.contract.profile.batch[2]
        tokens = self.pass_tokens(slots, context, pass_tokens)
        # one flat buffer per output, large enough for any pass this allocation allows
        self._outputs = {
            spec.name: np.empty(contract.buffer_elements(spec, rows, context, tokens), contract.dtype(spec))
            for spec in contract.outputs
        }

    def _run(self, feeds: dict[str, np.ndarray], past: Any, shape: tuple[int, int, int, int]) -> tuple[dict[str, Any], Any]:
        b, t, p, n = shape
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, array in (*feeds.items(), ("past_key_values", past)):
            binding.bind_cpu_input(name, array)
        views = {}
        for spec in self.contract.outputs:
            dims = self.contract.shape(spec, b, t, p, n)
            view = self._outputs[spec.name][: math.prod(dims)].reshape(dims)
            binding.bind_output(spec.name, "cpu", 0, view.dtype, list(view.shape), view.ctypes.data)
            views[spec.name] = view
        self.session.run_with_iobinding(binding)
        return views, views["present_key_values"]


class RuntimeUnavailable(RuntimeError):
    """The library or device a runtime needs is missing on this machine."""


TENSORRT_MISSING = "TensorRT is not installed: pip install .[tensorrt] on a GPU host"


def import_tensorrt() -> ModuleType:
    """The TensorRT module, or `RuntimeUnavailable` when it is missing. A `tensorrt` that imports but is not the
    library counts as missing: an empty namespace package (what `tensorrt-stubs` leaves when installed into the
    environment, or any stray `tensorrt/` folder on the path) or a module without `Builder` and `__version__`.
    Callers then `import tensorrt as trt` for its types (the type checker reads them from the stubs)."""
    try:
        import tensorrt
    except ImportError as e:
        raise RuntimeUnavailable(TENSORRT_MISSING) from e
    missing = [name for name in ("Builder", "__version__") if not hasattr(tensorrt, name)]
    if missing:
        where = ", ".join(getattr(tensorrt, "__path__", None) or [str(getattr(tensorrt, "__file__", "?"))])
        raise RuntimeUnavailable(
            f"{TENSORRT_MISSING} (the `tensorrt` found at {where} lacks {' and '.join(missing)}: "
            f"not the library, perhaps type stubs or an empty folder)"
        )
    return tensorrt


class TensorRTRuntime(EngineRuntime):
    """Runs `model.plan` with the TensorRT 10 Python API on one GPU (`device`, e.g. `cuda:3` for a Triton instance
    of KIND_GPU on GPU 3). The engine, its execution context, the cache, every buffer and a dedicated CUDA stream
    are created on that device; every pass (the cache gather, the input copies, `execute_async_v3`, the output
    copies) and every commit runs under that device and on that stream, never the legacy default stream, so
    instances on other GPUs of the node never serialise on one another. Device buffers (torch CUDA tensors) are
    allocated once by `allocate` and bound with `set_tensor_address`; the small per-pass inputs and the candidates
    go through pinned host buffers. The cache never leaves the GPU; only the candidates (B × N × K ids and
    logits, B × N logsumexp) come back to the host."""

    def __init__(self, artifact_dir: str | Path, config: dict[str, Any] | None = None, device: str = "cuda",
                 verify_files: bool = True):
        import_tensorrt()
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise RuntimeUnavailable("the TensorRT runtime needs a CUDA GPU, and torch sees none")
        super().__init__()
        self._torch = torch
        self.device = torch.device(device)
        major, minor = torch.cuda.get_device_capability(self.device)
        self.artifact = load_artifact(
            artifact_dir, "tensorrt", config=config, tensorrt_version=trt.__version__,
            compute_capability=f"{major}.{minor}", verify_files=verify_files,
        )
        self.contract = self.artifact.contract
        self.profile = self.contract.profile
        self.has_draft_adapter = self.contract.draft_adapter
        self.structured, self.bitmask_words = self.contract.structured, self.contract.bitmask_words
        self._host_bitmask = False  # an all-allowed mask stays on the device; only constrained rows are copied
        self.layout = layout_of(self.contract)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._trt_runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._trt_runtime.deserialize_cuda_engine(self.artifact.path.read_bytes())
            if self.engine is None:
                directory = self.artifact.path.parent
                raise ArtifactError(
                    f"TensorRT could not deserialize {self.artifact.path}; rebuild it with "
                    f"`{rebuild_command(directory, 'tensorrt', self.artifact.entry)}`"
                )
            self._execution = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(device=self.device)
        # TensorRT 10's own account of its working memory (device_memory_size_v2 from 10.1 on)
        self.activation_bytes = int(getattr(self.engine, "device_memory_size_v2", self.engine.device_memory_size))
        types = {
            trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool,
        }
        names = self.contract.input_names + self.contract.output_names
        self._dtypes = {name: types[self.engine.get_tensor_dtype(name)] for name in names}
        self.dtype = self._dtypes["past_key_values"]

    def _zeros(self, shape: tuple[int, ...]) -> Any:
        return self._torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _empty(self, size: int) -> Any:
        return self._torch.empty(size, dtype=self.dtype, device=self.device)

    def free_memory(self) -> int | None:
        free, _ = self._torch.cuda.mem_get_info(self.device)
        return int(free)

    def allocate(self, slots: int, context: int, pass_tokens: int | None = None) -> None:
        torch, contract, rows = self._torch, self.contract, self.contract.profile.batch[2]
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            super().allocate(slots, context, pass_tokens)  # the cache, and the staging the gather writes into
            tokens = self.pass_tokens(slots, context, pass_tokens)
            # each buffer is large enough for any pass this allocation allows; a pass uses a prefix of it
            self._buffers = {"past_key_values": self._past}
            self._pinned: dict[str, Any] = {}  # host side of the small inputs and of the candidates
            for spec in (*contract.inputs, *contract.outputs):
                size = contract.buffer_elements(spec, rows, context, tokens)
                dtype = self._dtypes[spec.name]
                if spec.name != "past_key_values":
                    self._buffers[spec.name] = torch.empty(size, dtype=dtype, device=self.device)
                if spec.name not in ("past_key_values", "present_key_values"):
                    self._pinned[spec.name] = torch.empty(size, dtype=dtype, pin_memory=True)
                self._execution.set_tensor_address(spec.name, self._buffers[spec.name].data_ptr())
            if "token_bitmask" in self._buffers:
                self._buffers["token_bitmask"].fill_(-1)  # every token allowed, for every row of every pass
            self.stream.synchronize()

    def forward(self, *args: Any) -> Any:
        with self._torch.cuda.device(self.device), self._torch.cuda.stream(self.stream):
            return super().forward(*args)  # the cache gather too runs on this instance's stream

    def commit(self, slots: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
        with self._torch.cuda.device(self.device), self._torch.cuda.stream(self.stream):
            super().commit(slots, starts, counts)

    def claim(self, free: Sequence[int], prompt: Sequence[int] | None) -> tuple[int, int]:
        with self._torch.cuda.device(self.device), self._torch.cuda.stream(self.stream):
            return super().claim(free, prompt)  # a shared prefix copied between slots is copied on this stream

    def _run(self, feeds: dict[str, np.ndarray], past: Any, shape: tuple[int, int, int, int]) -> tuple[dict[str, Any], Any]:
        torch, contract = self._torch, self.contract
        b, t, p, n = shape
        views, pinned = {}, {}
        for spec in (*contract.inputs, *contract.outputs):
            dims = contract.shape(spec, b, t, p, n)
            views[spec.name] = self._buffers[spec.name][: math.prod(dims)].view(dims)
            if spec.name in self._pinned:
                pinned[spec.name] = self._pinned[spec.name][: math.prod(dims)].view(dims)
        for name, array in feeds.items():  # host → pinned → device, asynchronously on this instance's stream
            pinned[name].copy_(torch.from_numpy(array))
            views[name].copy_(pinned[name], non_blocking=True)
        constrained = self._constrained if "token_bitmask" in views else None
        if constrained is not None:  # only the constrained rows' masks cross to the device
            rows, masks = constrained
            staged = pinned["token_bitmask"][: masks.size].view(masks.shape)
            staged.copy_(torch.from_numpy(np.ascontiguousarray(masks, dtype=np.int32)))
            index = torch.as_tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)
            views["token_bitmask"][index, : masks.shape[1]] = staged.to(self.device, non_blocking=True)
        for spec in contract.inputs:
            self._execution.set_input_shape(spec.name, tuple(views[spec.name].shape))
        if not self._execution.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run a pass of batch {b}, tokens {t}, cache {p}, positions {n}")
        for name in OUTPUTS:  # small: [B, N, K] and [B, N]
            pinned[name].copy_(views[name], non_blocking=True)
        if constrained is not None:
            views["token_bitmask"][index] = -1  # all-allowed again, on the stream, after this pass
        self.stream.synchronize()  # the candidates are on the host; the pinned inputs may be reused
        outputs = {name: pinned[name].numpy() for name in OUTPUTS}  # views, valid until the next pass
        return outputs, views["present_key_values"]


def tensorrt_usable() -> bool:
    """TensorRT importable and a CUDA GPU visible (without importing TensorRT). A `tensorrt` namespace package
    (a folder without `__init__.py`, such as type stubs leave) is not TensorRT."""
    spec = importlib.util.find_spec("tensorrt")
    if spec is None or spec.origin is None or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def choose_runtime(artifact_dir: str | Path) -> str:
    """`auto`: TensorRT when a plan, TensorRT and a GPU are there, else ONNX Runtime when model.onnx is there,
    else PyTorch with model.pt2."""
    directory = Path(artifact_dir)
    if (directory / FILES["tensorrt"]).is_file() and tensorrt_usable():
        return "tensorrt"
    if (directory / FILES["onnx"]).is_file():
        return "onnxruntime"
    if (directory / FILES["torch_export"]).is_file():
        return "torch"
    raise ArtifactError(
        f"no {', '.join(FILES.values())} in {directory}: build one with `{rebuild_command(directory, 'onnx')}`"
    )


def load_runtime(name: str, artifact_dir: str | Path, config: dict[str, Any] | None = None,
                 device: str | None = None, **options: Any) -> Any:
    """A runtime by name (`tensorrt`, `onnxruntime`, `torch`) or `auto`, over the artifacts of `artifact_dir`,
    checked against `config` (the config.json content of the model being served) when given."""
    if name == "auto":
        name = choose_runtime(artifact_dir)
    if name == "tensorrt":
        return TensorRTRuntime(artifact_dir, config, device=device or "cuda", **options)
    if name == "onnxruntime":
        return OnnxRuntime(artifact_dir, config, **options)
    if name == "torch":
        return TorchExportRuntime(artifact_dir, config, device=device or "cpu", **options)
    raise ValueError(f"runtime '{name}' is unknown: expected auto or one of {', '.join(RUNTIMES)}")
