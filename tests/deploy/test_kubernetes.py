"""deploy/kubernetes, rendered by kustomize and checked offline: every core resource against the
Kubernetes API's own schemas (kubernetes-validate, strict: unknown fields refused), KEDA's
resources against our schema of KEDA's documented spec, and the cross-checks no schema makes
(references resolve, worker groups cover the registry, settings are real and accepted, ports and
grace periods agree). Nothing here talks to a cluster: see deploy/README.md for what is unverified."""

from __future__ import annotations

import base64
import json
import math
import os
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest

from fluxserve.config import Settings
from fluxserve.models import DEFAULT_REGISTRY
from tests.deploy.manifests import (
    KUSTOMIZATIONS,
    OTHER_VARIABLES,
    by_kind,
    container,
    known_settings,
    pod_spec,
)

# The oldest and newest Kubernetes minor versions the manifests are checked against (schemas
# shipped in kubernetes-validate 1.37.0): nothing newer than 1.30 is used.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
SCHEMAS = Path(__file__).parent / "schemas"
KEDA_SCHEMAS = {
    "ScaledObject": SCHEMAS / "keda-scaledobject.schema.json",
    "TriggerAuthentication": SCHEMAS / "keda-triggerauthentication.schema.json",
}
WORKERS = ("worker-klein", "worker-flux")
# A stopping worker finishes or releases its job within FLUXSERVE_SHUTDOWN_GRACE_SECONDS, then
# still stores the finished images and updates the job: Kubernetes must wait at least this long more.
FINISH_MARGIN_SECONDS = 30


def settings_of(resources: list[dict]) -> dict[str, str]:
    """The fluxserve settings every pod gets (the ConfigMap's data)."""
    (config,) = by_kind(resources, "ConfigMap").values()
    return config["data"]


def secret_values(resources: list[dict]) -> dict[str, str]:
    (secret,) = by_kind(resources, "Secret").values()
    return {key: base64.b64decode(value).decode() for key, value in secret.get("data", {}).items()}


