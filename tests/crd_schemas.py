"""JSON schemas of the custom resources the chart renders, which kubernetes-validate has none for: InferencePool
(Gateway API Inference Extension, inference.networking.k8s.io/v1), InferenceObjective (llm-d router, llm-d.ai/
v1alpha2), ScaledObject (KEDA, keda.sh/v1alpha1), ServiceMonitor and PodMonitor (prometheus-operator,
monitoring.coreos.com/v1).

Written here from each API's reference documentation (field names, types, enums, required fields), not copied from
the projects' CRD files; strict as `kubectl apply --validate=strict`: every object admits only the fields listed,
so a misspelt field is an error. Each covers what the API defines at the level the chart uses it (the fields of
deeper objects it never sets are not all listed: such an object is refused, not passed, when the chart starts to
set one, and the schema is extended then). CEL rules are not evaluated.
"""

from __future__ import annotations

from typing import Any

DNS_SUBDOMAIN = {"type": "string", "minLength": 1, "maxLength": 253,
                 "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
PORT_NUMBER = {"type": "integer", "minimum": 1, "maximum": 65535}
METADATA = {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
    "name": DNS_SUBDOMAIN, "namespace": {"type": "string"}, "generateName": {"type": "string"},
    "labels": STRING_MAP, "annotations": STRING_MAP}}


def strict(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """An object that admits exactly these fields."""
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def resource(api_version: str, kind: str, spec: dict[str, Any], source: str) -> dict[str, Any]:
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": f"{kind} {api_version}, written from {source}",
        **strict({"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": METADATA,
                  "spec": spec, "status": {"type": "object"}}, ("apiVersion", "kind", "metadata", "spec")),
    }


LABEL_SELECTOR = strict({
    "matchLabels": STRING_MAP,
    "matchExpressions": {"type": "array", "items": strict({
        "key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
        "values": {"type": "array", "items": {"type": "string"}}}, ("key", "operator"))},
})
OBJECT_REFERENCE = strict({"group": {"type": "string"}, "kind": {"type": "string"}, "name": DNS_SUBDOMAIN},
                          ("name",))
INFERENCE_POOL = resource("inference.networking.k8s.io/v1", "InferencePool", strict({
    # v1: the pods by their labels only (matchLabels), at most 8 target ports
    "selector": strict({"matchLabels": {**STRING_MAP, "minProperties": 1}}, ("matchLabels",)),
    "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8,
                    "items": strict({"number": PORT_NUMBER}, ("number",))},
    "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
    "endpointPickerRef": strict({
        "group": {"type": "string"}, "kind": {"type": "string"}, "name": DNS_SUBDOMAIN,
        "port": strict({"number": PORT_NUMBER}, ("number",)), "failureMode": {"enum": ["FailOpen", "FailClose"]},
    }, ("name",)),
}, ("selector", "targetPorts", "endpointPickerRef")), "the Gateway API Inference Extension's v1 API reference")

INFERENCE_OBJECTIVE = resource("llm-d.ai/v1alpha2", "InferenceObjective", strict({
    "priority": {"type": "integer"}, "poolRef": OBJECT_REFERENCE,
}, ("poolRef",)), "the llm-d router's InferenceObjective API (v0.10)")

HPA_POLICY = strict({"type": {"enum": ["Pods", "Percent"]}, "value": {"type": "integer", "minimum": 1},
                     "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800}},
                    ("type", "value", "periodSeconds"))
HPA_RULES = strict({"stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
                    "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
                    "policies": {"type": "array", "items": HPA_POLICY}})
SCALED_OBJECT = resource("keda.sh/v1alpha1", "ScaledObject", strict({
    "scaleTargetRef": strict({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                              "name": {"type": "string"}, "envSourceContainerName": {"type": "string"}}, ("name",)),
    "pollingInterval": {"type": "integer"}, "cooldownPeriod": {"type": "integer"},
    "initialCooldownPeriod": {"type": "integer"}, "idleReplicaCount": {"type": "integer"},
    "minReplicaCount": {"type": "integer"}, "maxReplicaCount": {"type": "integer"},
    "advanced": strict({
        "restoreToOriginalReplicaCount": {"type": "boolean"},
        "horizontalPodAutoscalerConfig": strict({
            "name": {"type": "string"}, "behavior": strict({"scaleUp": HPA_RULES, "scaleDown": HPA_RULES})}),
    }),
    "fallback": strict({"failureThreshold": {"type": "integer"}, "replicas": {"type": "integer"}},
                       ("failureThreshold", "replicas")),
    "triggers": {"type": "array", "minItems": 1, "items": strict({
        "type": {"type": "string", "minLength": 1}, "name": {"type": "string"},
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]}, "useCachedMetrics": {"type": "boolean"},
        "metadata": STRING_MAP,
        "authenticationRef": strict({"name": {"type": "string"}, "kind": {"type": "string"}}, ("name",)),
    }, ("type", "metadata"))},
}, ("scaleTargetRef", "triggers")), "KEDA's ScaledObject specification (v2)")

RELABELING = strict({
    "sourceLabels": {"type": "array", "items": {"type": "string"}}, "separator": {"type": "string"},
    "targetLabel": {"type": "string"}, "regex": {"type": "string"}, "modulus": {"type": "integer"},
    "replacement": {"type": "string"},
    "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod", "labelmap",
                        "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep", "lowercase", "Lowercase",
                        "uppercase", "Uppercase", "keepequal", "KeepEqual", "dropequal", "DropEqual"]},
})
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                         r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
SCRAPE_ENDPOINT = {
    "path": {"type": "string"}, "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]}, "interval": DURATION,
    "scrapeTimeout": DURATION, "honorLabels": {"type": "boolean"}, "honorTimestamps": {"type": "boolean"},
    "params": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
    "relabelings": {"type": "array", "items": RELABELING},
    "metricRelabelings": {"type": "array", "items": RELABELING},
}
NAMESPACE_SELECTOR = strict({"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}})
MONITOR_COMMON = {"jobLabel": {"type": "string"}, "namespaceSelector": NAMESPACE_SELECTOR, "selector": LABEL_SELECTOR,
                  "sampleLimit": {"type": "integer", "minimum": 0}}
SERVICE_MONITOR = resource("monitoring.coreos.com/v1", "ServiceMonitor", strict({
    **MONITOR_COMMON, "targetLabels": {"type": "array", "items": {"type": "string"}},
    "endpoints": {"type": "array", "items": strict({
        **SCRAPE_ENDPOINT, "port": {"type": "string"}, "targetPort": {"type": ["integer", "string"]}})},
}, ("selector",)), "prometheus-operator's monitoring.coreos.com/v1 API reference")
POD_MONITOR = resource("monitoring.coreos.com/v1", "PodMonitor", strict({
    **MONITOR_COMMON, "podTargetLabels": {"type": "array", "items": {"type": "string"}},
    "podMetricsEndpoints": {"type": "array", "items": strict({
        **SCRAPE_ENDPOINT, "port": {"type": "string"}, "portNumber": PORT_NUMBER,
        "targetPort": {"type": ["integer", "string"]}})},
}, ("selector",)), "prometheus-operator's monitoring.coreos.com/v1 API reference")

SCHEMAS = [INFERENCE_POOL, INFERENCE_OBJECTIVE, SCALED_OBJECT, SERVICE_MONITOR, POD_MONITOR]
