"""The procedural world of the ``micro`` preset: dancers drawn from COCO-18 keypoints over scenes.

Every sample is a pure function of ``(seed, index)``: a caption from a small grammar ("a woman in
a red dress dancing on a beach"), a dance-like pose, the figure drawn from that pose (limb
capsules, torso polygon and head disc with exactly the geometry of
:func:`engine.compose.pose_body_mask`, so the pose map and the figure agree), the scene behind it,
and the matching OpenPose pose map. Some appearance is *not* fixed by the caption (the exact
shade, a stripe or dot pattern, hair, the positions of the scene's elements): two samples of one
caption differ, which is the drift the paper's alignment modules remove.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from engine.compose import _body_scale
from engine.pose.draw import render_pose_map
from engine.pose.skeleton import HEAD, LIMBS, NUM_JOINTS, TORSO
from engine.pose.synth import _pose_at

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 30, 35),
    "blue": (35, 70, 210),
    "green": (40, 160, 60),
    "yellow": (235, 205, 35),
    "pink": (245, 125, 180),
    "purple": (125, 45, 170),
    "orange": (245, 130, 25),
    "white": (238, 238, 238),
    "black": (28, 28, 30),
}
"""Garment colour names of the caption grammar and their RGB centres."""

SUBJECTS = ("woman", "man", "girl", "boy", "person")
TOPS = ("dress", "shirt", "jacket", "top")
BOTTOMS = ("trousers", "skirt", "shorts", "jeans")
SCENES: dict[str, str] = {
    "beach": "on a beach",
    "forest": "in a forest",
    "street": "on a city street",
    "library": "in a library",
    "night": "under the moon at night",
    "stage": "on a stage",
}
"""Scene kind → the caption's phrase."""

SKIN = ((236, 188, 150), (205, 150, 110), (150, 100, 70), (95, 62, 45))
HAIR = ((30, 25, 22), (95, 60, 35), (215, 180, 100), (150, 55, 30))
NEGATIVE_WORDS = (
    "lowres", "bad anatomy", "blurry", "deformed", "extra limbs", "watermark", "worst quality",
    "low quality", "jpeg artifacts", "ugly", "bad hands", "text", "cropped", "out of frame",
)  # fmt: skip
"""Words of typical negative prompts: training maps them to the unconditional branch."""


@dataclass(frozen=True)
class Look:
    """What one sample shows: the caption's facts plus the details it leaves open."""

    subject: str
    top: str
    colour: str
    bottom: str | None
    bottom_colour: str
    scene: str
    caption: str
    shade: tuple[int, int, int]
    """The top garment's exact RGB (the named colour, jittered)."""
    pattern: str
    """``plain`` | ``stripes`` | ``dots`` on the top garment."""
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    long_hair: bool


@dataclass(frozen=True)
class Sample:
    """One training sample, all arrays ``(size, size, ...)``."""

    image: np.ndarray
    """(H, W, 3) uint8 RGB: the figure over the scene."""
    scene: np.ndarray
    """(H, W, 3) uint8 RGB: the same scene without the figure (the inpainting target)."""
    pose_map: np.ndarray
    """(H, W, 3) uint8 RGB OpenPose pose map."""
    mask: np.ndarray
    """(H, W) uint8 in {0, 1}: the figure's pixels."""
    keypoints: np.ndarray
    """(18, 3) float32 (x_px, y_px, confidence)."""
    look: Look


def sample_look(rng: np.random.Generator) -> Look:
    """A random caption and the appearance details it leaves open."""
    subject = str(rng.choice(SUBJECTS))
    top = str(rng.choice(TOPS))
    colour = str(rng.choice(list(COLOURS)))
    named_bottom = top != "dress" and rng.random() < 0.5
    bottom = None if top == "dress" else str(rng.choice(BOTTOMS))
    bottom_colour = str(rng.choice([c for c in COLOURS if c != colour]))
    scene = str(rng.choice(list(SCENES)))
    caption = f"a {subject} in a {colour} {top}"
    if named_bottom:
        caption += f" and {bottom_colour} {bottom}"
    caption += f" dancing {SCENES[scene]}"
    jitter = rng.integers(-22, 23, size=3)
    shade = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
    return Look(
        subject=subject,
        top=top,
        colour=colour,
        bottom=bottom,
        bottom_colour=bottom_colour
        if named_bottom
        else str(rng.choice(["blue", "black", "white"])),
        scene=scene,
        caption=caption,
        shade=shade,  # type: ignore[arg-type]
        pattern=str(rng.choice(["plain", "plain", "stripes", "dots"])),
        skin=SKIN[int(rng.integers(len(SKIN)))],
        hair=HAIR[int(rng.integers(len(HAIR)))],
        long_hair=bool(rng.random() < (0.8 if subject in ("woman", "girl") else 0.25)),
    )


