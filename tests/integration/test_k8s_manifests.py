"""The Kubernetes manifests (deploy/k8s) render with ``kubectl kustomize`` for every overlay and
validate offline against the Kubernetes schemas of the pinned version (``kubernetes-validate``,
strict: unknown fields are errors). KEDA's objects are custom resources without a schema there:
their references are checked instead (the Deployment they scale, the queue, the Secret)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dicom_node.config import Settings
from tests.conftest import REPO

pytestmark = pytest.mark.integration

K8S = REPO / "deploy" / "k8s"
#: The Kubernetes version the manifests are validated against.
KUBERNETES_VERSION = "1.32.0"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
#: Custom resources (KEDA): no schema in kubernetes-validate.
CUSTOM = {"ScaledObject", "TriggerAuthentication"}
#: The environment variables that carry credentials: always from the Secret, never a literal.
CREDENTIALS = (
    "NODULEAI_DB_URL",
    "NODULEAI_AMQP_URL",
    "NODULEAI_DASHBOARD_TOKEN",
    "NODULEAI_SPOOL_TOKEN",
)


def render(overlay: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize <overlay>`` as a list of objects."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl (1.22 or later, with kustomize) is not installed")
        pytest.skip("kubectl is not installed")
    done = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet")
    }


def test_overlays_exist() -> None:
    assert OVERLAYS == ["cpu", "cpu-hpa", "gpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    objects = render(K8S / "overlays" / overlay)
    kinds = sorted(o["kind"] for o in objects)
    assert {"StatefulSet", "Deployment", "NetworkPolicy", "PodDisruptionBudget"} <= set(kinds)
    for obj in objects:
        if obj["kind"] in CUSTOM:
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        assert obj["metadata"].get("namespace") == "noduleai", obj["metadata"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_non_root_read_only_probed_and_take_credentials_from_secrets(overlay: str) -> None:
    objects = render(K8S / "overlays" / overlay)
    pods = _pod_specs(objects)
    assert set(pods) == {"noduleai-node", "noduleai-worker"}
    for name, pod in pods.items():
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        (container,) = pod["containers"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert "livenessProbe" in container, name
        for env in container["env"]:
            # every credential from a Secret, never a literal
            if env["name"] in CREDENTIALS:
                assert env["valueFrom"]["secretKeyRef"]["name"] == "noduleai-credentials"
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/var/lib/noduleai", "/etc/noduleai", "/tmp"} <= mounts
    node = pods["noduleai-node"]["containers"][0]
    assert node["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert node["livenessProbe"]["httpGet"]["path"] == "/healthz"
    worker = pods["noduleai-worker"]["containers"][0]
    assert "noduleai-worker-healthcheck" in " ".join(worker["livenessProbe"]["exec"]["command"])
    config = {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
    volumes = {v["name"]: v for v in pods["noduleai-node"]["volumes"]}
    assert volumes["config"]["secret"]["secretName"] in config
    gpu = worker.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    assert (gpu == 1) == (overlay == "gpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_mount_nothing_of_the_node_and_reach_its_spool_over_http(overlay: str) -> None:
    objects = render(K8S / "overlays" / overlay)
    pods = _pod_specs(objects)
    worker = pods["noduleai-worker"]
    assert not [v for v in worker["volumes"] if "persistentVolumeClaim" in v]
    env = {e["name"]: e for e in worker["containers"][0]["env"]}
    node_service = next(
        o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "noduleai-node"
    )
    (http,) = node_service["spec"]["ports"]
    assert env["NODULEAI_SPOOL_URL"]["value"] == f"http://noduleai-node:{http['port']}"
    node_env = {e["name"]: e for e in pods["noduleai-node"]["containers"][0]["env"]}
    token = env["NODULEAI_SPOOL_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == node_env["NODULEAI_SPOOL_TOKEN"]["valueFrom"]["secretKeyRef"]
    node = next(o for o in objects if o["kind"] == "StatefulSet")
    (claim,) = node["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    policy = next(
        o
        for o in objects
        if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "noduleai-node"
    )
    admitted = [
        rule
        for rule in policy["spec"]["ingress"]
        if {"protocol": "TCP", "port": http["port"]} in rule["ports"]
        and any(
            peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
            == "noduleai-worker"
            for peer in rule["from"]
        )
    ]
    assert admitted, "the workers cannot reach the node's HTTP port"


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_keda_scales_the_worker_deployment_on_the_job_queue(overlay: str) -> None:
    objects = render(K8S / "overlays" / overlay)
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    scaled = by_kind[("ScaledObject", "noduleai-worker")]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert ("Deployment", scaled["spec"]["scaleTargetRef"]["name"]) in by_kind
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == Settings.model_fields["amqp_queue"].default
    auth = by_kind[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
    (ref,) = auth["spec"]["secretTargetRef"]
    assert (ref["parameter"], ref["name"], ref["key"]) == (
        "host",
        "noduleai-credentials",
        "amqp-url",
    )


def test_the_validation_catches_a_wrong_field() -> None:
    objects = render(K8S / "overlays" / "cpu")
    worker = next(o for o in objects if o["kind"] == "Deployment")
    worker["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRoot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, KUBERNETES_VERSION, strict=True)
