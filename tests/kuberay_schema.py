"""Strict validation of Kubernetes manifests against KubeRay's CRD schemas (tests/data/kuberay/).

The CRDs' ``openAPIV3Schema`` is what the API server checks a RayCluster, RayJob or RayService
against. ``kubectl apply`` asks for strict field validation (the default since Kubernetes 1.27):
an unknown field is refused, not pruned. JSON Schema allows unknown fields unless told otherwise,
so :func:`strict` rewrites the CRD schema the way a structural schema behaves:

- every object schema with ``properties`` refuses other keys (``additionalProperties: false``),
  unless it carries ``x-kubernetes-preserve-unknown-fields: true``;
- the top-level ``metadata`` (``type: object`` in the CRD; the API server checks ObjectMeta
  itself) gets the ObjectMeta fields a manifest sets: name, namespace, labels, annotations;
- ``x-kubernetes-list-type: map`` lists refuse two items with the same key fields (two container
  ports named alike), ``set`` lists refuse duplicates;
- ``format: int32`` / ``int64`` integers are range-checked;
- CEL rules (``x-kubernetes-validations``) other than transition rules (``self == oldSelf``, not
  checked on create) cannot be evaluated here: a manifest that sets such a field is refused with
  the rule named, so nothing passes unchecked.

Regenerate a stored schema from a CRD file of the kuberay repository with
``python -m tests.kuberay_schema ray.io_rayclusters.yaml tests/data/kuberay/raycluster.schema.json.gz``.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema import Draft7Validator, ValidationError

DATA = Path(__file__).resolve().parent / "data" / "kuberay"
KINDS = {"RayCluster": "raycluster", "RayJob": "rayjob", "RayService": "rayservice"}

_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": _DNS_SUBDOMAIN},
        "namespace": {"type": "string", "maxLength": 63, "pattern": _DNS_SUBDOMAIN},
        "labels": _STRINGS,
        "annotations": _STRINGS,
    },
}
_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def trim_crd(crd: dict[str, Any], version: str = "v1") -> dict[str, Any]:
    """The ``openAPIV3Schema`` of one version of a CRD, without ``status`` (never written by a
    manifest) and without the free-text ``description`` strings (most of the file's size)."""

    def drop(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: drop(v)
                for k, v in node.items()
                if not (k == "description" and isinstance(v, str))
            }
        return [drop(x) for x in node] if isinstance(node, list) else node

    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = copy.deepcopy(entry["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    return drop(schema)


@functools.cache
def _stored(kind: str) -> str:
    with gzip.open(DATA / f"{KINDS[kind]}.schema.json.gz", "rt") as f:
        return f.read()


def load_schema(kind: str) -> dict[str, Any]:
    """The stored (trimmed) CRD schema of a KubeRay kind: RayCluster, RayJob or RayService."""
    if kind not in KINDS:
        raise ValueError(f"no stored KubeRay schema for kind {kind!r}; have {sorted(KINDS)}")
    return json.loads(_stored(kind))


def _closed(node: Any, models: bool = False) -> Any:
    """``node`` with ``additionalProperties: false`` on every object schema that lists
    ``properties`` and says nothing else about other keys (``additionalProperties`` or
    ``x-kubernetes-preserve-unknown-fields: true``). ``models``: also drop the open-dict
    alternative of an ``anyOf`` that names a model (``$ref``), so the model's fields are checked."""
    if isinstance(node, list):
        return [_closed(x, models) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _closed(v, models) for k, v in node.items() if k != "properties"}
    if "properties" in node:  # property names map to schemas, never keywords
        out["properties"] = {k: _closed(v, models) for k, v in node["properties"].items()}
        keeps = node.get("x-kubernetes-preserve-unknown-fields") is True
        if "additionalProperties" not in node and not keeps:
            out["additionalProperties"] = False
    if models and any("$ref" in b for b in out.get("anyOf", [])):
        out["anyOf"] = [b for b in out["anyOf"] if b.get("additionalProperties") is not True]
    return out


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a CRD schema that refuses what a strict ``kubectl apply`` refuses (module doc)."""
    out = _closed(schema)
    out["properties"]["metadata"] = OBJECT_META
    return out


def _list_type(validator: Any, kind: str, instance: Any, schema: dict[str, Any]) -> Iterator:
    if not isinstance(instance, list) or kind not in ("map", "set"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen: set[str] = set()
    for item in instance:
        if kind == "map" and isinstance(item, dict):
            ident = json.dumps([item.get(k) for k in keys])
        else:
            ident = json.dumps(item, sort_keys=True)
        if ident in seen:
            yield ValidationError(
                f"duplicate item in a list-type={kind} list (keys {keys}): {item}"
            )
        seen.add(ident)


def _rules(validator: Any, rules: list[dict[str, Any]], instance: Any, schema: Any) -> Iterator:
    for rule in rules:
        if rule["rule"].replace(" ", "") != "self==oldSelf":  # transition rule: updates only
            yield ValidationError(
                f"CEL rule not evaluated by this validator: {rule['rule']!r} "
                f"({rule.get('message', '')}); drop the field or check it on a real cluster"
            )


def _format(validator: Any, fmt: str, instance: Any, schema: dict[str, Any]) -> Iterator:
    if fmt in _RANGES and isinstance(instance, int) and not isinstance(instance, bool):
        low, high = _RANGES[fmt]
        if not low <= instance <= high:
            yield ValidationError(f"{instance} is out of range for {fmt}")


StrictValidator = jsonschema.validators.extend(
    Draft7Validator,
    {
        "x-kubernetes-list-type": _list_type,
        "x-kubernetes-validations": _rules,
        "format": _format,
    },
)


def _object(api: str, kind: str, **fields: Any) -> dict[str, Any]:
    """A top-level Kubernetes object schema: apiVersion, kind, metadata plus ``fields``."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata"],
        "properties": {"apiVersion": {"enum": [api]}, "kind": {"enum": [kind]}, **fields},
    }


def core_schema(kind: str) -> dict[str, Any]:
    """A strict schema for the built-in kinds next to the KubeRay ones (PersistentVolumeClaim,
    Service, Deployment, Secret), assembled from the Kubernetes schemas KubeRay's RayCluster CRD
    embeds: a pod template, a Service (``headService``), a PVC spec (ephemeral volumes), a label
    selector (pod affinity). A Deployment's own fields and a Secret are written out here."""
    head = load_schema("RayCluster")["properties"]["spec"]["properties"]["headGroupSpec"]
    head = head["properties"]
    pod = head["template"]
    volume = pod["properties"]["spec"]["properties"]["volumes"]["items"]["properties"]
    affinity = pod["properties"]["spec"]["properties"]["affinity"]["properties"]
    term = affinity["podAffinity"]["properties"]["requiredDuringSchedulingIgnoredDuringExecution"]
    strings = {"type": "object", "additionalProperties": {"type": "string"}}
    schemas = {
        "PersistentVolumeClaim": _object(
            "v1",
            "PersistentVolumeClaim",
            spec=volume["ephemeral"]["properties"]["volumeClaimTemplate"]["properties"]["spec"],
        ),
        "Service": _object("v1", "Service", spec=head["headService"]["properties"]["spec"]),
        "Secret": _object(
            "v1", "Secret", type={"type": "string"}, data=strings, stringData=strings
        ),
        "Deployment": _object(
            "apps/v1",
            "Deployment",
            spec={
                "type": "object",
                "required": ["selector", "template"],
                "properties": {
                    "replicas": {"type": "integer", "format": "int32", "minimum": 0},
                    "strategy": {
                        "type": "object",
                        "properties": {"type": {"enum": ["Recreate", "RollingUpdate"]}},
                    },
                    "selector": term["items"]["properties"]["labelSelector"],
                    "template": pod,
                },
            },
        ),
    }
    if kind not in schemas:
        raise ValueError(f"no schema for kind {kind!r}; have {sorted(schemas)} and {sorted(KINDS)}")
    return schemas[kind]


def schema_for(manifest: dict[str, Any]) -> dict[str, Any]:
    """The strict schema of a manifest's kind: KubeRay CRDs for ray.io/v1, else core_schema."""
    kind = manifest.get("kind", "")
    if manifest.get("apiVersion") == "ray.io/v1":
        return strict(load_schema(kind))
    return strict(core_schema(kind))


def strict_serve_schema() -> dict[str, Any]:
    """Ray Serve's own config schema (``ServeDeploySchema``) as JSON Schema, made strict: Ray's
    pydantic models ignore unknown keys (a misspelt ``max_replicas`` would be dropped without a
    word), so every model refuses them here, and a field that takes "a model or any dict" (e.g.
    ``autoscaling_config``) must match the model."""
    from ray.serve.schema import ServeDeploySchema

    return _closed(ServeDeploySchema.model_json_schema(), models=True)


def errors(manifest: dict[str, Any], schema: dict[str, Any] | None = None) -> list[str]:
    """Every way ``manifest`` breaks its kind's strict schema (or ``schema``), as
    ``path: message`` lines; empty when it is valid."""
    schema = schema_for(manifest) if schema is None else schema
    found = StrictValidator(schema).iter_errors(manifest)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found]


def main(argv: list[str]) -> None:
    """``python -m tests.kuberay_schema CRD.yaml OUT.json.gz``: store a trimmed CRD schema."""
    import yaml

    crd_path, out_path = argv
    schema = trim_crd(yaml.safe_load(Path(crd_path).read_text()))
    with gzip.GzipFile(out_path, "wb", mtime=0) as f:
        f.write(json.dumps(schema, sort_keys=True, separators=(",", ":")).encode())


if __name__ == "__main__":
    main(sys.argv[1:])
