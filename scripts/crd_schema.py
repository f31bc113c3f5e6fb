#!/usr/bin/env python3
"""Convert a published CustomResourceDefinition's openAPIV3Schema into a JSON schema that tests/test_helm.py validates
the chart's custom resources against, offline, as strictly as kubernetes-validate checks the core kinds:

    python scripts/crd_schema.py CRD.yaml --version v1 --source "owner/repo TAG path" --out tests/fixtures/crd_schemas/X.json

- every object that declares `properties` admits no other field (`additionalProperties: false`), unless the CRD
  says `x-kubernetes-preserve-unknown-fields`: a misspelt field is an error, as `kubectl apply --validate=strict`
  makes it;
- `nullable: true` admits null; `x-kubernetes-int-or-string` admits an integer or a string;
- `apiVersion` and `kind` must be the CRD's own, and `metadata` is ObjectMeta's fields the chart may set, with a
  name;
- descriptions are dropped (size); CEL rules (`x-kubernetes-validations`) cannot be evaluated here and are counted in
  the output's `$comment`, with the source.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

METADATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 253,
                 "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"},
        "namespace": {"type": "string"},
        "generateName": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def convert(node: Any, rules: list[int]) -> Any:
    """The JSON schema of one openAPIV3Schema node (recursively); counts the CEL rules met in `rules`."""
    if isinstance(node, list):
        return [convert(item, rules) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("description", "example", "externalDocs"):
            continue
        if key == "x-kubernetes-validations":
            rules[0] += len(value)
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: convert(child, rules) for name, child in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = convert(value, rules)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [convert(child, rules) for child in value]
        elif key.startswith("x-kubernetes-") or key == "nullable":
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    strict = "properties" in node and "additionalProperties" not in node
    if strict and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_schema(crd: dict[str, Any], version: str, source: str) -> dict[str, Any]:
    spec = crd["spec"]
    (served,) = [v for v in spec["versions"] if v["name"] == version]
    rules = [0]
    schema = convert(served["schema"]["openAPIV3Schema"], rules)
    group, kind = spec["group"], spec["names"]["kind"]
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = METADATA
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": f"{kind} {group}/{version}, converted by scripts/crd_schema.py from the CustomResourceDefinition "
                    f"{crd['metadata']['name']} of {source}; {rules[0]} CEL rule(s) (x-kubernetes-validations) "
                    f"not evaluated",
        **schema,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crd", type=Path, help="the CustomResourceDefinition (YAML)")
    parser.add_argument("--version", required=True, help="the served version to convert, e.g. v1")
    parser.add_argument("--source", required=True, help="where the CRD comes from: repository, tag or commit, path")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    crd = yaml.safe_load(args.crd.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(crd_schema(crd, args.version, args.source), indent=1, sort_keys=False) + "\n")


if __name__ == "__main__":
    main()
