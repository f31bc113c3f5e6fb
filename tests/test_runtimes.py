"""The runtimes over built artifacts: the same tokens as PyTorch in every mode, the cache allocated once, the
profile enforced, and artifacts that are missing or were built for something else refused with a clear message.
TensorRT tests are marked `tensorrt` and skip, saying why, where TensorRT or a GPU is absent."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from conftest import MINIATURE, random_tiny_model
from dlm.artifact import ArtifactError, load_artifact
from dlm.contract import EngineContract
from dlm.refine import GenerationParams, TokenSpec, generate
from dlm.runtime import (
    CacheLayout,
    OnnxRuntime,
    Runtime,
    RuntimeUnavailable,
    TensorRTRuntime,
    TorchExportRuntime,
    TorchRuntime,
    import_tensorrt,
    load_runtime,
    tensorrt_usable,
)
from export.__main__ import main
from export.checkpoint import load_checkpoint, save_checkpoint
from export.manifest import check, write_entry

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [[1, 5, 6, 7, 8], [1, 9], [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 40, 41]]
SETTINGS = {
    "ar": GenerationParams(mode="ar", max_tokens=19),
    "speculative": GenerationParams(mode="speculative", max_tokens=19),
    "diffusion-threshold": GenerationParams(mode="diffusion", max_tokens=19, threshold=0.9),
    "diffusion-steps": GenerationParams(mode="diffusion", max_tokens=19, threshold=None, steps=3),
}
MAX_BATCH, MAX_CONTEXT = 4, 64


def tiny_checkpoint(directory, scale: float = 0.3):
    save_checkpoint(random_tiny_model(scale), directory, dtype="float32")
    return directory




@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny random checkpoint and its model.onnx + model.pt2 (one trace), built once for the module."""
    root = tmp_path_factory.mktemp("runtimes")
    checkpoint, out = tiny_checkpoint(root / "checkpoint"), root / "artifact"
    rc = main(["onnx", "--checkpoint", str(checkpoint), "--out", str(out), "--max-batch", str(MAX_BATCH),
               "--max-context", str(MAX_CONTEXT), "--torch-export"])
    assert rc == 0
    return checkpoint, out


@pytest.fixture(scope="module")
def config(built):
    return json.loads((built[0] / "config.json").read_text())


@pytest.fixture(scope="module")
def spec(config):
    return dataclasses.replace(TokenSpec.from_config(config), eos_token_ids=frozenset())  # never ends early


@pytest.fixture(scope="module")
def reference(built, config):
    return TorchRuntime(load_checkpoint(built[0], "float32"), CacheLayout.from_config(config))


@pytest.fixture(scope="module")
def runtimes(built, config):
    """Each artifact runtime, loaded once (loading model.pt2 takes a second or two)."""
    return {"onnxruntime": load_runtime("onnxruntime", built[1], config, threads=1),
            "torch": load_runtime("torch", built[1], config)}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", ["onnxruntime", "torch"])
def test_same_tokens_as_pytorch_at_temperature_0(runtimes, spec, reference, name, setting):
    runtime = runtimes[name]
    kinds: dict[str, type[Runtime]] = {"onnxruntime": OnnxRuntime, "torch": TorchExportRuntime}
    assert type(runtime) is kinds[name]
    want = generate(reference, PROMPTS, SETTINGS[setting], spec)
    got = generate(runtime, PROMPTS, SETTINGS[setting], spec)
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert [g.num_forwards for g in got] == [w.num_forwards for w in want]


def test_onnxruntime_allocates_the_cache_once(built, config, spec):
    runtime = OnnxRuntime(built[1], config, threads=1)
    runtime.allocate(MAX_BATCH, MAX_CONTEXT)
    def buffers():
        assert runtime.cache is not None
        return [runtime.cache.cache, runtime._past, *runtime._outputs.values()]

    before = buffers()
    addresses = [b.ctypes.data for b in before]
    for setting in ("speculative", "diffusion-threshold"):
        generate(runtime, PROMPTS, SETTINGS[setting], spec)
    now = buffers()
    assert all(a is b for a, b in zip(before, now)) and [b.ctypes.data for b in now] == addresses
    assert np.shares_memory(runtime._present, runtime._outputs["present_key_values"])  # written in place


