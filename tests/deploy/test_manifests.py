"""deploy/kubernetes, validated offline: every YAML file and every kustomization as `kubectl
kustomize` renders it against Kubernetes' OpenAPI schemas (kubernetes-validate, strict), the KServe
resources against a minimal KServe schema (and KServe's real CRDs where they are provided),
medserve's own rules on top, and broken manifests that must fail."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonschema
import k8s_manifests as km
import kubernetes_validate
import pytest
import yaml

RENDERED = {name: km.render(path) for name, path in km.KUSTOMIZATIONS.items()}


def _versions(name: str) -> tuple[str, ...]:
    return km.IMAGE_VOLUME_VERSIONS if name == "overlays/model-image" else km.KUBERNETES_VERSIONS


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = km.pod_spec(doc)["containers"][0]
    return container


# -- schemas -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", km.KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", km.manifest_files(), ids=lambda p: str(p.relative_to(km.K8S)))
def test_every_manifest_file_validates(path: Path, version: str) -> None:
    docs = km.load_docs(path)
    assert docs, f"{path}: empty"
    for doc in docs:
        km.validate(doc, version)


@pytest.mark.parametrize("name", sorted(km.KUSTOMIZATIONS))
def test_every_kustomization_renders_and_validates(name: str) -> None:
    docs = RENDERED[name]
    assert docs
    for version in _versions(name):
        for doc in docs:
            km.validate(doc, version)


def test_every_resource_file_is_in_a_kustomization() -> None:
    listed = set()
    for folder in km.KUSTOMIZATIONS.values():
        (k,) = km.load_docs(folder / "kustomization.yaml")
        listed |= {(folder / r).resolve() for r in k.get("resources", [])}
        listed |= {(folder / p["path"]).resolve() for p in k.get("patches", [])}
    examples = km.K8S / "examples"
    missing = [p for p in sorted(km.K8S.rglob("*.yaml"))
               if p.name != "kustomization.yaml" and p.parent != examples and p.resolve() not in listed]
    assert missing == []


# -- medserve's rules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["base", "overlays/gpu", "overlays/model-image", "overlays/mtls", "model-volume"])
def test_workloads_follow_the_hardening_rules(name: str) -> None:
    problems = [p for d in RENDERED[name] if d["kind"] in ("Deployment", "Pod") for p in km.workload_problems(d)]
    assert problems == []


def test_base_serves_the_image_command_on_8001_with_metrics_on_9090() -> None:
    docs = RENDERED["base"]
    deployment = _one(docs, "Deployment", "medserve")
    container = _container(deployment)
    assert container["image"] == "registry.example.org/medserve:0.1.0"
    args = container["args"]
    assert args[:9] == ["--log-format", "json", "serve", "--repository", "/models", "--host", "0.0.0.0",
                        "--port", "8001"]
    serve = km.serve_args(args)
    assert serve is not None
    assert km._arg(serve, "--metrics-port") == "9090"
    assert km._arg(serve, "--model-control-mode") == "poll"  # new versions roll in without a restart
    assert deployment["spec"]["replicas"] >= 2
    pod = km.pod_spec(deployment)
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "medserve-models", "readOnly": True}
    claim = _one(RENDERED["model-volume"], "PersistentVolumeClaim", "medserve-models")
    assert "ReadWriteMany" in claim["spec"]["accessModes"] or "ReadOnlyMany" in claim["spec"]["accessModes"]

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = _one(docs, "Service", "medserve")
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 8001 and ports["grpc"]["targetPort"] == "grpc"
    assert ports["metrics"]["port"] == 9090 and ports["metrics"]["targetPort"] == "metrics"
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named == {"grpc": 8001, "metrics": 9090}

    pdb = _one(docs, "PodDisruptionBudget")
    assert all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "medserve"}
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    assert pod["serviceAccountName"] == _one(docs, "ServiceAccount")["metadata"]["name"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9090" and annotations["prometheus.io/path"] == "/metrics"


def test_base_serves_tls_from_the_secret_with_http_probes() -> None:
    deployment = _one(RENDERED["base"], "Deployment", "medserve")
    container, pod = _container(deployment), km.pod_spec(deployment)
    args = km.serve_args(container["args"])
    assert args is not None
    assert "--allow-plaintext" not in args
    assert [args[args.index(f)] for f in ("--tls-cert", "--tls-key")] == km.TLS_ARGS[::2]
    assert km._arg(args, "--tls-cert") == "/etc/medserve/tls/tls.crt"
    assert km._arg(args, "--tls-key") == "/etc/medserve/tls/tls.key"
    tls = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "medserve-tls"
    assert tls["secret"]["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == km.UID
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    assert mount == {"name": "tls", "mountPath": "/etc/medserve/tls", "readOnly": True}
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes == {"startupProbe": {"path": "/v2/health/ready", "port": 9090},
                      "readinessProbe": {"path": "/v2/health/ready", "port": 9090},
                      "livenessProbe": {"path": "/v2/health/live", "port": 9090}}
    # the grace period covers preStop, the announce, the drain and a margin
    announce, grace = float(km._arg(args, "--drain-announce-s") or 0), float(km._arg(args, "--drain-grace-s") or 0)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + announce + grace + km.STOP_MARGIN_S
    # gRPC is TLS end to end: the Services must not announce it as cleartext HTTP/2
    for service in (d for d in RENDERED["base"] if d["kind"] == "Service"):
        grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc.get("appProtocol") == "https"


def test_the_mtls_overlay_requires_client_certificates_on_top_of_the_base_identities() -> None:
    base = _one(RENDERED["base"], "Deployment")
    mtls = _one(RENDERED["overlays/mtls"], "Deployment")
    container, pod = _container(mtls), km.pod_spec(mtls)
    base_args = _container(base)["args"]
    assert container["args"][: len(base_args)] == base_args
    assert container["args"][len(base_args):] == ["--tls-client-ca", "/etc/medserve/tls/ca.crt"]
    # the identities (certificate subjects and tokens) are the base's: one Secret, mounted once
    assert km._arg(container["args"], "--tokens") == km.IDENTITIES_FILE
    # everything else is the base's
    for key in ("startupProbe", "readinessProbe", "livenessProbe", "securityContext", "image", "volumeMounts", "env"):
        assert container[key] == _container(base)[key]
    assert pod["volumes"] == km.pod_spec(base)["volumes"]


def test_the_gpu_overlay_asks_for_a_gpu_and_the_cuda_provider() -> None:
    base = _one(RENDERED["base"], "Deployment")
    gpu = _one(RENDERED["overlays/gpu"], "Deployment")
    container = _container(gpu)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert km._arg(container["args"], "--providers") == "CUDAExecutionProvider,CPUExecutionProvider"
    assert container["args"][: len(_container(base)["args"])] == _container(base)["args"]
    assert container["image"] == "registry.example.org/medserve:0.1.0-gpu"
    pod = km.pod_spec(gpu)
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # everything else is the base's: probes, hardening, volumes
    for key in ("startupProbe", "readinessProbe", "livenessProbe", "securityContext", "volumeMounts"):
        assert container[key] == _container(base)[key]
    assert pod["volumes"] == km.pod_spec(base)["volumes"]
    assert _one(RENDERED["overlays/gpu"], "HorizontalPodAutoscaler")["spec"]["maxReplicas"] <= 4


def test_the_model_image_overlay_swaps_the_claim_for_an_image_volume() -> None:
    pod = km.pod_spec(_one(RENDERED["overlays/model-image"], "Deployment"))
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert set(models) == {"name", "image"} and models["image"]["reference"].endswith(":demo-1")
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "models")
    assert mount["readOnly"] is True


def test_the_kserve_runtime_serves_the_inference_service() -> None:
    docs = RENDERED["kserve"]
    runtime = _one(docs, "ServingRuntime", "medserve")
    isvc = _one(docs, "InferenceService", "medserve-demo")
    spec = runtime["spec"]
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    assert any(f["name"] == "onnx" for f in spec["supportedModelFormats"])
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # KServe merges the predictor's model into it
    args = km.serve_args(container["args"])
    assert args is not None and args[:2] == ["--repository", "/mnt/models"]
    assert {"name": "h2c", "containerPort": 8001, "protocol": "TCP"} in container["ports"]
    # plaintext only because KServe routes h2c to the pod, and then explicitly, with the mesh's
    # sidecar asked for
    assert "--allow-plaintext" in args and "--tls-cert" not in args
    assert spec["annotations"]["sidecar.istio.io/inject"] == "true"
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    assert model["protocolVersion"] == "grpc-v2"  # inferenceservice-rest.yaml is the REST one
    assert model["storageUri"] == "pvc://medserve-models/"
    # One container port only (Knative, KServe's serverless mode, allows one): Prometheus scrapes
    # 9090 through the prometheus.kserve.io annotations, which need no container port.
    assert spec["annotations"]["prometheus.kserve.io/port"] == km._arg(args, "--metrics-port")
    problems = km.container_problems(container, spec.get("volumes", []), {},
                                     predictor.get("terminationGracePeriodSeconds", 30),
                                     metrics_container_port=False, allow_plaintext=True)
    assert problems == []
    # without the flag, the rules (like the server) refuse plaintext on 0.0.0.0
    bare = copy.deepcopy(container)
    bare["args"].remove("--allow-plaintext")
    problems = km.container_problems(bare, spec.get("volumes", []), {}, predictor.get("terminationGracePeriodSeconds"),
                                     metrics_container_port=False, allow_plaintext=True)
    assert any("no TLS" in p for p in problems), problems
    # and the deployment's rules do not allow it at all
    problems = km.container_problems(container, spec.get("volumes", []), {},
                                     predictor.get("terminationGracePeriodSeconds"), metrics_container_port=False)
    assert any("--allow-plaintext outside a mesh" in p for p in problems), problems


def test_the_kserve_runtime_serves_rest_to_the_v2_inference_service() -> None:
    """protocolVersion v2 (KServe V2 over REST): the runtime serves --http-port, declares it as
    its HTTP data endpoint, and the REST InferenceService routes its one port there, behind the
    same mesh policies as the gRPC one (STRICT mTLS; only the gateway and clients reach 8000)."""
    docs = RENDERED["kserve"]
    runtime = _one(docs, "ServingRuntime", "medserve")
    spec = runtime["spec"]
    (container,) = spec["containers"]
    args = km.serve_args(container["args"])
    assert args is not None
    http_port = km._arg(args, "--http-port")
    assert http_port == "8000" and spec["httpDataEndpoint"] == f"port:{http_port}"
    assert spec["grpcDataEndpoint"] == f"port:{km._arg(args, '--port')}"
    isvc = _one(docs, "InferenceService", "medserve-demo-rest")
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and model["runtime"] == "medserve"
    assert model["ports"] == [{"name": "http1", "containerPort": int(http_port), "protocol": "TCP"}]
    grpc_isvc = _one(docs, "InferenceService", "medserve-demo")["spec"]["predictor"]
    assert {k: v for k, v in isvc["spec"]["predictor"].items() if k != "model"} == \
        {k: v for k, v in grpc_isvc.items() if k != "model"}
    selector = {"serving.kserve.io/inferenceservice": "medserve-demo-rest"}
    peer = _one(docs, "PeerAuthentication", "medserve-demo-rest-predictor")
    assert peer["spec"]["selector"]["matchLabels"] == selector and peer["spec"]["mtls"]["mode"] == "STRICT"
    policy = _one(docs, "AuthorizationPolicy", "medserve-demo-rest-predictor")
    assert policy["spec"]["selector"]["matchLabels"] == selector
    ports = {p for rule in policy["spec"]["rules"] for op in rule["to"] for p in op["operation"]["ports"]}
    assert ports == {http_port, "9090"}


def test_the_queue_depth_example_names_the_metric_the_adapter_publishes() -> None:
    hpa = _one(km.load_docs(km.K8S / "examples" / "hpa-queue-depth.yaml"), "HorizontalPodAutoscaler")
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    adapter = _one(km.load_docs(km.K8S / "examples" / "prometheus-adapter-rules.yaml"), "ConfigMap")
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == pods["metric"]["name"] == "medserve_queue_depth"
    assert rule["seriesQuery"].startswith("medserve_queue_depth{")


def _kserve_crd_dir() -> Path | None:
    for candidate in (os.environ.get("MEDSERVE_KSERVE_CRDS"), km.ROOT.parent / "shared" / "kserve" / "crds"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.mark.parametrize("kind", ["ServingRuntime", "InferenceService"])
def test_kserve_resources_against_kserves_own_crd(kind: str) -> None:
    """Where KServe's CRD files are provided (MEDSERVE_KSERVE_CRDS, or ../shared/kserve/crds:
    config/crd/full/serving.kserve.io_{servingruntimes,inferenceservices}.yaml of KServe v0.20.0),
    the KServe resources also validate against their full openAPIV3Schema."""
    crd_dir = _kserve_crd_dir()
    schema = km.crd_schema(crd_dir, kind) if crd_dir else None
    if schema is None:
        pytest.skip("KServe's CRD files are not provided (MEDSERVE_KSERVE_CRDS): minimal schema only")
    doc = _one(RENDERED["kserve"], kind, "medserve" if kind == "ServingRuntime" else "medserve-demo")
    jsonschema.validate(doc, schema)
    broken = copy.deepcopy(doc)
    broken["spec"]["unknownField"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


# -- broken manifests fail -------------------------------------------------------------------------

def _deployment() -> dict[str, Any]:
    return copy.deepcopy(_one(RENDERED["base"], "Deployment"))


@pytest.mark.parametrize("version", km.KUBERNETES_VERSIONS)
def test_a_wrong_type_fails_the_kubernetes_schema(version: str) -> None:
    doc = _deployment()
    doc["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError, match="replicas|three"):
        km.validate(doc, version)


def test_an_unknown_field_fails_the_strict_kubernetes_schema() -> None:
    doc = _deployment()
    _container(doc)["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        km.validate(doc, km.KUBERNETES_VERSIONS[-1])
    doc = _deployment()
    _container(doc)["readinessProbe"]["httpGet"]["pathh"] = "/v2/health/ready"  # misspelt, one level down
    with pytest.raises(kubernetes_validate.ValidationError):
        km.validate(doc, km.KUBERNETES_VERSIONS[-1])
    doc = _deployment()
    _container(doc)["startupProbe"] = {"grpc": {"port": "8001"}}  # grpc probes take a number, no name
    with pytest.raises(kubernetes_validate.ValidationError):
        km.validate(doc, km.KUBERNETES_VERSIONS[-1])


def test_a_missing_image_fails_medserves_rules() -> None:
    doc = _deployment()
    del _container(doc)["image"]
    # Kubernetes' own schema lets a container leave its image to a controller, so the rules catch it.
    km.validate(doc, km.KUBERNETES_VERSIONS[-1])
    assert any("no image" in p for p in km.workload_problems(doc))


def _set_arg(args: list[str], flag: str, value: str) -> None:
    args[args.index(flag) + 1] = value


def _drop_arg(args: list[str], flag: str) -> None:
    del args[args.index(flag): args.index(flag) + 2]


def _no_tls(args: list[str], *, plaintext: bool = False) -> None:
    _drop_arg(args, "--tls-cert")
    _drop_arg(args, "--tls-key")
    if plaintext:
        args.append("--allow-plaintext")


def _volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    volume: dict[str, Any] = next(v for v in pod["volumes"] if v["name"] == name)
    return volume


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c, p: c["securityContext"].update(readOnlyRootFilesystem=False), "readOnlyRootFilesystem"),
        (lambda c, p: c["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
        (lambda c, p: c["securityContext"]["capabilities"].update(drop=["NET_RAW"]), "drop ALL"),
        (lambda c, p: c["securityContext"].update(runAsUser=0), "runAsUser"),
        (lambda c, p: c.update(image="registry.example.org/medserve:latest"), ":latest"),
        (lambda c, p: c.update(image="registry.example.org/medserve"), "no tag"),
        (lambda c, p: c["resources"].pop("limits"), "limits.cpu"),
        (lambda c, p: c.pop("livenessProbe"), "livenessProbe"),
        (lambda c, p: c.update(readinessProbe={"grpc": {"port": 8001}}), "readinessProbe"),
        (lambda c, p: c["readinessProbe"].update(grpc={"port": 9090}), "readinessProbe"),
        (lambda c, p: c["readinessProbe"]["httpGet"].update(port=8001), "readinessProbe"),
        (lambda c, p: c["readinessProbe"]["httpGet"].update(scheme="HTTPS"), "readinessProbe"),
        (lambda c, p: c["livenessProbe"]["httpGet"].update(path="/v2/health/ready"), "livenessProbe"),
        (lambda c, p: c["startupProbe"]["httpGet"].update(path="/metrics"), "startupProbe"),
        (lambda c, p: _drop_arg(c["args"], "--metrics-port"), "no --metrics-port"),
        (lambda c, p: p.update(terminationGracePeriodSeconds=20), "terminationGracePeriodSeconds"),
        (lambda c, p: p.update(terminationGracePeriodSeconds=32), "terminationGracePeriodSeconds"),
        (lambda c, p: _set_arg(c["args"], "--drain-announce-s", "30"), "terminationGracePeriodSeconds"),
        (lambda c, p: c["volumeMounts"][0].update(readOnly=False), "read-write"),
        (lambda c, p: p["volumes"][0]["persistentVolumeClaim"].pop("readOnly"), "claim is not readOnly"),
        (lambda c, p: p["volumes"].pop(), "/tmp"),
        (lambda c, p: _set_arg(c["args"], "--host", "127.0.0.1"), "--host"),
        (lambda c, p: p.pop("affinity"), "anti-affinity"),
        # TLS: from a read-only Secret only the server can read; plaintext never
        (lambda c, p: _no_tls(c["args"]), "no TLS"),
        (lambda c, p: _drop_arg(c["args"], "--tls-key"), "no TLS"),
        (lambda c, p: c["args"].append("--allow-plaintext"), "--allow-plaintext"),
        (lambda c, p: _no_tls(c["args"], plaintext=True), "--allow-plaintext outside a mesh"),
        (lambda c, p: _set_arg(c["args"], "--tls-key", "/tmp/tls.key"), "--tls-key /tmp/tls.key is not in a mounted Secret"),
        (lambda c, p: c["volumeMounts"].pop(1), "--tls-cert /etc/medserve/tls/tls.crt is not in a mounted Secret"),
        (lambda c, p: _volume(p, "tls")["secret"].pop("defaultMode"), "readable by others"),
        (lambda c, p: _volume(p, "tls")["secret"].update(defaultMode=0o444), "readable by others"),
        (lambda c, p: c["volumeMounts"][1].update(readOnly=False), "not mounted readOnly"),
        (lambda c, p: _set_arg(c["args"], "--tokens", "/models/identities.json"), "--tokens /models/identities.json"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_broken_hardening_fails_medserves_rules(change: Any, message: str) -> None:
    doc = _deployment()
    change(_container(doc), km.pod_spec(doc))
    problems = km.workload_problems(doc)
    assert any(message in p for p in problems), problems


def _runtime() -> dict[str, Any]:
    return copy.deepcopy(_one(RENDERED["kserve"], "ServingRuntime"))


def _isvc() -> dict[str, Any]:
    return copy.deepcopy(_one(RENDERED["kserve"], "InferenceService", "medserve-demo"))


@pytest.mark.parametrize(
    ("make", "change"),
    [
        (_runtime, lambda d: d["spec"]["supportedModelFormats"][0].pop("name")),
        (_runtime, lambda d: d["spec"].update(protocolVersions=["grpc-v3"])),
        (_runtime, lambda d: d["spec"].update(multiModel="no")),
        (_runtime, lambda d: d["spec"].pop("containers")),
        (_runtime, lambda d: d["spec"].update(unknownField=1)),
        (_runtime, lambda d: d["spec"]["containers"][0]["ports"][0].update(containerPort="8001")),
        (_runtime, lambda d: d["spec"]["containers"][0].update(readinessProbe={"grpc": {}})),
        (_isvc, lambda d: d["spec"]["predictor"].update(minReplicas="2")),
        (_isvc, lambda d: d["spec"]["predictor"].update(scaleMetric="gpu")),
        (_isvc, lambda d: d["spec"]["predictor"]["model"].pop("modelFormat")),
        (_isvc, lambda d: d["spec"]["predictor"]["model"].update(storageURI="pvc://x/")),
        (_isvc, lambda d: d["spec"]["predictor"]["model"]["resources"].update(limits={"cpu": []})),
        (_isvc, lambda d: d.update(apiVersion="serving.kserve.io/v1alpha1")),
    ],
)
def test_broken_kserve_resources_fail_validation(make: Any, change: Any) -> None:
    doc = make()
    km.validate(doc, km.KUBERNETES_VERSIONS[-1])  # the unbroken copy passes
    change(doc)
    with pytest.raises(jsonschema.ValidationError):
        km.validate(doc, km.KUBERNETES_VERSIONS[-1])


def test_a_patch_that_matches_nothing_fails_the_rendering(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(km.K8S / "base", overlay)  # kustomize takes relative paths only
    (overlay / "kustomization.yaml").write_text(
        f"kind: Kustomization\nresources: [{base}]\npatches: [{{path: p.yaml}}]\n")
    (overlay / "p.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: not-medserve}\nspec: {replicas: 1}\n")
    with pytest.raises(km.RenderError, match="not-medserve"):
        km.render(overlay)
    # the same overlay with the right name renders, the patch applied
    (overlay / "p.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: medserve}\nspec: {replicas: 1}\n")
    assert _one(km.render(overlay), "Deployment")["spec"]["replicas"] == 1
