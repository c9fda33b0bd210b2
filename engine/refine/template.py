"""The offline, deterministic ``template`` refiner: table lookups, no randomness, no network.

The vocabulary and the matching rules are documented in :mod:`engine.refine.tables`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import NamedTuple

from engine.config import DEFAULT_NEGATIVE
from engine.refine import tables as t
from engine.refine.schema import RefinedPrompt, RefineRequest, clean_text

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
_CLIP_PIECE_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
_MAX_PHRASE = 3
_GARMENT_MODIFIERS = frozenset(t.COLOURS) | set(t.SHADES) | set(t.MATERIALS) | set(t.PATTERNS)
_HAIR_MODIFIERS = (
    frozenset(t.COLOURS) | set(t.SHADES) | set(t.HAIR_WORDS) | set(t.HAIR_LENGTHS)
) | set(t.HAIR_TEXTURES)
_COLOUR_CUES = frozenset({"in", "wearing", "all", "dressed"})
_BODY_WORDS = frozenset({"hair", "eyes", "eye", "skin", "lips", "nails"})


class Match(NamedTuple):
    """A table key found in a token list: its position, canonical key and length in tokens."""

    start: int
    key: str
    length: int


def tokenize(text: str) -> list[str]:
    """Lower-case words of ``text`` (hyphenated words such as ``t-shirt`` stay whole)."""
    return _TOKEN_RE.findall(text.lower())


def _lemmas(word: str) -> Iterator[str]:
    yield word
    if word.endswith("es"):
        yield word[:-2]
    if word.endswith("s"):
        yield word[:-1]


def match_at(table: Mapping[str, object], tokens: list[str], start: int) -> Match | None:
    """The longest key of ``table`` (or alias of one) starting at ``tokens[start]``."""
    for length in range(min(_MAX_PHRASE, len(tokens) - start), 0, -1):
        head = tokens[start : start + length - 1]
        for lemma in _lemmas(tokens[start + length - 1]):
            phrase = " ".join([*head, lemma])
            key = t.ALIASES.get(phrase, phrase)
            if key in table:
                return Match(start, key, length)
    return None


def find_all(table: Mapping[str, object], tokens: list[str]) -> list[Match]:
    """Non-overlapping matches of ``table`` in ``tokens``, left to right."""
    found: list[Match] = []
    i = 0
    while i < len(tokens):
        match = match_at(table, tokens, i)
        if match is None:
            i += 1
        else:
            found.append(match)
            i += match.length
    return found


def _fix_article(text: str) -> str:
    """Make a leading "a"/"an" agree with the next word."""
    if text.startswith("a ") and text[2:3] in set("aeiou"):
        return "an " + text[2:]
    if text.startswith("an ") and text[3:4] not in set("aeiou"):
        return "a " + text[3:]
    return text


def _dedup(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------------------------------------
# Clothes


class _Piece(NamedTuple):
    key: str
    colour: str
    material: str


def _run_before(tokens: list[str], end: int, allowed: frozenset[str] | set[str]) -> list[str]:
    """The contiguous words right before ``tokens[end]`` that are in ``allowed`` or fillers."""
    i = end
    while i > 0 and (tokens[i - 1] in allowed or tokens[i - 1] in t.FILLERS):
        i -= 1
    return [w for w in tokens[i:end] if w in allowed]


def _colour_phrase(words: list[str], colours: Mapping[str, str] = t.COLOURS) -> str:
    """Colour phrase such as "dark blue and white" from shade and colour words (others ignored)."""
    segments: list[str] = []
    shade = ""
    for word in words:
        if word in t.SHADES and word not in colours:
            shade = t.SHADES[word]
        elif word in colours:
            segments.append(f"{shade} {colours[word]}".strip())
            shade = ""
    return " and ".join(_dedup(segments))


def _garment_modifiers(tokens: list[str], match: Match) -> _Piece:
    words = _run_before(tokens, match.start, _GARMENT_MODIFIERS)
    colour = _colour_phrase(words)
    pattern = " ".join(_dedup([t.PATTERNS[w] for w in words if w in t.PATTERNS]))
    if pattern:
        colour = f"{colour or t.GARMENTS[match.key].colour} {pattern}"
    material = " ".join(_dedup([t.MATERIALS[w] for w in words if w in t.MATERIALS]))
    return _Piece(match.key, colour, material)


def _free_colour(tokens: list[str], *, need_cue: bool) -> str:
    """Colour of an outfit named without a garment: "in red", "wearing dark blue"."""
    for i, word in enumerate(tokens):
        if word not in t.COLOURS:
            continue
        start = i
        while start > 0 and tokens[start - 1] in t.SHADES:
            start -= 1
        if need_cue and (start == 0 or tokens[start - 1] not in _COLOUR_CUES):
            continue
        if i + 1 < len(tokens) and tokens[i + 1] in _BODY_WORDS:
            continue
        return _colour_phrase(tokens[start : i + 1])
    return ""


def _complete_outfit(pieces: list[_Piece]) -> tuple[list[_Piece], str]:
    """Add the missing top/bottom (garment pairs) and pick the shoes of the main garment."""
    pieces = list(pieces)

    def first(*slots: str) -> _Piece | None:
        return next((p for p in pieces if t.GARMENTS[p.key].slot in slots), None)

    main = first("full") or first("bottom") or first("top") or first("outer")
    if first("full") is None:
        if first("top") is None:
            donor = first("outer", "bottom")
            pieces.append(
                _Piece(t.GARMENTS[donor.key].pair if donor else t.DEFAULT_OUTFIT[0], "", "")
            )
        if first("bottom") is None:
            top = first("top")
            pair = t.GARMENTS[top.key].pair if top else ""
            pieces.append(_Piece(pair or t.DEFAULT_OUTFIT[1], "", ""))
    main = main or first("full") or first("bottom") or first("top") or first("outer")
    shoes = t.GARMENTS[main.key].shoes if main and first("feet") is None else ""
    return pieces, shoes


def _describe_outfit(pieces: list[_Piece]) -> str:
    """The clothes description of ``pieces`` (completed, in :data:`SLOT_ORDER`)."""
    pieces, shoes = _complete_outfit(pieces)
    pieces.sort(key=lambda p: t.SLOT_ORDER.index(t.GARMENTS[p.key].slot))
    phrases = []
    for piece in pieces:
        garment = t.GARMENTS[piece.key]
        text = garment.template.format(
            colour=piece.colour or garment.colour, material=piece.material or garment.material
        )
        phrases.append(_fix_article(text))
    return ", ".join(_dedup([*phrases, shoes] if shoes else phrases))


def expand_clothes(tokens: list[str], *, explicit: bool) -> str | None:
    """Clothes description of the garments in ``tokens``; None when nothing is recognised.

    ``explicit``: the tokens are a clothes part, so a bare colour ("red") is the outfit's colour.
    """
    pieces: list[_Piece] = []
    for match in find_all(t.GARMENTS, tokens):
        if all(p.key != match.key for p in pieces):
            pieces.append(_garment_modifiers(tokens, match))
    if not pieces:
        colour = _free_colour(tokens, need_cue=not explicit)
        if not colour:
            return None
        pieces = [_Piece(t.DEFAULT_OUTFIT[0], colour, "")]
    return _describe_outfit(pieces)


# ---------------------------------------------------------------------------------------------
# Face and hair


def _hair(tokens: list[str], gender: str) -> tuple[str, bool]:
    """Hair description and whether the tokens said anything about the hair."""
    if "bald" in tokens:
        return "a smooth bald head", True
    words = [w for w in tokens if w in t.HAIR_WORDS or w in t.HAIR_TEXTURES_ANYWHERE]
    for i, word in enumerate(tokens):
        if word in ("hair", "haired"):
            words += _run_before(tokens, i, _HAIR_MODIFIERS)
        elif word.endswith("-haired"):
            words.append(word.removesuffix("-haired"))
    colour = _colour_phrase(words, {**t.COLOURS, **t.HAIR_COLOURS, **t.HAIR_WORDS})
    length = next((t.HAIR_LENGTHS[w] for w in words if w in t.HAIR_LENGTHS), "")
    texture = next((t.HAIR_TEXTURES[w] for w in words if w in t.HAIR_TEXTURES), "")
    styles = _dedup([t.HAIR_STYLES[m.key] for m in find_all(t.HAIR_STYLES, tokens)])
    found = bool(colour or length or texture or styles)
    default_length, default_texture, default_colour = t.HAIR_DEFAULTS[gender]
    if not styles:
        length, texture = length or default_length, texture or default_texture
    parts = [length, texture, colour or default_colour, "hair", *styles]
    return " ".join(p for p in parts if p), found


def _eyes(tokens: list[str]) -> str:
    words: list[str] = []
    for i, word in enumerate(tokens):
        if word in ("eyes", "eyed"):
            words += _run_before(tokens, i, frozenset(t.COLOURS) | set(t.SHADES))
        elif word.endswith("-eyed"):
            words.append(word.removesuffix("-eyed"))
    return _colour_phrase(words)


def expand_face(tokens: list[str], gender: str) -> tuple[str, bool]:
    """Face and hair description, and whether the tokens said anything about them."""
    hair, hair_found = _hair(tokens, gender)
    eyes = _eyes(tokens)
    features = _dedup([t.FACE_FEATURES[m.key] for m in find_all(t.FACE_FEATURES, tokens)])
    expressions = find_all(t.EXPRESSIONS, tokens)
    ages = find_all(t.AGES, tokens)
    found = hair_found or bool(eyes or features or expressions or ages)
    parts = [
        hair,
        *features,
        f"detailed symmetric {t.AGES[ages[0].key] if ages else 'face'}",
        f"bright {eyes} eyes" if eyes else "bright eyes",
        t.EXPRESSIONS[expressions[0].key] if expressions else t.DEFAULT_EXPRESSION,
        "natural skin texture",
    ]
    return ", ".join(parts), found


# ---------------------------------------------------------------------------------------------
# Background, subject, action


def expand_background(tokens: list[str]) -> str | None:
    """Scene description (setting, lighting) of ``tokens``; None when nothing is recognised."""
    scenes = find_all(t.SCENES, tokens)
    masked = list(tokens)
    for match in scenes:
        masked[match.start : match.start + match.length] = [""] * match.length
    lights = [
        t.LIGHTING[m.key]
        for m in find_all(t.LIGHTING, masked)
        if not (m.start + m.length < len(masked) and masked[m.start + m.length] in t.COLOURS)
    ]
    if not scenes and not lights:
        return None
    setting, light = t.SCENES[scenes[0].key] if scenes else t.DEFAULT_SCENE
    return ", ".join([setting, *(_dedup(lights) or [light])])


def detect_subject(text: str) -> tuple[str, str]:
    """(person noun, gender) of the first subject word of ``text``; ("person", "") if none."""
    found = find_all(t.SUBJECTS, tokenize(text))
    return t.SUBJECTS[found[0].key] if found else ("person", "")


def detect_action(text: str) -> str:
    """The highest-priority action phrase of ``text`` (default :data:`DEFAULT_ACTION`)."""
    found = {m.key for m in find_all(t.ACTIONS, tokenize(text))}
    return next((phrase for key, phrase in t.ACTIONS.items() if key in found), t.DEFAULT_ACTION)


def approx_clip_tokens(text: str) -> int:
    """Approximate CLIP token count of ``text``: its words and punctuation marks."""
    return len(_CLIP_PIECE_RE.findall(text.lower()))


def _phrases(text: str) -> list[str]:
    return [p for p in (clean_text(x) for x in text.split(",")) if p]


def compose_full(request: RefineRequest, clothes: str, face: str, background: str) -> str:
    """The frame prompt: identifier, subject and action of the coarse prompt, then the parts.

    When it would exceed :data:`FULL_TOKEN_BUDGET` approximate CLIP tokens, trailing phrases are
    dropped deterministically: first the quality terms, then one phrase at a time from whichever
    part has the most left (each part keeps its first phrase).
    """
    noun, _ = detect_subject(f"{request.coarse} {request.face or ''}")
    subject = _fix_article(f"a {noun} {detect_action(request.coarse)}")
    clothes = clothes.removeprefix("wearing ")
    # dict order breaks ties when trimming: face first, clothes last
    parts = {
        "face": _phrases(face),
        "background": _phrases(background),
        "clothes": _phrases(clothes),
    }
    quality = _phrases(t.FULL_QUALITY)

    def render() -> str:
        text = t.PROMPT_TEMPLATES["full"].format(
            identifier=request.identifier,
            subject=subject,
            quality=", ".join(quality),
            **{name: ", ".join(phrases) for name, phrases in parts.items()},
        )
        return clean_text(text)

    text = render()
    while approx_clip_tokens(text) > t.FULL_TOKEN_BUDGET:
        if quality:
            quality.pop()
        else:
            name = max(parts, key=lambda n: len(parts[n]))
            if len(parts[name]) <= 1:
                break
            parts[name].pop()
        text = render()
    return text


def template_negative() -> str:
    """The template backend's negative prompt (config default plus person-specific terms)."""
    return f"{DEFAULT_NEGATIVE}, {t.NEGATIVE_EXTRA}"