def test_onnxruntime_output_buffers_do_not_scale_with_the_vocabulary(built, config):
    """What the engine returns is sized by positions × K, never by tokens × vocabulary."""
    runtime = OnnxRuntime(built[1], config, threads=1)
    runtime.allocate(MAX_BATCH, MAX_CONTEXT)
    contract = runtime.contract
    k, n = contract.top_k, contract.profile.max_block
    assert runtime._outputs["top_tokens"].size == runtime._outputs["top_logits"].size == MAX_BATCH * n * k
    assert runtime._outputs["logsumexp"].size == MAX_BATCH * n
    candidates = sum(runtime._outputs[name].size for name in ("top_tokens", "top_logits", "logsumexp"))
    assert candidates < MAX_BATCH * contract.profile.tokens[2] * contract.vocab_size / 2  # v1's logits buffer


def test_candidates_equal_the_full_logits_selection(built, config, reference):
    """ONNX Runtime's candidates at the requested positions against the PyTorch model's full logits."""
    runtime = OnnxRuntime(built[1], config, threads=1)
    runtime.allocate(2, 32)
    reference.allocate(2, 32)
    b, t = 2, 6
    ids = np.arange(5, 5 + b * t, dtype=np.int64).reshape(b, t)
    pos = np.tile(np.arange(t, dtype=np.int64), (b, 1))
    predict = np.array([[5, 0, 2], [1, 1, 4]])
    args = (np.arange(b), ids, pos, np.ones((b, t), np.int64), np.zeros(b, np.int64), np.array([True, False]),
            predict)
    got = runtime.forward(*args)
    want = reference.forward(*args)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4)
    np.testing.assert_allclose(got.logsumexp, want.logsumexp, atol=1e-4)
    model = reference.module
    with torch.no_grad():
        full, _ = model.full_logits(torch.from_numpy(ids), torch.from_numpy(pos), torch.ones(b, t, dtype=torch.long),
                                    model.empty_cache(b), torch.tensor([True, False]))
    full = full.numpy()
    mask = config["mask_token_id"]
    for row in range(b):
        for j, position in enumerate(predict[row]):
            logits = np.delete(full[row, position], mask)
            ids_without_mask = np.delete(np.arange(full.shape[-1]), mask)
            best = ids_without_mask[np.argsort(-logits, kind="stable")[: got.k]]
            assert got.tokens[row, j, 0] == best[0] and mask not in got.tokens[row, j]
            np.testing.assert_allclose(got.logsumexp[row, j], np.log(np.exp(logits.astype(np.float64)).sum()),
                                       atol=1e-4)


def test_profile_is_enforced(built, config):
    runtime = OnnxRuntime(built[1], config, threads=1)
    with pytest.raises(ValueError, match=f"exceeds the {MAX_CONTEXT} this artifact was built for.*--max-context"):
        runtime.allocate(1, MAX_CONTEXT + 1)
    runtime.allocate(MAX_BATCH + 1, 16)
    b = MAX_BATCH + 1
    with pytest.raises(ValueError, match=rf"batch = {b} is outside the range \[1, {MAX_BATCH}\].*--max-batch"):
        runtime.forward(np.arange(b), np.ones((b, 2), np.int64), np.zeros((b, 2), np.int64),
                        np.ones((b, 2), np.int64), np.zeros(b, np.int64), np.ones(b, bool), np.zeros((b, 1), np.int64))
    n = runtime.contract.profile.max_block + 1
    with pytest.raises(ValueError, match=rf"positions = {n} is outside the range \[1, {n - 1}\].*--max-block"):
        runtime.forward(np.arange(1), np.ones((1, n), np.int64), np.zeros((1, n), np.int64),
                        np.ones((1, n), np.int64), np.zeros(1, np.int64), np.zeros(1, bool),
                        np.arange(n, dtype=np.int64)[None])


def test_artifact_of_the_old_contract_is_refused_with_the_rebuild_command(built, tmp_path):
    for name in ("model.onnx", "manifest.json"):
        shutil.copy(built[1] / name, tmp_path / name)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    contract = manifest["artifacts"]["model.onnx"]["contract"]
    del contract["version"], contract["top_k"], contract["profile"]["positions"]  # what version 1 wrote
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as error:
        load_runtime("onnxruntime", tmp_path, verify_files=False)
    message = str(error.value)
    assert "built for engine contract version 1, this code runs versions 2 and 3" in message
    assert f"Rebuild it with `python -m export onnx --checkpoint {built[0]}" in message


