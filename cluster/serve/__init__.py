"""The Ray Serve render service: HTTP API + web page over the engine core.

    serve run cluster/deploy/serve.yaml      # or: avatar serve [--config cluster/deploy/serve.yaml]

Modules, top-down (each imports only those below it): build (``build_app``, the Serve app),
deployments (the Serve deployments), app (FastAPI routes) + schema (the exact OpenAPI schema),
http (bodies, SSE, files), service (the core behind owner namespaces, limits, quotas,
idempotency, deletion, retention), views (a render as the API shows it), backend (ingress →
service), auth (tokens, quotas), uploads + inspect (pose inputs, their declared sizes), storage
(owner ids, server secret, bytes stored), telemetry (Prometheus), api (request/response
models), config (``ServeArgs``, data).
"""
