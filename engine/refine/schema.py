"""Typed inputs and outputs of prompt refinement, shared by every backend."""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.refine.tables import PROMPT_TEMPLATES

Source = Literal["template", "openai", "template-fallback"]
"""Which backend produced a :class:`RefinedPrompt` (``template-fallback``: openai failed)."""

_IDENTIFIER_RE = re.compile(r"^[^\s,()\[\]{}]{1,32}$")
_SPACES_RE = re.compile(r"\s+")


class RefineError(RuntimeError):
    """Refinement failed; the message says what happened and how to fix it."""


def clean_text(value: str) -> str:
    """``value`` on one line: whitespace runs collapsed, ends stripped of spaces and ``,;.``."""
    return _SPACES_RE.sub(" ", value).strip().strip(",;.").strip()


def check_identifier(value: str) -> str:
    """``value`` if it is a valid identifier token, else ValueError naming it and the fix."""
    if not _IDENTIFIER_RE.match(value):
        raise ValueError(
            f"identifier {value!r} must be one token of 1-32 characters without spaces, "
            "commas or brackets, e.g. 'sks'"
        )
    return value


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RefineRequest(_Frozen):
    """The inputs of one refinement: a coarse prompt, optional coarse parts, the identifier.

    A part left ``None`` (or blank) is derived from the coarse prompt; a given part takes
    precedence over what the coarse prompt says about the same aspect.
    """

    coarse: str = Field(max_length=2000)
    """The coarse prompt, e.g. "a woman in a red dress dancing on a beach"."""
    clothes: str | None = Field(default=None, max_length=1000)
    """Optional coarse description of the clothes, e.g. "red dress"."""
    face: str | None = Field(default=None, max_length=1000)
    """Optional coarse description of the face and hair, e.g. "blonde, smiling"."""
    background: str | None = Field(default=None, max_length=1000)
    """Optional coarse description of the scene, e.g. "beach at sunset"."""
    identifier: str = "sks"
    """Rare token naming the character in the appearance LoRA (DreamBooth style)."""

    @field_validator("coarse")
    @classmethod
    def _check_coarse(cls, value: str) -> str:
        value = clean_text(value)
        if not value:
            raise ValueError(
                "the coarse prompt is empty: pass a description such as "
                "'a woman in a red dress dancing on a beach'"
            )
        return value

    @field_validator("clothes", "face", "background")
    @classmethod
    def _clean_part(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return clean_text(value) or None

    @field_validator("identifier")
    @classmethod
    def _check_identifier(cls, value: str) -> str:
        return check_identifier(value)


class AppearancePrompts(NamedTuple):
    """The two prompts the appearance (LoRA) stage renders the character with."""

    full_body: str
    """Clothes-focused full-body shot: "a photo of <identifier> person, full body, …"."""
    face: str
    """Face close-up: "a photo of <identifier> person, close-up portrait of the face, …"."""


class RefinedPrompt(_Frozen):
    """Fine-grained prompts of one character in one scene, as the render stages need them."""

    clothes: str = Field(min_length=1)
    """Fine-grained description of the outfit."""
    face: str = Field(min_length=1)
    """Fine-grained description of the face and hair."""
    background: str = Field(min_length=1)
    """Fine-grained description of the scene, without any person."""
    full: str = Field(min_length=1)
    """The frame prompt: identifier, subject, clothes, face and background together."""
    identifier: str
    """The character's rare identifier token (e.g. "sks")."""
    negative: str
    """Negative prompt for classifier-free guidance."""
    source: Source
    """Backend that produced this refinement."""

    @field_validator("identifier")
    @classmethod
    def _check_identifier(cls, value: str) -> str:
        return check_identifier(value)

    @model_validator(mode="after")
    def _check_identifier_in_full(self) -> RefinedPrompt:
        if f" {self.identifier} " not in f" {self.full} ":
            raise ValueError(
                f"full prompt does not contain the identifier {self.identifier!r}: "
                "build it with engine.refine.compose_full"
            )
        return self

    @property
    def frame_prompt(self) -> str:
        """The prompt of every video frame (= :attr:`full`)."""
        return self.full

    @property
    def background_prompt(self) -> str:
        """The scene alone, with no person in it (for the background plate)."""
        return PROMPT_TEMPLATES["background"].format(background=self.background)

    def appearance_prompts(self) -> AppearancePrompts:
        """Full-body (clothes) and face close-up prompts of ``a photo of <identifier> person``."""
        return AppearancePrompts(
            full_body=PROMPT_TEMPLATES["full_body"].format(
                identifier=self.identifier, clothes=self.clothes
            ),
            face=PROMPT_TEMPLATES["face_closeup"].format(
                identifier=self.identifier, face=self.face
            ),
        )
