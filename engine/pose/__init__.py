"""Pose input: COCO-18 pose sequences, their readers/writers, pose-map rendering and decoding,
and pose extraction from driving RGB videos (MediaPipe Pose, :mod:`engine.pose.extract`).

Keypoints are ``np.ndarray`` float32 of shape ``(F, 18, 3)``: ``(x_px, y_px, confidence)``, origin
top-left, confidence in ``[0, 1]``, ``0`` = missing joint (x = y = 0). See :mod:`.skeleton`.
"""

from engine.pose.detect import PoseKind
from engine.pose.draw import decode_pose_map, overlay_pose, render_pose_map, render_pose_maps
from engine.pose.extract import PoseExtractConfig
from engine.pose.io import convert_poses, load_poses, read_poses_json, save_poses_json
from engine.pose.sequence import PoseError, PoseSequence, resample, validate
from engine.pose.synth import synthetic_dance
from engine.pose.video import write_pose_video

__all__ = [
    "PoseError",
    "PoseExtractConfig",
    "PoseKind",
    "PoseSequence",
    "convert_poses",
    "decode_pose_map",
    "load_poses",
    "overlay_pose",
    "read_poses_json",
    "render_pose_map",
    "render_pose_maps",
    "resample",
    "save_poses_json",
    "synthetic_dance",
    "validate",
    "write_pose_video",
]
