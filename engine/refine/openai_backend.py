"""The ``openai`` refiner: the paper's ChatGPT step through any OpenAI-compatible chat server.

The ``openai`` package is imported lazily, inside :meth:`OpenAIRefiner.refine`, so the engine
imports without it. The client's own retries are off; this module retries 408/409/429/5xx,
timeouts and connection errors itself with deterministic exponential backoff. The model only
writes the parts (clothes, face, background, negative); the frame prompt is composed locally so
the identifier token is always in it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from engine.config import DEFAULT_NEGATIVE, RefineConfig
from engine.refine.schema import RefinedPrompt, RefineError, RefineRequest, clean_text
from engine.refine.template import TemplateRefiner, compose_full

logger = logging.getLogger("engine.refine")

DEFAULT_API_URL = "https://api.openai.com/v1"
RETRY_STATUS = frozenset({408, 409, 429})
"""HTTP statuses retried besides every 5xx."""

SYSTEM_PROMPT = """\
You turn a coarse description of a person dancing into fine-grained text-to-image prompts for \
Stable Diffusion, as in the paper Dancing Avatar.
Reply with one JSON object and nothing else, matching this JSON schema:
{"type": "object", "required": ["clothes", "face", "background", "negative"],
 "properties": {
  "clothes": {"type": "string", "description": "the whole outfit: every garment with colour, \
material, cut and details, and the shoes"},
  "face": {"type": "string", "description": "face, skin, eyes, expression, hair length, colour \
and style"},
  "background": {"type": "string", "description": "the scene and its lighting, with no person \
in it"},
  "negative": {"type": "string", "description": "comma-separated things to avoid in the image"}}}
Rules: keep what the user wrote and add concrete visual detail; each value is one line of \
comma-separated phrases, at most 40 words; never mention the identifier token, the camera or \
image quality; the background never contains a person. Hints for clothes, face or background \
take precedence over the coarse prompt."""

_ERROR_SNIPPET = 200


class _ModelReply(BaseModel):
    """The JSON object the model must return (extra keys are ignored)."""

    model_config = ConfigDict(extra="ignore")

    clothes: str
    face: str
    background: str
    negative: str

    @field_validator("clothes", "face", "background", "negative")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        value = clean_text(value)
        if not value:
            raise ValueError("is empty")
        if len(value) > 1000:
            raise ValueError(f"is {len(value)} characters long (at most 1000)")
        return value


def _snippet(text: str) -> str:
    text = clean_text(text)
    return text if len(text) <= _ERROR_SNIPPET else text[:_ERROR_SNIPPET] + "…"


def _merge_negative(negative: str) -> str:
    """The config's default negative terms followed by the model's new ones."""
    terms = [clean_text(x) for x in f"{DEFAULT_NEGATIVE},{negative}".split(",")]
    return ", ".join(dict.fromkeys(x for x in terms if x))


def parse_reply(content: str | None, refusal: str | None, finish_reason: str | None) -> _ModelReply:
    """Validate the model's message; RefineError naming what is wrong otherwise."""
    hint = (
        "use a model that follows JSON instructions (response_format json_object), "
        "or set refine.backend=template"
    )
    if refusal:
        raise RefineError(f"the model refused to refine the prompt: {_snippet(refusal)!r}; {hint}")
    if not content or not content.strip():
        raise RefineError(
            f"the model returned an empty reply (finish_reason={finish_reason!r}); {hint}"
        )
    try:
        data = json.loads(content)
    except json.JSONDecodeError as e:
        cut = " (cut off: finish_reason='length')" if finish_reason == "length" else ""
        raise RefineError(
            f"the model's reply is not valid JSON{cut} ({e.msg} at char {e.pos}): "
            f"{_snippet(content)!r}; {hint}"
        ) from None
    if not isinstance(data, dict):
        raise RefineError(
            f"the model's reply is JSON but not an object: {_snippet(content)!r}; {hint}"
        )
    try:
        return _ModelReply.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'reply'}: "
            f"{'missing' if err['type'] == 'missing' else err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        )
        raise RefineError(
            f"the model's JSON reply is incomplete ({problems}); it needs string keys "
            f"clothes, face, background, negative: {_snippet(content)!r}; {hint}"
        ) from None


