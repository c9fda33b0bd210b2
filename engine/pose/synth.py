"""A procedural COCO-18 dance: a standing person, centred, waving the arms with a hip sway and steps.

Used by ``examples/make_dance.py`` (the example ``poses.json``), tests and benchmarks to get pose
sequences of any length, frame rate and size without a pose detector. Deterministic.
"""

from __future__ import annotations

import math

import numpy as np

from engine.pose.sequence import PoseSequence
from engine.pose.skeleton import JOINT_NAMES, NUM_JOINTS

# Body proportions as fractions of the stature h (frontal view, after standard anthropometry).
NECK_ABOVE_PELVIS = 0.30
SHOULDER_HALF = 0.115
HIP_HALF = 0.065
UPPER_ARM = 0.185
FOREARM = 0.16
THIGH = 0.245
SHIN = 0.235
PELVIS_ABOVE_ANKLE = 0.47
NOSE_ABOVE_NECK = 0.12
STATURE_FRAC = 0.62  # stature as a fraction of the frame's short side
ANKLES_BELOW_CENTRE = 0.50  # ankle line below the frame centre, in statures
BEAT_S = 2.0  # one sway / arm-wave cycle in seconds

_J = {name: i for i, name in enumerate(JOINT_NAMES)}


def _rot(v: np.ndarray, angle: float) -> np.ndarray:
    """Rotate 2-vectors ``v`` (..., 2) by ``angle`` radians (image coords, y down)."""
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([c * v[..., 0] - s * v[..., 1], s * v[..., 0] + c * v[..., 1]], axis=-1)


def _limb_dir(theta: float, outward: float, tilt: float) -> np.ndarray:
    """Unit vector of a limb ``theta`` radians from hanging straight down, swung ``outward``.

    ``outward`` is -1 for the person's right (image left), +1 for the left; ``tilt`` the torso roll.
    """
    return _rot(np.array([outward * math.sin(theta), math.cos(theta)]), tilt)


def _leg(hip: np.ndarray, ankle: np.ndarray, outward: float) -> np.ndarray:
    """Knee between ``hip`` and ``ankle``, pushed outward by how much the leg is bent."""
    d = float(np.linalg.norm(ankle - hip))
    reach = THIGH + SHIN
    bend = math.sqrt(max(0.0, 1.0 - (d / reach) ** 2)) * reach * 0.25
    return hip + (ankle - hip) * (THIGH / reach) + np.array([outward * bend, 0.0])


def _pose_at(t: float) -> np.ndarray:
    """``(18, 2)`` joint positions in statures at time ``t`` s; origin at the ankle-line centre."""
    phi = 2.0 * math.pi * t / BEAT_S
    sway = 0.06 * math.sin(phi)
    bob = 0.02 * (1.0 - math.cos(2.0 * phi)) / 2.0
    tilt = -0.06 * math.sin(phi)
    pelvis = np.array([sway, -PELVIS_ABOVE_ANKLE + bob])
    right = _rot(np.array([-1.0, 0.0]), tilt)  # person's right = image left
    up = _rot(np.array([0.0, -1.0]), tilt)
    p = np.zeros((NUM_JOINTS, 2))
    neck = pelvis + NECK_ABOVE_PELVIS * up
    p[_J["neck"]] = neck
    for side, out, ph in (("right", -1.0, 0.0), ("left", 1.0, math.pi)):
        u = right if side == "right" else -right
        shoulder = neck + SHOULDER_HALF * u
        theta = math.radians(80.0 + 55.0 * math.sin(phi + ph))
        bend = math.radians(35.0 + 30.0 * math.sin(2.0 * phi + ph + 0.5))
        elbow = shoulder + UPPER_ARM * _limb_dir(theta, out, tilt)
        p[_J[f"{side}_shoulder"]] = shoulder
        p[_J[f"{side}_elbow"]] = elbow
        p[_J[f"{side}_wrist"]] = elbow + FOREARM * _limb_dir(theta + bend, out, tilt)
        hip = pelvis + HIP_HALF * u
        lift = 0.035 * max(0.0, math.sin(phi + ph)) ** 2
        ankle = np.array([out * 0.075 + 0.5 * sway, -lift])
        p[_J[f"{side}_hip"]] = hip
        p[_J[f"{side}_knee"]] = _leg(hip, ankle, out)
        p[_J[f"{side}_ankle"]] = ankle
    head_tilt = tilt + 0.08 * math.sin(phi + 0.7)
    h_up = _rot(np.array([0.0, -1.0]), head_tilt)
    h_right = _rot(np.array([-1.0, 0.0]), head_tilt)
    nose = neck + NOSE_ABOVE_NECK * h_up
    p[_J["nose"]] = nose
    p[_J["right_eye"]] = nose + 0.022 * h_up + 0.028 * h_right
    p[_J["left_eye"]] = nose + 0.022 * h_up - 0.028 * h_right
    p[_J["right_ear"]] = nose + 0.005 * h_up + 0.058 * h_right
    p[_J["left_ear"]] = nose + 0.005 * h_up - 0.058 * h_right
    return p


def synthetic_dance(
    frames: int = 16, fps: float = 8.0, width: int = 512, height: int = 512
) -> PoseSequence:
    """Generate a smooth, periodic dance of ``frames`` frames at ``fps`` in a ``width x height`` frame.

    A frontal, anatomically proportioned COCO-18 person (stature 62 % of the short side, centred)
    sways the hips, alternates arm waves and takes small steps, on a 2 s cycle; frame ``i`` is the
    pose at ``t = i / fps``. All joints are present (confidence 1) and inside the frame.

    Returns:
        A :class:`PoseSequence` with keypoints ``(frames, 18, 3)`` float32, ``source="synthetic_dance"``.
    """
    assert frames >= 1 and fps > 0 and width >= 1 and height >= 1, (frames, fps, width, height)
    stature = STATURE_FRAC * min(width, height)
    origin = np.array([width / 2.0, height / 2.0 + ANKLES_BELOW_CENTRE * stature])
    kp = np.ones((frames, NUM_JOINTS, 3), dtype=np.float32)
    for i in range(frames):
        kp[i, :, :2] = origin + stature * _pose_at(i / fps)
    return PoseSequence(
        kp, fps=float(fps), width=int(width), height=int(height), source="synthetic_dance"
    )
