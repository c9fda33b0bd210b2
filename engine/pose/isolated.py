"""Decode a visual pose input (video, GIF, image, folder of images) in a bounded child process.

A video or GIF from an untrusted source can declare far more pixels than its bytes suggest (a
300 KB GIF declaring 10000x10000 frames; an mp4 of 4096x4096 black frames), and a decoder in the
process that owns every render (the engine) would grow it by gigabytes and stall it for a
minute. :func:`load_poses_isolated` runs :func:`~engine.pose.io.load_poses` in a fresh Python
process instead:

* its address space is capped (``RLIMIT_AS`` = ``memory_mb``; the ffmpeg it starts inherits the
  cap), so a decode bomb ends in that child with a :class:`PoseError` naming the cap;
* it is killed (with everything it started: its own session) after ``timeout_s``;
* its result is the keypoints (``(F, 18, 3)`` float32, exact) and their metadata, nothing else.

The parent never decodes a pixel; it reads back an ``.npz`` of at most ``F x 18 x 3`` floats.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine.pose.frames import IMAGE_EXTS, VIDEO_EXTS
from engine.pose.sequence import PoseError, PoseSequence

POLL_S = 0.25
EXIT_POSE_ERROR = 3
EXIT_MEMORY = 4
_CHILD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def is_visual(path: str | Path) -> bool:
    """Whether ``path`` is an input :func:`load_poses_isolated` is for: a video, GIF or image
    file, or a folder without OpenPose ``.json`` frames (one of images)."""
    p = Path(path)
    if p.is_dir():
        return not any(c.suffix.lower() == ".json" for c in p.iterdir())
    return p.suffix.lower() in (*VIDEO_EXTS, ".gif", *IMAGE_EXTS)


def load_poses_isolated(
    path: Path,
    *,
    memory_mb: int,
    timeout_s: float,
    cancelled: Callable[[], bool] | None = None,
    **options: Any,
) -> PoseSequence:
    """:func:`~engine.pose.io.load_poses` of ``path`` in a child process bounded in memory and time.

    Args:
        path: a visual pose input (video, GIF, image or folder of images).
        memory_mb: the child's address-space cap in MiB (decoders, ffmpeg and Python included).
        timeout_s: wall-clock limit; the child (and what it started) is killed past it.
        cancelled: polled every :data:`POLL_S` while the child runs; True kills it (PoseError).
        options: JSON-able keyword arguments of ``load_poses`` (``max_frames``, ``kind``,
            ``cache_dir``, ``extraction`` as a dict).

    Returns:
        The :class:`PoseSequence` ``load_poses`` returns (keypoints bit-identical), ``source`` =
        ``str(path)``.

    Raises:
        PoseError: the input is bad (the child's message), needs more than ``memory_mb``, took
            longer than ``timeout_s``, or the child died; the message names the cap to raise.
    """
    with tempfile.TemporaryDirectory(prefix="avatar-decode-") as tmp:
        out = Path(tmp) / "poses.npz"
        request = json.dumps({"path": str(path), "out": str(out), "options": options})
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.pose.isolated"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: a timeout kills ffmpeg too
            preexec_fn=_limit(memory_mb),
            env=_child_env(),
        )
        err = _wait(proc, request.encode(), path, timeout_s, cancelled)
        _kill(proc)  # anything it left running in its group
        message = err.decode(errors="replace").strip().splitlines()
        last = message[-1] if message else ""
        if proc.returncode == EXIT_POSE_ERROR:
            raise PoseError(last)
        if proc.returncode == EXIT_MEMORY or proc.returncode in (-signal.SIGKILL, -signal.SIGSEGV):
            raise PoseError(
                f"{path}: decoding needs more than {memory_mb} MiB (limits.decode_memory_mb); "
                "give a shorter or smaller input"
            )
        if proc.returncode != 0 or not out.is_file():
            raise PoseError(f"{path}: the decoder failed (exit {proc.returncode}: {last[-200:]})")
        return _read(out, path)


def _wait(
    proc: subprocess.Popen[bytes],
    request: bytes,
    path: Path,
    timeout_s: float,
    cancelled: Callable[[], bool] | None,
) -> bytes:
    """The child's stderr once it exits; kills it past ``timeout_s`` or when ``cancelled()``."""
    deadline = time.monotonic() + timeout_s
    data: bytes | None = request
    while True:
        left = deadline - time.monotonic()
        try:
            _, err = proc.communicate(data, timeout=max(0.0, min(POLL_S, left)))
            return err
        except subprocess.TimeoutExpired:
            data = None  # the request is written once
        if cancelled is not None and cancelled():
            _kill(proc)
            raise PoseError(f"{path}: decoding stopped: the render was cancelled")
        if time.monotonic() >= deadline:
            _kill(proc)
            raise PoseError(
                f"{path}: decoding took longer than {timeout_s:g} s (limits.decode_timeout_s); "
                "give a shorter or smaller input"
            )


def _child_env() -> dict[str, str]:
    """This environment, single-threaded numerics, and this package importable from anywhere."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, **_CHILD_ENV, "PYTHONPATH": os.pathsep.join(p for p in (root, path) if p)}


def _limit(memory_mb: int) -> Any:
    cap = int(memory_mb) << 20

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _read(out: Path, path: Path) -> PoseSequence:
    with np.load(out, allow_pickle=False) as data:
        keypoints = np.asarray(data["keypoints"], dtype=np.float32)
        meta = json.loads(str(data["meta"]))
    return PoseSequence(
        keypoints,
        fps=float(meta["fps"]),
        width=int(meta["width"]),
        height=int(meta["height"]),
        source=str(path),
        info=meta.get("info"),
    )


def _child() -> int:
    """The child: read the request from stdin, decode, write the ``.npz``; exit code by outcome."""
    request = json.loads(sys.stdin.read())
    try:
        from engine.pose.extract import PoseExtractConfig
        from engine.pose.io import load_poses

        options = dict(request["options"])
        if options.get("extraction") is not None:
            options["extraction"] = PoseExtractConfig.model_validate(options["extraction"])
        seq = load_poses(request["path"], **options)
        meta = {"fps": seq.fps, "width": seq.width, "height": seq.height, "info": seq.info}
        np.savez(request["out"], keypoints=seq.keypoints, meta=np.array(json.dumps(meta)))
    except PoseError as e:
        print(str(e).replace("\n", " "), file=sys.stderr)
        return EXIT_POSE_ERROR
    except MemoryError:
        return EXIT_MEMORY
    return 0


if __name__ == "__main__":
    sys.exit(_child())
