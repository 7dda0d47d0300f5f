"""The rendered overlays: valid against the Kubernetes schemas, and the deployment's invariants hold."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from unclip.runtime import metrics, settings

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ["dev", "gpu", "gpu-hpa", "gpu-cascade", "gpu-plain-secrets"]
# Schemas checked: the kubectl we render with (1.35) and an older still-supported minor.
K8S_VERSIONS = ["1.35.0", "1.33.0"]
# Deployment name -> (process, its metrics `service` label = its key in settings.DEFAULT_PORTS).
STAGES = {
    "unclip-orchestrator": ("orchestrator", "orchestrator"),
    "unclip-encoder": ("encoder", "encoder"),
    "unclip-prior": ("prior", "prior"),
    "unclip-decoder": ("decoder", "decoder"),
    "unclip-super-res": ("decoder", "super_res"),
    "unclip-safety": ("safety", "safety"),
}
MODEL_STAGES = ["unclip-encoder", "unclip-prior", "unclip-decoder", "unclip-super-res"]
# The second super-resolution stage, in overlays that include components/super-res-2.
SUPER_RES_2 = {"unclip-super-res-2": ("decoder", "super_res_2")}
# The orchestrator's address settings and the Deployments each must reach (upsamplers: in cascade order).
ADDRESSES = {
    "UNCLIP_ENCODER_ADDR": ["unclip-encoder"],
    "UNCLIP_PRIOR_ADDR": ["unclip-prior"],
    "UNCLIP_DECODER_ADDR": ["unclip-decoder"],
    "UNCLIP_UPSAMPLER_ADDRS": ["unclip-super-res"],
    "UNCLIP_SAFETY_ADDR": ["unclip-safety"],
}


def stages_of(docs) -> dict[str, tuple[str, str]]:
    """STAGES, plus super-res-2 where the overlay runs a two-stage cascade."""
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    return {**STAGES, **{n: v for n, v in SUPER_RES_2.items() if n in names}}


def model_stages_of(docs) -> list[str]:
    return MODEL_STAGES + [n for n in SUPER_RES_2 if n in stages_of(docs)]


# Objects that the gpu overlays expect to exist already (created by the operator, docs/operations.md).
EXTERNAL = {("Secret", "unclip-s3"), ("Secret", "unclip-keys"), ("Secret", "unclip-watermark")}
# Without cert-manager the operator also creates the certificate Secrets (`unclip certs mint`).
EXTERNAL_WITHOUT_CERT_MANAGER = {
    ("Secret", name)
    for name in (
        "unclip-c2pa",
        *(f"unclip-tls-{s}" for s in ("orchestrator", "encoder", "prior", "decoder", "super-res", "safety")),
    )
}
# Environment variables the manifests set that no code reads yet (wiring listed in docs/operations.md).
NOT_YET_READ: set[str] = set()


def kinds(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def by_name(docs, kind):
    return {d["metadata"]["name"]: d for d in kinds(docs, kind)}


def container(deployment):
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env_of(deployment, docs) -> dict[str, str]:
    """The container's environment as the pod sees it: envFrom ConfigMaps, then env (later wins)."""
    out: dict[str, str] = {}
    configmaps = by_name(docs, "ConfigMap")
    c = container(deployment)
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            out.update(configmaps[source["configMapRef"]["name"]]["data"])
    for item in c.get("env", []):
        if "value" in item:
            out[item["name"]] = item["value"]
    return out


def settings_data(docs) -> dict[str, str]:
    [cm] = [d for d in kinds(docs, "ConfigMap") if d["metadata"]["name"].startswith("unclip-settings")]
    return cm["data"]


