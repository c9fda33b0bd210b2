"""Deployment manifests in cluster/deploy/: parsed and checked against the project, no cluster."""

from __future__ import annotations

import importlib.util
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

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "cluster" / "deploy"
GPU = "nvidia.com/gpu"


def _split(requirements: list[str]) -> dict[str, str]:
    """Requirement strings as {name: specifier}, e.g. ["torch==2.14.1"] -> {"torch": "==2.14.1"}."""
    pairs = (re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)(.*)", r) for r in requirements)
    return {m[1]: m[2] for m in pairs if m}


def _pins() -> dict[str, str]:
    """[project].dependencies of pyproject.toml, split as by _split."""
    return _split(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())


def _container(group: dict[str, Any]) -> dict[str, Any]:
    (container,) = group["template"]["spec"]["containers"]
    return container


def _head(rayjob: dict[str, Any]) -> dict[str, Any]:
    return rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]


def _images(rayjob: dict[str, Any]) -> list[str]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [_container(g)["image"] for g in groups]


def _entrypoint(rayjob: dict[str, Any]) -> list[str]:
    return shlex.split(rayjob["spec"]["entrypoint"])


# --- KubeRay RayJob ---------------------------------------------------------------------------


def test_rayjob_runs_the_batch_entrypoint(rayjob: dict[str, Any]) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    argv = _entrypoint(rayjob)
    assert argv[:3] == ["python", "-m", "cluster.batch"], argv
    assert len(argv) == 6 and argv[4] == "--out", f"want MANIFEST --out ROOT, got {argv}"
    manifest, out = argv[3], argv[5]
    # Both paths live on the data volume the head mounts.
    mounts = {m["mountPath"] for m in _container(_head(rayjob)).get("volumeMounts", [])}
    for path in (manifest, out):
        assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), (path, mounts)


def test_batch_module_exists(rayjob: dict[str, Any]) -> None:
    module = _entrypoint(rayjob)[2]
    path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} is not written yet (issue 5 batch entrypoint)")
    assert importlib.util.find_spec(module) is not None, f"{module} is not importable"


def test_rayjob_lifecycle_and_runtime_env(rayjob: dict[str, Any]) -> None:
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "working_dir" in runtime_env or "pip" in runtime_env
    pip = runtime_env.get("pip", {})
    packages = pip["packages"] if isinstance(pip, dict) else pip
    # Same list and pins as pyproject.toml; ray itself comes with the image.
    want = {name: pin for name, pin in _pins().items() if not name.startswith("ray")}
    assert _split(packages) == want


def test_ray_version_matches_installed(rayjob: dict[str, Any], launcher: dict[str, Any]) -> None:
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert _pins()["ray[serve]"] == f"=={ray.__version__}"
    docker = launcher["docker"]
    # Each image carries this Ray and a Python the project accepts (requires-python ">=3.11").
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    oldest = tuple(int(x) for x in project["requires-python"].removeprefix(">=").split("."))
    for image in [*_images(rayjob), docker["head_image"], docker["worker_image"]]:
        m = re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3(\d+)(-gpu)?", image)
        assert m and (3, int(m[1])) >= oldest, image


def test_rayjob_gpu_workers_and_cpu_head(rayjob: dict[str, Any]) -> None:
    head = _head(rayjob)
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"].get("num-gpus", "0") == "0"
    for kind in ("limits", "requests"):
        assert GPU not in _container(head)["resources"].get(kind, {}), f"head {kind} has a GPU"

    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert groups
    for group in groups:
        resources = _container(group)["resources"]
        assert resources["limits"][GPU] == resources["requests"][GPU] >= 1, group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert _container(group)["image"].endswith("-gpu")

    volumes = head["template"]["spec"]["volumes"]
    claims = [
        v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v
    ]
    assert claims == ["avatar-data"]


# --- Ray cluster launcher ---------------------------------------------------------------------


def test_launcher_matches_ray_schema(launcher: dict[str, Any]) -> None:
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    jsonschema.validate(launcher, json.loads(schema_path.read_text()))
    assert launcher["head_node_type"] in launcher["available_node_types"]


def test_launcher_gpu_workers_and_cpu_head(launcher: dict[str, Any]) -> None:
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0
    workers = {k: v for k, v in types.items() if k != launcher["head_node_type"]}
    assert any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers.values())
    for name, worker in workers.items():
        assert 0 <= worker.get("min_workers", 0) <= worker["max_workers"], name
    assert sum(w["max_workers"] for w in workers.values()) <= launcher["max_workers"]


def test_launcher_setup_pins_torch_like_pyproject(launcher: dict[str, Any]) -> None:
    pins = _pins()
    assert pins["torch"] == "==2.14.1" and pins["torchvision"] == "==0.29.1"
    commands = launcher["setup_commands"]
    torch_at = next(i for i, c in enumerate(commands) if "torch==" in c)
    words = shlex.split(commands[torch_at])
    assert f"torch{pins['torch']}" in words and f"torchvision{pins['torchvision']}" in words
    # The pair goes in first, then the project itself (which would otherwise pick its own torch).
    install_at = next(i for i, c in enumerate(commands) if "pip install -e" in c)
    assert torch_at < install_at


def test_launcher_start_commands_bind_6379(launcher: dict[str, Any]) -> None:
    head = " ".join(launcher["head_start_ray_commands"])
    assert re.search(r"ray start --head\b.*--port[= ]6379\b", head), head
    assert re.search(r"--dashboard-host[= ]0\.0\.0\.0\b", head), head
    worker = " ".join(launcher["worker_start_ray_commands"])
    assert re.search(r"ray start --address[= ]\$RAY_HEAD_IP:6379\b", worker), worker
