"""What the in-process scheduler benchmarks (bench_prefill.py, bench_prefix.py, bench_structured.py) share: the
shipped config.pbtxt's parameters, a deployment loaded from them as Triton's model.py loads it and its scheduler, an
artifact exported once into a work folder, a consumer that waits for a request's end, one request run to its end,
its time to first block, and the machine's description for the figures' JSON."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dlm.deployment import Deployment, load_deployment
from dlm.refine import GenerationParams
from dlm.scheduler import Job, Scheduler

ROOT = Path(__file__).resolve().parents[1]
CONFIG_PBTXT = ROOT / "model_repository" / "dlm" / "config.pbtxt"


def parameter(key: str) -> str:
    """A config.pbtxt parameter's string value, as Triton hands it to model.py."""
    match = re.search(rf'key: "{key}", value: {{ string_value: "([^"]*)"', CONFIG_PBTXT.read_text())
    if match is None:
        raise KeyError(f"config.pbtxt has no parameter {key}")
    return match.group(1)


def parameters() -> dict[str, str]:
    """Every config.pbtxt parameter, as Triton hands them to model.py."""
    return dict(re.findall(r'key: "(\w+)", value: \{ string_value: "([^"]*)"', CONFIG_PBTXT.read_text()))


def deployment(artifact: Path, tokenizer: Path | None = None, **overrides: str) -> Deployment:
    """What model.py loads from the shipped config.pbtxt, over `artifact` (an artifact folder) and `tokenizer` (a
    checkpoint's config.json and tokenizer files; default the model repository's), with `overrides` of parameters
    (max_live, runtime_threads, ...)."""
    version = CONFIG_PBTXT.parent / "1"
    values = {**parameters(), "artifact": str(Path(artifact).resolve()), **overrides}
    if tokenizer is not None:
        values["tokenizer"] = str(Path(tokenizer).resolve())
    return load_deployment(version, values, log=lambda line: None)


def scheduler(loaded: Deployment, prefix_caching: bool | None = None) -> Scheduler:
    """The scheduler model.py builds over a deployment (prefix caching as config.pbtxt says, unless given)."""
    return Scheduler(loaded.runtime, loaded.spec, max_live=loaded.max_live, max_queue=int(parameter("max_queue")),
                     context=loaded.context, pad_token_id=int(loaded.model_config.get("pad_token_id") or 0),
                     limits=loaded.pass_limits,
                     prefix_caching=loaded.prefix_caching if prefix_caching is None else prefix_caching)


def export_once(checkpoint: Path, out: Path, *options: str) -> Path:
    """`python -m export onnx --checkpoint CHECKPOINT --out OUT OPTIONS...`, unless OUT already holds an artifact
    (a work folder reused from an earlier run)."""
    if not (out / "manifest.json").is_file():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "export", "onnx", "--checkpoint", str(checkpoint), "--out", str(out),
                        *options], check=True, cwd=ROOT)
        print(f"exported {out.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return out


class Done:
    """A consumer that only waits for the end."""

    def __init__(self, timeout: float = 600) -> None:
        self.event = threading.Event()
        self.error: Exception | None = None
        self.timeout = timeout

    def cancelled(self) -> bool:
        return False

    def update(self, job: Job) -> bool:
        if job.finished:
            self.event.set()
        return False

    def fail(self, job: Job, error: Exception) -> None:
        self.error = error
        self.event.set()

    def wait(self) -> None:
        if not self.event.wait(self.timeout):
            raise TimeoutError(f"a request did not finish within {self.timeout:g} s")
        if self.error is not None:
            raise self.error


def run_one(scheduler: Scheduler, prompt: list[int], params: GenerationParams) -> Job:
    done = Done()
    job = scheduler.submit(prompt, params, done)
    done.wait()
    return job


def ttfb(job: Job) -> float:
    assert job.first_block_at is not None
    return job.first_block_at - job.submitted


def machine() -> dict[str, Any]:
    import onnxruntime

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        lscpu = ""
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "")
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "load_average": os.getloadavg()[0], "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "platform": platform.platform()}
