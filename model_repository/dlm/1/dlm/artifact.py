"""Find a built artifact and check, before anything loads it, that it was built for this model and this machine.

Each artifact directory holds `manifest.json` (written by `export/manifest.py`), one entry per artifact file:
what it was built from (config, checkpoint and source hashes), for what (precision, profile, TensorRT version,
GPU compute capability) and by which command. A missing artifact or any mismatch is an `ArtifactError` that says
what differs and how to rebuild, never a deserialization crash deeper down.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlm.contract import EngineContract, OldContract

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
FILES = {"tensorrt": "model.plan", "onnx": "model.onnx", "torch_export": "model.pt2"}
BUILD_COMMANDS = {
    "onnx": "python -m export onnx --checkpoint CHECKPOINT --out {dir}",
    "torch_export": "python -m export torch-export --checkpoint CHECKPOINT --out {dir}",
    "tensorrt": "python -m export engine --onnx ONNX_FILE --precision fp16 --out {dir}",
}
# config.json keys that do not change the network (the storage dtype of the weights, tool versions)
NOT_MODEL_KEYS = frozenset({"dtype", "torch_dtype", "transformers_version", "_name_or_path"})


class ArtifactError(RuntimeError):
    """An artifact that is missing or was built for another model, TensorRT version or GPU."""


@dataclass(frozen=True)
class Artifact:
    path: Path  # the main file (model.plan, model.onnx, model.pt2)
    entry: dict[str, Any]  # its manifest entry

    @property
    def contract(self) -> EngineContract:
        return EngineContract.from_dict(self.entry["contract"])


def model_config(config: dict[str, Any]) -> dict[str, Any]:
    """The keys of a config.json that define the network."""
    return {k: v for k, v in config.items() if k not in NOT_MODEL_KEYS}


def config_sha256(config: dict[str, Any]) -> str:
    canonical = json.dumps(model_config(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a directory; an empty one when there is none yet."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return {"manifest_version": MANIFEST_VERSION, "artifacts": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); rebuild the artifacts of {directory}") from e
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ArtifactError(
            f"{path} has manifest_version {manifest.get('manifest_version')}, this code reads {MANIFEST_VERSION}; "
            f"rebuild the artifacts of {directory}"
        )
    return manifest


def rebuild_command(directory: Path, kind: str, entry: dict[str, Any] | None = None) -> str:
    if entry and entry.get("command"):
        return entry["command"]
    return BUILD_COMMANDS[kind].format(dir=directory)


def load_artifact(
    directory: str | Path,
    kind: str,
    *,
    config: dict[str, Any] | None = None,
    checkpoint_sha256: str | None = None,
    tensorrt_version: str | None = None,
    compute_capability: str | None = None,
    verify_files: bool = True,
) -> Artifact:
    """The artifact of `kind` in `directory`, checked against its manifest and every expectation given.

    `config`: the config.json content of the model being served; `tensorrt_version` and `compute_capability`:
    the running TensorRT and GPU (plans only run where they were built). `verify_files` hashes the files."""
    directory = Path(directory)
    name = FILES[kind]
    path = directory / name
    if not path.is_file():
        raise ArtifactError(f"no {name} in {directory}: build it with `{rebuild_command(directory, kind)}`")
    entry = read_manifest(directory)["artifacts"].get(name)
    if entry is None:
        raise ArtifactError(
            f"{directory / MANIFEST} has no entry for {name}, so nothing says what it was built from; "
            f"rebuild it with `{rebuild_command(directory, kind)}`"
        )
    try:
        EngineContract.from_dict(entry["contract"])
    except OldContract as e:
        raise ArtifactError(f"{path} cannot be served: {e}. Rebuild it with `{rebuild_command(directory, kind, entry)}`") from e
    differences = []
    if verify_files:
        for file, recorded in entry["files"].items():
            if not (directory / file).is_file():
                differences.append(f"{file} is missing")
            elif file_sha256(directory / file) != recorded:
                differences.append(f"{file} was changed after it was built (its sha256 differs from the manifest's)")
    if config is not None and entry["config_sha256"] != config_sha256(config):
        built, here = model_config(entry["config"]), model_config(config)
        keys = sorted(k for k in built.keys() | here.keys() if built.get(k) != here.get(k))
        shown = ", ".join(f"{k} {built.get(k)!r} (artifact) != {here.get(k)!r} (this model)" for k in keys[:5])
        differences.append(f"other model config: {shown}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else ""))
    expected = {
        "checkpoint_sha256": ("checkpoint", checkpoint_sha256),
        "tensorrt_version": ("TensorRT version", tensorrt_version),
        "compute_capability": ("GPU compute capability", compute_capability),
    }
    for key, (what, value) in expected.items():
        if value is not None and entry.get(key) != value:
            recorded = entry.get(key)
            if key == "checkpoint_sha256":  # a prefix is enough to tell them apart
                recorded, value = str(recorded)[:12], value[:12]
            differences.append(f"{what} {recorded} (artifact) != {value} (here)")
    if differences:
        raise ArtifactError(
            f"{path} does not match: {'; '.join(differences)}. "
            f"Rebuild it with `{rebuild_command(directory, kind, entry)}`"
        )
    return Artifact(path, entry)
