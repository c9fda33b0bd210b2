"""The documented batch path: `ray job submit … -- python -m cluster.batch` on a local head node.

Starts its own head node (127.0.0.1 only) and stops it at the end; every step has a timeout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.pose import save_poses_json, synthetic_dance

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    if not RAY.exists():
        pytest.skip(f"no ray command beside {sys.executable}")
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PATH": f"{RAY.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    dashboard = free_port()
    start = [
        str(RAY), "start", "--head", f"--port={free_port()}", "--num-cpus=2",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        "--include-dashboard=true", "--disable-usage-stats",
    ]  # fmt: skip
    subprocess.run(start, env=env, check=True, timeout=180, capture_output=True)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, timeout=120, capture_output=True)


def test_ray_job_submit_batch(head, tmp_path: Path):
    address, env = head
    save_poses_json(
        synthetic_dance(frames=2, fps=8, width=512, height=512), tmp_path / "poses.json"
    )
    manifest = tmp_path / "batch.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "preset": "tiny",
                "set": [
                    "sampler.steps=2",
                    "output.contact_sheet=false",
                    f"cache_dir={tmp_path / 'cache'}",
                ],
                "renders": [
                    {"id": "one", "prompt": "a dancer", "poses": "poses.json"},
                    {"id": "two", "prompt": "a robot", "poses": "poses.json", "seed": 5},
                ],
            }
        )
    )
    out = tmp_path / "renders"
    submit = [
        str(RAY), "job", "submit", "--address", address, "--working-dir", str(ROOT),
        "--", "python", "-m", "cluster.batch", str(manifest), "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(submit, env=env, cwd=ROOT, timeout=420, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {v["status"] for v in summary["renders"].values()} == {"done"}
    assert (out / "one" / "video.mp4").is_file() and (out / "two" / "video.mp4").is_file()
