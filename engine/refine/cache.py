"""On-disk cache of refinements: one JSON file per request, written atomically.

The key is the sha256 of the backend, the model (openai only), the request (coarse prompt, parts,
identifier) and :data:`PROMPT_VERSION`, which changes whenever the template tables or the system
prompt change. The server URL is deliberately not part of the key: the same model behind another
URL gives the same refinement.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from pydantic import ValidationError

from engine.files import atomic_write
from engine.refine.openai_backend import SYSTEM_PROMPT
from engine.refine.schema import RefinedPrompt, RefineRequest
from engine.refine.tables import TABLES_DIGEST

logger = logging.getLogger("engine.refine")

COMPOSE_VERSION = "1"
"""Bump when the code that composes prompts changes in a way the tables do not show."""

PROMPT_VERSION = (
    f"{COMPOSE_VERSION}-{TABLES_DIGEST}-{hashlib.sha256(SYSTEM_PROMPT.encode()).hexdigest()[:16]}"
)
"""Version of the tables, system prompt and composition; part of every cache key."""


def cache_key(request: RefineRequest, backend: str, model: str) -> str:
    """sha256 hex digest naming the refinement of ``request`` by ``backend``/``model``."""
    payload = {
        "backend": backend,
        "model": model if backend == "openai" else "",
        "request": request.model_dump(mode="json"),
        "version": PROMPT_VERSION,
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


class RefineCache:
    """Refinements stored as ``<dir>/<key>.json``; unreadable entries count as misses."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        """File of the entry ``key``."""
        return self.directory / f"{key}.json"

    def get(self, key: str) -> RefinedPrompt | None:
        """The cached refinement of ``key``, or None (missing or corrupt entry)."""
        path = self.path(key)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as e:
            logger.warning("cannot read refine cache entry %s (%s); refining again", path, e)
            return None
        try:
            return RefinedPrompt.model_validate_json(text)
        except ValidationError:
            logger.warning("refine cache entry %s is corrupt; refining again", path)
            return None

    def put(self, key: str, value: RefinedPrompt) -> None:
        """Store ``value`` atomically (temp file in the same folder, then os.replace).

        A failure to write is logged, never raised: the cache is an optimisation.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path(key), value.model_dump_json(indent=2))
        except OSError as e:
            logger.warning("cannot write refine cache entry in %s (%s)", self.directory, e)
