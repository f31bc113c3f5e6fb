"""Trace the denoiser into one ONNX graph (DESIGN §4) and validate it before returning.

Steps: torch.export with the contract's dynamic axes → `torch.onnx.export(dynamo=True)` at opset ≥ 18 → axis names
and IO checked against the contract → `onnx.checker` full check → ONNX Runtime against PyTorch on several shapes,
an empty cache among them (largest absolute logit difference printed, refused above the tolerance) → the same
inputs and ONNX Runtime outputs saved as a polygraphy comparison, which a GPU host replays against a TensorRT plan
(`polygraphy run model.plan --model-type engine --trt --load-inputs ... --load-outputs ...`) → manifest entry.
A bf16 graph, which ONNX Runtime cannot run on a CPU, is validated instead as the bf16 model against fp32 on decoded
prompts (`export.bf16_validation`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch

from dlm.contract import DEFAULT_TOP_K, EngineContract
from export.manifest import checkpoint_sha256, write_entry
from export.model import DiffusionLM
from export.torch_export import (
    DEFAULT_MAX_BATCH,
    TORCH_EXPORT_FILE,
    adapter_option,
    adapter_record,
    contract_for,
    limits_options,
    load_for_export,
    profile_for,
    sample_inputs,
    save_torch_export,
    to_torch,
    trace,
)

ONNX_FILE = "model.onnx"
ONNX_DATA = ONNX_FILE + ".data"  # weights beside the graph once they pass protobuf's 2 GiB limit
POLYGRAPHY_INPUTS = "polygraphy_inputs.json"
POLYGRAPHY_OUTPUTS = "polygraphy_outputs.json"
DEFAULT_OPSET = 18  # the dynamo exporter cannot write 17
# fp32, fp16: largest absolute difference of the candidates' logits and logsumexp (ONNX Runtime against PyTorch);
# bf16: mean |Δ confidence| against fp32 on decoded prompts (`export.bf16_validation`)
TOLERANCE = {"fp32": 1e-3, "fp16": 0.1, "bf16": 0.05}
EXTERNAL_DATA_BYTES = 1 << 30
ONNX_DTYPES = {"int64": onnx.TensorProto.INT64, "int32": onnx.TensorProto.INT32, "bool": onnx.TensorProto.BOOL,
               "float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
               "bfloat16": onnx.TensorProto.BFLOAT16}


class ExportError(RuntimeError):
    """The exported graph breaks the contract or disagrees with PyTorch."""


# The validation passes stay small whatever the model: their saved feeds and outputs (for the polygraphy replay)
# are bounded by these, not by the profile's maxima (a 4096-position cache of 8B would be tens of GB of JSON).
VALIDATION_MAX_PAST = 64
VALIDATION_MAX_BATCH = 4


def validation_shapes(contract: EngineContract, block_size: int) -> list[tuple[int, int, int, int]]:
    """(batch, tokens, past, positions) of the passes checked: the profile minimum (one token, empty cache, one
    position), a prompt prefill into an empty cache predicting from its last token, a denoising pass over one block
    predicting from all of it, and one-token decoding at a longer cache and larger batch."""
    p = contract.profile
    block = min(block_size, p.tokens[2], p.max_block)
    return [
        (1, 1, 0, 1),
        (min(2, p.batch[2]), min(2 * block, p.tokens[2]), 0, 1),
        (min(p.batch[1], VALIDATION_MAX_BATCH), block, min(p.past[1], VALIDATION_MAX_PAST), block),
        (min(p.batch[2], VALIDATION_MAX_BATCH), 1, min(p.past[2], 2 * VALIDATION_MAX_PAST), 1),
    ]


def write_onnx(program: torch.export.ExportedProgram, contract: EngineContract, path: Path, opset: int) -> list[str]:
    """Convert the traced program; returns the files written (the graph, and its weights when external)."""
    onnx_program = torch.onnx.export(
        program, (), dynamo=True, opset_version=opset, output_names=contract.output_names, verbose=False
    )
    assert onnx_program is not None  # the dynamo exporter returns its program (only the legacy one returns None)
    weight_bytes = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    onnx_program.save(str(path), external_data=external)
    name_axes(path, contract)
    return [path.name, ONNX_DATA] if external else [path.name]


def name_axes(path: Path, contract: EngineContract) -> None:
    """Give every graph input and output the contract's axis names (the exporter may name them s0, s1, ...)."""
    model = onnx.load(str(path), load_external_data=False)
    specs = {s.name: s for s in (*contract.inputs, *contract.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, want in zip(dims, specs[value.name].dims):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want
    onnx.save(model, str(path))


def graph_signature(path: Path) -> dict[str, tuple[int, tuple[int | str, ...]]]:
    """name → (ONNX element type, dims) of every graph input and output, in order."""
    model = onnx.load(str(path), load_external_data=False)
    return {
        v.name: (v.type.tensor_type.elem_type, tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim))
        for v in (*model.graph.input, *model.graph.output)
    }


def expected_signature(contract: EngineContract) -> dict[str, tuple[int, tuple[int | str, ...]]]:
    return {s.name: (ONNX_DTYPES[contract.dtype(s)], s.dims) for s in (*contract.inputs, *contract.outputs)}


def check_graph(path: Path, contract: EngineContract) -> None:
    onnx.checker.check_model(str(path), full_check=True)
    got, want = graph_signature(path), expected_signature(contract)
    if list(got) != list(want) or got != want:
        raise ExportError(f"{path}: inputs/outputs {got} differ from the engine contract {want}")


def run_onnxruntime(path: Path, feeds: list[dict[str, np.ndarray]], save_dir: Path | None = None) -> list[dict[str, np.ndarray]]:
    """ONNX Runtime outputs for each feed, through polygraphy; with `save_dir`, the feeds and outputs are saved
    there as a polygraphy comparison."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    runner = OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"]), name="onnxrt")
    inputs_path = str(save_dir / POLYGRAPHY_INPUTS) if save_dir else None
    with G_LOGGER.verbosity(G_LOGGER.ERROR):  # polygraphy prints every feed's shapes otherwise
        results = Comparator.run([runner], data_loader=feeds, save_inputs_path=inputs_path)
        if save_dir:
            results.save(str(save_dir / POLYGRAPHY_OUTPUTS))
    return [{name: np.asarray(results[0][1][i][name]) for name in results[0][1][i].keys()} for i in range(len(feeds))]


def compare_with_torch(
    model: DiffusionLM,
    path: Path,
    contract: EngineContract,
    shapes: list[tuple[int, int, int, int]],
    save_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Largest absolute differences between ONNX Runtime and PyTorch over `shapes` (the best candidate's logit,
    logsumexp, present keys and values) and the agreement of the best candidates."""
    feeds = [sample_inputs(contract, b, t, p, seed=i, positions=n) for i, (b, t, p, n) in enumerate(shapes)]
    outputs = run_onnxruntime(path, feeds, save_dir)
    report: dict[str, Any] = {"shapes": [], "max_abs_logit_diff": 0.0, "max_abs_present_diff": 0.0}
    for (b, t, p, n), feed, got in zip(shapes, feeds, outputs):
        with torch.no_grad():
            tokens, logits, lse, present = model(**{name: to_torch(feed[name]) for name in contract.input_names})
        logit_diff = max(candidate_logit_difference(got, tokens.numpy(), logits.numpy()),
                         float(np.abs(got["logsumexp"] - lse.numpy()).max()))
        present_diff = float(np.abs(got["present_key_values"].astype(np.float32) - present.float().numpy()).max())
        agreement = float((got["top_tokens"][..., 0] == tokens.numpy()[..., 0]).mean())
        log(f"  batch {b:3d} tokens {t:4d} cache {p:5d} positions {n:3d}: max |Δlogits| {logit_diff:.3g}, "
            f"max |Δpresent| {present_diff:.3g}, best-candidate agreement {agreement:.4f}")
        report["shapes"].append({"batch": b, "tokens": t, "past": p, "positions": n, "max_abs_logit_diff": logit_diff,
                                 "max_abs_present_diff": present_diff, "argmax_agreement": agreement})
        report["max_abs_logit_diff"] = max(report["max_abs_logit_diff"], logit_diff)
        report["max_abs_present_diff"] = max(report["max_abs_present_diff"], present_diff)
    return report


def candidate_logit_difference(got: dict[str, np.ndarray], tokens: np.ndarray, logits: np.ndarray) -> float:
    """Largest |Δ| between the logits two runs give the same candidate ids (near-ties may swap ranks, so logits are
    matched by token id, not by rank; a candidate of one run missing from the other is not compared)."""
    worst = 0.0
    for row_tokens, row_logits, ref_tokens, ref_logits in zip(
        got["top_tokens"].reshape(-1, tokens.shape[-1]), got["top_logits"].reshape(-1, tokens.shape[-1]),
        tokens.reshape(-1, tokens.shape[-1]), logits.reshape(-1, tokens.shape[-1]),
    ):
        ref = dict(zip(ref_tokens.tolist(), ref_logits.tolist()))
        diffs = [abs(v - ref[k]) for k, v in zip(row_tokens.tolist(), row_logits.tolist()) if k in ref]
        worst = max([worst, *diffs])
    return worst


def validate(
    model: DiffusionLM,
    path: Path,
    contract: EngineContract,
    tolerance: float,
    save_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch on the validation shapes; ExportError above `tolerance`."""
    log("ONNX Runtime against PyTorch:")
    shapes = validation_shapes(contract, model.config.block_size)
    report = compare_with_torch(model, path, contract, shapes, save_dir, log)
    report["tolerance"] = tolerance
    log(f"largest absolute logit difference: {report['max_abs_logit_diff']:.3g} (tolerance {tolerance:g})")
    if not report["max_abs_logit_diff"] <= tolerance:
        raise ExportError(
            f"ONNX Runtime differs from PyTorch by {report['max_abs_logit_diff']:.3g} in the logits, more than "
            f"the tolerance {tolerance:g}; see the per-shape figures above"
        )
    return report


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    *,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_context: int | None = None,
    max_tokens: int | None = None,
    max_block: int | None = None,
    top_k: int = DEFAULT_TOP_K,
    draft_adapter: str | Path | None = "auto",
    tolerance: float | None = None,
    torch_export: bool = False,
    log: Callable[[str], None] = print,
    structured: bool = False,
) -> dict[str, Any]:
    """Checkpoint → validated `model.onnx` (+ `model.pt2` with `torch_export`) and manifest; returns the manifest
    entry of the ONNX graph. Raises ExportError when validation fails."""
    checkpoint, out = Path(checkpoint), Path(out)
    if opset < 18:
        raise ValueError(f"opset {opset} is not supported: the dynamo exporter writes opset 18 or newer")
    out.mkdir(parents=True, exist_ok=True)
    model = load_for_export(checkpoint, precision, top_k, draft_adapter, structured)
    profile = profile_for(model.config, max_batch, max_context, max_tokens, max_block)
    contract = contract_for(model, precision, profile)
    command = (
        f"python -m export onnx --checkpoint {checkpoint} --out {out} --precision {precision} --opset {opset} "
        + limits_options(profile, contract.top_k) + adapter_option(model)
    )
    if model.draft_adapter is not None:
        log(f"with the draft-only LoRA of {model.draft_adapter.path} (rank {model.draft_adapter.rank}, "
            f"alpha {model.draft_adapter.alpha:g}): the graph takes `draft [B]`")

    log(f"tracing {checkpoint} ({precision}) with torch.export")
    program = trace(model, contract)
    path = out / ONNX_FILE
    log(f"exporting {path} at opset {opset}")
    files = write_onnx(program, contract, path, opset)
    check_graph(path, contract)
    log("onnx.checker full check passed; inputs and outputs match the engine contract")

    limit = TOLERANCE[precision] if tolerance is None else tolerance
    if precision == "bf16":  # ONNX Runtime's CPU kernels have no bfloat16: the bf16 model against fp32 instead
        from export.bf16_validation import validate_bf16  # imported here: it imports this module

        reference = load_for_export(checkpoint, "fp32", top_k, draft_adapter, structured)
        report = validate_bf16(model, reference, contract, checkpoint, limit, log)
        polygraphy = None
    else:
        report = validate(model, path, contract, limit, out, log)
        polygraphy = {"inputs": POLYGRAPHY_INPUTS, "outputs": POLYGRAPHY_OUTPUTS}
    config = json.loads((checkpoint / "config.json").read_text())
    entry = write_entry(
        out,
        "onnx",
        files=files,
        config=config,
        checkpoint_hash=checkpoint_sha256(checkpoint),
        precision=precision,
        contract=contract,
        command=command,
        opset=opset,
        validation=report,
        polygraphy=polygraphy,
        **adapter_record(model),
    )
    saved = f", {POLYGRAPHY_INPUTS}, {POLYGRAPHY_OUTPUTS}" if polygraphy else ""
    log(f"wrote {', '.join(files)}{saved} and manifest.json to {out}")
    if torch_export:
        save_torch_export(program, out, checkpoint, precision, contract, command + " --torch-export",
                          **adapter_record(model))
        log(f"wrote {out / TORCH_EXPORT_FILE}")
    return entry