def selector_matches(selector: dict, labels: dict) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        present, value = expr["key"] in labels, labels.get(expr["key"])
        op = expr["operator"]
        if (op == "In" and value not in expr["values"]) or (op == "NotIn" and value in expr["values"]):
            return False
        if (op == "Exists" and not present) or (op == "DoesNotExist" and present):
            return False
    return True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(rendered, overlay):
    checked = 0
    for doc in rendered[overlay]:
        if doc["apiVersion"].startswith(("keda.sh/", "cert-manager.io/")):
            continue  # custom resources: checked against their required fields (below, test_access_manifests)
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(
                    f"{overlay}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: {error}"
                )
        checked += 1
    assert checked >= 30


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_probes_resources_and_runs_non_root(rendered, overlay):
    docs = rendered[overlay]
    deployments = kinds(docs, "Deployment")
    assert set(stages_of(docs)) <= {d["metadata"]["name"] for d in deployments}
    for d in deployments:
        name = d["metadata"]["name"]
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["automountServiceAccountToken"] is False, name
        for c in pod["containers"]:
            assert c["readinessProbe"] and c["livenessProbe"], name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, kind)
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: pin {image}"
            # A read-only root needs a writable /tmp for our Python processes (torch and caches write there).
            assert name not in stages_of(docs) or any(
                m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])
            ), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stage_ports_agree_everywhere(rendered, overlay):
    """Deployment port, UNCLIP_PORT, probes, headless Service, orchestrator settings and the default ports."""
    docs = rendered[overlay]
    deployments, services = by_name(docs, "Deployment"), by_name(docs, "Service")
    for name, (process, label) in stages_of(docs).items():
        d, c = deployments[name], container(deployments[name])
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        grpc_port = ports["grpc"]
        assert grpc_port == settings.DEFAULT_PORTS[label], name  # docs/interfaces.md
        assert ports["metrics"] == 9464
        env = env_of(d, docs)
        assert int(env["UNCLIP_PORT"]) == grpc_port and int(env["UNCLIP_METRICS_PORT"]) == 9464
        if process == "decoder":
            assert env["UNCLIP_STAGE"] == label
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            # Native gRPC probes on grpc.health.v1 (NOT_SERVING until weights are loaded), on the plaintext
            # health-only port the process serves (UNCLIP_HEALTH_PORT): the main port requires mTLS.
            assert c[probe]["grpc"]["port"] == ports["health"] == int(env["UNCLIP_HEALTH_PORT"]), (
                name,
                probe,
            )
            assert ports["health"] != grpc_port, name
        # The orchestrator's readiness follows its stages (a named health service); liveness stays on "".
        expected_readiness = "unclip.v1.ImageService" if process == "orchestrator" else None
        assert c["readinessProbe"]["grpc"].get("service") == expected_readiness, name
        assert "service" not in c["livenessProbe"]["grpc"], name
        service = services[name]
        assert service["spec"]["clusterIP"] == "None", f"{name}: must be headless for round_robin"
        assert selector_matches(
            {"matchLabels": service["spec"]["selector"]}, d["spec"]["template"]["metadata"]["labels"]
        )
        [svc_port] = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        assert svc_port["port"] == grpc_port and svc_port["targetPort"] in ("grpc", grpc_port)

    data = settings_data(docs)
    expected = dict(ADDRESSES)
    if "unclip-super-res-2" in deployments:
        expected["UNCLIP_UPSAMPLER_ADDRS"] = ["unclip-super-res", "unclip-super-res-2"]
    for key, targets in expected.items():
        dialed = data[key].split(",")
        assert len(dialed) == len(targets), f"{key}={data[key]}"
        for target, deployment in zip(dialed, targets, strict=True):
            assert target.startswith("dns:///"), f"{key}={target}: dial dns:/// so round_robin sees every pod"
            host, port = target.removeprefix("dns:///").rsplit(":", 1)
            assert host == deployment and host in services
            grpc_port = container(deployments[deployment])["ports"][0]["containerPort"]
            assert int(port) == grpc_port, key
    assert float(data["UNCLIP_MAX_CONNECTION_AGE_SECONDS"]) > 0  # clients re-resolve as pods come and go


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_startup_and_shutdown_budgets(rendered, overlay):
    docs = rendered[overlay]
    deployments = by_name(docs, "Deployment")
    grace = {}
    model_stages = model_stages_of(docs)
    for name in stages_of(docs):
        d = deployments[name]
        c, pod = container(d), d["spec"]["template"]["spec"]
        env = env_of(d, docs)
        grace[name] = float(env["UNCLIP_GRACE_SECONDS"])
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        # SIGTERM comes after preStop; the drain (UNCLIP_GRACE_SECONDS) must fit before the SIGKILL.
        assert pod["terminationGracePeriodSeconds"] > pre_stop + grace[name], name
        startup = c["startupProbe"]
        if name in model_stages:
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, f"{name}: weights need time"
    # The orchestrator drains whole requests, which include the slowest stage call.
    assert grace["unclip-orchestrator"] >= max(grace[n] for n in model_stages)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_stage_has_a_disruption_budget(rendered, overlay):
    docs = rendered[overlay]
    deployments = by_name(docs, "Deployment")
    budgets = kinds(docs, "PodDisruptionBudget")
    for name in stages_of(docs):
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets if selector_matches(b["spec"]["selector"], labels)]
        assert len(matching) == 1, name


