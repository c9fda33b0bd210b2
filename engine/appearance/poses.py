"""Canonical COCO-18 poses of the reference set: front, three-quarter, upper body, face close-up.

The references of a character are rendered on these four views, cycled for K references (every
second cycle mirrored, so K = 8 also covers the other side of the three-quarter view). All poses
are procedural: a symmetric A-pose built with the body proportions of
:mod:`engine.pose.synth`, then turned (three-quarter) or zoomed in (upper body, face). Joints
that leave the frame are marked missing (confidence 0, x = y = 0), as the pose module expects.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from engine.pose import synth
from engine.pose.skeleton import JOINT_NAMES, NUM_JOINTS

View = Literal["front", "three_quarter", "upper_body", "face"]

VIEWS: tuple[View, ...] = ("front", "three_quarter", "upper_body", "face")
"""Order in which the views are cycled for K references."""

YAW_DEG = 40.0
"""Turn of the three-quarter view about the vertical axis (degrees, towards image right)."""

_J = {name: i for i, name in enumerate(JOINT_NAMES)}
# Depth towards the viewer (statures) of the face joints; the rest of the body is flat (z = 0).
_DEPTH = {"nose": 0.10, "right_eye": 0.075, "left_eye": 0.075}
# Left/right partner of every joint (for mirroring: a mirrored person swaps sides).
_MIRROR = [
    _J[n.replace("right", "@").replace("left", "right").replace("@", "left")] for n in JOINT_NAMES
]


def _a_pose() -> np.ndarray:
    """(18, 2) joints in statures of a frontal A-pose, origin at the ankle-line centre, y down."""
    p = np.zeros((NUM_JOINTS, 2))
    pelvis = np.array([0.0, -synth.PELVIS_ABOVE_ANKLE])
    neck = pelvis + np.array([0.0, -synth.NECK_ABOVE_PELVIS])
    p[_J["neck"]] = neck
    for side, out in (("right", -1.0), ("left", 1.0)):  # person's right = image left
        shoulder = neck + np.array([out * synth.SHOULDER_HALF, 0.0])
        upper, fore = math.radians(22.0), math.radians(30.0)  # arms down and out, elbows bent
        elbow = shoulder + synth.UPPER_ARM * np.array([out * math.sin(upper), math.cos(upper)])
        wrist = elbow + synth.FOREARM * np.array([out * math.sin(fore), math.cos(fore)])
        hip = pelvis + np.array([out * synth.HIP_HALF, 0.0])
        ankle = np.array([out * 0.085, 0.0])
        p[_J[f"{side}_shoulder"]] = shoulder
        p[_J[f"{side}_elbow"]] = elbow
        p[_J[f"{side}_wrist"]] = wrist
        p[_J[f"{side}_hip"]] = hip
        p[_J[f"{side}_knee"]] = hip + (ankle - hip) * (synth.THIGH / (synth.THIGH + synth.SHIN))
        p[_J[f"{side}_ankle"]] = ankle
    nose = neck + np.array([0.0, -synth.NOSE_ABOVE_NECK])
    p[_J["nose"]] = nose
    for side, out in (("right", -1.0), ("left", 1.0)):
        p[_J[f"{side}_eye"]] = nose + np.array([out * 0.028, -0.022])
        p[_J[f"{side}_ear"]] = nose + np.array([out * 0.058, -0.005])
    return p


def _turn(p: np.ndarray, yaw_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate the (18, 2) pose about the vertical axis; returns (pose, visible (18,) bool).

    The face gets a little depth so the nose leads the turn; the ear on the far side is hidden.
    """
    yaw = math.radians(yaw_deg)
    z = np.array([_DEPTH.get(name, 0.0) for name in JOINT_NAMES])
    out = p.copy()
    out[:, 0] = p[:, 0] * math.cos(yaw) + z * math.sin(yaw)
    visible = np.ones(NUM_JOINTS, dtype=bool)
    visible[_J["left_ear"] if yaw_deg > 0 else _J["right_ear"]] = False
    return out, visible


def _place(
    p: np.ndarray, visible: np.ndarray, centre: np.ndarray, zoom: float, resolution: int
) -> np.ndarray:
    """Map statures to pixels: ``centre`` (statures) to the frame centre, ``zoom`` × the default
    stature (:data:`engine.pose.synth.STATURE_FRAC` of the side). Returns (18, 3) float32
    ``(x, y, confidence)``; joints outside the frame or not ``visible`` are missing (all 0)."""
    scale = synth.STATURE_FRAC * resolution * zoom
    xy = (p - centre) * scale + resolution / 2.0
    inside = visible & np.all((xy >= 0.0) & (xy <= resolution - 1.0), axis=1)
    kp = np.zeros((NUM_JOINTS, 3), dtype=np.float32)
    kp[inside, :2] = xy[inside]
    kp[inside, 2] = 1.0
    return kp


def mirror(keypoints: np.ndarray, width: int) -> np.ndarray:
    """The (18, 3) pose flipped left-right in a ``width``-pixel frame (sides swapped)."""
    kp = np.asarray(keypoints, dtype=np.float32)[_MIRROR].copy()
    present = kp[:, 2] > 0
    kp[present, 0] = (width - 1.0) - kp[present, 0]
    return kp


def canonical_poses(resolution: int) -> dict[View, np.ndarray]:
    """The four canonical views as (18, 3) float32 keypoints in a ``resolution``² frame.

    ``front``/``three_quarter``: the whole body, stature 62 % of the side, centred. ``upper_body``:
    head to hips (legs out of frame). ``face``: head-and-shoulders close-up, ears 35 % of the side
    apart.
    """
    assert resolution >= 8, resolution
    body = _a_pose()
    everything = np.ones(NUM_JOINTS, dtype=bool)
    mid_body = np.array([0.0, -0.5])  # the stature's midpoint
    turned, turned_visible = _turn(body, YAW_DEG)
    head = body[_J["nose"]]
    ear_span = float(body[_J["left_ear"], 0] - body[_J["right_ear"], 0])
    face_zoom = 0.35 / (ear_span * synth.STATURE_FRAC)  # ears 35 % of the side apart
    return {
        "front": _place(body, everything, mid_body, 1.0, resolution),
        "three_quarter": _place(turned, turned_visible, mid_body, 1.0, resolution),
        "upper_body": _place(body, everything, np.array([0.0, head[1] + 0.22]), 2.0, resolution),
        "face": _place(body, everything, head + np.array([0.0, 0.06]), face_zoom, resolution),
    }


def reference_views(count: int) -> list[tuple[View, bool]]:
    """``(view, mirrored)`` of each of ``count`` references: views cycled, odd cycles mirrored."""
    if count < 1:
        raise ValueError(f"references={count}: need at least 1 reference (appearance.references)")
    return [(VIEWS[i % len(VIEWS)], (i // len(VIEWS)) % 2 == 1) for i in range(count)]


def reference_pose(view: View, mirrored: bool, resolution: int) -> np.ndarray:
    """(18, 3) float32 keypoints of one reference view (optionally mirrored)."""
    kp = canonical_poses(resolution)[view]
    return mirror(kp, resolution) if mirrored else kp
