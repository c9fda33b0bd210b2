"""Load pose sequences from any supported input, save ``poses.json``, convert between formats.

Inputs, told apart by :func:`load_poses`:

* our ``poses.json``: ``{"fps": float, "width": int, "height": int, "frames": [[[x, y, c] x 18] x F]}``;
* OpenPose JSON (see :mod:`engine.pose.openpose`): one per-frame file, a file holding a JSON list
  of per-frame objects, or a folder of per-frame ``*.json`` files (sorted by name);
* visual inputs: ``.mp4/.webm/.avi/.mov/.mkv``, ``.gif``, a single ``.png/.jpg``, or a folder of
  ``.png/.jpg`` frames (natural order). Each is either a rendered OpenPose skeleton (decoded back
  to keypoints, :mod:`engine.pose.video`) or an RGB video of a person (poses extracted with
  MediaPipe Pose, :mod:`engine.pose.extract`, cached under the cache root). ``kind="auto"``
  tells them apart from the first frames (:mod:`engine.pose.detect`); an RGB video is never
  decoded as a skeleton.

A folder holding both ``*.json`` and images is read as OpenPose JSON (OpenPose's ``--write_images``
puts its renders next to the JSON).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np

from engine.pose.detect import PoseKind, detect_kind
from engine.pose.estimate import PoseEstimator
from engine.pose.extract import PoseExtractConfig, default_cache_root, extract_poses
from engine.pose.frames import IMAGE_EXTS, VIDEO_EXTS, natural_key, open_frames
from engine.pose.openpose import DEFAULT_FPS, openpose_sequence
from engine.pose.sequence import PoseError, PoseSequence, resample, validate, zero_missing
from engine.pose.skeleton import NUM_JOINTS
from engine.pose.video import decode_source, write_pose_video

PathLike = str | os.PathLike[str]


def _read_json(path: Path) -> object:
    try:
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise PoseError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PoseError(f"{path}: cannot read the file ({exc})") from exc


def _poses_json_frames(path: Path, frames: object) -> np.ndarray:
    """``frames`` of a poses.json as ``(F, 18, 3)`` float32; errors name the bad frame."""
    if not isinstance(frames, list):
        raise PoseError(f"{path}: 'frames' is {type(frames).__name__}, expected a list of frames")
    for f, frame in enumerate(frames):
        joints = frame if isinstance(frame, list) else None
        if joints is None or len(joints) != NUM_JOINTS:
            got = f"{len(joints)} joints" if joints is not None else type(frame).__name__
            raise PoseError(
                f"{path}: frame {f} has {got}; expected {NUM_JOINTS} [x, y, confidence] "
                "triples in COCO-18 order"
            )
        for j, joint in enumerate(joints):
            if not (isinstance(joint, list) and len(joint) == 3):
                raise PoseError(f"{path}: frame {f}, joint {j}: expected [x, y, confidence]")
    try:
        return np.asarray(frames, dtype=np.float32).reshape(len(frames), NUM_JOINTS, 3)
    except (TypeError, ValueError) as exc:
        raise PoseError(f"{path}: 'frames' holds non-numbers ({exc})") from exc


def read_poses_json(path: PathLike, obj: object | None = None) -> PoseSequence:
    """Read our compact ``poses.json`` (``obj``: its already parsed content, if at hand)."""
    path = Path(path)
    obj = _read_json(path) if obj is None else obj
    if not isinstance(obj, dict):
        raise PoseError(f"{path}: expected a JSON object with fps, width, height and frames")
    missing = [k for k in ("fps", "width", "height", "frames") if k not in obj]
    if missing:
        raise PoseError(f"{path}: poses.json lacks {', '.join(missing)}; add them")
    for key in ("width", "height"):
        if not isinstance(obj[key], int) or isinstance(obj[key], bool):
            raise PoseError(f"{path}: '{key}' is {obj[key]!r}, expected an integer (pixels)")
    if not isinstance(obj["fps"], int | float) or isinstance(obj["fps"], bool):
        raise PoseError(f"{path}: 'fps' is {obj['fps']!r}, expected a number")
    kp = zero_missing(_poses_json_frames(path, obj["frames"]))
    return PoseSequence(kp, float(obj["fps"]), obj["width"], obj["height"], source=str(path))


def save_poses_json(seq: PoseSequence, path: PathLike, *, decimals: int = 2) -> Path:
    """Write ``seq`` as compact ``poses.json`` (one frame per line), coordinates rounded to
    ``decimals`` and confidences to 3 decimals; creates parent folders. Returns the path."""
    path = Path(path)
    validate(seq, max_frames=max(1, seq.num_frames))
    lines = []
    for frame in zero_missing(seq.keypoints):
        joints = [
            [round(float(x), decimals), round(float(y), decimals), round(float(c), 3)]
            for x, y, c in frame
        ]
        lines.append(json.dumps(joints, separators=(",", ":")))
    header = json.dumps({"fps": seq.fps, "width": seq.width, "height": seq.height})
    text = header[:-1] + ', "frames": [\n' + ",\n".join(lines) + "\n]}\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise PoseError(f"{path}: cannot write poses.json ({exc})") from exc
    return path


def _load_json_file(
    path: Path, fps: float | None, width: int | None, height: int | None
) -> PoseSequence:
    obj = _read_json(path)
    if isinstance(obj, dict) and "frames" in obj:
        return read_poses_json(path, obj)
    if isinstance(obj, dict) and "people" in obj:
        return openpose_sequence(
            [obj], [str(path)], source=str(path), fps=fps, width=width, height=height
        )
    if isinstance(obj, list):
        names = [f"{path}, frame {i}" for i in range(len(obj))]
        return openpose_sequence(obj, names, source=str(path), fps=fps, width=width, height=height)
    raise PoseError(
        f"{path}: neither our poses.json (an object with 'frames') nor OpenPose JSON (an object "
        "with 'people', or a list of them); convert it to one of these"
    )


def _load_json_folder(
    path: Path, fps: float | None, width: int | None, height: int | None, max_frames: int
) -> PoseSequence | None:
    """The folder's OpenPose ``*.json`` frames as a sequence; None when it holds no JSON."""
    entries = sorted((p for p in path.iterdir() if p.is_file()), key=lambda p: natural_key(p.name))
    jsons = [p for p in entries if p.suffix.lower() == ".json"]
    if not jsons:
        if not any(p.suffix.lower() in IMAGE_EXTS for p in entries):
            raise PoseError(
                f"{path}: folder holds no OpenPose *.json nor .png/.jpg frames; "
                "point at the folder with the frames"
            )
        return None
    if len(jsons) > max_frames:
        raise PoseError(f"{path}: has {len(jsons)} frames, more than max_frames={max_frames}")
    frames = [_read_json(p) for p in jsons]
    names = [str(p) for p in jsons]
    return openpose_sequence(frames, names, source=str(path), fps=fps, width=width, height=height)


