"""Start a real tritonserver for the tests: `scripts/serve.sh` on free loopback ports, over the project's model
repository or a copy of it with other `config.pbtxt` parameters."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "model_repository"
# A request the miniature never ends early: "1+" in ar runs all 200 passes, so a test that cancels it after its
# first response cannot lose the race to the request finishing by itself.
ENDLESS_PROMPT, ENDLESS_TOKENS = "1+", 200
LOG_PROB_OUTPUTS = ("output_log_probs", "output_tokens", "output_top_log_probs", "output_top_tokens")


def engine_top_k() -> int:
    """K, the candidates per position of the repository's artifact (its manifest's contract)."""
    prepare_repository()
    manifest = json.loads((REPOSITORY / "dlm" / "1" / "engine" / "manifest.json").read_text())
    return int(next(iter(manifest["artifacts"].values()))["contract"]["top_k"])


T = TypeVar("T")


def wait_until(server: "TritonServer", predicate: Callable[[dict[str, float]], bool],
               timeout: float = 20.0) -> dict[str, float]:
    """The server's metrics once `predicate(metrics)` holds (they are recorded off the engine's path), or at the
    deadline."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        if predicate(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.1)


def given_up_until_cancelled(server: "TritonServer", key: str, give_up: Callable[[], T], tries: int = 3) -> T:
    """Runs `give_up` (a request that its client abandons) until `server` counts one more `key` (a cancelled
    request's counter) within 20 s, and returns what it returned that time; fails after `tries` misses. Triton's gRPC
    frontend now and then misses the cancellation of a stream on a loaded machine (the model is never told and the
    request runs to its end; measured here: 1 in 60 blocking, 2 to 5 in 40 asyncio streams), so one miss is tried
    again, while a server that ignores cancellations misses every time."""
    for _ in range(tries):
        before = server.metrics().get(key, 0.0)
        given = give_up()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            after = server.metrics().get(key, 0.0)
            if after > before:
                assert after == before + 1, f"{key} went from {before} to {after}: more than the one request cancelled"
                return given
            time.sleep(0.2)
    raise AssertionError(f"{key} never counted the abandoned request ({tries} tries): "
                         f"{ {k: v for k, v in server.metrics().items() if k.startswith('dlm_requests_total')} }")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_repository() -> None:
    """Export the miniature into the repository once (what serve.sh does for the default repository)."""
    subprocess.run([str(ROOT / "scripts" / "prepare_repository.sh")], check=True, timeout=600)


def repository_with(directory: Path, **parameters: str) -> Path:
    """A model repository in `directory` whose `dlm` is the project's, with some config.pbtxt parameters replaced."""
    model = directory / "dlm"
    model.mkdir(parents=True)
    config = (REPOSITORY / "dlm" / "config.pbtxt").read_text()
    for key, value in parameters.items():
        config, found = re.subn(
            rf'(key: "{key}", value: {{ string_value: )"[^"]*"', rf'\g<1>"{value}"', config
        )
        assert found == 1, f"config.pbtxt has no parameter {key}"
    (model / "config.pbtxt").write_text(config)
    (model / "1").symlink_to(REPOSITORY / "dlm" / "1", target_is_directory=True)
    return directory


