"""k8s/, validated offline: every overlay (and the base with every component) renders with
`kubectl kustomize`; each resource validates against Kubernetes' schemas, KEDA's objects
against KEDA's documented fields; the FLEET_* names are the settings the code reads; no
pod runs privileged, as root or without limits; and what the manifests say about the
fleet (commands, ports, probes, the backlog route and its JSON) is what the code does."""

from __future__ import annotations

import functools
import json
import os
import re
import urllib.parse
from pathlib import Path
from unittest import mock

import jsonschema
import kubernetes_validate
import pytest
import yaml

from app.factory import create_app
from app.metrics import BacklogCollector
from app.services import Services
from fleet.cli import build_parser
from tasks.celery import PRIORITY_SEP, redis_priority
from tasks.probes import ready_file
from tasks.registry import load_registry
from tasks.settings import Settings
from tests.k8s.conftest import COMBINATIONS, COMPONENTS, K8S, OVERLAYS, ROOT, render_overlay
from tests.k8s.keda_schema import SCALED_OBJECT, semantic_errors

#: The oldest Kubernetes the manifests are for, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", "1.37.0")

#: The longest batch the grace period and the scaling windows must outlast: SDXL, 1024 px,
#: a batch of 8 at 50 steps on an A100, estimated (docs/KUBERNETES.md, "Scale-in loses
#: nothing", says how to size it for your model).
LONGEST_BATCH_S = 60

#: Settings with no place in a cluster's configuration: FLEET_EMBEDDED picks the servers
#: `fleet up` starts on a laptop, `fleet worker` sets FLEET_WORKER_SLOT itself, and
#: FLEET_API_KEY is the key a client (`fleet submit`, `fleet bench load`) sends.
NOT_FOR_A_CLUSTER = {"FLEET_EMBEDDED", "FLEET_WORKER_SLOT", "FLEET_API_KEY"}

SETTINGS = {f"FLEET_{name.upper()}" for name in Settings.model_fields}
FLEET_IMAGES = {"diffusion-fleet-api", "diffusion-fleet-worker"}
WORKLOADS = ("Deployment", "StatefulSet", "Job", "DaemonSet")


def _version() -> str:
    match = re.search(r"^version = (\S+)$", (ROOT / "setup.cfg").read_text(), re.M)
    assert match
    return match[1]


def env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value
    return pairs


SECRETS_EXAMPLE = env_file(K8S / "secrets.example.env")


# -- helpers over rendered resources ------------------------------------------------------
def of_kind(resources, kind: str) -> list[dict]:
    return [r for r in resources if r["kind"] == kind]


def named(resources, kind: str, name: str) -> dict:
    found = [r for r in of_kind(resources, kind) if r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def generated(resources, kind: str, name: str) -> dict | None:
    """A ConfigMap or Secret kustomize generated (its name carries a hash suffix)."""
    found = [r for r in of_kind(resources, kind) if re.fullmatch(rf"{name}(-[a-z0-9]{{10}})?", r["metadata"]["name"])]
    assert len(found) <= 1
    return found[0] if found else None


def fleet_config(resources) -> dict[str, str]:
    config = generated(resources, "ConfigMap", "fleet-config")
    assert config is not None, "every rendering has the fleet-config ConfigMap"
    return config["data"]


def fleet_secrets(resources) -> dict[str, str]:
    """The Secret's keys and values: generated (cpu-dev), else the example you fill in."""
    import base64

    secret = generated(resources, "Secret", "fleet-secrets")
    if secret is None:
        return SECRETS_EXAMPLE
    return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()} | secret.get("stringData", {})


def workloads(resources) -> list[dict]:
    return [r for r in resources if r["kind"] in WORKLOADS]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def fleet_containers(resources) -> list[tuple[dict, dict]]:
    """(workload, container) for every container running one of the fleet's images."""
    return [(w, c) for w in workloads(resources) for c in containers(pod_spec(w)) if image_name(c) in FLEET_IMAGES]


def image_name(container: dict) -> str:
    """The image's name without registry or tag (an overlay may push it anywhere)."""
    return container["image"].rsplit(":", 1)[0].rsplit("/", 1)[-1]


