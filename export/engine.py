"""TensorRT engine build (TensorRT 10 and 11 Python API): ONNX graph → `model.plan` plus its manifest entry.

Every build is strongly typed: the graph's own types decide every layer's precision, so a bf16 engine comes from a
bf16 graph (`python -m export onnx --precision bf16`, the checkpoints' own dtype), an fp16 engine from an fp16 graph
and an FP8 engine from the Q/DQ graph of `python -m export quantize`; the norms, the attention softmax and the
candidate selection are float32 in every graph. A graph whose KV cache is float32 would give an engine with an fp32
cache (twice the memory and bandwidth of the cache): it is refused unless `--allow-fp32-cache` asks for it, and then
an fp16 engine is built from it with TensorRT 10's (weakly typed) FP16 flag, as before. One optimization profile,
min/opt/max from the profile recorded in the ONNX graph's manifest (the same ranges the export validated and the
runtimes enforce). A timing cache file makes rebuilds fast. The source graph is checked against its manifest before
TensorRT is touched; TensorRT is imported only here, and its absence is reported with the extra to install.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dlm.artifact import FILES
from dlm.runtime import import_tensorrt
from export.manifest import check, write_entry

if TYPE_CHECKING:  # TensorRT itself is imported only inside the functions that build (see import_tensorrt)
    import tensorrt as trt

PLAN_FILE = FILES["tensorrt"]
TIMING_CACHE = "timing.cache"
PRECISIONS = ("fp16", "bf16", "fp8")
# engine precision → ONNX graph precisions it takes (fp32 only with allow_fp32_cache)
SOURCE_PRECISIONS = {"fp16": ("fp16", "fp32"), "bf16": ("bf16",), "fp8": ("fp8",)}
# polygraphy tolerances for replaying the ONNX Runtime outputs against a plan (first guesses, to tune on a GPU)
REPLAY_TOLERANCE = {"fp16": 5e-2, "bf16": 2e-1, "fp8": 5e-1}


class EngineError(RuntimeError):
    """The engine cannot be built from this graph or on this machine."""


def progress_monitor(log: Callable[[str], None]) -> trt.IProgressMonitor:
    """A `trt.IProgressMonitor` that prints each build phase (nested phases indented) and its duration."""
    import tensorrt as trt  # imported once TensorRT is known to be there (`import_tensorrt`)

    class TerminalProgress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._phases: dict[str, tuple[int, int, float]] = {}  # name → (depth, steps, start time)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            depth = self._phases[parent_phase][0] + 1 if parent_phase in self._phases else 0
            self._phases[phase_name] = (depth, num_steps, time.monotonic())
            if depth < 3:
                log(f"{'  ' * depth}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            depth, steps, _ = self._phases.get(phase_name, (0, 0, 0.0))
            if depth == 0 and sys.stdout.isatty():
                print(f"\r  step {step + 1}/{steps}", end="", flush=True)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            depth, _, start = self._phases.pop(phase_name, (0, 0, time.monotonic()))
            if depth < 3:
                log(f"{'  ' * depth}{phase_name} done in {time.monotonic() - start:.1f} s")

    return TerminalProgress()


def replay_command(plan: Path, source_dir: Path, entry: dict[str, Any], precision: str) -> str | None:
    """The polygraphy command that replays the source graph's saved comparison against the plan."""
    saved = entry.get("polygraphy")
    if not saved:
        return None
    tol = REPLAY_TOLERANCE[precision]
    return (
        f"polygraphy run {plan} --model-type engine --trt "
        f"--load-inputs {source_dir / saved['inputs']} --load-outputs {source_dir / saved['outputs']} "
        f"--atol {tol} --rtol {tol}"
    )


