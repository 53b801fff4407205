"""The Kubernetes manifests under deploy/: schema-valid, policy-clean, and saying what the README
says."""

from __future__ import annotations

import json
import shutil
import subprocess
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from bot.core.observability import Metrics
from bot.core.settings import Settings
from bot.jobs.shutdown import TERMINATION_MARGIN_S
from tests.deploy.manifests import (
    DEPLOY_DIR,
    OVERLAYS,
    Manifest,
    all_containers,
    env_of,
    kubectl,
    of_kind,
    one,
    pod_specs,
    render,
    render_text,
)

pytestmark = pytest.mark.skipif(
    kubectl() is None, reason="kubectl (with its built-in kustomize) is not installed"
)

API = "deksdenflow-api"
WORKER = "deksdenflow-worker"
SECRET_DIR = "/var/run/secrets/deksdenflow"
KEDA_SCHEMA = Path(__file__).with_name("keda-scaledobject-v1alpha1.schema.json")
CHECKOV_CANDIDATES = (
    Path(__file__).resolve().parents[2] / ".venv-checkov" / "bin" / "checkov",
    Path(shutil.which("checkov") or "/nonexistent"),
)


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def objects(overlay: str) -> list[Manifest]:
    return render(overlay)


def _secret_setting_names() -> set[str]:
    """DEKSDENFLOW_<NAME> of every setting that is a secret or may carry a password."""
    names = {"DEKSDENFLOW_DB_URL", "DEKSDENFLOW_REDIS_URL"}
    for name, info in Settings.model_fields.items():
        if info.annotation is SecretStr or SecretStr in typing.get_args(info.annotation):
            names.add(f"DEKSDENFLOW_{name.upper()}")
    return names


# --- schemas -------------------------------------------------------------------------------