def test_auto_picks_onnxruntime_then_torch_export(built, tmp_path):
    _, out = built
    if not tensorrt_usable():
        (tmp_path / "with_plan").mkdir()
        for name in ("model.onnx", "manifest.json"):
            shutil.copy(out / name, tmp_path / "with_plan" / name)
        (tmp_path / "with_plan" / "model.plan").write_bytes(b"not a plan")  # ignored without TensorRT and a GPU
        assert isinstance(load_runtime("auto", tmp_path / "with_plan"), OnnxRuntime)
    (tmp_path / "pt2").mkdir()
    for name in ("model.pt2", "manifest.json"):
        shutil.copy(out / name, tmp_path / "pt2" / name)
    assert isinstance(load_runtime("auto", tmp_path / "pt2"), TorchExportRuntime)
    with pytest.raises(ValueError, match="runtime 'tflite' is unknown"):
        load_runtime("tflite", out)


@pytest.mark.parametrize(
    "name, message",
    [
        ("onnxruntime", r"no model.onnx in .*: build it with `python -m export onnx --checkpoint"),
        ("torch", r"no model.pt2 in .*: build it with `python -m export torch-export --checkpoint"),
        ("auto", r"no model.plan, model.onnx, model.pt2 in .*: build one with `python -m export onnx"),
    ],
)
def test_missing_artifact_is_refused(tmp_path, name, message):
    with pytest.raises(ArtifactError, match=message):
        load_runtime(name, tmp_path)


def test_artifact_without_manifest_entry_is_refused(built, tmp_path):
    shutil.copy(built[1] / "model.onnx", tmp_path / "model.onnx")
    with pytest.raises(ArtifactError, match="manifest.json has no entry for model.onnx.*rebuild it with"):
        load_runtime("onnxruntime", tmp_path)


def test_artifact_for_another_model_is_refused(built, config):
    other = {**config, "hidden_size": 96, "num_hidden_layers": 3}
    with pytest.raises(ArtifactError) as error:
        load_runtime("onnxruntime", built[1], other)
    message = str(error.value)
    assert "other model config: hidden_size 64 (artifact) != 96 (this model), num_hidden_layers 2 (artifact)" in message
    assert f"Rebuild it with `python -m export onnx --checkpoint {built[0]} --out {built[1]}" in message
    # the weights' storage dtype is not part of the network
    load_artifact(built[1], "onnx", config={**config, "dtype": "bfloat16"})


def test_artifact_from_another_checkpoint_is_refused(built, tmp_path):
    check(built[1], "onnx", checkpoint=built[0])  # the one it was built from passes
    retrained = tiny_checkpoint(tmp_path / "retrained", scale=0.2)  # same config, other weights
    with pytest.raises(ArtifactError, match=r"checkpoint \w{12} \(artifact\) != \w{12} \(here\)\. Rebuild it with"):
        check(built[1], "onnx", checkpoint=retrained)


def test_changed_artifact_is_refused(built, tmp_path):
    for name in ("model.onnx", "manifest.json"):
        shutil.copy(built[1] / name, tmp_path / name)
    with open(tmp_path / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="model.onnx was changed after it was built"):
        load_runtime("onnxruntime", tmp_path)


def test_plan_for_another_tensorrt_or_gpu_is_refused(built, config, tmp_path):
    """The check TensorRTRuntime runs before deserializing, exercised without TensorRT."""
    entry = load_artifact(built[1], "onnx").entry
    (tmp_path / "model.plan").write_bytes(b"plan bytes")
    write_entry(tmp_path, "tensorrt", files=["model.plan"], config=config, checkpoint_hash=entry["checkpoint_sha256"],
                precision="fp16", contract=EngineContract.from_dict(entry["contract"]),
                command="python -m export engine --onnx X/model.onnx --precision fp16 --out Y",
                tensorrt_version="10.9.0.34", compute_capability="8.0")
    load_artifact(tmp_path, "tensorrt", config=config, tensorrt_version="10.9.0.34", compute_capability="8.0")
    with pytest.raises(ArtifactError) as error:
        load_artifact(tmp_path, "tensorrt", config=config, tensorrt_version="10.13.3.9", compute_capability="9.0")
    assert str(error.value).endswith(
        "does not match: TensorRT version 10.9.0.34 (artifact) != 10.13.3.9 (here); GPU compute capability 8.0 "
        "(artifact) != 9.0 (here). Rebuild it with `python -m export engine --onnx X/model.onnx --precision fp16 --out Y`"
    )