def keda_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads(KEDA_SCHEMAS[kind].read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


# -- the resources there are ---------------------------------------------------------------------


def test_the_example_overlay_renders_every_piece(example):
    kinds = sorted((item["kind"], item["metadata"]["name"].rsplit("-", 1)[0] if item["kind"] in ("ConfigMap", "Secret")
                    else item["metadata"]["name"]) for item in example)
    assert kinds == sorted([
        ("Namespace", "fluxserve"), ("ConfigMap", "fluxserve-settings"), ("Secret", "fluxserve-secrets"),
        ("Deployment", "api"), ("Service", "api"), ("PodDisruptionBudget", "api"),
        ("Deployment", "worker-klein"), ("PodDisruptionBudget", "worker-klein"), ("ScaledObject", "worker-klein"),
        ("Deployment", "worker-flux"), ("PodDisruptionBudget", "worker-flux"), ("ScaledObject", "worker-flux"),
        ("TriggerAuthentication", "fluxserve-postgres"),
        ("ServiceAccount", "fluxserve-worker"), ("Role", "fluxserve-worker-pod-deletion-cost"),
        ("RoleBinding", "fluxserve-worker-pod-deletion-cost"),
    ])
    assert {item["metadata"].get("namespace") for item in example if item["kind"] != "Namespace"} == {"fluxserve"}
    images = {c["image"] for d in by_kind(example, "Deployment").values() for c in pod_spec(d)["containers"]}
    assert images == {"registry.example.com/fluxserve:0.1.0"}, "one image for every role, as the overlay names it"


# -- schemas ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_core_resources_validate_against_the_kubernetes_schemas(rendered, kustomization, version):
    checked = 0
    for resource in rendered[kustomization]:
        if resource["apiVersion"].startswith("keda.sh/"):
            continue  # a custom resource: our KEDA schema below
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{resource['kind']}/{resource['metadata']['name']} ({kustomization}, Kubernetes {version}): {where}: {exc.message}")
        checked += 1
    assert checked >= 7


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_keda_resources_validate_against_our_keda_schema(rendered, kustomization):
    keda = [item for item in rendered[kustomization] if item["apiVersion"].startswith("keda.sh/")]
    assert sorted(item["kind"] for item in keda) == ["ScaledObject", "ScaledObject", "TriggerAuthentication"]
    for resource in keda:
        errors = sorted(keda_validator(resource["kind"]).iter_errors(resource), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{resource['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("mistake", [
    "unquoted number in trigger metadata", "no query", "unknown spec field", "misspelt scaler field",
    "bad policy type", "bad target name",
])
def test_our_keda_schema_refuses_the_usual_mistakes(example, mistake):
    scaled = json.loads(json.dumps(by_kind(example, "ScaledObject")["worker-flux"]))
    trigger = scaled["spec"]["triggers"][0]
    if mistake == "unquoted number in trigger metadata":
        trigger["metadata"]["targetQueryValue"] = 1
    elif mistake == "no query":
        del trigger["metadata"]["query"]
    elif mistake == "unknown spec field":
        scaled["spec"]["minReplicas"] = 1  # the HPA's name, not KEDA's
    elif mistake == "misspelt scaler field":
        trigger["metadata"]["targetValue"] = "1"
    elif mistake == "bad policy type":
        scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["policies"][0]["type"] = "pods"
    elif mistake == "bad target name":
        scaled["spec"]["scaleTargetRef"]["name"] = "Worker_Flux"
    assert list(keda_validator("ScaledObject").iter_errors(scaled)), mistake


def test_scaled_objects_follow_kedas_admission_rules(example):
    """What KEDA's webhook checks beyond the schema: min <= max, idle < min; and the postgresql
    scaler's: a target above 0, a connection (here: from the TriggerAuthentication)."""
    for name, scaled in by_kind(example, "ScaledObject").items():
        spec = scaled["spec"]
        low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        assert 0 <= low <= high, name
        if "idleReplicaCount" in spec:
            assert spec["idleReplicaCount"] < low, name
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "postgresql"
        assert float(trigger["metadata"]["targetQueryValue"]) > 0
        assert "host" not in trigger["metadata"] and "connectionFromEnv" not in trigger["metadata"]
        assert trigger["authenticationRef"]["name"] in by_kind(example, "TriggerAuthentication"), name


# -- references ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_selectors_match_their_pods(rendered, kustomization):
    resources = rendered[kustomization]
    deployments = by_kind(resources, "Deployment")
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}

    def selects(selector: dict, labels: dict) -> bool:
        return all(labels.get(key) == value for key, value in selector.items())

    for name, deployment in deployments.items():
        assert selects(deployment["spec"]["selector"]["matchLabels"], pods[name]), name
    for name, service in by_kind(resources, "Service").items():
        assert [d for d, labels in pods.items() if selects(service["spec"]["selector"], labels)] == ["api"], name
    for name, budget in by_kind(resources, "PodDisruptionBudget").items():
        assert [d for d, labels in pods.items() if selects(budget["spec"]["selector"]["matchLabels"], labels)] == [name]


def test_every_reference_resolves_in_the_example(example):
    config_maps, secrets = by_kind(example, "ConfigMap"), by_kind(example, "Secret")
    for name, deployment in by_kind(example, "Deployment").items():
        for source in container(deployment).get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in config_maps, name
            if "secretRef" in source:
                assert source["secretRef"]["name"] in secrets, name
    for name, scaled in by_kind(example, "ScaledObject").items():
        target = scaled["spec"]["scaleTargetRef"]
        assert (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment")) == ("apps/v1", "Deployment")
        assert target["name"] == name and name in by_kind(example, "Deployment")
    (auth,) = by_kind(example, "TriggerAuthentication").values()
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "connection"  # the postgresql scaler's connection string
    assert ref["name"] in secrets and ref["key"] in secrets[ref["name"]]["data"]
    assert ref["key"] == "FLUXSERVE_DATABASE_URL"


def test_kedas_connection_is_a_url_both_fluxserve_and_keda_read(example):
    """KEDA's scaler hands the string to pgx: a plain postgresql:// URL (SQLAlchemy's
    postgresql+psycopg:// would not parse there); fluxserve maps plain URLs to psycopg itself."""
    url = secret_values(example)["FLUXSERVE_DATABASE_URL"]
    assert re.match(r"postgres(ql)?://[^@/]+@[^/]+/\w+", url), url
    assert ".svc.cluster.local" in url, "KEDA's operator resolves the host from its own namespace"


# -- worker groups -------------------------------------------------------------------------------


def worker_models(deployment: dict) -> list[str]:
    env = {item["name"]: item.get("value") for item in container(deployment).get("env", [])}
    return env["FLUXSERVE_WORKER_MODELS"].split(",")


def query_models(scaled: dict) -> list[str]:
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    (listed,) = re.findall(r"model IN \(([^)]*)\)", query)
    return [item.strip().strip("'") for item in listed.split(",")]


def test_worker_groups_split_the_registry(example):
    """Each group names registry models (canonical names: what the jobs table's `model` holds),
    no model is in two groups, and every model has a group (else its jobs would wait forever)."""
    groups = {name: worker_models(d) for name, d in by_kind(example, "Deployment").items() if name != "api"}
    assert sorted(groups) == sorted(WORKERS)
    seen: list[str] = []
    for name, models in groups.items():
        unknown = [model for model in models if model not in DEFAULT_REGISTRY]
        assert not unknown, f"{name}: not registry names: {unknown}"
        seen += models
    assert len(seen) == len(set(seen)), f"a model in two groups: {seen}"
    assert sorted(seen) == sorted(DEFAULT_REGISTRY)


def test_each_scaled_object_counts_its_own_groups_models(example):
    deployments = by_kind(example, "Deployment")
    for name, scaled in by_kind(example, "ScaledObject").items():
        assert query_models(scaled) == worker_models(deployments[name]), name


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_variable_is_a_real_setting(rendered, kustomization):
    resources = rendered[kustomization]
    names = set(settings_of(resources))
    for secret in by_kind(resources, "Secret").values():
        names |= set(secret.get("data", {}))
    for deployment in by_kind(resources, "Deployment").values():
        names |= {item["name"] for item in container(deployment).get("env", [])}
    unknown = sorted(name for name in names if name not in known_settings() | OTHER_VARIABLES)
    assert not unknown, f"not fluxserve settings (typo?): {unknown}"


@pytest.mark.parametrize("deployment", ["api", *WORKERS])
def test_fluxserve_accepts_the_settings_each_pod_gets(example, deployment, monkeypatch):
    """The ConfigMap, the example Secret and the pod's own env, through fluxserve's own checks."""
    for name in list(os.environ):
        if name.startswith("FLUXSERVE_"):
            monkeypatch.delenv(name)
    env = {**settings_of(example), **secret_values(example)}
    env.update({item["name"]: item["value"] if "value" in item else downward_api(example, deployment, item)
                for item in container(by_kind(example, "Deployment")[deployment]).get("env", [])})
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.database_url and settings.database_url.startswith("postgresql://")
    assert settings.s3_default_details() is not None
    assert settings.secret_key and settings.public_base_url and settings.models == "real"


def downward_api(resources: list[dict], deployment: str, item: dict) -> str:
    """What the kubelet puts in an env entry's ``valueFrom.fieldRef``: a pod name as a ReplicaSet
    makes it, or the namespace."""
    path = item["valueFrom"]["fieldRef"]["fieldPath"]
    values = {"metadata.name": f"{deployment}-7d9c5b8f6d-x2k7q",
              "metadata.namespace": by_kind(resources, "Deployment")[deployment]["metadata"].get("namespace", "default")}
    assert path in values, f"{deployment}: {item['name']} from {path}: not a field this test knows"
    return values[path]


def test_worker_pods_may_patch_their_own_deletion_cost(example):
    """Each worker pod knows its name and namespace (downward API), runs as the workers'
    ServiceAccount with its token mounted, and that account is bound to a Role allowing get and
    patch on pods in the pod's namespace: what ``fluxserve.pod_cost`` needs. The API pods get none of it."""
    deployments = by_kind(example, "Deployment")
    accounts, roles, bindings = (by_kind(example, kind) for kind in ("ServiceAccount", "Role", "RoleBinding"))
    for name in WORKERS:
        deployment, spec = deployments[name], pod_spec(deployments[name])
        fields = {item["name"]: item["valueFrom"]["fieldRef"]["fieldPath"]
                  for item in container(deployment)["env"] if "valueFrom" in item}
        assert fields == {"FLUXSERVE_POD_NAME": "metadata.name", "FLUXSERVE_POD_NAMESPACE": "metadata.namespace"}, name
        account = spec["serviceAccountName"]
        assert account in accounts, name
        assert spec.get("automountServiceAccountToken", True) and accounts[account].get("automountServiceAccountToken", True)
        namespace = deployment["metadata"]["namespace"]
        allowed: set[str] = set()
        for binding in bindings.values():
            if binding["metadata"]["namespace"] != namespace:
                continue
            if not any(s["kind"] == "ServiceAccount" and s["name"] == account and s.get("namespace", namespace) == namespace
                       for s in binding["subjects"]):
                continue
            assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                          "name": binding["roleRef"]["name"]}
            role = roles[binding["roleRef"]["name"]]
            assert role["metadata"]["namespace"] == namespace
            for rule in role["rules"]:
                if "" in rule["apiGroups"] and "pods" in rule["resources"]:
                    allowed |= set(rule["verbs"])
        assert {"get", "patch"} <= allowed, f"{name}: its account may only {sorted(allowed)} pods"
    api = pod_spec(deployments["api"])
    assert "serviceAccountName" not in api and not any(item["name"].startswith("FLUXSERVE_POD_")
                                                        for item in container(deployments["api"]).get("env", []))


def test_the_overlay_sets_the_public_url(example):
    assert settings_of(example)["FLUXSERVE_PUBLIC_BASE_URL"] == "https://images.example.com"


# -- ports, probes, GPUs, grace ------------------------------------------------------------------


def named_ports(deployment: dict) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container(deployment)["ports"]}


