"""The type check of scripts/typecheck.sh is live: mypy reads TensorRT's stubs and fails a wrong TensorRT call.
The check itself runs in scripts/test.sh, before these tests, and installs the stubs they use."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from conftest import ROOT

STUBS = ROOT / ".venv" / "typing"  # pyproject's mypy_path; filled by scripts/typecheck.sh


def mypy(path) -> subprocess.CompletedProcess:
    """mypy with the project's configuration on one file."""
    if not (STUBS / "tensorrt" / "__init__.pyi").is_file():
        pytest.fail(f"no TensorRT stubs in {STUBS}: run scripts/typecheck.sh (scripts/test.sh runs it) first")
    return subprocess.run(
        # a cache of its own: the shared .mypy_cache would answer for a same-named file of an earlier run's tmp_path
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(path.parent / ".mypy_cache"), str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def test_a_wrong_tensorrt_call_fails_the_type_check(tmp_path):
    wrong = tmp_path / "wrong_tensorrt_call.py"
    wrong.write_text(
        "import tensorrt as trt\n"
        "\n"
        "\n"
        "def build() -> None:\n"
        "    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
        "    config = builder.create_builder_config()\n"
        "    config.set_flag(trt.BuilderFlag.FP16)\n"  # right: passes
        "    config.set_flag(trt.BuilderFlag.NOT_A_FLAG)\n"  # wrong: the stubs define no such flag
        "    builder.create_network(0).no_such_method()\n"  # wrong: no such method
    )
    result = mypy(wrong)
    report = result.stdout + result.stderr
    assert result.returncode == 1, report
    assert f'{wrong}:8: error: "type[BuilderFlag]" has no attribute "NOT_A_FLAG"' in report, report
    assert f'{wrong}:9: error: "INetworkDefinition" has no attribute "no_such_method"' in report, report
    assert "Found 2 errors in 1 file" in report, report  # the right calls pass: the stubs were read


def test_stub_repair_rewrites_only_the_signatures_that_do_not_parse(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from repair_trt_stubs import repair_file
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    stub = tmp_path / "stub.pyi"
    stub.write_bytes(
        b"class Plugin:\r\n"
        b"    def size(self, in: list[int], out: list[int]) -> int:\r\n"
        b"        ...\r\n"
        b"    def scale(self, x: int, shift: int = None, channel_axis: int, *, k: int = 1) -> None:\r\n"
        b"        ...\r\n"
        b"    def fine(self, a: int = 0, b: dict[str, int] = {'x': 1}) -> None:\r\n"
        b"        ...\r\n"
    )
    rewrites = repair_file(stub)
    assert [line.split(": ")[0] for line in rewrites] == [f"{stub}:2", f"{stub}:4"]
    assert stub.read_bytes().split(b"\r\n")[1:6:2] == [
        b"    def size(self, in_: list[int], out: list[int]) -> int:",
        b"    def scale(self, x: int, shift: int, channel_axis: int, *, k: int = 1) -> None:",
        b"    def fine(self, a: int = 0, b: dict[str, int] = {'x': 1}) -> None:",
    ]
    ast.parse(stub.read_text())
    assert repair_file(stub) == []  # nothing left to repair

    other = tmp_path / "other.pyi"
    other.write_text("x = (\n")
    with pytest.raises(SystemExit, match="not a signature this script knows how to repair"):
        repair_file(other)
