"""`python -m export quantize` on a random tiny checkpoint: INT8 and FP8 Q/DQ graphs that keep the engine contract,
run in ONNX Runtime (the serving runtime), stay close to fp32, and record their calibration set in the manifest.
Skipped, saying why, where NVIDIA ModelOpt is not installed (the `modelopt` extra)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import numpy as np
import onnx
import pytest

from conftest import MINIATURE, random_tiny_model, replay_polygraphy
from dlm.runtime import OnnxRuntime, tensorrt_usable
from export.__main__ import main
from export.checkpoint import load_tokenizer, save_checkpoint
from export.onnx_export import candidate_logit_difference
from export.manifest import check
from export.tasks import TASKS, held_out_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_BATCH, MAX_CONTEXT = 2, 96
CALIBRATION = 6  # prompts: enough to show the mechanics, few enough to stay fast
QUANT_TYPES = {"int8": {onnx.TensorProto.INT8}, "fp8": {onnx.TensorProto.FLOAT8E4M3FN}}




@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random checkpoint with the miniature's tokenizer, and its fp32 ONNX export."""
    if not (MINIATURE / "tokenizer.json").is_file():
        pytest.fail(f"the miniature's tokenizer is missing from {MINIATURE}")
    model = random_tiny_model()
    root = tmp_path_factory.mktemp("quantize")
    checkpoint = root / "checkpoint"
    save_checkpoint(model, checkpoint, dtype="float32")
    shutil.copy(MINIATURE / "tokenizer.json", checkpoint)  # same vocabulary size as the tiny config
    rc = main(["onnx", "--checkpoint", str(checkpoint), "--out", str(root / "fp32"), "--max-batch", str(MAX_BATCH),
               "--max-context", str(MAX_CONTEXT)])
    assert rc == 0
    return checkpoint, root


@pytest.fixture(scope="module")
def quantized(exported):
    """precision → directory of its Q/DQ graph (the checkpoint comes from the fp32 graph's manifest)."""
    pytest.importorskip("modelopt.onnx.quantization",
                        reason="NVIDIA ModelOpt is not installed (pip install -e '.[modelopt]')")
    _, root = exported
    out = {}
    for precision in ("int8", "fp8"):
        rc = main(["quantize", "--onnx", str(root / "fp32" / "model.onnx"), "--precision", precision,
                   "--out", str(root / precision), "--calibration-size", str(CALIBRATION)])
        assert rc == 0
        out[precision] = root / precision
    return out