def pod_settings(env: dict[str, str]) -> Settings:
    """Settings as a pod reads them: from its environment (JSON settings decoded, types
    converted), with nothing else of FLEET_* around."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    with mock.patch.dict(os.environ, clean | env, clear=True):
        return Settings()


def settings_of(resources) -> Settings:
    env = {k: v for k, v in (fleet_config(resources) | fleet_secrets(resources)).items() if k.startswith("FLEET_")}
    return pod_settings(env)


def deployment(resources, name: str) -> dict:
    return named(resources, "Deployment", name)


# -- rendering and schemas ------------------------------------------------------------------
def test_every_component_is_rendered():
    """Each component is in an overlay or in one of the tests' combinations, so each is
    rendered and validated here."""
    used = {c for combination in COMBINATIONS.values() for c in combination}
    for overlay in OVERLAYS:
        kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        used |= {Path(c).name for c in kustomization.get("components", [])}
    assert used == set(COMPONENTS)
    assert set(OVERLAYS) >= {"redis", "rabbitmq", "minio", "external", "cpu-dev"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_resources_validate_against_the_kubernetes_schemas(resources, version):
    """Strict: a misspelt or misplaced field fails, not only a wrong type."""
    for resource in resources:
        if not resource["apiVersion"].startswith("keda.sh/"):
            error = _kubernetes_schema_error(json.dumps(resource, sort_keys=True), version)
            assert error is None, f"{resource['kind']}/{resource['metadata']['name']} on {version}: {error}"


@functools.cache
def _kubernetes_schema_error(resource: str, version: str) -> str | None:
    """Each distinct resource once: the renderings share most of theirs."""
    try:
        kubernetes_validate.validate(json.loads(resource), version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{'.'.join(str(p) for p in exc.path)}: {exc.message}"
    return None


def test_keda_objects_have_keda_s_documented_fields(resources):
    for resource in resources:
        if resource["apiVersion"].startswith("keda.sh/"):
            assert resource["kind"] == "ScaledObject", "only ScaledObjects are described by tests/k8s/keda_schema.py"
            jsonschema.validate(resource, SCALED_OBJECT, cls=jsonschema.Draft202012Validator)
            assert semantic_errors(resource) == []


def test_the_keda_schema_catches_mistakes():
    """The schema is strict enough to matter: a typo, a bad value, a missing field fail."""
    good = next(r for r in render_overlay("redis") if r["kind"] == "ScaledObject")
    jsonschema.validate(good, SCALED_OBJECT)
    for mutate in (
        lambda so: so["spec"].update(cooldownPeriods=300),
        lambda so: so["spec"]["triggers"][0]["metadata"].update(valueLocaton="backlog"),
        lambda so: so["spec"]["triggers"][0]["metadata"].pop("targetValue"),
        lambda so: so["spec"]["triggers"][0]["metadata"].update(targetValue="sixteen"),
        lambda so: so["spec"].update(idleReplicaCount=1),
        lambda so: so["spec"]["triggers"][0].update(metricType="Average"),
    ):
        bad = yaml.safe_load(yaml.safe_dump(good))
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, SCALED_OBJECT)


# -- security ------------------------------------------------------------------------------
def test_no_privileged_containers_or_root_users(resources):
    for workload in workloads(resources):
        pod, where = pod_spec(workload), f"{workload['kind']}/{workload['metadata']['name']}"
        assert pod.get("hostNetwork") is not True and pod.get("hostPID") is not True and pod.get("hostIPC") is not True
        assert pod.get("automountServiceAccountToken") is False, f"{where}: no pod here talks to the API server"
        pod_security = pod.get("securityContext", {})
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for container in containers(pod):
            security = pod_security | container.get("securityContext", {})
            what = f"{where} {container['name']}"
            assert security.get("runAsNonRoot") is True, f"{what}: may run as root"
            assert security.get("runAsUser", 0) != 0 and security.get("runAsGroup", 0) != 0, f"{what}: root user"
            assert security.get("privileged") is not True, f"{what}: privileged"
            assert security.get("allowPrivilegeEscalation") is False, f"{what}: may escalate"
            assert security.get("readOnlyRootFilesystem") is True, f"{what}: writable root filesystem"
            assert security.get("capabilities", {}).get("drop") == ["ALL"], f"{what}: keeps capabilities"
            assert not security.get("capabilities", {}).get("add"), f"{what}: adds capabilities"


def test_every_container_has_requests_and_limits(resources):
    for workload in workloads(resources):
        for container in containers(pod_spec(workload)):
            what = f"{workload['kind']}/{workload['metadata']['name']} {container['name']}"
            resources_ = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources_.get(kind, {})), f"{what}: no {kind}"
        for volume in pod_spec(workload).get("volumes", []):
            if "emptyDir" in volume:
                assert "sizeLimit" in volume["emptyDir"], f"{workload['metadata']['name']}: unbounded {volume['name']}"


# -- FLEET_* settings ----------------------------------------------------------------------
def test_manifests_configure_exactly_the_settings_the_code_reads():
    """fleet-config (k8s/base/fleet.env) and the Secret (k8s/secrets.example.env) between
    them set every FLEET_* setting tasks/settings.py reads, once, and nothing else."""
    config = set(env_file(K8S / "base" / "fleet.env"))
    secret = {k for k in SECRETS_EXAMPLE if k.startswith("FLEET_")}
    assert config.isdisjoint(secret), f"set twice: {config & secret}"
    missing, unknown = SETTINGS - NOT_FOR_A_CLUSTER - config - secret, (config | secret) - SETTINGS
    assert not missing and not unknown, f"missing: {sorted(missing)}; unknown: {sorted(unknown)}"
    assert NOT_FOR_A_CLUSTER <= SETTINGS, "a setting this test leaves out no longer exists"


def test_every_fleet_name_in_a_rendering_is_a_setting(resources):
    """In ConfigMaps, Secrets and container environments alike; and the fleet's containers
    take FLEET_* only from fleet-config and the Secret (envFrom), never a literal."""
    for resource in of_kind(resources, "ConfigMap") + of_kind(resources, "Secret"):
        keys = set(resource.get("data", {})) | set(resource.get("stringData", {}))
        unknown = {k for k in keys if k.startswith("FLEET_")} - SETTINGS
        assert not unknown, f"{resource['kind']}/{resource['metadata']['name']}: {unknown} are not settings"
    for workload in workloads(resources):
        for container in containers(pod_spec(workload)):
            literal = {e["name"] for e in container.get("env", []) if e["name"].startswith("FLEET_")}
            assert not literal, f"{workload['metadata']['name']}: FLEET_ set outside fleet-config: {literal}"
    for _, container in fleet_containers(resources):
        sources = {next(iter(s)) for s in container.get("envFrom", [])}
        assert "configMapRef" in sources, container["name"]


def test_the_configuration_is_valid_settings(resources):
    """The fleet's own validation (types, ranges, cross-checks) accepts what the pods get."""
    settings = settings_of(resources)
    assert settings.state_dir == Path("/var/lib/fleet")
    assert settings.api_host == "0.0.0.0", "listen on the pod's address, not its loopback"


