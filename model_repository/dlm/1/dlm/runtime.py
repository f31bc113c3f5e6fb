"""Runtimes: one interface over the engine contract of DESIGN §4, whatever executes the denoiser.

A runtime owns the KV cache: `allocate` reserves one slot of `context` positions per live sequence, once.
`forward` gathers each row's cache (its first `cache_lengths[i]` positions), runs the pass and returns float32
logits; the keys and values of the pass stay inside the runtime until `commit` appends the first `counts[i]` new
columns of row i to its slot (speculative decoding keeps only the accepted prefix, a bidirectional pass nothing).

Implementations: `TorchRuntime` (an nn.Module, for tests and tools), and over built artifacts, each checked against
its manifest at load (`dlm.artifact`): `TensorRTRuntime` (model.plan), `OnnxRuntime` (model.onnx) and
`TorchExportRuntime` (model.pt2). `load_runtime` picks one by name or `auto`. torch, onnxruntime and tensorrt are
imported only by the runtime that needs them, so the serving environment installs just the one it runs.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from dlm.artifact import FILES, ArtifactError, load_artifact, rebuild_command
from dlm.contract import EngineContract

RUNTIMES = ("tensorrt", "onnxruntime", "torch")


@dataclass(frozen=True)
class CacheLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CacheLayout":
        """From a checkpoint's config.json content."""
        return cls(config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"])


class Runtime(Protocol):
    layout: CacheLayout
    slots: int
    context: int

    def allocate(self, slots: int, context: int) -> None: ...

    def forward(
        self,
        slots: np.ndarray,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        new_mask: np.ndarray,
        cache_lengths: np.ndarray,
        causal: np.ndarray,
    ) -> np.ndarray: ...

    def commit(self, slots: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None: ...


def attention_mask(cache_lengths: np.ndarray, new_mask: np.ndarray) -> np.ndarray:
    """`[B, P+T]` int64 key mask: a row's first `cache_lengths[i]` cached keys and its real new tokens."""
    p = int(cache_lengths.max(initial=0))
    cached = np.arange(p)[None, :] < cache_lengths[:, None]
    return np.concatenate([cached, new_mask.astype(bool)], axis=1).astype(np.int64)


class TorchRuntime:
    """Runs a PyTorch module with the engine contract (`forward(input_ids, position_ids, attention_mask,
    past_key_values, causal) -> (logits, present_key_values)`) on CPU or CUDA; the cache stays on that device."""

    def __init__(self, module: Any, layout: CacheLayout, device: str = "cpu", dtype: Any = None):
        import torch  # lazily: the serving environment may run another runtime without torch

        self._torch = torch
        self.module = module
        self.layout = layout
        self.device = torch.device(device)
        self.dtype = dtype or next(module.parameters()).dtype
        self.slots = 0
        self.context = 0
        self._cache: Any = None
        self._present: Any = None

    def allocate(self, slots: int, context: int) -> None:
        lay = self.layout
        shape = (slots, lay.num_layers, 2, lay.num_kv_heads, context, lay.head_dim)
        self._cache = self._torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.slots, self.context = slots, context

    def forward(
        self,
        slots: np.ndarray,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        new_mask: np.ndarray,
        cache_lengths: np.ndarray,
        causal: np.ndarray,
    ) -> np.ndarray:
        torch = self._torch
        p = int(cache_lengths.max(initial=0))
        index = torch.as_tensor(slots, device=self.device)
        with torch.inference_mode():
            logits, self._present = self.module(
                torch.as_tensor(input_ids, dtype=torch.int64, device=self.device),
                torch.as_tensor(position_ids, dtype=torch.int64, device=self.device),
                torch.as_tensor(attention_mask(cache_lengths, new_mask), device=self.device),
                self._cache[index, :, :, :, :p],
                torch.as_tensor(causal, dtype=torch.bool, device=self.device),
            )
        return logits.float().cpu().numpy()

    def commit(self, slots: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
        for row, (slot, start, count) in enumerate(zip(slots.tolist(), starts.tolist(), counts.tolist())):
            if count:
                self._cache[slot, :, :, :, start : start + count] = self._present[row, :, :, :, :count]


def check_context(contract: EngineContract, context: int) -> None:
    """Refuse a cache longer than the artifact's profile allows."""
    if context > contract.profile.max_context:
        raise ValueError(
            f"a cache of {context} positions exceeds the {contract.profile.max_context} this artifact was built for; "
            f"rebuild it with a larger --max-context"
        )


def layout_of(contract: EngineContract) -> CacheLayout:
    return CacheLayout(contract.num_layers, contract.num_kv_heads, contract.head_dim)


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

    def allocate(self, slots: int, context: int) -> None:
        check_context(self.contract, context)
        super().allocate(slots, context)

    def forward(self, slots, input_ids, position_ids, new_mask, cache_lengths, causal) -> np.ndarray:
        b, t = input_ids.shape
        self.contract.profile.check(b, t, int(cache_lengths.max(initial=0)))
        return super().forward(slots, input_ids, position_ids, new_mask, cache_lengths, causal)


class OnnxRuntime:
    """Runs `model.onnx` with ONNX Runtime through IO binding. The cache, the gathered past of a pass and both
    outputs live in numpy buffers allocated once by `allocate`; each pass binds views of them, so no step
    allocates cache-sized memory. The returned logits are a view, valid until the next `forward`."""

    def __init__(self, artifact_dir: str | Path, config: dict[str, Any] | None = None,
                 providers: list[str] | None = None, threads: int | None = None, verify_files: bool = True,
                 spin: bool = True):
        import onnxruntime as ort

        self.artifact = load_artifact(artifact_dir, "onnx", config=config, verify_files=verify_files)
        self.contract = self.artifact.contract
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
        self.slots = 0
        self.context = 0

    def allocate(self, slots: int, context: int) -> None:
        check_context(self.contract, context)
        lay, profile = self.layout, self.contract.profile
        rows, tokens = min(slots, profile.batch[2]), min(context, profile.tokens[2])
        per_position = lay.num_layers * 2 * lay.num_kv_heads * lay.head_dim
        self._cache = np.zeros((slots, lay.num_layers, 2, lay.num_kv_heads, context, lay.head_dim), self.dtype)
        # flat staging buffers, viewed with each pass's shape
        self._past = np.empty(rows * context * per_position, self.dtype)
        self._present_buffer = np.empty(rows * tokens * per_position, self.dtype)
        self._logits = np.empty(rows * tokens * self.contract.vocab_size, np.float32)
        self.slots, self.context = slots, context

    def _view(self, buffer: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return buffer[: math.prod(shape)].reshape(shape)

    def forward(self, slots, input_ids, position_ids, new_mask, cache_lengths, causal) -> np.ndarray:
        b, t = input_ids.shape
        p = int(cache_lengths.max(initial=0))
        self.contract.profile.check(b, t, p)
        past = self._view(self._past, self.contract.shape_of("past_key_values", b, t, p))
        for row, slot in enumerate(slots.tolist()):
            past[row] = self._cache[slot, :, :, :, :p]  # gather each row's cache into the staging buffer
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
            "attention_mask": attention_mask(cache_lengths, new_mask),
            "past_key_values": past,
            "causal": np.ascontiguousarray(causal, dtype=bool).reshape(b),
        }
        logits = self._view(self._logits, self.contract.shape_of("logits", b, t, p))
        self._present = self._view(self._present_buffer, self.contract.shape_of("present_key_values", b, t, p))
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name, array in (("logits", logits), ("present_key_values", self._present)):
            binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        self.session.run_with_iobinding(binding)
        return logits

    def commit(self, slots: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
        for row, (slot, start, count) in enumerate(zip(slots.tolist(), starts.tolist(), counts.tolist())):
            if count:
                self._cache[slot, :, :, :, start : start + count] = self._present[row, :, :, :, :count]


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


class TensorRTRuntime:
    """Runs `model.plan` with the TensorRT 10 Python API. Device buffers (torch CUDA tensors) for the cache and
    every input and output are allocated once by `allocate` and bound with `set_tensor_address`; each pass sets
    the input shapes and calls `execute_async_v3` on torch's current stream. The cache never leaves the GPU."""

    def __init__(self, artifact_dir: str | Path, config: dict[str, Any] | None = None, device: str = "cuda",
                 verify_files: bool = True):
        import_tensorrt()
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise RuntimeUnavailable("the TensorRT runtime needs a CUDA GPU, and torch sees none")
        self._torch = torch
        self.device = torch.device(device)
        major, minor = torch.cuda.get_device_capability(self.device)
        self.artifact = load_artifact(
            artifact_dir, "tensorrt", config=config, tensorrt_version=trt.__version__,
            compute_capability=f"{major}.{minor}", verify_files=verify_files,
        )
        self.contract = self.artifact.contract
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
        types = {
            trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool,
        }
        names = self.contract.input_names + self.contract.output_names
        self._dtypes = {name: types[self.engine.get_tensor_dtype(name)] for name in names}
        self.dtype = self._dtypes["past_key_values"]
        self.slots = 0
        self.context = 0

    def allocate(self, slots: int, context: int) -> None:
        torch, lay, contract = self._torch, self.layout, self.contract
        check_context(contract, context)
        rows, tokens = min(slots, contract.profile.batch[2]), min(context, contract.profile.tokens[2])
        self._cache = torch.zeros(
            (slots, lay.num_layers, 2, lay.num_kv_heads, context, lay.head_dim), dtype=self.dtype, device=self.device
        )
        # each buffer is large enough for any pass this allocation allows; a pass uses a prefix of it
        self._buffers = {}
        for spec in (*contract.inputs, *contract.outputs):
            size = math.prod(contract.shape(spec, rows, tokens, context))
            self._buffers[spec.name] = torch.empty(size, dtype=self._dtypes[spec.name], device=self.device)
            self._execution.set_tensor_address(spec.name, self._buffers[spec.name].data_ptr())
        self.slots, self.context = slots, context

    def forward(
        self,
        slots: np.ndarray,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        new_mask: np.ndarray,
        cache_lengths: np.ndarray,
        causal: np.ndarray,
    ) -> np.ndarray:
        torch, contract = self._torch, self.contract
        b, t = input_ids.shape
        p = int(cache_lengths.max(initial=0))
        contract.profile.check(b, t, p)
        views = {
            spec.name: self._buffers[spec.name][: math.prod(shape)].view(shape)
            for spec in (*contract.inputs, *contract.outputs)
            for shape in [contract.shape(spec, b, t, p)]
        }
        host = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": attention_mask(cache_lengths, new_mask),
            "causal": np.asarray(causal, dtype=bool).reshape(b),
        }
        for name, array in host.items():
            views[name].copy_(torch.from_numpy(np.ascontiguousarray(array)))
        past = views["past_key_values"]
        for row, slot in enumerate(slots.tolist()):
            past[row].copy_(self._cache[slot, :, :, :, :p])
        for spec in contract.inputs:
            self._execution.set_input_shape(spec.name, tuple(views[spec.name].shape))
        # torch's current stream, so the copies above and the commits after stay ordered with the engine
        if not self._execution.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT failed to run a pass of batch {b}, tokens {t}, cache {p}")
        self._present = views["present_key_values"]
        return views["logits"].float().cpu().numpy()

    def commit(self, slots: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
        for row, (slot, start, count) in enumerate(zip(slots.tolist(), starts.tolist(), counts.tolist())):
            if count:
                self._cache[slot, :, :, :, start : start + count] = self._present[row, :, :, :, :count]


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
