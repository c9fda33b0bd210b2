"""MediaPipe Pose worker, run by :class:`engine.pose.estimate.SubprocessPose` in a separate
Python that has mediapipe 0.10.21 (it pins numpy<2, which this project's environment cannot).

Standalone on purpose: it imports only numpy and mediapipe, never the engine. Protocol on
stdin/stdout: it prints ``ready``; then for each request ``"H W\\n"`` + H·W·3 uint8 RGB bytes it
prints one JSON line, ``null`` (no person) or 33 ``[x, y, visibility]`` normalised landmarks.
Argument: ``--min-detection-confidence C`` (0..1, default 0.5), the person detector's threshold.
"""

import argparse
import json
import sys

import mediapipe as mp
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--min-detection-confidence", type=float, default=0.5)
    args = parser.parse_args()
    pose = mp.solutions.pose.Pose(
        static_image_mode=True,
        model_complexity=1,
        min_detection_confidence=args.min_detection_confidence,
    )
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    data = sys.stdin.buffer
    while True:
        header = data.readline()
        if not header:
            return
        height, width = (int(v) for v in header.split())
        image = np.frombuffer(data.read(height * width * 3), np.uint8).reshape(height, width, 3)
        result = pose.process(image)
        marks = result.pose_landmarks
        reply = None if marks is None else [[m.x, m.y, m.visibility] for m in marks.landmark]
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
