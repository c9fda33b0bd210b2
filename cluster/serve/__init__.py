"""The Ray Serve render service: HTTP API + web page over the engine core.

    serve run cluster/deploy/serve.yaml      # or: avatar serve [--config cluster/deploy/serve.yaml]

Modules, top-down (each imports only those below it): build (``build_app``, the Serve app),
deployments (the Serve deployments), app (FastAPI routes), http (bodies, SSE, files), service
(the core behind owner checks, limits, quotas, idempotency, deletion, retention), backend
(ingress → service), auth (tokens, quotas), uploads + inspect (pose inputs, their declared
sizes), telemetry (Prometheus), api (request/response models), config (``ServeArgs``, data).
"""
