"""The COCO-18 (OpenPose body) skeleton: joint order, limbs and the standard OpenPose colours.

Keypoints everywhere in the engine are ``np.ndarray`` of shape ``(18, 3)`` (one frame) or
``(F, 18, 3)`` (a sequence), dtype float32, columns ``(x, y, confidence)`` with ``x, y`` in pixels
of the frame (origin top-left) and confidence in ``[0, 1]``; confidence ``0`` marks a missing joint
(its x, y are then meaningless and set to 0).
"""

from __future__ import annotations

NUM_JOINTS = 18

JOINT_NAMES: tuple[str, ...] = (
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
)

# Limbs as (joint a, joint b), in the order the OpenPose / ControlNet annotator draws them
# (controlnet_aux `draw_bodypose` limbSeq, converted to 0-based indices). The 17 drawn limbs.
LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2),
    (1, 5),
    (2, 3),
    (3, 4),
    (5, 6),
    (6, 7),
    (1, 8),
    (8, 9),
    (9, 10),
    (1, 11),
    (11, 12),
    (12, 13),
    (1, 0),
    (0, 14),
    (14, 16),
    (0, 15),
    (15, 17),
)

# The standard OpenPose colours (RGB), one per joint; limb i is drawn with COLORS[i].
COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (255, 85, 0),
    (255, 170, 0),
    (255, 255, 0),
    (170, 255, 0),
    (85, 255, 0),
    (0, 255, 0),
    (0, 255, 85),
    (0, 255, 170),
    (0, 255, 255),
    (0, 170, 255),
    (0, 85, 255),
    (0, 0, 255),
    (85, 0, 255),
    (170, 0, 255),
    (255, 0, 255),
    (255, 0, 170),
    (255, 0, 85),
)

# BODY_25 index of each COCO-18 joint (BODY_25 adds mid-hip at 8 and six foot points at 19-24).
BODY25_TO_COCO18: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)

# Joints that make up the torso polygon (neck, shoulders, hips), used for body masks.
TORSO: tuple[int, ...] = (2, 5, 11, 8)
HEAD: tuple[int, ...] = (0, 14, 15, 16, 17)
