"""Pose MSE's offline estimator for real: MediaPipe Pose (its model ships in the wheel), run in
the separate environment `make pose-env` builds, on a real photograph of a person."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.data import astronaut

from engine.metrics.pose_mse import MediaPipeEstimator, make_estimator, pose_python, pose_scores
from engine.pose.skeleton import JOINT_NAMES

pytestmark = pytest.mark.skipif(
    pose_python() is None,
    reason="no mediapipe environment: run `make pose-env` (or set AVATAR_POSE_PYTHON)",
)


@pytest.fixture(scope="module")
def estimator():
    est = make_estimator("mediapipe")
    assert isinstance(est, MediaPipeEstimator)
    yield est
    close = getattr(est._pose, "close", None)
    if close is not None:
        close()


def test_finds_the_astronaut(estimator):
    image = astronaut()  # 512x512, a person from the chest up, face at about (230, 120)
    keypoints = estimator.estimate(image)
    assert keypoints is not None and keypoints.shape == (18, 3)
    nose = keypoints[JOINT_NAMES.index("nose")]
    assert nose[2] > 0.5 and 150 < nose[0] < 300 and 60 < nose[1] < 200, nose
    shoulders = keypoints[[JOINT_NAMES.index("right_shoulder"), JOINT_NAMES.index("left_shoulder")]]
    assert (shoulders[:, 1] > nose[1]).all()  # shoulders below the nose


def test_pose_mse_of_a_video_against_its_own_poses(estimator):
    frames = [astronaut(), np.zeros((512, 512, 3), np.uint8)]  # a person, then no one
    truth = estimator.estimate(frames[0])
    scores = pose_scores(frames, np.stack([truth, truth]), estimator)
    assert scores["detection_rate"] == 0.5
    assert scores["pose_mse"] == pytest.approx(0.0, abs=1e-6)
