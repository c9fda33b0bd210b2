"""Shared helpers of the service tests: an in-process app over a tiny-preset core."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from cluster.serve.app import make_api
from cluster.serve.backend import LocalBackend
from cluster.serve.config import ServeArgs
from cluster.serve.service import RenderService
from engine.core import InProcessExecutor
from engine.pose import save_poses_json, synthetic_dance

TOKENS = {"alice": "token-alice", "bob": "token-bob", "carol": "token-carol"}
ENGINE = ["sampler.steps=2", "output.contact_sheet=true", "cluster.batch_wait_s=0"]


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def make_args(root: Path, **fields: Any) -> ServeArgs:
    tokens = [
        {"name": "alice", "token": TOKENS["alice"]},
        {"name": "bob", "token": TOKENS["bob"]},
        {"name": "carol", "token": TOKENS["carol"], "max_concurrent": 2, "frames_per_day": 5},
    ]
    data: dict[str, Any] = {
        "storage": root,
        "executor": "inprocess",
        "tokens": tokens,
        "set": ENGINE + fields.pop("set", []),
        "poll_s": 0.05,
    }
    data.update(fields)
    return ServeArgs.model_validate(data)


def make_client(args: ServeArgs, chain: Any) -> tuple[TestClient, RenderService]:
    service = RenderService(args, InProcessExecutor(args.engine_config(), chain))
    return TestClient(make_api(LocalBackend(service), args)), service


def poses(frames: int = 3) -> dict[str, Any]:
    """A synthetic dance as an inline poses.json object (512x512, 8 fps)."""
    seq = synthetic_dance(frames=frames, fps=8, width=512, height=512)
    return {
        "fps": seq.fps,
        "width": seq.width,
        "height": seq.height,
        "frames": [[[float(v) for v in joint] for joint in frame] for frame in seq.keypoints],
    }


def poses_file(path: Path, frames: int = 3) -> Path:
    save_poses_json(synthetic_dance(frames=frames, fps=8, width=512, height=512), path)
    return path


def body(prompt: str = "a woman dancing", frames: int = 3, **fields: Any) -> dict[str, Any]:
    return {"prompt": prompt, "poses": poses(frames), "steps": 2, **fields}


def wait_state(client: TestClient, render_id: str, who: str, states: set[str], timeout_s: float = 90
               ) -> dict[str, Any]:  # fmt: skip
    """Poll until the render is in one of ``states``; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = client.get(f"/v1/renders/{render_id}", headers=auth(who)).json()
        if view.get("state") in states:
            return view
        time.sleep(0.1)
    raise AssertionError(f"render {render_id} not in {states} after {timeout_s} s: {view}")


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of every event of an SSE stream (comments and retry lines skipped)."""
    out = []
    for block in text.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != ":"
        )
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out