@pytest.mark.skipif(tensorrt_usable(), reason="TensorRT and a GPU are present")
def test_without_tensorrt_the_runtime_and_the_build_say_what_to_install(built, capsys):
    with pytest.raises(RuntimeUnavailable, match=r"pip install \.\[tensorrt\] on a GPU host"):
        TensorRTRuntime(built[1])
    rc = main(["engine", "--onnx", str(built[1] / "model.onnx"), "--precision", "fp16", "--out", str(built[1]),
               "--allow-fp32-cache"])
    assert rc != 0
    assert "pip install .[tensorrt] on a GPU host" in capsys.readouterr().err


def tensorrt_package_installed() -> bool:
    spec = importlib.util.find_spec("tensorrt")
    return spec is not None and spec.origin is not None


# a regular package anywhere on the path wins over a namespace package, so this needs TensorRT absent
@pytest.mark.skipif(tensorrt_package_installed(), reason="TensorRT is installed")
def test_a_tensorrt_namespace_package_is_not_tensorrt(tmp_path, monkeypatch):
    """What `tensorrt-stubs` leaves when installed into the environment: a `tensorrt/` folder without `__init__.py`,
    importable as an empty namespace package. It is reported as TensorRT missing, with the usual message."""
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.pyi").write_text("class Builder: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    try:
        import tensorrt  # the namespace package imports ...

        assert tensorrt.__file__ is None
        assert not tensorrt_usable()  # ... but is not TensorRT
        with pytest.raises(RuntimeUnavailable) as error:
            import_tensorrt()
    finally:
        sys.modules.pop("tensorrt", None)
    assert str(error.value).startswith("TensorRT is not installed: pip install .[tensorrt] on a GPU host (")
    assert f"found at {tmp_path / 'tensorrt'} lacks Builder and __version__" in str(error.value)


def test_engine_build_refuses_an_fp32_cache_unless_asked(built, capsys):
    """An fp32 graph keeps an fp32 KV cache; an engine from it would hold that on the GPU: refused before TensorRT
    is touched, naming the export that gives a bf16 or fp16 cache and the flag that allows it."""
    for precision in ("fp16", "bf16"):
        rc = main(["engine", "--onnx", str(built[1] / "model.onnx"), "--precision", precision, "--out", str(built[1])])
        assert rc != 0
        err = capsys.readouterr().err
        if precision == "fp16":
            assert "keeps its KV cache in float32 (fp32 graph)" in err and "--precision bf16" in err
            assert "--allow-fp32-cache" in err
        else:
            assert "is an fp32 graph; an bf16 engine is built from a bf16 graph" in err


def test_engine_build_on_tensorrt_11_takes_only_an_fp16_graph_for_fp16(built, monkeypatch, capsys):
    """TensorRT 11 removed BuilderFlag.FP16 with weak typing: an fp32 graph would build an fp32 engine, so even
    with --allow-fp32-cache it is refused before the GPU is asked for (a stand-in module plays TensorRT 11: it
    cannot be installed here)."""
    trt11 = types.ModuleType("tensorrt")
    trt11.__dict__.update(__version__="11.0.0", Builder=object, BuilderFlag=types.SimpleNamespace(FP8=15))
    monkeypatch.setitem(sys.modules, "tensorrt", trt11)
    rc = main(["engine", "--onnx", str(built[1] / "model.onnx"), "--precision", "fp16", "--out", str(built[1]),
               "--allow-fp32-cache"])
    assert rc != 0
    assert (
        "TensorRT 11.0.0 builds strongly typed networks only (no BuilderFlag.FP16), so an fp16 engine needs an fp16 "
        f"graph, and {built[1] / 'model.onnx'} is fp32: make one with `python -m export onnx --checkpoint CHECKPOINT "
        "--out DIR --precision fp16`"
    ) in capsys.readouterr().err


def test_engine_build_refuses_a_graph_of_the_wrong_precision(built, capsys):
    rc = main(["engine", "--onnx", str(built[1] / "model.onnx"), "--precision", "fp8", "--out", str(built[1])])
    assert rc != 0
    assert "is an fp32 graph; an fp8 engine is built from a fp8 graph" in capsys.readouterr().err


def need_tensorrt_and_gpu():
    try:
        import_tensorrt()  # not importorskip: an empty `tensorrt` namespace package would pass that
    except RuntimeUnavailable as e:
        pytest.skip(str(e))
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU and none is visible")