# KEDA's ScaledObject (keda.sh/v1alpha1): the fields its CRD requires, plus what the Prometheus scaler needs.
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}, "kind": {"type": "string"}},
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {"type": "object", "required": ["failureThreshold", "replicas"]},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"const": "prometheus"},
                            "metricType": {"enum": ["AverageValue", "Value"]},
                            "metadata": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},  # KEDA: map[string]string
                                "required": ["serverAddress", "query", "threshold"],
                            },
                        },
                    },
                },
            },
        },
    },
}


def metric_names_in(query: str) -> set[str]:
    return set(re.findall(r"\b(unclip_[a-z_]+)\b", query))


def exported_metric_names() -> set[str]:
    """The sample names unclip.runtime.metrics exports (gauges as named, counters with _total ...)."""
    names = set()
    for metric in (
        metrics.REQUESTS_WAITING,
        metrics.REQUESTS_RUNNING,
        metrics.REQUESTS,
        metrics.QUEUE_SECONDS,
    ):
        for family in metric.collect():
            names.add(family.name)
            names.update(s.name for s in family.samples)
    return names


@pytest.mark.parametrize("overlay", ["gpu", "gpu-cascade", "gpu-plain-secrets"])
def test_every_stage_has_a_keda_scaler_on_its_own_queue(rendered, overlay):
    docs = rendered[overlay]
    scalers = kinds(docs, "ScaledObject")
    exported = exported_metric_names() | {"unclip_requests_waiting", "unclip_requests_running"}
    targets = {}
    for so in scalers:
        jsonschema.validate(so, SCALED_OBJECT_SCHEMA)
        targets[so["spec"]["scaleTargetRef"]["name"]] = so
        assert so["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert so["spec"]["minReplicaCount"] >= 1  # a stage at 0 would fail the first request's deadline
    assert set(targets) == set(stages_of(docs))  # one scaler per stage, none for anything else
    for name, (_, label) in stages_of(docs).items():
        [trigger] = targets[name]["spec"]["triggers"]
        query = trigger["metadata"]["query"]
        assert f'service="{label}"' in query, f"{name} must scale on its own queue: {query}"
        names = metric_names_in(query)
        assert names and names <= exported, (
            f"{name}: {names - exported} not exported by unclip.runtime.metrics"
        )
        assert float(trigger["metadata"]["threshold"]) > 0
        assert urlsplit(trigger["metadata"]["serverAddress"]).scheme in ("http", "https")
    assert not kinds(docs, "HorizontalPodAutoscaler")  # KEDA makes its own; a second HPA would fight it


def test_hpa_variant_replaces_keda(rendered):
    docs = rendered["gpu-hpa"]
    assert not kinds(docs, "ScaledObject")
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in kinds(docs, "HorizontalPodAutoscaler")}
    assert set(hpas) == set(stages_of(docs))
    exported = exported_metric_names()
    for hpa in hpas.values():
        names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
        assert names == {"unclip_requests_waiting", "unclip_requests_running"} and names <= exported


