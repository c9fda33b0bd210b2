"""Generate the example dance pose sequence ``examples/dance/poses.json``.

A standing person, centred in a 512x512 frame, sways the hips, alternates arm waves and takes small
steps (see :func:`engine.pose.synth.synthetic_dance`). Run from the repository root::

    python examples/make_dance.py                      # 16 frames, 8 fps, 512x512
    python examples/make_dance.py --frames 64 --out /tmp/long.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run without installing the package

from engine.pose import PoseSequence, save_poses_json, synthetic_dance, validate

DEFAULT_OUT = Path(__file__).resolve().parent / "dance" / "poses.json"


def make_dance(
    frames: int = 16, fps: float = 8.0, width: int = 512, height: int = 512
) -> PoseSequence:
    """The example dance: keypoints ``(frames, 18, 3)`` float32 in a ``width x height`` frame."""
    seq = synthetic_dance(frames, fps, width, height)
    validate(seq, max_frames=max(frames, 1))
    return seq


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    seq = make_dance(args.frames, args.fps, args.width, args.height)
    path = save_poses_json(seq, args.out, decimals=1)
    print(f"wrote {path}: {seq.num_frames} frames, {seq.fps:g} fps, {seq.width}x{seq.height}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
