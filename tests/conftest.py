"""Shared fixtures: tiny seeded components (built once per session) and short pose sequences."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# Caches (refined prompts, adapters) of the test session go to a throwaway folder, not ~/.cache.
os.environ["AVATAR_CACHE_DIR"] = tempfile.mkdtemp(prefix="avatar-test-cache-")


@pytest.fixture(scope="module")
def s3():
    """A real S3-API server (moto) on 127.0.0.1 with a bucket ``renders``; its endpoint URL."""
    from tests.s3_helpers import make_bucket, s3_server

    with s3_server() as endpoint:
        make_bucket(endpoint, "renders")
        yield endpoint


@pytest.fixture(scope="session")
def tiny_components():
    from engine.config import ModelConfig
    from engine.models.registry import build_components

    return build_components(ModelConfig(preset="tiny", device="cpu"))


@pytest.fixture(scope="session")
def tiny_chain(tiny_components):
    from engine.chain import FrameChain

    return FrameChain(tiny_components)


@pytest.fixture()
def dance_json(tmp_path: Path) -> Path:
    """A 4-frame synthetic dance as poses.json (512x512, 8 fps)."""
    from engine.pose import save_poses_json, synthetic_dance

    path = tmp_path / "poses.json"
    save_poses_json(synthetic_dance(frames=4, fps=8, width=512, height=512), path)
    return path


def tiny_config(poses: Path, *overrides: str):
    """A tiny render config with few steps for fast tests."""
    from engine.config import load_config

    base = [
        f"poses={poses}",
        "prompt=a woman in a red dress dancing",
        "sampler.steps=3",
        "output.contact_sheet=false",
    ]
    return load_config(None, preset="tiny", overrides=[*base, *overrides])
