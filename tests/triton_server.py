"""Start a real tritonserver for the tests: `scripts/serve.sh` on free loopback ports, over the project's model
repository or a copy of it with other `config.pbtxt` parameters."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "model_repository"


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

    def __init__(self, repository: Path | None = None, log: Path | None = None, extra_args: list[str] = ()):
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log_path = log
        self._log = open(log, "wb") if log else subprocess.DEVNULL
        command = [
            str(ROOT / "scripts" / "serve.sh"),
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--metrics-port", str(self.metrics_port),
        ]
        if repository is not None:
            command += ["--model-repository", str(repository)]
        if extra_args:
            command += ["--", *extra_args]
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
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

    def wait_ready(self, timeout: float = 120.0, model: str = "dlm") -> "TritonServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{model}/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"tritonserver was not ready within {timeout} s:\n{self.log_tail()}")

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
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.process.returncode


def start_server(log: Path, repository: Path | None = None, extra_args: list[str] = ()) -> TritonServer:
    prepare_repository()
    server = TritonServer(repository, log, extra_args)
    try:
        return server.wait_ready()
    except Exception:
        server.stop()
        raise

