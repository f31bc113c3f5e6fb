"""Shared fixtures: a random tiny checkpoint config with every key the real family's config.json carries."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> Any:
    """A script under scripts/ imported as the module `name`."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
MINIATURE = ROOT / "export" / "miniature"

TINY_CONFIG: dict[str, Any] = {
    "architectures": ["NemotronLabsDiffusionModel"],
    "model_type": "nemotron_labs_diffusion",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    # a small original context so that positions in the tests cross the YaRN query-scaling steps
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 1000000.0,
        "factor": 16.0,
        "original_max_position_embeddings": 16,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.1,
    },
    "mask_token_id": 100,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "block_size": 8,
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
}


@pytest.fixture
def tiny_config_dict() -> dict:
    return copy.deepcopy(TINY_CONFIG)


def random_tiny_model(scale: float = 0.3):
    """A random tiny denoiser in fp32, weights large enough to give peaked, non-trivial logits; seeded."""
    import torch

    from export.config import ModelConfig
    from export.model import DiffusionLM

    torch.manual_seed(0)
    model = DiffusionLM(ModelConfig.from_dict(TINY_CONFIG)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
    return model


@pytest.fixture
def tiny_model():
    return random_tiny_model()


@pytest.fixture(scope="session")
def miniature():
    """The shipped miniature, loaded once for the session."""
    from export.inprocess import InProcessGenerator

    if not (MINIATURE / "config.json").is_file():
        pytest.fail(f"the shipped miniature is missing from {MINIATURE}: run scripts/train_miniature.py")
    return InProcessGenerator(MINIATURE)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for modules of tiny comparisons: extra threads only contend on a 2-core runner."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def replay_polygraphy(directory: Path) -> subprocess.CompletedProcess:
    """Replay the comparison saved beside a graph with `polygraphy run`, as the GPU host does against a plan."""
    polygraphy = [sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())"]
    return subprocess.run(
        [*polygraphy, "run", "model.onnx", "--onnxrt", "--load-inputs", "polygraphy_inputs.json",
         "--load-outputs", "polygraphy_outputs.json"],
        cwd=directory, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="session")
def triton(tmp_path_factory):
    """One real tritonserver (scripts/serve.sh) over the project's model repository, shared by the session's
    end-to-end tests; its log is printed when it fails to start."""
    from triton_server import start_server

    server = start_server(tmp_path_factory.mktemp("triton") / "server.log")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _session_server_still_up(request):
    """A test that uses the session's server fails, with the end of the server's log, if the server has died, so a
    crash is reported where it happened instead of as the refused connections of the tests after it."""
    if "triton" not in request.fixturenames:
        yield
        return
    server = request.getfixturevalue("triton")

    def check(when: str) -> None:
        if server.process.poll() is not None:
            pytest.fail(f"tritonserver exited with {server.process.returncode} {when}; its log ends:\n"
                        f"{server.log_tail()}", pytrace=False)

    check("before this test")
    yield
    check("during this test")


@pytest.fixture(scope="session")
def gateway_process(triton, tmp_path_factory):
    """`python -m client.gateway` (the command users run) in a child process, in front of the session's server."""
    from triton_server import Gateway

    gateway = Gateway(triton.grpc_url, tmp_path_factory.mktemp("gateway") / "gateway.log",
                      triton_metrics=triton.metrics_url).wait_ready()
    yield gateway
    gateway.stop()