def test_dev_overlay_runs_without_autoscaler_gpu_or_outside_s3(rendered):
    docs = rendered["dev"]
    assert not kinds(docs, "ScaledObject") and not kinds(docs, "HorizontalPodAutoscaler")
    deployments = by_name(docs, "Deployment")
    assert "unclip-minio" in deployments and "unclip-minio" in by_name(docs, "Service")
    data = settings_data(docs)
    assert data["UNCLIP_S3_ENDPOINT"] == "http://unclip-minio:9000"
    assert data["UNCLIP_MODEL"].startswith("s3://unclip-models/")
    for d in deployments.values():
        assert "nvidia.com/gpu" not in str(d), d["metadata"]["name"]
        assert env_of(d, docs).get("UNCLIP_DEVICE", "cpu") == "cpu"
    [job] = kinds(docs, "Job")
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert f'push "$model" {data["UNCLIP_MODEL"]}' in script  # the Job seeds the model the stages load


@pytest.mark.parametrize("overlay", ["gpu", "gpu-cascade", "gpu-plain-secrets"])
def test_gpu_overlay_puts_model_stages_on_gpus_in_fp16(rendered, overlay):
    docs = rendered[overlay]
    deployments = by_name(docs, "Deployment")
    for name in model_stages_of(docs):
        d = deployments[name]
        pod, c = d["spec"]["template"]["spec"], container(d)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), name
        env = env_of(d, docs)
        assert env["UNCLIP_DEVICE"] == "cuda" and env["UNCLIP_DTYPE"] == "float16", name
        assert c["image"].endswith("-cuda"), name
    for name in ("unclip-orchestrator", "unclip-safety"):
        assert "nvidia.com/gpu" not in str(deployments[name]["spec"]), name


