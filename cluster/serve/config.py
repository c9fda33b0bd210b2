"""Settings of the render service (:class:`ServeArgs`), loaded from YAML.

Data only: the Serve app builder that binds the deployments to these settings lives above them,
in :mod:`cluster.serve.build` (``cluster/deploy/serve.yaml`` names it by ``import_path``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.config import ConfigError, RenderConfig, load_config, preset_dict

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenConfig(_Base):
    """One API token (its owner name scopes every render it submits)."""

    name: str
    """Owner name ([A-Za-z0-9_-]{1,32}); renders of one name are invisible to the others."""
    sha256: str | None = None
    """Hex SHA-256 of the token (preferred: the config never holds the secret)."""
    token: str | None = None
    """The token itself (hashed at load, never logged); use ``sha256`` in shared configs."""
    max_concurrent: int | None = Field(default=None, ge=1, le=10_000)
    """Unfinished renders this token may hold (None: ``quotas.max_concurrent``)."""
    frames_per_day: int | None = Field(default=None, ge=1, le=10_000_000)
    """Frames this token may submit per rolling 24 h (None: ``quotas.frames_per_day``)."""
    max_storage_bytes: int | None = Field(default=None, ge=0, le=1 << 50)
    """Bytes this token's renders and uploads may occupy (None: ``quotas.max_storage_bytes``)."""
    retention_days: float | None = Field(default=None, gt=0.0, le=36_500.0)
    """Finished renders of this token are removed this long after they ended (None:
    ``storage.retention_days``)."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(f"token name {value!r}: use 1-32 characters of A-Z, a-z, 0-9, _, -")
        return value


class QuotaConfig(_Base):
    """Default per-token quotas."""

    max_concurrent: int = Field(default=8, ge=1, le=10_000)
    """Unfinished (queued or running) renders one token may hold; past it → 429."""
    frames_per_day: int = Field(default=5000, ge=1, le=10_000_000)
    """Frames one token may submit per rolling 24 h; past it → 429 with Retry-After."""
    max_storage_bytes: int = Field(default=10 << 30, ge=0, le=1 << 50)
    """Bytes one token's renders (artefacts) and uploads may occupy; past it → 429 (delete some)."""


class LimitConfig(_Base):
    """Limits on every size a request can set (past one → 413 or 422 naming the field)."""

    max_body_bytes: int = Field(default=8 << 20, ge=1024, le=1 << 30)
    """Largest request body (JSON or multipart with the pose upload)."""
    max_frames: int = Field(default=64, ge=1, le=100_000)
    """Most frames of one render (after resampling to its fps)."""
    max_side: int = Field(default=512, ge=64, le=2048)
    """Largest width or height in pixels."""
    max_steps: int = Field(default=50, ge=1, le=1000)
    """Most denoising steps per frame."""
    max_prompt_chars: int = Field(default=500, ge=1, le=10_000)
    """Longest prompt (and negative prompt)."""
    max_upload_pixels: int = Field(default=2048 * 2048, ge=64 * 64, le=4096 * 4096)
    """Largest frame (width x height) a video/GIF upload may declare in its header (422 past
    it, before anything is decoded)."""
    max_upload_frames: int = Field(default=1024, ge=1, le=100_000)
    """Most frames a video/GIF upload may declare (before resampling to the render's fps)."""
    max_upload_megapixels: int = Field(default=256, ge=1, le=100_000)
    """Most pixels (millions) of all the frames an upload declares together: bounds the time its
    decode takes (about 20 Mpx/s on one core here) where the header states a frame count."""


class IngressConfig(_Base):
    """The HTTP ingress deployment (Ray Serve options)."""

    replicas: int = Field(default=2, ge=1, le=64)
    """Ingress replicas (CPU only; stateless: any replica serves any render, on any node)."""
    max_ongoing_requests: int = Field(default=64, ge=1, le=10_000)
    """Requests one replica works on at once (SSE streams count)."""
    max_queued_requests: int = Field(default=128, ge=-1, le=100_000)
    """Requests waiting for a replica before Serve answers 503 (-1: unbounded; don't)."""


class StorageConfig(_Base):
    """Where renders live and how long finished ones are kept."""

    root: Path = Path("out/serve")
    """Storage root: the render store (renders.sqlite, one folder per render) and uploads."""
    retention_days: float | None = Field(default=None, gt=0.0, le=36_500.0)
    """Finished (done, failed, cancelled) renders are removed with their uploads this long after
    they ended; None keeps them until DELETE. A token's ``retention_days`` overrides it."""
    retention_check_s: float = Field(default=3600.0, ge=1.0, le=86_400.0)
    """How often the engine looks for renders past their retention."""