def sample_pose(rng: np.random.Generator, size: int) -> np.ndarray:
    """(18, 3) float32 keypoints of a dance-like pose in a ``size``² frame.

    The procedural dance of :mod:`engine.pose.synth` at a random time, with random arm and leg
    offsets, a random stature (45–75 % of the frame) and position; every joint inside the frame.
    """
    p = _pose_at(float(rng.uniform(0.0, 2.0)))  # statures, origin at the ankle-line centre
    neck = p[1].copy()
    for shoulder, elbow, wrist in ((2, 3, 4), (5, 6, 7)):  # swing each arm about its shoulder
        a, b = rng.uniform(-0.9, 0.9), rng.uniform(-0.8, 0.8)
        p[elbow] = p[shoulder] + _rotate(p[elbow] - p[shoulder], a)
        p[wrist] = p[elbow] + _rotate(p[wrist] - p[elbow], a + b)
    for hip, knee, ankle in ((8, 9, 10), (11, 12, 13)):
        a = rng.uniform(-0.35, 0.35)
        p[knee] = p[hip] + _rotate(p[knee] - p[hip], a)
        p[ankle] = p[knee] + _rotate(p[ankle] - p[knee], a + rng.uniform(-0.3, 0.3))
    p = neck + _rotate(p - neck, rng.uniform(-0.15, 0.15))
    stature = rng.uniform(0.45, 0.75) * size
    pts = p * stature
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    margin = 0.06 * size
    room = np.maximum(size - 2 * margin - (hi - lo), 0.0)
    offset = margin - lo + rng.uniform(0.0, 1.0, size=2) * room
    kp = np.ones((NUM_JOINTS, 3), np.float32)
    kp[:, :2] = pts + offset
    return kp


