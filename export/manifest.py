"""What every artifact was built from and for, written to `manifest.json` beside it (one entry per artifact file).

An entry holds: the files and their sha256, the checkpoint hash and its config.json, the precision, the engine
contract (tensor names, dtypes, profile ranges), the ONNX opset, the source artifact's hash (plans, quantized
graphs), the calibration hash, the TensorRT version and GPU compute capability (plans), tool versions and the
command that rebuilds it. The serving side reads it with `dlm.artifact` (the runtimes cannot import `export`);
`check` is the same test against a checkpoint on disk.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from dlm.artifact import (
    FILES,
    MANIFEST,
    Artifact,
    ArtifactError,
    config_sha256,
    file_sha256,
    load_artifact,
    read_manifest,
)
from dlm.contract import EngineContract

__all__ = ["ArtifactError", "check", "checkpoint_sha256", "write_entry", "FILES", "MANIFEST"]


def checkpoint_sha256(directory: str | Path) -> str:
    """One hash over a checkpoint's config.json and weight files (single file or shards plus index)."""
    directory = Path(directory)
    names = ["config.json", *sorted(p.name for p in directory.glob("*.safetensors")), "model.safetensors.index.json"]
    digest = hashlib.sha256()
    for name in names:
        if (directory / name).is_file():
            digest.update(f"{name}:{file_sha256(directory / name)}\n".encode())
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("torch", "onnx", "onnxruntime", "onnxscript", "tensorrt", "nvidia-modelopt"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_entry(
    directory: str | Path,
    kind: str,
    *,
    files: list[str],
    config: dict[str, Any],
    checkpoint_hash: str,
    precision: str,
    contract: EngineContract,
    command: str,
    **extra: Any,
) -> dict[str, Any]:
    """Record one artifact in `directory/manifest.json`, keeping the entries of the other artifacts there.
    `extra`: opset, source_sha256, calibration_sha256, tensorrt_version, compute_capability, validation, ..."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    entry = {
        "kind": kind,
        "files": {name: file_sha256(directory / name) for name in files},
        "precision": precision,
        "checkpoint_sha256": checkpoint_hash,
        "config_sha256": config_sha256(config),
        "config": config,
        "contract": contract.to_dict(),
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": tool_versions(),
        **extra,
    }
    manifest["artifacts"][FILES[kind]] = entry
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return entry


def check(
    directory: str | Path,
    kind: str,
    checkpoint: str | Path | None = None,
    **expected: Any,
) -> Artifact:
    """The artifact of `kind` in `directory`, refused (ArtifactError: what differs, how to rebuild) when its files
    changed, or when it was not built from `checkpoint` or for the `expected` TensorRT version / compute capability."""
    if checkpoint is not None:
        config = json.loads((Path(checkpoint) / "config.json").read_text())
        expected.setdefault("config", config)
        expected.setdefault("checkpoint_sha256", checkpoint_sha256(checkpoint))
    return load_artifact(directory, kind, **expected)
