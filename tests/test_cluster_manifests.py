"""Deployment manifests in cluster/deploy/, checked without a cluster: every Kubernetes object
against the real schema of its kind (KubeRay v1.7.0's CRDs, tests/data/kuberay/, made as strict as
``kubectl apply``), the embedded Serve config against Ray's own Serve schema, the ``ray up`` YAML
against Ray's autoscaler schema, the engine settings through engine/config.py, and what the files
must agree on (secrets, volumes, the head pin, GPU sizes that fit the node types they name)."""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from tests.kuberay_schema import errors, strict_serve_schema

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "cluster" / "deploy"
GPU = "nvidia.com/gpu"
KUBE_FILES = ["rayservice.yaml", "rayjob.yaml", "volumes.yaml", "redis.yaml", "secrets.yaml"]
# Nominal EKS allocatable of the node types the manifests name (see the comments there), less
# 1 CPU and 2 GiB for the node's DaemonSets: (CPU, GiB, GPUs).
NODES = {"g5.48xlarge": (191.4 - 1, 757 - 2, 8), "m5.4xlarge": (15.89 - 1, 58 - 2, 0)}


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def _all_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name in KUBE_FILES for doc in _docs(name)]


def _one(kind: str) -> dict[str, Any]:
    """The one object of a kind (``Kind:name`` where there are several)."""
    kind, _, name = kind.partition(":")
    (doc,) = [
        d for _, d in _all_docs() if d["kind"] == kind and name in ("", d["metadata"]["name"])
    ]
    return doc