class TritonServer:
    """`scripts/serve.sh` as a child process; `stop()` sends SIGTERM like an operator would."""

    def __init__(self, repository: Path | None = None, log: Path | None = None, extra_args: Sequence[str] = (),
                 admin_key: str | None = None):
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log_path = log
        self._log: IO[bytes] | None = open(log, "wb") if log else None
        command = [
            str(ROOT / "scripts" / "serve.sh"),
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--metrics-port", str(self.metrics_port),
        ]
        if repository is not None:
            command += ["--model-repository", str(repository)]
        if admin_key is not None:
            command += ["--admin-key", admin_key]
        if extra_args:
            command += ["--", *extra_args]
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        self.process = subprocess.Popen(command, stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def wait_ready(self, timeout: float = 120.0, path: str = "/v2/models/dlm/ready") -> "TritonServer":
        """Wait until `path` answers 200 (by default: the model is ready)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"tritonserver: {path} was not ready within {timeout} s:\n{self.log_tail()}")

    def metrics(self) -> dict[str, float]:
        """Triton's metrics as {'name{labels}': value}."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            lines = r.read().decode().splitlines()
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line and line[0] != "#"
        }

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; kills the process group if it has not exited within `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log is not None:
            self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group: for a server that may have crashed into a hang."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self._log is not None:
            self._log.close()


def start_server(log: Path, repository: Path | None = None, extra_args: Sequence[str] = (),
                 admin_key: str | None = None, ready_path: str = "/v2/models/dlm/ready") -> TritonServer:
    """A started server whose `ready_path` answers (by default: the model is ready)."""
    prepare_repository()
    server = TritonServer(repository, log, extra_args, admin_key)
    try:
        return server.wait_ready(path=ready_path)
    except Exception:
        server.stop()
        raise



class Gateway:
    """`python -m client.gateway` as a child process in front of a running server."""

    def __init__(self, triton_grpc_url: str, log: Path, api_key: str | None = None, tokenizer: Path | None = None,
                 triton_metrics: str | None = None, extra_args: Sequence[str] = ()):
        """`triton_metrics`: Triton's metrics URL (`TritonServer.metrics_url`), read for the replica gauges."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")
        self.log_path = log
        command = [sys.executable, "-m", "client.gateway", "--triton", triton_grpc_url, "--port", str(self.port),
                   "--log-level", "warning"]
        if api_key:
            command += ["--api-key", api_key]
        if tokenizer is not None:
            command += ["--tokenizer", str(tokenizer)]
        if triton_metrics is not None:
            command += ["--triton-metrics", triton_metrics]
        self.process = subprocess.Popen([*command, *extra_args], cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> "Gateway":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        raise TimeoutError(f"the gateway was not ready within {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


# --- raw tritonclient requests, so the tests hold the server to its contract whatever the client library does

def grpc_inputs(text: str, **values) -> list:
    kinds = {"max_tokens": ("INT32", np.int32), "stream": ("BOOL", bool), "temperature": ("FP32", np.float32),
             "seed": ("UINT64", np.uint64), "mode": ("BYTES", np.object_), "block_length": ("INT32", np.int32),
             "threshold": ("FP32", np.float32), "steps": ("INT32", np.int32), "stop_words": ("BYTES", np.object_),
             "top_k": ("INT32", np.int32), "top_p": ("FP32", np.float32), "return_log_probs": ("BOOL", bool),
             "top_logprobs": ("INT32", np.int32), "remask_threshold": ("FP32", np.float32),
             "max_remasks": ("INT32", np.int32), "min_tokens": ("INT32", np.int32), "min_length": ("INT32", np.int32),
             "ignore_eos": ("BOOL", bool), "exclude_input_in_output": ("BOOL", bool),
             "add_special_tokens": ("BOOL", bool),
             "sampling_parameters": ("BYTES", np.object_)}
    arrays = {"text_input": np.array([text.encode()], dtype=np.object_)}
    for name, value in values.items():
        values_list = value if isinstance(value, list) else [value]
        dtype = kinds[name][1]
        arrays[name] = np.array([v.encode() if isinstance(v, str) else v for v in values_list], dtype=dtype)
    inputs = []
    for name, array in arrays.items():
        datatype = "BYTES" if name == "text_input" else kinds[name][0]
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def grpc_generate(url: str, text: str, inputs: list | None = None, cancel_after: int | None = None,
                  timeout: float = 120, on_response=None, **values) -> list[dict]:
    """Responses of one request over a gRPC stream, each {'text', 'num_forwards', 'num_tokens', 'finish_reason'}
    (the last only in the final response), and the log prob outputs present in it ('output_log_probs',
    'output_tokens', 'output_top_log_probs', 'output_top_tokens': numpy arrays); raises the server's error. With
    `cancel_after`, closes the stream (cancelling the request) after that many responses; `on_response` is called
    with each response as it arrives."""
    client = grpcclient.InferenceServerClient(url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    responses = []
    ended = False  # the final response or an error came
    try:
        client.async_stream_infer("dlm", inputs or grpc_inputs(text, **values), enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                ended = True
                raise error
            final = result.get_response().parameters["triton_final_response"].bool_param
            ended = final
            if result.as_numpy("text_output") is not None:
                reason = result.as_numpy("finish_reason")
                response = {
                    "text": result.as_numpy("text_output")[0].decode(),
                    "num_forwards": int(result.as_numpy("num_forwards")[0]),
                    "num_tokens": int(result.as_numpy("num_tokens")[0]),
                    "finish_reason": None if reason is None else reason[0].decode(),
                }
                for name in LOG_PROB_OUTPUTS:
                    if result.as_numpy(name) is not None:
                        response[name] = result.as_numpy(name)
                responses.append(response)
                if on_response is not None:
                    on_response(response)
            if final or (cancel_after is not None and len(responses) >= cancel_after):
                return responses
    finally:
        # a request that has not ended is cancelled: waiting for it could hang on a server that has hung
        client.stop_stream(cancel_requests=not ended)
        client.close()


def http_post(url: str, path: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """POST JSON to `path` (under /v2/models/dlm/ unless it starts with /); the status and body, errors included."""
    path = path if path.startswith("/") else f"/v2/models/dlm/{path}"
    request = urllib.request.Request(f"http://{url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