# ---------------------------------------------------------------------------------------------
# The refiner


class TemplateRefiner:
    """Offline refiner: expands known words of the prompt with the curated tables.

    Deterministic: the same request always gives the same :class:`RefinedPrompt`. A given part
    (``request.clothes`` …) is expanded instead of the coarse prompt; a given part with no known
    word is kept verbatim; with neither, the defaults of :mod:`engine.refine.tables` are used.
    """

    name = "template"

    def refine(self, request: RefineRequest) -> RefinedPrompt:
        """Refine ``request`` into fine-grained prompts."""
        coarse = tokenize(request.coarse)
        _, gender = detect_subject(f"{request.coarse} {request.face or ''}")
        templates = t.PROMPT_TEMPLATES

        if request.clothes is not None:
            clothes = expand_clothes(tokenize(request.clothes), explicit=True)
            clothes = clothes or templates["clothes_verbatim"].format(part=request.clothes)
        else:
            clothes = expand_clothes(coarse, explicit=False)
            clothes = clothes or _describe_outfit([_Piece(k, "", "") for k in t.DEFAULT_OUTFIT])

        if request.face is not None:
            face, found = expand_face(tokenize(request.face), gender)
            face = face if found else templates["face_verbatim"].format(part=request.face)
        else:
            face, _ = expand_face(coarse, gender)

        if request.background is not None:
            background = expand_background(tokenize(request.background))
            background = background or templates["background_verbatim"].format(
                part=request.background
            )
        else:
            background = expand_background(coarse) or ", ".join(t.DEFAULT_SCENE)

        return RefinedPrompt(
            clothes=clothes,
            face=face,
            background=background,
            full=compose_full(request, clothes, face, background),
            identifier=request.identifier,
            negative=template_negative(),
            source="template",
        )
