"""The Ray Serve render service: HTTP API + web page over the engine core.

    serve run cluster/deploy/serve.yaml      # or: avatar serve [--config cluster/deploy/serve.yaml]

Modules: config (ServeArgs, build_app), api (request/response models), service (the core behind
owner checks, limits, quotas, idempotency), app (FastAPI routes), http (bodies, SSE, files),
auth (tokens, quotas), uploads (pose inputs), telemetry (Prometheus), deployments (Serve).
"""