class OpenAIRefiner:
    """Refiner backed by an OpenAI-compatible chat-completions server.

    Args:
        config: The ``refine`` section of the render config.
        retry_base_delay_s: Delay before the first retry; it doubles on every retry.
        retry_max_delay_s: Upper bound of one delay (also caps a server's Retry-After).
        sleep: Function used to wait between retries (tests pass a recorder).
    """

    name = "openai"

    def __init__(
        self,
        config: RefineConfig,
        *,
        retry_base_delay_s: float = 0.5,
        retry_max_delay_s: float = 8.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.retry_base_delay_s = retry_base_delay_s
        self.retry_max_delay_s = retry_max_delay_s
        self._sleep = sleep

    @property
    def url(self) -> str:
        """The server URL requests go to (the client reads OPENAI_BASE_URL when unset)."""
        return self.config.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_API_URL

    def retry_delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based): base * 2**retry, capped."""
        delay = self.retry_base_delay_s * 2.0**retry
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.retry_max_delay_s)

    def refine(self, request: RefineRequest) -> RefinedPrompt:
        """Refine ``request`` with the model; on failure raise or fall back to the template.

        Raises:
            RefineError: The server or the model failed and ``fallback_to_template`` is false.
        """
        try:
            return self._refine_remote(request)
        except RefineError as e:
            if not self.config.fallback_to_template:
                raise
            logger.warning("openai refinement failed, using the template backend: %s", e)
            result = TemplateRefiner().refine(request)
            return result.model_copy(update={"source": "template-fallback"})

    def _refine_remote(self, request: RefineRequest) -> RefinedPrompt:
        openai = _import_openai()
        key = os.environ.get(self.config.api_key_env, "").strip()
        if not key:
            raise RefineError(
                f"no API key: environment variable {self.config.api_key_env} is not set; export "
                f"it (any non-empty value for a server without auth), set refine.api_key_env to "
                "the variable holding the key, or use refine.backend=template"
            )
        hints = {"clothes": request.clothes, "face": request.face, "background": request.background}
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": json.dumps({"coarse_prompt": request.coarse, **hints})},
        ]
        try:
            client = openai.OpenAI(
                base_url=self.config.base_url,
                api_key=key,
                timeout=self.config.timeout_s,
                max_retries=0,
            )
        except openai.OpenAIError as e:
            raise RefineError(f"cannot create the OpenAI client for {self.url}: {e}") from None
        with client:
            completion = self._complete(openai, client, messages)
        choices = getattr(completion, "choices", None) or []
        if not choices:
            raise RefineError(f"the server at {self.url} returned no choices; check refine.model")
        message = choices[0].message
        reply = parse_reply(
            message.content, getattr(message, "refusal", None), choices[0].finish_reason
        )
        return RefinedPrompt(
            clothes=reply.clothes,
            face=reply.face,
            background=reply.background,
            full=compose_full(request, reply.clothes, reply.face, reply.background),
            identifier=request.identifier,
            negative=_merge_negative(reply.negative),
            source="openai",
        )

    def _complete(self, openai: Any, client: Any, messages: list[dict[str, str]]) -> Any:
        """One chat completion with retries; RefineError (no client traceback) on failure."""
        attempts = self.config.max_retries + 1
        problem = ""
        for attempt in range(attempts):
            retry_after: float | None = None
            try:
                return client.chat.completions.create(
                    model=self.config.model,
                    messages=messages,
                    response_format={"type": "json_object"},
                )
            except openai.APIStatusError as e:
                if e.status_code < 500 and e.status_code not in RETRY_STATUS:
                    raise RefineError(self._status_message(e.status_code, e.message)) from None
                problem = f"HTTP {e.status_code} ({_snippet(e.message)})"
                retry_after = _retry_after(e.response.headers.get("retry-after"))
            except openai.APITimeoutError:
                problem = f"no answer within refine.timeout_s={self.config.timeout_s:g} s"
            except openai.APIConnectionError:
                problem = "connection failed (is the server running?)"
            except openai.OpenAIError as e:
                raise RefineError(f"request to {self.url} failed: {_snippet(str(e))}") from None
            if attempt + 1 < attempts:
                delay = self.retry_delay(attempt, retry_after)
                logger.info(
                    "openai refinement: %s; retry %d in %.2f s", problem, attempt + 1, delay
                )
                self._sleep(delay)
        raise RefineError(
            f"openai refinement at {self.url} (model {self.config.model!r}) failed after "
            f"{attempts} attempt(s): {problem}. Check the server and refine.base_url, raise "
            "refine.timeout_s or refine.max_retries, set refine.fallback_to_template=true, "
            "or use refine.backend=template"
        )

    def _status_message(self, status: int, message: str) -> str:
        where = f"the server at {self.url} (model {self.config.model!r})"
        detail = _snippet(message)
        if status in (401, 403):
            return (
                f"{where} rejected the API key from ${self.config.api_key_env} (HTTP {status}: "
                f"{detail}); check the key and its permissions"
            )
        if status == 404:
            return (
                f"{where} answered HTTP 404 ({detail}); check refine.model and refine.base_url "
                "(an OpenAI-compatible URL usually ends in /v1)"
            )
        return (
            f"{where} rejected the request (HTTP {status}: {detail}); check that refine.model "
            "supports chat completions with response_format json_object"
        )


def _retry_after(value: str | None) -> float | None:
    """Seconds of a numeric Retry-After header, or None."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _import_openai() -> Any:
    try:
        import openai
    except ImportError:
        raise RefineError(
            "refine.backend=openai needs the openai package: pip install 'dancing-avatar[openai]' "
            "(or pip install openai), or use refine.backend=template"
        ) from None
    return openai