def build_engine(
    onnx_file: str | Path,
    precision: str,
    out: str | Path,
    *,
    opt_level: int = 3,
    timing_cache: str | Path | None = None,
    workspace_gib: float | None = None,
    allow_fp32_cache: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build `out/model.plan` from `onnx_file` and record it in `out/manifest.json`; returns the manifest entry.
    A graph with a float32 KV cache is refused unless `allow_fp32_cache`."""
    onnx_file, out = Path(onnx_file), Path(out)
    if precision not in PRECISIONS:
        raise EngineError(f"precision '{precision}' is not built here: expected one of {', '.join(PRECISIONS)}")
    if not 0 <= opt_level <= 5:
        raise EngineError(f"--opt-level must be in [0, 5], got {opt_level}")
    if onnx_file.name != FILES["onnx"]:
        raise EngineError(f"expected a {FILES['onnx']} written by `python -m export onnx` or `quantize`, got {onnx_file}")
    source = check(onnx_file.parent, "onnx")  # the graph is the one its manifest describes
    entry, contract = source.entry, source.contract
    if entry["precision"] not in SOURCE_PRECISIONS[precision]:
        hint = (
            f"python -m export quantize --onnx {onnx_file} --precision fp8 --out DIR"
            if precision == "fp8"
            else "python -m export onnx --checkpoint CHECKPOINT --out DIR"
        )
        raise EngineError(
            f"{onnx_file} is an {entry['precision']} graph; an {precision} engine is built from a "
            f"{' or '.join(SOURCE_PRECISIONS[precision])} graph: make one with `{hint}`"
        )

    if contract.cache_dtype == "float32" and not allow_fp32_cache:
        raise EngineError(
            f"{onnx_file} keeps its KV cache in float32 ({entry['precision']} graph): an engine built from it would "
            f"hold an fp32 cache on the GPU, twice the memory and bandwidth. Export the graph in the checkpoint's "
            f"dtype with `python -m export onnx --checkpoint CHECKPOINT --out DIR --precision bf16` (or fp16"
            + (", then quantize it with --high-precision fp16" if precision == "fp8" else "")
            + "), or pass --allow-fp32-cache to build it anyway"
        )

    import_tensorrt()  # a clear message when TensorRT is missing
    import tensorrt as trt
    import torch

    # Strongly typed unless an fp32 graph is asked to become fp16: TensorRT 10's (weak typing) FP16 flag does
    # that; TensorRT 11 removed weak typing and the flag, so there an fp16 engine needs an fp16 graph.
    fp16_from_fp32 = precision == "fp16" and entry["precision"] == "fp32"
    weak_fp16 = fp16_from_fp32 and hasattr(trt.BuilderFlag, "FP16")
    if fp16_from_fp32 and not weak_fp16:
        raise EngineError(
            f"TensorRT {trt.__version__} builds strongly typed networks only (no BuilderFlag.FP16), so an fp16 "
            f"engine needs an fp16 graph, and {onnx_file} is {entry['precision']}: make one with "
            f"`python -m export onnx --checkpoint CHECKPOINT --out DIR --precision fp16`"
        )

    if not torch.cuda.is_available():
        raise EngineError("building a TensorRT engine needs a CUDA GPU, and torch sees none")
    major, minor = torch.cuda.get_device_capability()
    compute_capability = f"{major}.{minor}"
    log(f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()} (compute capability {compute_capability})")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0 if weak_fp16 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):  # reads external weights beside the file too
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_file}:\n{errors}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != contract.input_names:
        raise EngineError(f"{onnx_file} has inputs {names}, the engine contract says {contract.input_names}")

    config = builder.create_builder_config()
    if weak_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    config.builder_optimization_level = opt_level
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    profile = builder.create_optimization_profile()
    for spec in contract.inputs:
        low, opt, high = contract.profile_shapes(spec)
        profile.set_shape(spec.name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
        log(f"profile {spec.name}: min {low} opt {opt} max {high}")
    config.add_optimization_profile(profile)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = Path(timing_cache) if timing_cache else out / TIMING_CACHE
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    config.progress_monitor = progress_monitor(log)

    log(f"building a {precision} engine at optimization level {opt_level}")
    start = time.monotonic()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_file}; its log above says why")
    plan_path = out / PLAN_FILE
    plan_path.write_bytes(memoryview(plan))
    cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    log(f"wrote {plan_path} ({plan_path.stat().st_size / 2**20:.1f} MiB) in {time.monotonic() - start:.0f} s")

    command = shlex.join(
        ["python", "-m", "export", "engine", "--onnx", str(onnx_file), "--precision", precision,
         "--out", str(out), "--opt-level", str(opt_level)]
    )
    replay = replay_command(plan_path, onnx_file.parent, entry, precision)
    if replay:
        log(f"replay the saved ONNX Runtime comparison against it with:\n  {replay}")
    return write_entry(
        out,
        "tensorrt",
        files=[PLAN_FILE],
        config=entry["config"],
        checkpoint_hash=entry["checkpoint_sha256"],
        precision=precision,
        contract=contract,
        command=command,
        source=str(onnx_file),
        source_sha256=entry["files"][FILES["onnx"]],
        source_precision=entry["precision"],
        opset=entry.get("opset"),
        calibration_sha256=entry.get("calibration_sha256"),
        tensorrt_version=trt.__version__,
        compute_capability=compute_capability,
        builder_optimization_level=opt_level,
        replay=replay,
    )