def _rotate(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([c * v[..., 0] - s * v[..., 1], s * v[..., 0] + c * v[..., 1]], axis=-1)


def draw_scene(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8 RGB scene of ``kind``; element positions drawn from ``rng``."""
    s = size
    img = np.zeros((s, s, 3), np.uint8)
    y = np.linspace(0.0, 1.0, s)[:, None, None]
    horizon = int(s * rng.uniform(0.5, 0.62))

    def grad(top: tuple[int, ...], bottom: tuple[int, ...]) -> np.ndarray:
        return (np.array(top) * (1 - y) + np.array(bottom) * y).astype(np.uint8) * np.ones(
            (1, s, 1), np.uint8
        )

    if kind == "beach":
        img[:] = grad((90, 160, 235), (185, 220, 245))
        img[horizon - s // 10 : horizon] = (30, 120, 175)
        img[horizon:] = grad((235, 215, 160), (215, 185, 120))[horizon:]
        cx = int(rng.uniform(0.1, 0.9) * s)
        cv2.circle(img, (cx, int(s * 0.14)), max(2, s // 14), (255, 236, 140), -1)
    elif kind == "forest":
        img[:] = grad((120, 170, 110), (45, 95, 40))
        for x in rng.uniform(0, s, size=5):
            w = max(2, int(s * rng.uniform(0.03, 0.07)))
            cv2.rectangle(img, (int(x), 0), (int(x) + w, s), (85, 58, 35), -1)
        for _ in range(6):
            c = (int(rng.uniform(0, s)), int(rng.uniform(0, 0.35 * s)))
            cv2.circle(img, c, max(3, int(s * rng.uniform(0.08, 0.16))), (30, 85, 35), -1)
    elif kind == "street":
        img[:] = grad((170, 175, 185), (150, 155, 160))
        x = 0
        while x < s:
            w, h = int(s * rng.uniform(0.15, 0.3)), int(s * rng.uniform(0.25, 0.55))
            g = int(rng.uniform(70, 150))
            cv2.rectangle(img, (x, horizon - h), (x + w, horizon), (g, g, g + 10), -1)
            for wy in range(horizon - h + 3, horizon - 3, max(3, s // 12)):
                for wx in range(x + 2, x + w - 2, max(3, s // 12)):
                    cv2.rectangle(
                        img, (wx, wy), (wx + max(1, s // 40), wy + 1), (235, 215, 120), -1
                    )
            x += w + 1
        img[horizon:] = (65, 65, 70)
        cv2.line(img, (0, (horizon + s) // 2), (s, (horizon + s) // 2), (230, 230, 230), 1)
    elif kind == "library":
        img[:] = (120, 80, 50)
        shelf = max(4, s // 6)
        for top in range(int(s * rng.uniform(0.0, 0.08)), horizon, shelf):
            x = int(rng.uniform(0, 3))
            while x < s:
                w = max(1, int(s * rng.uniform(0.015, 0.035)))
                colour = tuple(int(c) for c in rng.integers(40, 200, size=3))
                cv2.rectangle(img, (x, top + 1), (x + w, top + shelf - 2), colour, -1)
                x += w + 1
            cv2.line(img, (0, top + shelf - 1), (s, top + shelf - 1), (70, 45, 25), 1)
        img[horizon:] = (150, 105, 65)
    elif kind == "night":
        img[:] = grad((8, 10, 35), (25, 30, 70))
        for _ in range(s // 3):
            img[int(rng.uniform(0, horizon)), int(rng.uniform(0, s))] = (235, 235, 245)
        cx = int(rng.uniform(0.15, 0.85) * s)
        cv2.circle(img, (cx, int(s * 0.16)), max(2, s // 11), (245, 240, 200), -1)
        img[horizon:] = (20, 28, 30)
    elif kind == "stage":
        img[:] = (25, 15, 20)
        cv2.rectangle(img, (0, 0), (int(s * 0.16), s), (140, 20, 35), -1)
        cv2.rectangle(img, (s - int(s * 0.16), 0), (s, s), (140, 20, 35), -1)
        img[horizon:] = (120, 80, 45)
        cx = int(rng.uniform(0.3, 0.7) * s)
        overlay = img.copy()
        cv2.ellipse(overlay, (cx, int(s * 0.85)), (s // 4, s // 12), 0, 0, 360, (250, 235, 180), -1)
        img = np.asarray(cv2.addWeighted(overlay, 0.45, img, 0.55, 0), np.uint8)
    else:
        raise ValueError(f"unknown scene kind {kind!r}; use one of {list(SCENES)}")
    return img


# Which garment colours each limb of LIMBS takes (see engine.pose.skeleton.LIMBS order).
_UPPER = {(1, 2), (1, 5), (2, 3), (5, 6), (1, 8), (1, 11)}
_THIGH = {(8, 9), (11, 12)}
_SHIN = {(9, 10), (12, 13)}
_FOREARM = {(3, 4), (6, 7)}


def _part_masks(kp: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Per-part binary masks with :func:`pose_body_mask`'s geometry (limbs, torso, head)."""
    scale = _body_scale(kp)
    thick = max(2, round(0.22 * scale))
    pts = np.round(kp[:, :2]).astype(int)
    parts = {k: np.zeros((size, size), np.uint8) for k in ("top", "thigh", "shin", "fore", "skin")}
    for a, b in LIMBS:
        key = (
            "top" if (a, b) in _UPPER else "thigh" if (a, b) in _THIGH
            else "shin" if (a, b) in _SHIN else "fore" if (a, b) in _FOREARM else "skin"
        )  # fmt: skip
        cv2.line(parts[key], tuple(pts[a]), tuple(pts[b]), 1, thick, lineType=cv2.LINE_8)
        for j in (a, b):
            cv2.circle(parts[key], tuple(pts[j]), thick // 2 + 1, 1, -1)
    cv2.fillConvexPoly(parts["top"], pts[list(TORSO)].astype(np.int32), 1)
    head = np.zeros((size, size), np.uint8)
    centre = kp[list(HEAD), :2].mean(axis=0)
    radius = max(2, int(0.35 * scale))
    cv2.circle(head, tuple(np.round(centre).astype(int)), radius, 1, -1)
    parts["head"] = head
    parts["head_geom"] = np.array([centre[0], centre[1], radius], np.float32)  # type: ignore[assignment]
    return parts


def draw_figure(
    canvas: np.ndarray, kp: np.ndarray, look: Look, rng: np.random.Generator
) -> np.ndarray:
    """Draw the dancer of ``look`` at ``kp`` onto ``canvas`` (modified); returns its (H, W) mask."""
    size = canvas.shape[0]
    parts = _part_masks(kp, size)
    top_colour = np.array(look.shade, np.uint8)
    bottom = np.array(COLOURS[look.bottom_colour], np.uint8)
    skin = np.array(look.skin, np.uint8)
    canvas[parts["skin"] > 0] = skin
    legs_skin = look.top == "dress" or look.bottom in ("skirt", "shorts")
    canvas[parts["shin"] > 0] = skin if legs_skin else bottom
    canvas[parts["thigh"] > 0] = top_colour if look.top == "dress" else bottom
    canvas[parts["fore"] > 0] = top_colour if look.top == "jacket" else skin
    top = parts["top"] > 0
    canvas[top] = top_colour
    if look.pattern != "plain":
        shade = np.clip(top_colour.astype(int) + (-70 if top_colour.mean() > 110 else 80), 0, 255)
        marks = np.zeros((size, size), np.uint8)
        step = max(3, size // 16)
        phase = int(rng.integers(step))
        if look.pattern == "stripes":
            marks[phase::step] = 1
        else:
            marks[phase::step, phase::step] = 1
        canvas[top & (marks > 0)] = shade.astype(np.uint8)
    head = parts["head"] > 0
    canvas[head] = skin
    cx, cy, r = (float(v) for v in parts["head_geom"])
    ys, xs = np.mgrid[0:size, 0:size]
    hair = head & (ys < cy - 0.15 * r)  # the cap
    if look.long_hair:  # hair framing the face down to the chin, inside the head disc
        hair |= head & (np.abs(xs - cx) > 0.55 * r)
    canvas[hair] = np.array(look.hair, np.uint8)
    drawn = np.zeros((size, size), np.uint8)
    for key in ("top", "thigh", "shin", "fore", "skin", "head"):
        drawn |= parts[key]
    return drawn


def make_sample(seed: int, index: int, size: int = 64) -> Sample:
    """Sample ``index`` of the world seeded ``seed``: deterministic, independent of other samples."""
    rng = np.random.default_rng([seed, index])
    look = sample_look(rng)
    kp = sample_pose(rng, size)
    scene = draw_scene(look.scene, size, rng)
    image = scene.copy()
    mask = draw_figure(image, kp, look, rng)
    return Sample(
        image=image,
        scene=scene,
        pose_map=render_pose_map(kp, size, size),
        mask=mask,
        keypoints=kp,
        look=look,
    )


def parse_caption(prompt: str) -> tuple[str | None, str | None]:
    """``(colour, scene)`` named by a prompt: the first garment colour word and scene word, or None.

    The colour is the one right before the first top-garment word when there is one ("a woman in
    a red dress"), else the first colour word.
    """
    words = prompt.lower().replace(",", " ").split()
    colour = None
    for i, w in enumerate(words):
        if w in TOPS and i > 0 and words[i - 1] in COLOURS:
            colour = words[i - 1]
            break
    if colour is None:
        colour = next((w for w in words if w in COLOURS), None)
    scene = None
    for kind, phrase in SCENES.items():
        if kind in words or phrase.split()[-1] in words or (kind == "night" and "moon" in words):
            scene = kind
            break
    return colour, scene


def negative_caption(rng: np.random.Generator) -> str:
    """A typical negative prompt (0–5 of :data:`NEGATIVE_WORDS`), or the empty string."""
    n = int(rng.integers(0, 6))
    return ", ".join(rng.choice(NEGATIVE_WORDS, size=n, replace=False)) if n else ""
