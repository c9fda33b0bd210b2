"""The full ``avatar`` command line: the engine's commands (:mod:`engine.cli`) plus ``avatar
serve``, which needs Ray Serve and FastAPI and so lives here, above the engine
(``configs ← engine ← actors ← cluster``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from engine.cli import _fail, app
from engine.config import ConfigError

__all__ = ["app", "main"]


@app.command()
def serve(
    config: Annotated[
        Path | None,
        typer.Option(help="ServeArgs YAML or a Serve config (cluster/deploy/serve.yaml)."),
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="HTTP port (default: the config's, 8000).")
    ] = None,
    storage: Annotated[Path | None, typer.Option(help="Storage root of the renders.")] = None,
) -> None:
    """Start the HTTP render service and its web page on 127.0.0.1 (Ray Serve); Ctrl-C stops."""
    import time

    from cluster.serve.config import load_args
    from cluster.serve.local import ensure_token, start, stop

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = load_args(config, port=port, storage=storage, host="127.0.0.1")
        token = ensure_token(args)
        url = start(args)
    except (ConfigError, TimeoutError) as e:
        _fail(str(e))
        return
    typer.echo(f"serving on {url}  (API: {url}/openapi.json, metrics: {url}/metrics)")
    if token:
        typer.echo(f"token (this run only): {token}\npage: {url}/#token={token}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop()


def main() -> None:
    """The ``avatar`` console script."""
    app()


if __name__ == "__main__":
    main()
