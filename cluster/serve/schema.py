"""The OpenAPI schema of the service, made exactly as strict as the server.

FastAPI derives the schema from the request models, which are looser than what this server
accepts (its limits come from ``ServeArgs``); a client generating requests from a loose schema
gets 422s it could not have foreseen, and a fuzzer reports them (schemathesis' "schema-valid
request rejected"). :func:`exact_openapi` tightens the generated schema to the server:

* ``RenderRequest``: ``prompt``/``negative_prompt`` at most ``limits.max_prompt_chars`` and not
  blank, ``width``/``height``/``steps`` at most the server's limits, ``preset`` one of the served
  presets, ``example`` one of the built-in examples, exactly one of ``poses`` / ``example`` in a
  JSON body and neither in a multipart ``request`` part (never null);
* optional query and header parameters are never null (a header cannot carry JSON null);
* the event stream is ``text/event-stream`` whose events are described one by one;
* ``/metrics`` declares its bearer token only when one is configured.

What JSON Schema cannot say: inline poses are checked for meaning (keypoints inside the frame,
enough frames, a known layout) and answer 422 naming ``poses`` when they are not.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI

from cluster.serve.api import ErrorDetail, ErrorResponse, RenderRequest
from cluster.serve.config import ServeArgs

NOT_BLANK = r"\S"
SSE_EVENT = {
    "type": "object",
    "description": "One server-sent event; ``data`` is JSON: a progress event of the render "
    "(``seq``, ``type``, ``state`` / ``index`` / ``error``), or ``{state}`` for ``end``.",
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "event": {"type": "string", "enum": ["state", "frame", "error", "retry", "end"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "retry": {"type": "integer"},
    },
}
"""The event stream's items (schemathesis checks each event against it)."""
_SUBMITS = (("/v1/renders", "post"), ("/v1/renders/{render_id}", "put"))


def _non_null(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` without its ``{"type": "null"}`` branch (anyOf of one → that one)."""
    branches = [b for b in schema.get("anyOf", []) if b.get("type") != "null"]
    if not branches:
        return schema
    rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    return {**rest, **branches[0]} if len(branches) == 1 else {**rest, "anyOf": branches}


def request_schema(args: ServeArgs, examples: list[str]) -> dict[str, Any]:
    """RenderRequest's JSON schema tightened to this server's limits."""
    schema = RenderRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    props, lim = schema["properties"], args.limits
    props["prompt"].update(maxLength=lim.max_prompt_chars, pattern=NOT_BLANK)
    fields = {
        "negative_prompt": {"maxLength": lim.max_prompt_chars},
        "width": {"maximum": lim.max_side},
        "height": {"maximum": lim.max_side},
        "steps": {"maximum": lim.max_steps},
        "preset": {"enum": list(args.presets)},
    }
    for name, extra in fields.items():
        props[name]["anyOf"] = [
            {**b, **extra} if b.get("type") != "null" else b for b in props[name]["anyOf"]
        ]
    props["example"] = {**_non_null(props["example"]), "enum": examples}
    props["poses"] = _non_null(props["poses"])
    return schema


def exact_openapi(app: FastAPI, args: ServeArgs, examples: list[str], metrics_token: bool) -> None:
    """Replace ``app.openapi`` by the generated schema made exact (see the module docstring)."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        request = request_schema(args, examples)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(request.pop("$defs", {}))
        components["RenderRequest"] = request
        part = copy.deepcopy(request)  # the multipart "request" part: poses come as a file
        for name in ("poses", "example"):
            part["properties"].pop(name)
        components["RenderRequestPart"] = part
        for model in (ErrorResponse, ErrorDetail):
            error = model.model_json_schema(ref_template="#/components/schemas/{model}")
            error.pop("$defs", None)
            components[model.__name__] = error
        _tighten_operations(schema, metrics_token)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def submit_body() -> dict[str, Any]:
    """The request body of POST/PUT: JSON (exactly one of poses / example) or multipart."""
    ref = {"$ref": "#/components/schemas/RenderRequest"}
    one_of = [{"required": ["poses"]}, {"required": ["example"]}]
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"allOf": [ref], "oneOf": one_of}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["request", "poses"],
                        "additionalProperties": False,
                        "properties": {
                            "request": {"$ref": "#/components/schemas/RenderRequestPart"},
                            "poses": {"type": "string", "format": "binary"},
                        },
                    },
                    "encoding": {"request": {"contentType": "application/json"}},
                },
            },
        }
    }


def _tighten_operations(schema: dict[str, Any], metrics_token: bool) -> None:
    for path, item in schema["paths"].items():
        for method, op in item.items():
            for param in op.get("parameters", []):
                if not param.get("required"):
                    param["schema"] = _non_null(param["schema"])
            if path.endswith("/events") and method == "get":
                op["responses"]["200"]["content"] = {"text/event-stream": {"schema": SSE_EVENT}}
            if path == "/metrics" and not metrics_token:
                op.pop("security", None)
                op["responses"].pop("401", None)