def _cluster(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return spec["rayClusterConfig"] if doc["kind"] == "RayService" else spec["rayClusterSpec"]


def _groups(doc: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = _cluster(doc)
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def _container(group: dict[str, Any]) -> dict[str, Any]:
    (container,) = group["template"]["spec"]["containers"]
    return container


def _serve_config() -> dict[str, Any]:
    return yaml.safe_load(_one("RayService")["spec"]["serveConfigV2"])


def _quantity(value: str | int) -> float:
    """A Kubernetes quantity as a number: CPU cores, or GiB for ``Gi``/``Mi`` suffixes."""
    text = str(value)
    for suffix, scale in (("Gi", 1.0), ("Mi", 1 / 1024)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --- every object against its schema -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "doc"), _all_docs(), ids=lambda v: v if isinstance(v, str) else v["kind"]
)
def test_manifest_matches_its_schema(name: str, doc: dict[str, Any]) -> None:
    assert errors(doc) == [], f"{name} {doc['kind']} {doc['metadata']['name']}"


JOB_WORKER = "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0"
MUTATIONS = [
    # (kind, path to a mapping, key, value, words the error must contain)
    ("RayService", "spec", "serveConfigV3", "x", "serveConfigV3"),
    ("RayService", "spec.rayClusterConfig.headGroupSpec", "rayStartParam", {}, "rayStartParam"),
    ("RayService", "spec.rayClusterConfig.workerGroupSpecs.0", "maxReplicas", "64", "'64' is not"),
    ("RayService", "spec.rayClusterConfig.workerGroupSpecs.0", "minReplicas", 2.5, "2.5 is not"),
    ("RayService", "spec.rayClusterConfig.gcsFaultToleranceOptions", "backend", "etcd", "etcd"),
    ("RayService", "spec", "managedBy", "me", "CEL rule"),
    ("RayService", "metadata", "lables", {"a": "b"}, "lables"),
    ("RayJob", "spec", "ttlSecondsAfterFinish", 60, "ttlSecondsAfterFinish"),
    ("RayJob", "spec", "ttlSecondsAfterFinished", 2**31, "out of range for int32"),
    ("RayJob", JOB_WORKER, "resource", {}, "resource"),
    ("RayJob", f"{JOB_WORKER}.resources.limits", "cpu", 0.5, "0.5 is not valid"),
    ("Deployment", "spec.template.spec.containers.0", "imagePullPolicyy", "Always", "imagePull"),
    ("Service", "spec.ports.0", "port", "6379", "'6379' is not"),
    ("Secret:avatar-redis", "stringData", "password", 5, "5 is not"),
]


@pytest.mark.parametrize(("kind", "path", "key", "value", "words"), MUTATIONS)
def test_schema_refuses_unknown_fields_and_wrong_types(
    kind: str, path: str, key: str, value: Any, words: str
) -> None:
    """Each mutation of a valid manifest (a misspelt key, a string for a number, a float for an
    integer, a value outside an enum or int32, a CEL-checked field) is an error naming it."""
    doc = copy.deepcopy(_one(kind))
    node: Any = doc
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    node[key] = value
    found = errors(doc)
    assert any(words in e for e in found), found


def test_schema_refuses_duplicate_list_map_keys() -> None:
    """A list keyed by name (env, x-kubernetes-list-type: map) may not repeat a name."""
    doc = copy.deepcopy(_one("Deployment"))
    env = doc["spec"]["template"]["spec"]["containers"][0]["env"]
    env.append(dict(env[0]))
    assert any("duplicate item" in e for e in errors(doc)), errors(doc)


def test_strict_keeps_what_kubernetes_keeps() -> None:
    """Objects marked x-kubernetes-preserve-unknown-fields and maps (additionalProperties) keep
    unknown keys; other objects with properties refuse them; transition rules pass on create."""
    from tests.kuberay_schema import strict

    obj = {"type": "object", "properties": {"a": {"type": "string"}}}
    schema = strict({
        "type": "object",
        "properties": {
            "metadata": {"type": "object"},
            "open": {**obj, "x-kubernetes-preserve-unknown-fields": True},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
            "closed": obj,
            "immutable": {"type": "string",
                          "x-kubernetes-validations": [{"rule": "self == oldSelf"}]},
        },
    })  # fmt: skip
    ok = {"metadata": {"name": "x"}, "open": {"b": 1}, "map": {"b": "c"}, "immutable": "v"}
    assert errors(ok, schema) == []
    assert any("'b' was unexpected" in e for e in errors({**ok, "closed": {"b": 1}}, schema))


# --- the Serve config inside the RayService ----------------------------------------------------


def test_serve_config_matches_rays_schema() -> None:
    from ray.serve.schema import ServeDeploySchema

    from cluster.serve.deployments import Engine, Ingress

    config = _serve_config()
    ServeDeploySchema.model_validate(config)  # Ray's checks (types, min <= max replicas, …)
    assert errors(config, strict_serve_schema()) == []  # and no key Ray would ignore
    (app,) = config["applications"]
    assert app["import_path"] == "cluster.serve.build:build_app"
    names = {d["name"] for d in app["deployments"]}
    assert names == {Engine.name, Ingress.name}, names
    broken = copy.deepcopy(config)
    broken["applications"][0]["deployments"][0]["autoscaling_config"]["max_replica"] = 4
    assert errors(broken, strict_serve_schema()), "a misspelt autoscaling key passed"


def test_serve_yaml_matches_rays_schema() -> None:
    """The local Serve config (serve.yaml) passes the same strict Serve schema."""
    from ray.serve.schema import ServeDeploySchema

    config = _docs("serve.yaml")[0]
    ServeDeploySchema.model_validate(config)
    assert errors(config, strict_serve_schema()) == []


def test_ingress_autoscales_2_to_4() -> None:
    (app,) = _serve_config()["applications"]
    ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")
    assert ingress["num_replicas"] == "auto"
    auto = ingress["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (2, 4)
    assert 0 < auto["target_ongoing_requests"] <= ingress["max_ongoing_requests"]


def test_serve_args_and_engine_settings_load() -> None:
    """The application's args are ServeArgs and its engine settings (elastic Samplers included)
    load."""
    from cluster.serve.config import ServeArgs

    args = _serve_config()["applications"][0]["args"]
    config = ServeArgs.model_validate(args).engine_config()
    assert config.storage.uri and config.storage.uri.startswith("s3://")
    assert config.cluster.samplers == "auto" and config.cluster.max_samplers == 64


def test_batch_manifest_loads() -> None:
    from cluster.batch import BatchManifest
    from engine.config import load_config

    batch = BatchManifest.model_validate(_docs("batch-manifest.yaml")[0])
    config = load_config(None, preset=batch.preset, overrides=batch.set)
    assert config.cluster.samplers == "auto"
    assert len({r.id for r in batch.renders}) == len(batch.renders) >= 1


# --- what the files must agree on ---------------------------------------------------------------


def test_engine_is_pinned_to_the_head_where_the_index_is_mounted() -> None:
    service = _one("RayService")
    head, *workers = _groups(service)
    (app,) = _serve_config()["applications"]
    engine = next(d for d in app["deployments"] if d["name"] == "Engine")
    pin = engine["ray_actor_options"]["resources"]
    assert pin and set(pin) <= set(head.get("resources", {})), (pin, head.get("resources"))
    for group in workers:
        assert not set(pin) & set(group.get("resources", {})), group["groupName"]
        assert not set(pin) & set(json.dumps(group.get("rayStartParams", {})).split('"'))
    # The index (the ServeArgs storage root) lies on the avatar-index claim, mounted on the head.
    volumes = {v["name"]: v for v in head["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in _container(head)["volumeMounts"]}
    root = app["args"]["storage"]["root"]
    claim = volumes[mounts[root]]["persistentVolumeClaim"]["claimName"]
    assert claim == "avatar-index"
    assert "ReadWriteOnce" in _claims()[claim]["spec"]["accessModes"]


def _claims() -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d for _, d in _all_docs() if d["kind"] == "PersistentVolumeClaim"
    }


def test_gcs_fault_tolerance_uses_the_redis_of_redis_yaml() -> None:
    ft = _cluster(_one("RayService"))["gcsFaultToleranceOptions"]
    host, port = ft["redisAddress"].rsplit(":", 1)
    service = _one("Service")
    assert service["metadata"]["name"] == host
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    secrets = {d["metadata"]["name"]: d for _, d in _all_docs() if d["kind"] == "Secret"}
    assert ref["key"] in secrets[ref["name"]]["stringData"]
    # Redis itself requires that same password.
    redis = _one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in redis["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref
    assert redis["args"][:2] == ["--requirepass", "$(REDIS_PASSWORD)"]


@pytest.mark.parametrize("kind", ["RayService", "RayJob"])
def test_pods_get_secrets_weights_cache_and_claims_that_exist(kind: str) -> None:
    doc = _one(kind)
    secrets = {d["metadata"]["name"] for _, d in _all_docs() if d["kind"] == "Secret"}
    claims = _claims()
    for group in _groups(doc):
        container = _container(group)
        assert {"secretRef": {"name": "avatar-secrets"}} in container["envFrom"]
        assert "avatar-secrets" in secrets
        env = {e["name"]: e.get("value") for e in container["env"]}
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        cache = volumes[mounts[env["HF_HOME"]]]["persistentVolumeClaim"]["claimName"]
        assert "ReadWriteMany" in claims[cache]["spec"]["accessModes"]
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        assert "/dev/shm" in mounts


@pytest.mark.parametrize("kind", ["RayService", "RayJob"])
def test_pods_fit_the_node_types_they_name(kind: str) -> None:
    """64 GPUs in GPU groups with node selectors + GPU tolerations; each pod's requests equal
    its limits, and as many pods as the node type has GPUs fit its allocatable CPU and memory."""
    head, *workers = _groups(_one(kind))
    assert head["rayStartParams"]["num-gpus"] == "0"
    gpus = 0
    for group in [head, *workers]:
        spec = group["template"]["spec"]
        cpu_node, mem_node, gpus_node = NODES[
            spec["nodeSelector"]["node.kubernetes.io/instance-type"]
        ]
        resources = _container(group)["resources"]
        assert resources["requests"] == resources["limits"], group.get("groupName", "head")
        per_pod = int(resources["limits"].get(GPU, 0))
        pods = gpus_node // per_pod if per_pod else 1
        cpu, mem = (_quantity(resources["limits"][k]) for k in ("cpu", "memory"))
        assert pods * cpu <= cpu_node and pods * mem <= mem_node, (group.get("groupName"), pods)
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"]
        assert _quantity(shm) < mem
        if per_pod:
            assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            gpus += group["maxReplicas"] * per_pod
    assert gpus == 64


def test_rayjob_lifecycle_and_entrypoint() -> None:
    spec = _one("RayJob")["spec"]
    # ttlSecondsAfterFinished deletes the RayCluster and only acts with shutdownAfterJobFinishes.
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "cluster.batch"], argv
    opts = dict(zip(argv[4::2], argv[5::2], strict=True))
    assert opts["--storage"].startswith("s3://YOUR-BUCKET/")
    head = _groups(_one("RayJob"))[0]
    mounts = [m["mountPath"] for m in _container(head)["volumeMounts"]]
    for path in (argv[3], opts["--out"]):  # the manifest and the index on the data volume
        assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), (path, mounts)


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {m[1]: m[2] for m in (re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)(.*)", d) for d in deps) if m}


def test_images_carry_this_ray_and_the_pinned_torch() -> None:
    """Every Ray pod runs the image of cluster/deploy/Dockerfile, which starts FROM the Ray image
    of this Ray version and installs the torch pair of pyproject.toml before the package."""
    for kind in ("RayService", "RayJob"):
        assert _cluster(_one(kind))["rayVersion"] == ray.__version__
        assert {_container(g)["image"] for g in _groups(_one(kind))} == {
            "YOUR-REGISTRY/dancing-avatar:YOUR-TAG"
        }
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, flags=re.M)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    pins = _pins()
    assert pins["ray[serve]"] == f"=={ray.__version__}"
    torch_at = dockerfile.index(f"torch{pins['torch']} torchvision{pins['torchvision']}")
    assert torch_at < dockerfile.index('pip install --no-cache-dir -e ".[s3]"')


# --- Ray cluster launcher (`ray up`) ------------------------------------------------------------


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())


def test_launcher_matches_ray_schema(launcher: dict[str, Any]) -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    assert launcher["head_node_type"] in launcher["available_node_types"]
    broken = copy.deepcopy(launcher)
    broken["docker"]["head_run_option"] = []  # Ray's schema is strict here: prove it
    with pytest.raises(jsonschema.ValidationError, match="head_run_option"):
        jsonschema.validate(broken, schema)


def test_launcher_64_gpus_and_cpu_head(launcher: dict[str, Any]) -> None:
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {k: v for k, v in types.items() if k != launcher["head_node_type"]}
    assert sum(w["max_workers"] * w["resources"].get("GPU", 0) for w in workers.values()) == 64
    assert sum(w["max_workers"] for w in workers.values()) <= launcher["max_workers"]


def test_launcher_keeps_the_index_outside_the_container(launcher: dict[str, Any]) -> None:
    """The core's index is a host folder bound into the head container (it outlives the
    container), created for the container's user first; artefacts go to the bucket."""
    (bind,) = launcher["docker"]["head_run_options"]
    host, inside = shlex.split(bind)[1].split(":")
    assert any(host in c and "chown 1000:100" in c for c in launcher["initialization_commands"])
    header = (DEPLOY / "ray-cluster.yaml").read_text().split("\n\n")[0]
    assert f"--out {inside}" in header and "--storage s3://YOUR-BUCKET/" in header


def test_launcher_setup_pins_torch_like_pyproject(launcher: dict[str, Any]) -> None:
    pins = _pins()
    commands = launcher["setup_commands"]
    torch_at = next(i for i, c in enumerate(commands) if "torch==" in c)
    words = shlex.split(commands[torch_at])
    assert f"torch{pins['torch']}" in words and f"torchvision{pins['torchvision']}" in words
    install_at = next(i for i, c in enumerate(commands) if "pip install -e" in c)
    assert torch_at < install_at and "[s3]" in commands[install_at]


def test_launcher_start_commands_bind_6379(launcher: dict[str, Any]) -> None:
    head = " ".join(launcher["head_start_ray_commands"])
    assert re.search(r"ray start --head\b.*--port[= ]6379\b", head), head
    assert re.search(r"--dashboard-host[= ]0\.0\.0\.0\b", head), head
    worker = " ".join(launcher["worker_start_ray_commands"])
    assert re.search(r"ray start --address[= ]\$RAY_HEAD_IP:6379\b", worker), worker