# -- references -----------------------------------------------------------------------------
def test_references_resolve(resources):
    """ConfigMaps, Secrets, claims and scale targets named anywhere exist in the rendering,
    except the Secret fleet-secrets where you create it (its keys: secrets.example.env)."""
    names = {(r["kind"], r["metadata"]["name"]) for r in resources}
    secret_generated = generated(resources, "Secret", "fleet-secrets") is not None

    def secret_exists(name: str, key: str | None = None) -> bool:
        if (("Secret", name)) in names:
            return key is None or key in fleet_secrets(resources)
        return not secret_generated and name == "fleet-secrets" and (key is None or key in SECRETS_EXAMPLE)

    for workload in workloads(resources):
        pod, where = pod_spec(workload), workload["metadata"]["name"]
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names, where
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names, where
        volumes = {v["name"] for v in pod.get("volumes", [])} | claims
        for container in containers(pod):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}: mount of missing volume {mount['name']}"
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names, where
                if "secretRef" in source:
                    assert secret_exists(source["secretRef"]["name"]), where
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert secret_exists(ref["name"], ref["key"]), f"{where}: secret key {ref['key']}"
    for autoscaler in of_kind(resources, "HorizontalPodAutoscaler"):
        assert ("Deployment", autoscaler["spec"]["scaleTargetRef"]["name"]) in names
    for scaled in of_kind(resources, "ScaledObject"):
        assert ("Deployment", scaled["spec"]["scaleTargetRef"]["name"]) in names
    for target in {a["spec"]["scaleTargetRef"]["name"] for a in of_kind(resources, "HorizontalPodAutoscaler")} | {
        s["spec"]["scaleTargetRef"]["name"] for s in of_kind(resources, "ScaledObject")
    }:
        assert "replicas" not in named(resources, "Deployment", target)["spec"], (
            f"{target}: its autoscaler owns replicas; a value in the manifest resets it at every apply"
        )
    targets = [a["spec"]["scaleTargetRef"]["name"] for a in of_kind(resources, "HorizontalPodAutoscaler")]
    targets += [s["spec"]["scaleTargetRef"]["name"] for s in of_kind(resources, "ScaledObject")]
    assert len(targets) == len(set(targets)), f"two autoscalers on one Deployment: {targets}"