@pytest.mark.tensorrt
def test_tensorrt_fp16_plan_matches_pytorch(built, config, spec, reference, tmp_path):
    need_tensorrt_and_gpu()
    from export.engine import build_engine

    entry = build_engine(built[1] / "model.onnx", "fp16", tmp_path, opt_level=0, allow_fp32_cache=True,
                         log=lambda _: None)
    assert entry["tensorrt_version"] and entry["compute_capability"]
    runtime = load_runtime("auto", tmp_path, config)
    assert isinstance(runtime, TensorRTRuntime)
    runtime.allocate(MAX_BATCH, MAX_CONTEXT)
    b, t = 2, 5
    ids = np.arange(1, 1 + b * t, dtype=np.int64).reshape(b, t)
    pos = np.tile(np.arange(t, dtype=np.int64), (b, 1))
    args = (np.arange(b), ids, pos, np.ones((b, t), np.int64), np.zeros(b, np.int64), np.array([True, False]),
            np.tile(np.arange(t, dtype=np.int64), (b, 1)))
    reference.allocate(MAX_BATCH, MAX_CONTEXT)
    want = reference.forward(*args)
    got = runtime.forward(*args)
    assert np.abs(got.logsumexp - want.logsumexp).max() < 0.1
    assert np.mean(got.tokens[..., 0] == want.tokens[..., 0]) > 0.9
    # decoding end to end: greedy AR tokens agree with PyTorch on most positions at fp16
    got_ar = generate(runtime, PROMPTS, SETTINGS["ar"], spec)
    want_ar = generate(reference, PROMPTS, SETTINGS["ar"], spec)
    agree = np.mean([g == w for a, b_ in zip(got_ar, want_ar) for g, w in zip(a.tokens, b_.tokens)])
    assert agree > 0.9


@pytest.mark.tensorrt
def test_tensorrt_refuses_a_plan_built_elsewhere(built, config, tmp_path):
    need_tensorrt_and_gpu()
    entry = load_artifact(built[1], "onnx").entry
    (tmp_path / "model.plan").write_bytes(b"plan bytes")
    write_entry(tmp_path, "tensorrt", files=["model.plan"], config=config, checkpoint_hash=entry["checkpoint_sha256"],
                precision="fp16", contract=EngineContract.from_dict(entry["contract"]), command="rebuild",
                tensorrt_version="0.0.0", compute_capability="1.0")
    with pytest.raises(ArtifactError, match=r"TensorRT version 0\.0\.0 \(artifact\) != .*Rebuild it with `rebuild`"):
        TensorRTRuntime(tmp_path, config)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_export_runs_on_cuda(built, config, spec, reference):
    runtime = load_runtime("torch", built[1], config, device="cuda")
    want = generate(reference, PROMPTS, SETTINGS["speculative"], spec)
    got = generate(runtime, PROMPTS, SETTINGS["speculative"], spec)
    assert [g.tokens for g in got] == [w.tokens for w in want]


@pytest.mark.slow
@pytest.mark.skipif(not (MINIATURE / "model.safetensors").is_file(), reason="the miniature is not trained yet")
def test_miniature_onnxruntime_gives_the_pytorch_tokens_in_every_mode(tmp_path):
    from export.inprocess import InProcessGenerator
    from export.tasks import TASKS, held_out_set

    checkpoint = tmp_path / "miniature"  # a snapshot: the shipped one may be rewritten while this runs
    shutil.copytree(MINIATURE, checkpoint)
    rc = main(["onnx", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "onnx"), "--max-batch", "4",
               "--max-context", "128"])
    assert rc == 0
    reference = InProcessGenerator(checkpoint)
    runtime = load_runtime("onnxruntime", tmp_path / "onnx", json.loads((checkpoint / "config.json").read_text()))
    prompts = [reference.encode(problem.prompt) for task in TASKS for problem in held_out_set(task, 1)][:4]
    for mode in ("ar", "diffusion", "speculative"):
        params = GenerationParams(mode=mode, max_tokens=32)
        want = generate(reference.runtime, prompts, params, reference.spec)
        got = generate(runtime, prompts, params, reference.spec)
        assert [g.tokens for g in got] == [w.tokens for w in want], mode


