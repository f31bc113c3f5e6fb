"""What the in-process scheduler benchmarks (bench_prefill.py, bench_prefix.py) share: the shipped config.pbtxt's
parameters, a consumer that waits for a request's end, one request run to its end, its time to first block, and
the machine's description for the figures' JSON."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

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