def test_every_object_is_valid_for_the_current_kubernetes(objects: list[Manifest]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate import utils

    version = utils.latest_version()
    assert tuple(int(p) for p in version.split(".")[:2]) >= (1, 33)
    seen = set()
    for obj in objects:
        seen.add(obj["kind"])
        if obj["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked against KEDA's schema below
        # strict: an unknown field anywhere is an error, not silently dropped by the API server
        kubernetes_validate.validate(obj, version, strict=True)
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= seen
    assert {"NetworkPolicy", "ConfigMap", "ServiceAccount", "ScaledObject"} <= seen


def test_the_scaled_object_is_valid_for_keda(objects: list[Manifest]) -> None:
    import jsonschema

    schema = json.loads(KEDA_SCHEMA.read_text())
    for obj in of_kind(objects, "ScaledObject"):
        jsonschema.validate(obj, schema)


def test_no_persistent_storage_and_no_secret_objects(objects: list[Manifest]) -> None:
    kinds = {o["kind"] for o in objects}
    # stateless workers; secrets are created by the operator, never rendered from the repo
    assert not kinds & {"PersistentVolume", "PersistentVolumeClaim", "StatefulSet", "Secret"}


# --- policy --------------------------------------------------------------------------------


def _checkov() -> Path | None:
    return next((p for p in CHECKOV_CANDIDATES if p.is_file()), None)


def test_policy_check_has_no_failures(overlay: str, tmp_path: Path) -> None:
    checkov = _checkov()
    if checkov is None:
        pytest.skip("checkov is not installed (`make checkov` puts it in .venv-checkov)")
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(render_text(overlay))
    argv = [str(checkov), "-f", str(rendered), "--framework", "kubernetes", "--skip-download",
            "--output", "json"]  # fmt: skip
    # without a network of its own checkov cannot phone home even if a future version tries
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        argv = [unshare, "-n", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [c for r in reports for c in r["results"]["failed_checks"]]
    assert not failed, [(c["check_id"], c["resource"]) for c in failed]
    passed = sum(r["summary"]["passed"] for r in reports)
    assert passed > 100  # it really looked at the objects
    assert sum(r["summary"]["parsing_errors"] for r in reports) == 0
    # every waiver says why, in the manifest next to the object it excuses
    for r in reports:
        for check in r["results"]["skipped_checks"]:
            reason = (check.get("check_result") or {}).get("suppress_comment") or ""
            assert len(reason) > 20, check["check_id"]
            assert check["check_id"] in {"CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_43"}


# --- what the README promises -------------------------------------------------------------


def test_pods_run_restricted(objects: list[Manifest]) -> None:
    specs = list(pod_specs(objects))
    assert {name for name, _ in specs} == {API, WORKER}
    for name, pod in specs:
        assert pod["automountServiceAccountToken"] is False, name
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] >= 10000, name
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in all_containers(pod):
            csc = c["securityContext"]
            where = f"{name}/{c['name']}"
            assert csc["readOnlyRootFilesystem"] is True, where
            assert csc["allowPrivilegeEscalation"] is False, where
            assert csc["capabilities"] == {"drop": ["ALL"]}, where
            assert "limits" in c["resources"] and "requests" in c["resources"], where
    namespace = one(objects, "Namespace", "deksdenflow")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_api_probes_and_port(objects: list[Manifest]) -> None:
    pod = one(objects, "Deployment", API)["spec"]["template"]["spec"]
    (api,) = pod["containers"]
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert api["args"][:1] == ["serve"]
    service = one(objects, "Service", API)
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    hpa = one(objects, "HorizontalPodAutoscaler", API)
    assert hpa["spec"]["scaleTargetRef"]["name"] == API
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_migration_runs_before_both(objects: list[Manifest]) -> None:
    for name in (API, WORKER):
        pod = one(objects, "Deployment", name)["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        assert init["args"] == ["migrate"], name
        assert init["image"] == pod["containers"][0]["image"], name


def test_secrets_only_as_mounted_files(objects: list[Manifest]) -> None:
    secret_names = _secret_setting_names() | {"CODEX_API_KEY"}
    for config in of_kind(objects, "ConfigMap"):
        assert not set(config["data"]) & secret_names, config["metadata"]["name"]
    for name, pod in pod_specs(objects):
        volumes = {v["name"]: v for v in pod["volumes"]}
        secret_volumes = {k: v for k, v in volumes.items() if "secret" in v}
        assert secret_volumes, name
        for c in all_containers(pod):
            env = env_of(c)
            assert not env.keys() & secret_names, f"{name}/{c['name']} has a secret in env"
            for e in env.values():
                assert "secretKeyRef" not in e.get("valueFrom", {}), e["name"]
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            for var, e in env.items():
                if not var.endswith("_FILE"):
                    continue
                assert var[: -len("_FILE")] in secret_names, var
                directory, _, key = e["value"].rpartition("/")
                mount = mounts[directory]
                assert mount.get("readOnly") is True
                volume = secret_volumes[mount["name"]]
                assert key in {i["path"] for i in volume["secret"]["items"]}, var
        # the API gets no model key; the workers get it
        containers = {c["name"]: env_of(c) for c in pod["containers"]}
        if name == API:
            assert "CODEX_API_KEY_FILE" not in containers["api"]
        else:
            assert "CODEX_API_KEY_FILE" in containers["worker"]
            assert "DEKSDENFLOW_DB_URL_FILE" in containers["worker"]


def test_workers_have_scratch_and_no_state(objects: list[Manifest]) -> None:
    pod = one(objects, "Deployment", WORKER)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert all(set(v) & {"emptyDir", "secret"} for v in volumes.values())
    (worker,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    config = one(objects, "ConfigMap", "deksdenflow-config")["data"]
    for path in (config["DEKSDENFLOW_DATA_DIR"], "/tmp", config["CODEX_HOME"].rsplit("/", 1)[0]):
        assert "emptyDir" in volumes[mounts[path]], path


def test_worker_grace_period_matches_the_shutdown(objects: list[Manifest]) -> None:
    pod = one(objects, "Deployment", WORKER)["spec"]["template"]["spec"]
    config = one(objects, "ConfigMap", "deksdenflow-config")["data"]
    grace = Settings(worker_shutdown_grace_s=float(config["DEKSDENFLOW_WORKER_SHUTDOWN_GRACE_S"]))
    from bot.jobs.shutdown import termination_grace_period_s

    assert pod["terminationGracePeriodSeconds"] == termination_grace_period_s(grace)
    assert pod["terminationGracePeriodSeconds"] - TERMINATION_MARGIN_S > 0


def test_keda_scales_workers_on_queue_demand(objects: list[Manifest], overlay: str) -> None:
    scaled = one(objects, "ScaledObject", WORKER)["spec"]
    assert scaled["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": WORKER,
    }
    worker = one(objects, "Deployment", WORKER)
    assert "replicas" not in worker["spec"]  # KEDA owns it
    if overlay == "dev":
        assert scaled["minReplicaCount"] == 0
    assert scaled["maxReplicaCount"] >= 2
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "metrics-api"
    meta = trigger["metadata"]
    assert meta["format"] == "prometheus"
    # the gauge the API really exports
    assert meta["valueLocation"] == "deksdenflow_queue_demand"
    assert Metrics().registry.get_sample_value("deksdenflow_queue_demand") is not None
    namespace = worker["metadata"]["namespace"]
    assert meta["url"] == f"http://{API}.{namespace}.svc.cluster.local:8000/metrics"
    # one worker pod per DEKSDENFLOW_WORKER_MAX_JOBS jobs
    config = one(objects, "ConfigMap", "deksdenflow-config")["data"]
    assert meta["targetValue"] == config["DEKSDENFLOW_WORKER_MAX_JOBS"]
    assert trigger["metricType"] == "AverageValue"


def test_disruption_budgets_cover_both(objects: list[Manifest]) -> None:
    for name in (API, WORKER):
        pdb = one(objects, "PodDisruptionBudget", name)
        labels = one(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def _rules(policy: Manifest, direction: str) -> list[dict[str, Any]]:
    return list(policy["spec"].get(direction, []))


def test_network_policies(objects: list[Manifest]) -> None:
    policies = {p["metadata"]["name"]: p for p in of_kind(objects, "NetworkPolicy")}
    deny = policies["deksdenflow-default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny

    # only the API has an ingress rule, on its port only
    ingress = [p for p in policies.values() if _rules(p, "ingress")]
    assert [p["metadata"]["name"] for p in ingress] == ["deksdenflow-api-ingress"]
    (rule,) = _rules(ingress[0], "ingress")
    assert rule["ports"] == [{"port": 8000, "protocol": "TCP"}]

    worker = policies["deksdenflow-worker-egress"]
    assert worker["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    ports = {(p["port"], p["protocol"]) for r in _rules(worker, "egress") for p in r["ports"]}
    # DNS, Postgres, Redis, HTTPS (forge + model API): nothing else
    assert ports == {(53, "UDP"), (53, "TCP"), (5432, "TCP"), (6379, "TCP"), (443, "TCP")}
    for r in _rules(worker, "egress"):
        assert r.get("to"), "an egress rule without `to` would allow every address"
        for peer in r["to"]:
            block = peer.get("ipBlock")
            if block and block["cidr"] == "0.0.0.0/0":
                # HTTPS to the outside only: no cluster, private or metadata addresses
                assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(
                    block["except"]
                )
                assert [p["port"] for p in r["ports"]] == [443]


def test_readme_documents_the_overlays() -> None:
    readme = (DEPLOY_DIR / "README.md").read_text()
    for needle in ("kubectl apply -k", "KEDA", "ZCARD", "migrat", "NetworkPolic", "per core"):
        assert needle in readme, needle