def test_onnxruntime_staging_is_sized_by_the_pass_token_budget(built, config, spec):
    """With the planner's budget, the new keys and values are budget × one position, not rows × context; decoding
    under the same limits never needs more."""
    from dlm.planner import PassLimits

    runtime = OnnxRuntime(built[1], config, threads=1)
    budget = 32
    runtime.allocate(MAX_BATCH, MAX_CONTEXT, pass_tokens=budget)
    per_position = runtime.layout.per_position
    assert runtime._outputs["present_key_values"].size == budget * per_position
    assert runtime._outputs["top_tokens"].size == min(budget, MAX_BATCH * runtime.contract.profile.max_block) * 64
    limits = dataclasses.replace(PassLimits.from_profile(runtime.contract.profile), token_budget=budget)
    want = generate(runtime, PROMPTS, SETTINGS["diffusion-threshold"], spec, limits)
    assert len(want) == len(PROMPTS) and all(len(r.tokens) == 19 for r in want)


def test_a_bf16_export_decodes_in_every_mode(built, config, spec, reference, tmp_path):
    """`--precision bf16` (the checkpoints' own dtype): the graph and the torch.export program are bf16 with a bf16
    cache; the program decodes on the CPU in every mode, close to fp32, and speculative still equals ar."""
    out = tmp_path / "bf16"
    assert main(["onnx", "--checkpoint", str(built[0]), "--out", str(out), "--precision", "bf16", "--max-batch",
                 str(MAX_BATCH), "--max-context", str(MAX_CONTEXT), "--torch-export"]) == 0
    entry = load_artifact(out, "onnx").entry
    assert entry["contract"]["cache_dtype"] == "bfloat16" and entry["validation"]["against"] == "pytorch fp32"
    runtime = load_runtime("torch", out, config)
    assert runtime.dtype == torch.bfloat16
    want = generate(reference, PROMPTS, SETTINGS["ar"], spec)
    got = generate(runtime, PROMPTS, SETTINGS["ar"], spec)
    agree = np.mean([g == w for a, b_ in zip(got, want) for g, w in zip(a.tokens, b_.tokens)])
    assert agree > 0.6, agree  # a random tiny model's near-ties flip under bf16; the prefix agrees
    assert [r.tokens for r in generate(runtime, PROMPTS, SETTINGS["speculative"], spec)] == [r.tokens for r in got]
    for setting in ("diffusion-threshold", "diffusion-steps"):
        assert all(len(r.tokens) == 19 for r in generate(runtime, PROMPTS, SETTINGS[setting], spec))


@pytest.mark.parametrize("name", ["onnxruntime", "torch"])
def test_prefix_caching_gives_the_same_tokens_on_every_artifact_runtime(runtimes, spec, name):
    """Prefix caching lives in the runtimes' shared base (`EngineRuntime.claim`/`retain`, `dlm.kv_cache`): over
    ONNX Runtime and torch.export alike, a request sharing a prefix with one that finished, and a second turn that
    resends the first with its answer, reuse the slot's keys and values and decode the tokens they do without."""
    from dlm.planner import PassLimits
    from dlm.scheduler import Scheduler

    runtime = runtimes[name]
    limits = PassLimits.from_profile(runtime.contract.profile, prefill_chunk=8)
    system = list(range(10, 30))
    got: dict[bool, list] = {}
    for caching in (True, False):
        scheduler = Scheduler(runtime, spec, max_live=2, max_queue=8, context=MAX_CONTEXT, limits=limits,
                              prefix_caching=caching)
        try:
            outcomes = []
            for setting in SETTINGS.values():
                params = dataclasses.replace(setting, max_tokens=12)
                first = run_to_end(scheduler, system + [60, 61], params)
                second = run_to_end(scheduler, system + [62], params)
                turn = run_to_end(scheduler, system + [60, 61] + first.seq.output + [70], params)
                outcomes.append([(j.seq.output, j.seq.cached_tokens) for j in (first, second, turn)])
            got[caching] = outcomes
        finally:
            scheduler.stop()
    for on, off in zip(got[True], got[False]):
        assert [tokens for tokens, _ in on] == [tokens for tokens, _ in off]
        assert on[1][1] >= len(system) and on[2][1] >= len(system) + 2 and all(c is None for _, c in off)


def run_to_end(scheduler, prompt, params):
    import threading

    done = threading.Event()

    class Waiter:
        def cancelled(self):
            return False

        def update(self, job):
            if job.finished:
                done.set()
            return False

        def fail(self, job, error):
            done.set()

    job = scheduler.submit(prompt, params, Waiter())
    assert done.wait(60) and job.outcome in ("length", "eos"), job.outcome
    return job