def test_services_and_budgets_select_pods(resources):
    pods = [(pod_spec(w), w["spec"]["template"]["metadata"]["labels"]) for w in workloads(resources)]
    for service in of_kind(resources, "Service"):
        selector = service["spec"]["selector"]
        matched = [pod for pod, labels in pods if selector.items() <= labels.items()]
        assert matched, f"Service/{service['metadata']['name']} selects no pod"
        ports = {p["name"] for pod in matched for c in pod["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service/{service['metadata']['name']}: no port {port['targetPort']}"
    for budget in of_kind(resources, "PodDisruptionBudget"):
        selector = budget["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= labels.items() for _, labels in pods), budget["metadata"]["name"]


# -- what the manifests say about the fleet -------------------------------------------------
def test_fleet_containers_run_fleet_commands_from_the_right_image(resources):
    """The images' entry point is `fleet`: each container's args are a command it has;
    the worker and the model writers use the worker image (torch), the rest the API one."""
    parser, version = build_parser(), _version()
    for _, container in fleet_containers(resources):
        args = parser.parse_args(container["args"])
        tag = container["image"].rsplit(":", 1)[1]
        assert tag.startswith(version), f"{container['image']}: tag is not the package's version {version}"
        wants_torch = args.command == "worker" or args.command == "model"
        assert image_name(container) == ("diffusion-fleet-worker" if wants_torch else "diffusion-fleet-api")
    commands = {parser.parse_args(c["args"]).command for _, c in fleet_containers(resources)}
    assert {"web", "worker", "hooks", "flower"} <= commands


def test_the_worker_pod(resources):
    """One worker per GPU pod (slot 0), probes from its own health, a grace period that
    outlasts two of the longest batches and the upload retries."""
    settings = settings_of(resources)
    worker = deployment(resources, "fleet-worker")
    pod = pod_spec(worker)
    (container,) = pod["containers"]
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    if settings.device == "cpu":
        assert "nvidia.com/gpu" not in limits and "nodeSelector" not in pod
    else:
        assert limits["nvidia.com/gpu"] == 1 == requests["nvidia.com/gpu"], "one worker per GPU"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["terminationGracePeriodSeconds"] >= 2 * LONGEST_BATCH_S + settings.retry_window_s + 30
    assert pod["terminationGracePeriodSeconds"] > settings.retry_window_s
    assert "preStop" not in container.get("lifecycle", {}), "SIGTERM itself starts the warm shutdown"

    ready = ["test", "-f", str(ready_file(settings.state_dir, "worker0@pod"))]
    assert container["startupProbe"]["exec"]["command"] == ready
    assert container["readinessProbe"]["exec"]["command"] == ready
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60, "time to load, warm and compile"
    liveness = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[liveness["port"]] == settings.worker_metrics_port, "slot 0 serves metrics on the base port"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", "the engine's images pass through /dev/shm"
    assert mounts[str(settings.state_dir)] in volumes, "the state directory is writable"
    if settings.model.startswith("/models/") and "/models" in mounts:
        assert next(m for m in container["volumeMounts"] if m["mountPath"] == "/models").get("readOnly", False) or (
            "emptyDir" in volumes[mounts["/models"]]
        )


def test_hooks_pod_ready_while_consuming(resources):
    settings = settings_of(resources)
    (container,) = pod_spec(deployment(resources, "fleet-hooks"))["containers"]
    assert container["readinessProbe"]["exec"]["command"] == [
        "test",
        "-f",
        str(ready_file(settings.state_dir, "hooks@pod")),
    ]


def _routes() -> set[str]:
    app = create_app({"SETTINGS": Settings(), "SERVICES": _FakeServices()})
    return {rule.rule for rule in app.url_map.iter_rules()}


def test_api_and_flower_probe_real_routes(resources):
    settings = settings_of(resources)
    routes = _routes()
    (api,) = pod_spec(deployment(resources, "fleet-api"))["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert api[probe]["httpGet"]["path"] in routes, probe
    assert {p["name"]: p["containerPort"] for p in api["ports"]}["http"] == settings.api_port
    (flower,) = pod_spec(deployment(resources, "fleet-flower"))["containers"]
    assert flower["livenessProbe"]["httpGet"]["path"] == "/healthcheck"  # Flower's, open without credentials
    assert {p["name"]: p["containerPort"] for p in flower["ports"]}["http"] == settings.flower_port
    assert api["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"


# -- scaling --------------------------------------------------------------------------------
class _FakeStore:
    def backlog(self, queues):
        return {q: (3 + i, 5) for i, q in enumerate(queues)}


class _FakeServices(Services):
    def __init__(self, settings: Settings | None = None):
        settings = settings or Settings()
        super().__init__(
            settings=settings,
            store=_FakeStore(),
            owners=None,
            storage=None,
            celery=None,
            events=None,
            keys=None,
            registry=load_registry(settings),
        )


def gjson(document, path: str):
    """The subset of GJSON paths KEDA's metrics-api scaler reads here: keys joined by
    dots, a dot inside a key escaped as \\."""
    for key in re.split(r"(?<!\\)\.", path):
        document = document[key.replace("\\.", ".")]
    return document


def test_gjson_subset():
    assert gjson({"queues": {"fleet.batch": {"backlog": 4}}}, r"queues.fleet\.batch.backlog") == 4


def backlog_json(settings: Settings | None = None) -> dict:
    app = create_app({"SETTINGS": settings or Settings(), "SERVICES": _FakeServices(settings)})
    with app.test_client() as client:
        response = client.get("/metrics/backlog")
    assert response.status_code == 200
    return response.get_json()


def _behavior_ok(behavior: dict) -> None:
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 2 * LONGEST_BATCH_S, "scale in slower than batches"
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0, "scale out at once: a worker takes minutes"


def registry_settings(resources, tmp_path: Path) -> Settings:
    """The rendering's settings, its registry (a ConfigMap where FLEET_MODELS_FILE is
    mounted) written to ``tmp_path`` for this process to read."""
    settings = settings_of(resources)
    if not settings.models_file:
        return settings
    name = Path(settings.models_file).name
    (data,) = [c["data"][name] for c in of_kind(resources, "ConfigMap") if name in c.get("data", {})]
    (tmp_path / name).write_text(data)
    return settings.model_copy(update={"models_file": str(tmp_path / name)})


def served_model(resources, worker: dict, settings: Settings) -> str:
    """The model a worker Deployment serves: its FLEET_SERVE (from the ConfigMaps its
    container reads, the last one winning), else the registry's default."""
    serve = ""
    for source in worker["spec"]["template"]["spec"]["containers"][0].get("envFrom", []):
        if "configMapRef" in source:
            serve = named(resources, "ConfigMap", source["configMapRef"]["name"])["data"].get("FLEET_SERVE") or serve
    return serve or load_registry(settings).default


def test_workers_scale_on_the_true_backlog(resources, tmp_path):
    """Every worker pool has one autoscaler. KEDA asks the API's /metrics/backlog in the
    ScaledObject's own namespace and reads there the backlog of what its workers serve (a
    number, in the JSON the route really returns): the whole fleet's for the one pool of a
    fleet of one model, its model's (models.NAME.backlog) for a pool of many; it keeps
    twice the max batch per worker; cooldown and scale-in windows outlast the longest batch."""
    settings = registry_settings(resources, tmp_path)
    scalers = of_kind(resources, "ScaledObject") + [
        h for h in of_kind(resources, "HorizontalPodAutoscaler") if h["metadata"]["name"] == "fleet-worker"
    ]
    if settings.device == "cpu":
        assert not scalers, "cpu-dev runs one worker, without KEDA"
        return
    workers = [d for d in of_kind(resources, "Deployment") if d["metadata"]["name"].startswith("fleet-worker")]
    assert sorted(s["spec"]["scaleTargetRef"]["name"] for s in scalers) == sorted(
        w["metadata"]["name"] for w in workers
    ), "each worker pool has one autoscaler"
    for scaler in scalers:
        worker = deployment(resources, scaler["spec"]["scaleTargetRef"]["name"])
        _scales_on_its_backlog(resources, scaler, settings, served_model(resources, worker, settings), len(workers))


def _scales_on_its_backlog(resources, scaler: dict, settings: Settings, model: str, pools: int) -> None:
    target = 2 * settings.max_batch_images
    if scaler["kind"] == "HorizontalPodAutoscaler":
        (metric,) = scaler["spec"]["metrics"]
        assert metric["external"]["metric"]["name"] == "fleet_backlog"
        assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": str(target)}
        _behavior_ok(scaler["spec"]["behavior"])
        return
    spec = scaler["spec"]
    assert spec["cooldownPeriod"] >= 2 * LONGEST_BATCH_S
    assert spec["minReplicaCount"] >= 1 and spec["maxReplicaCount"] > spec["minReplicaCount"]
    _behavior_ok(spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"])
    main = spec["triggers"][0]
    assert main["name"] == "fleet-backlog" and main.get("metricType", "AverageValue") == "AverageValue"
    if main["type"] == "metrics-api":
        url = urllib.parse.urlsplit(main["metadata"]["url"])
        service, namespace, *_ = url.hostname.split(".")
        assert (service, namespace) == ("fleet-api", scaler["metadata"]["namespace"])
        api = named(resources, "Service", "fleet-api")
        assert (url.port or 80) in {p["port"] for p in api["spec"]["ports"]}
        assert url.path in _routes()
        value = gjson(backlog_json(settings), main["metadata"]["valueLocation"])
        registry = load_registry(settings)
        counted = registry.job_queues if pools == 1 else registry.queues(model)
        expected = sum(3 + i + 5 for i, queue in enumerate(registry.job_queues) if queue in counted)
        assert isinstance(value, int) and value == expected, main["metadata"]["valueLocation"]
        assert main["metadata"]["targetValue"] == str(target)
    else:
        assert main["type"] == "prometheus"
        assert "fleet_backlog" in main["metadata"]["query"] and "max by (queue)" in main["metadata"]["query"]
        assert main["metadata"]["threshold"] == str(target)
    for fallback in spec["triggers"][1:]:
        meta = fallback["metadata"]
        for key, variable in meta.items():
            if key.endswith("FromEnv"):  # KEDA reads it from the worker container's environment
                assert variable in fleet_secrets(resources), f"{fallback['name']}: {key} {variable} is in no Secret"
        if fallback["type"] == "redis":
            # Where a job of the default priority waits on the Redis broker.
            assert meta["listName"] == f"{settings.queue}{PRIORITY_SEP}{redis_priority(0)}"
            assert meta["listLength"] == str(target)
            assert named(resources, "Service", meta["address"].split(":")[0])
        else:
            assert fallback["type"] == "rabbitmq" and meta["queueName"] == settings.queue
            assert meta["protocol"] == "http", "only the management API counts prefetched messages"
            assert meta["value"] == str(target)


def test_the_backlog_metric_names_exist():
    """The Prometheus query and the External metric name what app/metrics.py exports."""
    families = {family.name for family in BacklogCollector(_FakeServices()).collect()}
    assert "fleet_backlog" in families


def test_keda_is_in_every_gpu_overlay():
    for overlay in OVERLAYS:
        resources = render_overlay(overlay)
        kinds = {r["kind"] for r in resources}
        assert ("ScaledObject" in kinds) == (overlay != "cpu-dev"), overlay


# -- brokers and storage ----------------------------------------------------------------------
def test_rabbitmq_consumer_timeout_is_the_setting(resources):
    config = [c for c in of_kind(resources, "ConfigMap") if c["metadata"]["name"].startswith("fleet-rabbitmq")]
    if not config:
        return
    match = re.search(r"^consumer_timeout = (\d+)$", config[0]["data"]["fleet.conf"], re.M)
    assert match and int(match[1]) == settings_of(resources).consumer_timeout_s * 1000


def test_in_cluster_servers_and_the_fleet_s_urls_agree(resources):
    """In-cluster Redis, RabbitMQ and MinIO are where the fleet's URLs point (for cpu-dev's
    own Secret, with the same passwords)."""
    names = {r["metadata"]["name"] for r in of_kind(resources, "Service")}
    settings, secrets = settings_of(resources), fleet_secrets(resources)
    redis_url = urllib.parse.urlsplit(settings.redis_url)
    if "fleet-redis" in names and secrets is not SECRETS_EXAMPLE:
        assert redis_url.hostname == "fleet-redis" and redis_url.password == secrets["REDIS_PASSWORD"]
    endpoint = urllib.parse.urlsplit(settings.s3_endpoint_url).hostname or ""
    assert (endpoint.split(".")[0] == "fleet-minio") == ("fleet-minio" in names), "S3 is MinIO only with MinIO"


def test_secrets_example_is_consistent():
    """The example's URLs use its own passwords, so filling it in consistently is easy."""
    redis_url = urllib.parse.urlsplit(SECRETS_EXAMPLE["FLEET_REDIS_URL"])
    assert redis_url.password == SECRETS_EXAMPLE["REDIS_PASSWORD"]
    pod_settings({k: v for k, v in SECRETS_EXAMPLE.items() if k.startswith("FLEET_")})
