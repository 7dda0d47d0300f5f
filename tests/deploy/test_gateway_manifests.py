"""k8s/overlays/gpu-gateway (the gpu overlay + components/gateway): every object validates, and the gateway's
Deployment, Service, PDB, HPA on request rate, NetworkPolicies (clients -> gateway -> orchestrator) and the
example Ingress agree with each other and with the code."""

from __future__ import annotations

import subprocess

import kubernetes_validate
import pytest
import yaml

from services.gateway.app import REQUESTS
from tests.deploy.test_manifests import (
    K8S_VERSIONS,
    ROOT,
    by_name,
    container,
    env_of,
    kinds,
    selector_matches,
)
from unclip.runtime import settings


@pytest.fixture(scope="module")
def docs(kubectl) -> list[dict]:
    proc = subprocess.run(
        [str(kubectl), "kustomize", str(ROOT / "k8s" / "overlays" / "gpu-gateway")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def test_every_object_validates(docs):
    for doc in docs:
        if doc["apiVersion"].startswith(("keda.sh/", "cert-manager.io/")):
            continue  # custom resources: test_manifests / test_access_manifests check the gpu overlay's
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    assert all(d["metadata"].get("namespace") == "unclip" for d in docs if d["kind"] != "Namespace")


def test_gateway_deployment_service_and_budget(docs):
    gateway = by_name(docs, "Deployment")["unclip-gateway"]
    c = container(gateway)
    assert c["image"] == "unclip-gateway:0.1.0-cpu"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": settings.DEFAULT_PORTS["gateway"], "metrics": 9464}
    env = env_of(gateway, docs)
    assert int(env["UNCLIP_PORT"]) == ports["http"]
    assert (
        env["UNCLIP_ORCHESTRATOR_ADDR"]
        == f"dns:///unclip-orchestrator:{settings.DEFAULT_PORTS['orchestrator']}"
    )
    known = {s.env for s in settings.SETTINGS.values()}
    assert {e["name"] for e in c["env"]} <= known
    assert (
        c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    )
    pod = gateway["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > c["lifecycle"]["preStop"]["sleep"]["seconds"] + float(
        env["UNCLIP_GRACE_SECONDS"]
    )
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    service = by_name(docs, "Service")["unclip-gateway"]
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, labels)
    [budget] = [
        b for b in kinds(docs, "PodDisruptionBudget") if selector_matches(b["spec"]["selector"], labels)
    ]
    assert budget["spec"]["maxUnavailable"] == 1


def test_hpa_scales_the_gateway_on_request_rate(docs):
    [hpa] = [h for h in kinds(docs, "HorizontalPodAutoscaler")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "unclip-gateway" and hpa["spec"]["minReplicas"] >= 2
    [metric] = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "unclip_gateway_requests_per_second"
    exported = {family.name for family in REQUESTS.collect()}
    assert "unclip_gateway_requests" in exported  # the counter the adapter's rate() reads (…_total)
    # KEDA scales the stages; nothing else targets the gateway.
    assert "unclip-gateway" not in {s["spec"]["scaleTargetRef"]["name"] for s in kinds(docs, "ScaledObject")}


def test_network_path_clients_gateway_orchestrator(docs):
    deployments = by_name(docs, "Deployment")
    policies = by_name(docs, "NetworkPolicy")
    gateway_labels = deployments["unclip-gateway"]["spec"]["template"]["metadata"]["labels"]
    orchestrator_labels = deployments["unclip-orchestrator"]["spec"]["template"]["metadata"]["labels"]
    # The gateway may call the orchestrator's gRPC port, and only it.
    egress = policies["unclip-gateway-egress"]["spec"]["egress"]
    assert [rule["ports"][0]["port"] for rule in egress] == [settings.DEFAULT_PORTS["orchestrator"]]
    assert all(selector_matches(peer["podSelector"], orchestrator_labels) for peer in egress[0]["to"])
    # The orchestrator's ingress policy admits the gateway's pods.
    [rule] = policies["unclip-orchestrator-ingress"]["spec"]["ingress"]
    assert any(selector_matches(peer["podSelector"], gateway_labels) for peer in rule["from"])
    # Clients reach the gateway's HTTP port; stages stay closed to it.
    ingress = policies["unclip-gateway-ingress"]["spec"]
    assert selector_matches(ingress["podSelector"], gateway_labels)
    assert ingress["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}]
    stages = policies["unclip-stages-ingress"]["spec"]["ingress"][0]["from"]
    assert not any(selector_matches(peer["podSelector"], gateway_labels) for peer in stages)


def test_ingress_example_routes_to_the_gateway(docs):
    [ingress] = kinds(docs, "Ingress")
    [path] = ingress["spec"]["rules"][0]["http"]["paths"]
    assert path["backend"]["service"] == {"name": "unclip-gateway", "port": {"name": "http"}}
    size = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert int(size.removesuffix("m")) * 1024 * 1024 >= 2 * settings.SETTINGS["max_upload_bytes"].default