def load_visual(
    path: Path,
    *,
    kind: PoseKind = "auto",
    max_frames: int = 512,
    fps: float = DEFAULT_FPS,
    extraction: PoseExtractConfig | None = None,
    cache_dir: Path | None = None,
    estimator: PoseEstimator | None = None,
) -> PoseSequence:
    """A video, GIF, image or image folder: decoded as a skeleton or its poses extracted.

    Args:
        kind: ``auto`` (detect, :func:`~engine.pose.detect.detect_kind`), ``skeleton`` or ``rgb``.
        fps: frame rate of inputs that carry none (images).
        extraction, cache_dir, estimator: see :func:`~engine.pose.extract.extract_poses`.

    Returns:
        The sequence in the input's pixel frame; ``info`` records the kind (and detection).
    """
    source = open_frames(path, max_frames=max_frames, fps=fps)
    frames = source.frames
    record: dict[str, object] = {"kind": kind, "forced": kind != "auto"}
    if kind == "auto":
        detection, read = detect_kind(frames)
        frames = itertools.chain(read, frames)
        if detection.kind is None:
            source.close()
            raise PoseError(
                f"{path}: its first {len(read)} frames are all black: neither a skeleton nor a "
                "person to track; trim the black frames, or pass --kind skeleton / --kind rgb "
                "(spec: pose_kind)"
            )
        kind = detection.kind
        record = {"kind": kind, "forced": False, "detection": detection.record()}
    if kind == "skeleton":
        seq = decode_source(source, frames, max_frames=max_frames)
        return PoseSequence(
            seq.keypoints, seq.fps, seq.width, seq.height, source=seq.source, info=record
        )
    seq = extract_poses(
        source, frames, settings=extraction, estimator=estimator, cache_dir=cache_dir
    )
    return PoseSequence(
        seq.keypoints,
        seq.fps,
        seq.width,
        seq.height,
        source=seq.source,
        info={**record, **(seq.info or {})},
    )