def _allowed_peers(policies, pod_labels, direction: str, port_name: str) -> list[dict]:
    """Peers allowed to reach (ingress) a pod on `port_name` by the policies selecting it."""
    peers = []
    for policy in policies:
        spec = policy["spec"]
        if direction.capitalize() not in spec["policyTypes"] or not selector_matches(
            spec["podSelector"], pod_labels
        ):
            continue
        for rule in spec.get(direction, []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if not ports or port_name in ports:
                peers.extend(rule.get("from", [{}]) if direction == "ingress" else rule.get("to", [{}]))
    return peers


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_only_the_orchestrator_reach_the_stages(rendered, overlay):
    docs = rendered[overlay]
    policies = kinds(docs, "NetworkPolicy")
    deployments = by_name(docs, "Deployment")
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {}
        and "ingress" not in p["spec"]
        and "egress" not in p["spec"]
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ]
    assert deny, "a default-deny policy for the namespace"
    orchestrator_labels = deployments["unclip-orchestrator"]["spec"]["template"]["metadata"]["labels"]
    stages = stages_of(docs)
    for name in stages:
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        peers = _allowed_peers(policies, labels, "ingress", "grpc")
        assert peers, f"{name}: nobody may call it"
        if name == "unclip-orchestrator":
            assert all(p["podSelector"] == {"matchLabels": {"unclip.dev/client": "true"}} for p in peers)
        else:
            # Only pods of this namespace (no namespaceSelector, no ipBlock): the orchestrator, and for the
            # encoder also the safety service (its embedding filters call the encoder).
            callers = {"unclip-orchestrator"} | ({"unclip-safety"} if name == "unclip-encoder" else set())
            assert {p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in peers} == callers, name
            for peer in peers:
                assert set(peer) == {"podSelector"} and set(peer["podSelector"]) == {"matchLabels"}
    # The orchestrator may call every stage's grpc port.
    egress = _allowed_peers(policies, orchestrator_labels, "egress", "grpc")
    for name in stages:
        if name != "unclip-orchestrator":
            labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
            assert any(
                selector_matches(p.get("podSelector", {"matchLabels": {"_": "_"}}), labels) for p in egress
            )
    # The safety service may call the encoder (embedding filters), and no other stage.
    safety_labels = deployments["unclip-safety"]["spec"]["template"]["metadata"]["labels"]
    safety_egress = [
        p for p in _allowed_peers(policies, safety_labels, "egress", "grpc") if "podSelector" in p
    ]
    pod_labels = {n: deployments[n]["spec"]["template"]["metadata"]["labels"] for n in stages}
    reachable = {
        n for n in stages if any(selector_matches(p["podSelector"], pod_labels[n]) for p in safety_egress)
    }
    assert reachable == {"unclip-encoder"}
    # Every unclip process may reach DNS and the collector.
    for name in stages:
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert _allowed_peers(policies, labels, "egress", 53)
        assert _allowed_peers(policies, labels, "egress", 4317)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_referenced_configmap_and_secret_exists(rendered, overlay):
    docs = rendered[overlay]
    present = {(d["kind"], d["metadata"]["name"]) for d in docs}
    referenced = set()
    for d in kinds(docs, "Deployment") + kinds(docs, "Job"):
        pod = d["spec"]["template"]["spec"]
        for c in pod["containers"]:
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    referenced.add(("ConfigMap", source["configMapRef"]["name"]))
                if "secretRef" in source:
                    referenced.add(("Secret", source["secretRef"]["name"]))
            for item in c.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add(("Secret", ref["name"]))
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                referenced.add(("ConfigMap", volume["configMap"]["name"]))
            if "secret" in volume:
                referenced.add(("Secret", volume["secret"]["secretName"]))
    # cert-manager writes each Certificate's Secret.
    present |= {("Secret", c["spec"]["secretName"]) for c in kinds(docs, "Certificate")}
    missing = referenced - present
    if overlay == "dev":
        assert not missing  # dev is self-contained
    elif overlay == "gpu-plain-secrets":
        assert not kinds(docs, "Certificate") and missing <= EXTERNAL | EXTERNAL_WITHOUT_CERT_MANAGER, missing
    else:
        assert missing <= EXTERNAL, missing


def test_settings_keys_are_ones_the_code_reads(rendered):
    """A typo in a ConfigMap key is silently ignored by the process; catch it here."""
    read = {s.env for s in settings.SETTINGS.values()}
    for path in [*ROOT.glob("unclip/**/*.py"), *ROOT.glob("services/**/*.py")]:
        read.update(re.findall(r"\"(UNCLIP_[A-Z0-9_]+)\"", path.read_text()))
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        keys = set(settings_data(docs))
        for d in kinds(docs, "Deployment"):
            keys.update(item["name"] for item in container(d).get("env", []))
        unclip_keys = {k for k in keys if k.startswith("UNCLIP_")}
        unknown = unclip_keys - read - NOT_YET_READ
        assert not unknown, f"{overlay}: set but read by nothing: {sorted(unknown)}"


def test_policy_configmap_is_a_valid_policy(rendered, tmp_path):
    from services.safety.policy import load_policy

    for overlay in OVERLAYS:
        [cm] = [d for d in kinds(rendered[overlay], "ConfigMap") if d["metadata"]["name"] == "unclip-policy"]
        text = cm["data"]["policy.yaml"]
        # The cluster policy may differ from the local default (k8s/base/policy.yaml is its own file), but it
        # must load with the safety service's own loader, which refuses a bad policy.
        path = tmp_path / f"{overlay}.yaml"
        path.write_text(text)
        policy = load_policy(str(path))  # the safety service's own loader: raises on a bad policy
        assert policy.version == yaml.safe_load(text)["version"]