class ServeArgs(_Base):
    """Everything the render service needs; the ``args`` of the Serve config's application."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Storage root and retention (a plain path is read as ``{root: path}``)."""
    preset: str = "tiny"
    """Preset of the engine (model, cluster settings) every render uses."""
    presets: list[str] = Field(default_factory=lambda: ["tiny"])
    """Presets a request may name for its defaults (size, steps); each must use the engine's
    model, so a request can never choose a model."""
    set: list[str] = Field(default_factory=list)
    """Overrides of the engine settings, e.g. ``cluster.max_queued=200``."""
    characters: dict[str, str] = Field(default_factory=dict)
    """Character LoRAs a request may name (``character``): name → a LoRA file or folder on the
    server (``appearance.lora``). The only way a request reaches a LoRA: it never names a path."""
    executor: Literal["ray", "inprocess"] = "ray"
    """``ray``: resident model actors (RayExecutor); ``inprocess``: models in the engine replica."""
    paused: bool = False
    """Accept and store renders but never render them (maintenance, API fuzzing)."""
    host: str = "127.0.0.1"
    """HTTP host of ``avatar serve`` (Serve's proxy)."""
    port: int = Field(default=8000, ge=1, le=65535)
    """HTTP port of ``avatar serve``."""
    auth: bool = True
    """Require a bearer token (False: every caller is the owner ``anonymous``; local use only)."""
    tokens: list[TokenConfig] = Field(default_factory=list)
    """API tokens; more come from the environment variable ``tokens_env``."""
    tokens_env: str = "AVATAR_SERVE_TOKENS"
    """Environment variable with more tokens: ``name:token,name:token``."""
    metrics_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """Hex SHA-256 of a token that ``GET /metrics`` then requires (None: see ``metrics_env``)."""
    metrics_env: str = "AVATAR_METRICS_TOKEN"
    """Environment variable holding the metrics token; with neither set, /metrics is open
    (it shows service-wide counts, no render ids or owners)."""
    quotas: QuotaConfig = Field(default_factory=QuotaConfig)
    limits: LimitConfig = Field(default_factory=LimitConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    retry_after_s: int = Field(default=5, ge=1, le=3600)
    """Retry-After of 503 answers (render queue full)."""
    poll_s: float = Field(default=0.5, gt=0.0, le=10.0)
    """How often an event stream looks for new progress events."""
    stream_max_s: float = Field(default=3600.0, gt=0.0, le=86_400.0)
    """An event stream ends after this long (clients reconnect with Last-Event-ID)."""

    @field_validator("characters")
    @classmethod
    def _check_characters(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not NAME_PATTERN.match(name):
                raise ValueError(f"character {name!r}: use 1-32 characters of A-Z, a-z, 0-9, _, -")
        return value

    @field_validator("storage", mode="before")
    @classmethod
    def _storage_path(cls, value: Any) -> Any:
        return {"root": value} if isinstance(value, str | Path) else value

    @property
    def root(self) -> Path:
        return self.storage.root.resolve()

    def engine_config(self) -> RenderConfig:
        """The engine settings; checks that every allowed preset uses the engine's model."""
        config = load_config(None, preset=self.preset, overrides=self.set)
        if not self.presets:
            raise ConfigError("serve args: presets is empty; list at least the engine's preset")
        mine = preset_dict(self.preset).get("model", {})
        for name in self.presets:
            if preset_dict(name).get("model", {}) != mine:
                raise ConfigError(
                    f"serve args: preset {name!r} uses another model than the engine's preset "
                    f"{self.preset!r}; one service serves one model: drop it from presets"
                )
        return config


def load_args(path: Path | None, **overrides: Any) -> ServeArgs:
    """ServeArgs from a YAML file (a bare ServeArgs mapping, or a Serve config whose first
    application's ``args`` are used), with keyword overrides on top."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"serve config {path}: {e}") from None
        if "applications" in raw:
            data = dict(raw["applications"][0].get("args") or {})
        else:
            data = dict(raw)
    storage = overrides.pop("storage", None)
    if storage is not None:  # a root given on the command line keeps the file's retention
        given = data.get("storage")
        data["storage"] = {**given, "root": storage} if isinstance(given, dict) else storage
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ServeArgs.model_validate(data)
    except ValueError as e:
        raise ConfigError(f"serve config {path or '(defaults)'}: {e}") from None


def env_tokens(args: ServeArgs) -> list[TokenConfig]:
    """Tokens of the config plus those of ``args.tokens_env`` (``name:token,…``)."""
    tokens = list(args.tokens)
    raw = os.environ.get(args.tokens_env, "")
    for i, item in enumerate(t for t in raw.split(",") if t.strip()):
        name, sep, secret = item.strip().partition(":")
        if not sep or not secret:
            raise ConfigError(
                f"${args.tokens_env}: entry {i} is not name:token (the token itself not shown)"
            )
        tokens.append(TokenConfig(name=name, token=secret))
    return tokens