def probe_ports(deployment: dict) -> list:
    c = container(deployment)
    return [next(iter(probe[kind]["port"] for kind in ("httpGet", "tcpSocket") if kind in probe))
            for probe in (c.get(name) for name in ("startupProbe", "readinessProbe", "livenessProbe")) if probe]


def test_ports_agree_everywhere(example):
    settings, deployments = settings_of(example), by_kind(example, "Deployment")
    api = deployments["api"]
    assert named_ports(api) == {"http": int(settings["FLUXSERVE_PORT"])}
    assert container(api)["args"] == ["serve", "--no-worker"]
    (service,) = by_kind(example, "Service").values()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    for name in WORKERS:
        assert named_ports(deployments[name]) == {"metrics": int(settings["FLUXSERVE_WORKER_PORT"])}, name
        assert container(deployments[name])["args"] == ["worker", "--gpus", "all"]
    for name, deployment in deployments.items():
        ports = named_ports(deployment)
        assert probe_ports(deployment) and all(port in ports for port in probe_ports(deployment)), name
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) in ports.values(), name
        readiness = container(deployment)["readinessProbe"]["httpGet"]
        assert readiness["path"] == "/health", name
        assert "tcpSocket" in container(deployment)["livenessProbe"], f"{name}: liveness must not depend on the database"


