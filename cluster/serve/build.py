"""The Ray Serve application builder: binds the HTTP ingress to the engine deployment.

``cluster/deploy/serve.yaml`` references :func:`build_app` by ``import_path`` and passes
:class:`~cluster.serve.config.ServeArgs` as ``args``; ``avatar serve`` builds the same app from
a YAML of ``ServeArgs``. This module sits above the pieces it binds (config, deployments), so
the package imports top-down: build → deployments → app/service → auth/uploads → config.
"""

from __future__ import annotations

from typing import Any

from cluster.serve.config import ServeArgs
from cluster.serve.deployments import Engine, Ingress


def build_app(args: dict[str, Any] | ServeArgs) -> Any:
    """The Serve application: the HTTP ingress bound to the engine deployment."""
    args = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    args.engine_config()  # fail at deploy time, not in a replica
    data = args.model_dump(mode="json")
    data["storage"]["root"] = str(args.root)
    engine = Engine.bind(data)
    ing = args.ingress
    return Ingress.options(
        num_replicas=ing.replicas,
        max_ongoing_requests=ing.max_ongoing_requests,
        max_queued_requests=ing.max_queued_requests,
    ).bind(engine, data)