def entry_of(directory):
    return json.loads((directory / "manifest.json").read_text())["artifacts"]["model.onnx"]


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_graph_has_qdq_pairs_of_its_type_and_keeps_the_contract(exported, quantized, precision):
    from export.onnx_export import check_graph

    path = quantized[precision] / "model.onnx"
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    # the zero points say which type the Q/DQ pairs quantize to
    initializers = {t.name: t.data_type for t in model.graph.initializer}
    zero_point_types = {initializers.get(n.input[2]) for n in model.graph.node
                        if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    assert zero_point_types == QUANT_TYPES[precision]
    check_graph(path, check(exported[1] / "fp32", "onnx").contract)  # same inputs, outputs, dtypes, axes


def copied(candidates):
    """The candidates of a pass outlive the next one only as copies (ONNX Runtime writes into its buffers)."""
    return dataclasses.replace(candidates, tokens=candidates.tokens.copy(), logits=candidates.logits.copy(),
                               logsumexp=candidates.logsumexp.copy())


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_onnxruntime_runs_it_close_to_fp32(exported, quantized, precision):
    """Held-out prompts through the serving runtime: a prefill, then a denoising pass over one block."""
    checkpoint, root = exported
    config = json.loads((checkpoint / "config.json").read_text())
    tokenizer = load_tokenizer(checkpoint)
    prompts = [p for task in TASKS for p in held_out_set(task, 4)]
    block = config["block_size"]
    slot = np.array([0])
    passes, seeds = {}, []
    for name, directory in (("fp32", root / "fp32"), (precision, quantized[precision])):
        runtime = OnnxRuntime(directory, config, threads=1)
        runtime.allocate(1, MAX_CONTEXT)
        rows = []
        for i, problem in enumerate(prompts):
            ids = np.asarray([tokenizer.encode(problem.prompt).ids])
            n = ids.shape[1]
            every = np.arange(min(n, runtime.contract.profile.max_block))[None]
            rows.append(copied(runtime.forward(slot, ids, np.arange(n)[None], np.ones_like(ids), np.array([0]),
                                               np.array([True]), every)))
            runtime.commit(slot, np.array([0]), np.array([n]))
            if name == "fp32":
                seeds.append(int(rows[-1].tokens[0, -1, 0]))
            block_ids = np.full((1, block), config["mask_token_id"])
            block_ids[0, 0] = seeds[i]  # both graphs denoise the same block
            rows.append(copied(runtime.forward(slot, block_ids, n + np.arange(block)[None], np.ones_like(block_ids),
                                               np.array([n]), np.array([False]), np.arange(block)[None])))
        passes[name] = rows
    diff, scale, agree, positions = 0.0, 0.0, 0, 0
    for q, f in zip(passes[precision], passes["fp32"]):
        outputs = {"top_tokens": q.tokens, "top_logits": q.logits}
        diff = max(diff, candidate_logit_difference(outputs, f.tokens, f.logits),
                   float(np.abs(q.logsumexp - f.logsumexp).max()))
        scale = max(scale, float(np.abs(f.logits).max()))
        agree += int((q.tokens[..., 0] == f.tokens[..., 0]).sum())
        positions += f.logsumexp.size
    agreement = agree / positions
    print(f"{precision}: max |Δlogits| {diff:.3g} (largest |logit| {scale:.3g}), best-candidate agreement "
          f"{agreement:.3f} over {positions} positions")
    # a random tiny model has flat, structureless logits, the hard case for quantization: loose bounds
    assert diff < 0.3 * scale and agreement >= 0.75
    report = entry_of(quantized[precision])["validation"]  # what the command measured and recorded
    assert report["argmax_agreement"] >= 0.75 and report["max_abs_logit_diff"] < 0.3 * scale


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_manifest_records_the_calibration_set_and_the_source(exported, quantized, precision):
    from export.quantize import build_passes, calibration_problems, feeds_sha256, session_for

    checkpoint, root = exported
    entry = entry_of(quantized[precision])
    source = entry_of(root / "fp32")
    assert entry["kind"] == "onnx" and entry["precision"] == precision and entry["opset"] >= 19
    assert entry["source_sha256"] == source["files"]["model.onnx"] and entry["source_precision"] == "fp32"
    assert entry["checkpoint_sha256"] == source["checkpoint_sha256"] and entry["contract"] == source["contract"]
    check(quantized[precision], "onnx", checkpoint)  # the load-time check accepts it for this checkpoint
    # the hash is the calibration set's: the real prompts of the training split, tokenized, as engine passes
    config = json.loads((checkpoint / "config.json").read_text())
    tokenizer = load_tokenizer(checkpoint)
    problems = calibration_problems(CALIBRATION)
    held_out = {p.prompt for task in TASKS for p in held_out_set(task, 200)}
    assert not any(p.prompt in held_out for p in problems)
    prompts = [tokenizer.encode(p.prompt).ids for p in problems]
    feeds = build_passes(session_for(root / "fp32" / "model.onnx", 1), check(root / "fp32", "onnx").contract,
                         config, prompts)
    assert entry["calibration_sha256"] == feeds_sha256(feeds)
    assert entry["calibration"]["prompts"] == CALIBRATION and entry["calibration"]["passes"] == 2 * CALIBRATION
    prefill, denoise = feeds[0], feeds[1]
    assert prefill["input_ids"][0].tolist() == prompts[0] and prefill["causal"].tolist() == [True]
    assert prefill["past_key_values"].shape[4] == 0
    assert denoise["causal"].tolist() == [False] and denoise["past_key_values"].shape[4] == len(prompts[0])
    assert (denoise["input_ids"][0, 1:] == config["mask_token_id"]).all()


def test_saved_comparison_replays_on_the_quantized_graph(quantized):
    """The fp8 graph's own ONNX Runtime outputs, saved for the GPU host to replay against the FP8 plan."""
    out = quantized["fp8"]
    result = replay_polygraphy(out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.skipif(tensorrt_usable(), reason="TensorRT and a GPU are present")
def test_engine_build_takes_the_fp8_graph_up_to_tensorrt(quantized, tmp_path, capsys):
    command = ["engine", "--onnx", str(quantized["fp8"] / "model.onnx"), "--precision", "fp8", "--out", str(tmp_path)]
    assert main(command) == 1  # quantized from the fp32 graph, its cache is float32: refused by default
    assert "keeps its KV cache in float32 (fp8 graph)" in capsys.readouterr().err
    assert main([*command, "--allow-fp32-cache"]) == 1
    assert "pip install .[tensorrt]" in capsys.readouterr().err  # past the manifest and precision checks


def test_without_modelopt_the_command_says_which_extra_to_install(exported, monkeypatch, capsys):
    _, root = exported
    monkeypatch.setitem(sys.modules, "modelopt.onnx.quantization", None)  # makes the import fail
    rc = main(["quantize", "--onnx", str(root / "fp32" / "model.onnx"), "--precision", "fp8",
               "--out", str(root / "absent")])
    assert rc == 1
    assert "pip install -e '.[modelopt]'" in capsys.readouterr().err
    assert not (root / "absent").exists()