def test_gpus_go_to_workers_only_and_keda_owns_their_count(example):
    deployments = by_kind(example, "Deployment")
    for name, deployment in deployments.items():
        resources = container(deployment)["resources"]
        if name == "api":
            assert "nvidia.com/gpu" not in resources.get("limits", {})
            assert deployment["spec"]["replicas"] == 2
            continue
        assert resources["limits"]["nvidia.com/gpu"] == 1, name
        assert resources["requests"]["nvidia.com/gpu"] == 1, name
        assert "replicas" not in deployment["spec"], f"{name}: a replica count would fight KEDA on every apply"
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod_spec(deployment)["tolerations"])


def test_grace_periods_outlast_a_draining_worker(example):
    grace = float(settings_of(example)["FLUXSERVE_SHUTDOWN_GRACE_SECONDS"])
    deployments = by_kind(example, "Deployment")
    for name in WORKERS:
        assert pod_spec(deployments[name])["terminationGracePeriodSeconds"] >= grace + FINISH_MARGIN_SECONDS, name
    api = deployments["api"]
    pre_stop = float(container(api)["lifecycle"]["preStop"]["exec"]["command"][1])
    wait = float(settings_of(example)["FLUXSERVE_SYNC_WAIT_SECONDS"])
    assert pod_spec(api)["terminationGracePeriodSeconds"] > pre_stop + wait


def test_scale_down_is_gradual_and_the_metric_is_the_worker_count(example):
    for name, scaled in by_kind(example, "ScaledObject").items():
        behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 60, name
        assert all(p["type"] == "Pods" and p["value"] == 1 for p in behavior["scaleDown"]["policies"]), name
        metadata = scaled["spec"]["triggers"][0]["metadata"]
        # the query returns the number of workers wanted; AverageValue 1 makes it the replica count
        assert metadata["targetQueryValue"] == "1" and scaled["spec"]["triggers"][0].get("metricType", "AverageValue") == "AverageValue"
        assert math.isclose(float(metadata["activationTargetQueryValue"]), 0.0)


def test_the_readme_shows_the_query_that_is_deployed(example):
    readme = (Path(__file__).parents[2] / "deploy" / "README.md").read_text()
    (shown,) = re.findall(r"```sql\n(.*?)```", readme, flags=re.S)
    deployed = by_kind(example, "ScaledObject")["worker-klein"]["spec"]["triggers"][0]["metadata"]["query"]
    assert " ".join(shown.split()) == " ".join(deployed.split())