def load_poses(
    path: PathLike,
    *,
    max_frames: int = 512,
    fps: float | None = None,
    width: int | None = None,
    height: int | None = None,
    kind: PoseKind = "auto",
    extraction: PoseExtractConfig | None = None,
    cache_dir: PathLike | None = None,
    estimator: PoseEstimator | None = None,
) -> PoseSequence:
    """Load and validate a pose sequence from any supported input (see the module docstring).

    Args:
        path: a ``.json`` file (poses.json or OpenPose), a pose-map video/GIF/image, or a folder
            of OpenPose JSON or pose-map frames.
        max_frames: reject longer inputs (checked while reading, before decoding everything).
        fps: frame rate for inputs that do not store one (OpenPose JSON, image frames); default 8.
            Ignored for poses.json, videos and GIFs, which carry their own — use
            :func:`~engine.pose.sequence.resample` or :func:`convert_poses` to change it.
        width, height: the pixel frame of OpenPose keypoints; default the JSON's canvas size, else
            the keypoint extent rounded up to a multiple of 8. Ignored for the other inputs.
        kind: for visual inputs: ``auto`` (detect), ``skeleton`` (decode a rendered pose map) or
            ``rgb`` (extract poses with MediaPipe Pose); keypoint files accept only ``auto``.
        extraction: settings of the RGB extraction (default :class:`PoseExtractConfig`).
        cache_dir: cache root (RGB extraction caches under ``<cache_dir>/poses``); default
            ``$AVATAR_CACHE_DIR`` or ``~/.cache/dancing-avatar``. Renders pass
            ``engine.method.cache_root(config)``.
        estimator: the RGB pose estimator (default MediaPipe Pose); tests inject fakes.

    Returns:
        A validated :class:`PoseSequence`, keypoints ``(F, 18, 3)`` float32, ``source=str(path)``,
        in the input's pixel frame (``resample`` letterboxes it into a render size).

    Raises:
        PoseError: missing/unreadable file, unknown extension, bad content, nobody detected in an
            RGB video, the pose environment missing; the message names the file (and
            frame/joint) and the fix.
    """
    path = Path(path)
    if not path.exists():
        raise PoseError(f"{path}: no such file or folder; check the path")
    ext = path.suffix.lower()
    seq = None
    if path.is_dir():
        seq = _load_json_folder(path, fps, width, height, max_frames)
    elif ext == ".json":
        seq = _load_json_file(path, fps, width, height)
    elif ext not in (*VIDEO_EXTS, ".gif", *IMAGE_EXTS):
        known = ", ".join((".json", *VIDEO_EXTS, ".gif", *IMAGE_EXTS))
        raise PoseError(f"{path}: unknown pose input type '{ext}'; give one of {known} or a folder")
    if seq is not None and kind != "auto":
        raise PoseError(
            f"{path}: holds keypoints (JSON); kind={kind!r} (--kind / pose_kind) applies only to "
            "videos, GIFs and images: leave it at auto"
        )
    if seq is None:
        seq = load_visual(
            path,
            kind=kind,
            max_frames=max_frames,
            fps=fps or DEFAULT_FPS,
            extraction=extraction,
            cache_dir=Path(cache_dir) if cache_dir is not None else default_cache_root(),
            estimator=estimator,
        )
    validate(seq, max_frames=max_frames)
    return seq


def convert_poses(
    src: PathLike,
    dst: PathLike,
    *,
    fps: float | None = None,
    width: int | None = None,
    height: int | None = None,
    max_frames: int = 512,
    input_fps: float | None = None,
    input_width: int | None = None,
    input_height: int | None = None,
    kind: PoseKind = "auto",
    extraction: PoseExtractConfig | None = None,
    cache_dir: PathLike | None = None,
    estimator: PoseEstimator | None = None,
    preview: PathLike | None = None,
) -> PoseSequence:
    """Load ``src``, optionally resample it, and write it to ``dst`` by extension.

    ``dst``: ``.json`` -> poses.json; ``.mp4`` / ``.gif`` / a path without extension (folder of
    PNGs) -> rendered pose maps. ``fps``/``width``/``height`` are the output's (see
    :func:`~engine.pose.sequence.resample`; the size is fitted with letterboxing); the ``input_*``
    arguments are passed to :func:`load_poses` as ``fps``/``width``/``height`` for inputs that do
    not carry them (OpenPose JSON, image frames). ``max_frames`` applies to the input and output.
    ``kind``, ``extraction``, ``cache_dir``, ``estimator``: see :func:`load_poses`.
    ``preview``: also write this ``.mp4``: the poses drawn over the input video (a visual input;
    for keypoint files, the pose maps on black).

    Returns:
        The written (validated) sequence.
    """
    seq = load_poses(
        src,
        max_frames=max_frames,
        fps=input_fps,
        width=input_width,
        height=input_height,
        kind=kind,
        extraction=extraction,
        cache_dir=cache_dir,
        estimator=estimator,
    )
    if preview is not None:
        from engine.pose.preview import write_preview

        if seq.info is not None:  # a visual input: draw on its frames
            write_preview(Path(src), seq, Path(preview), max_frames=max_frames)
        else:
            write_pose_video(seq, Path(preview))
    if fps is not None or width is not None or height is not None:
        seq = resample(seq, fps=fps, width=width, height=height)
        validate(seq, max_frames=max_frames)
    dst = Path(dst)
    if dst.suffix.lower() == ".json":
        save_poses_json(seq, dst)
    else:
        write_pose_video(seq, dst)
    return seq
