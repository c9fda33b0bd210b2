"""``model.sam_checkpoint`` by URI (engine/models/remote.py) against moto's real S3-API server on
127.0.0.1: fetched once per node (ETag-keyed cache, file lock, atomic rename), fetched again when
the object changes, one download when callers of a node ask at once, reported by
``avatar models check``."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.models.errors import WeightsNotFoundError
from engine.models.remote import fetch

FIELD = "model.sam_checkpoint"


def sam_bytes(width: int) -> bytes:
    """A checkpoint with SAM's patch embedding only (``avatar models check`` reads its shape)."""
    buffer = io.BytesIO()
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(width, 3, 16, 16)}, buffer)
    return buffer.getvalue()


@pytest.fixture
def bucket(s3, monkeypatch):
    """boto3 client of the test server; the endpoint reaches fsspec through AWS_ENDPOINT_URL."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    return boto3.client("s3", endpoint_url=s3)


def test_fetched_once_per_node_and_again_when_changed(bucket, tmp_path: Path):
    vit_b = sam_bytes(768)
    bucket.put_object(Bucket="renders", Key="weights/sam_vit_b.pth", Body=vit_b)
    uri = "s3://renders/weights/sam_vit_b.pth"
    first = fetch(uri, FIELD, tmp_path / "node")
    again = fetch(uri, FIELD, tmp_path / "node")
    assert first.downloaded and not again.downloaded
    assert again.path == first.path and first.path.read_bytes() == vit_b
    assert first.version.startswith("etag:") and first.size == len(vit_b)
    assert not list(first.path.parent.glob("*.part"))  # the download was renamed into place

    vit_l = sam_bytes(1024)  # the object changes: a new ETag, a new local copy
    bucket.put_object(Bucket="renders", Key="weights/sam_vit_b.pth", Body=vit_l)
    changed = fetch(uri, FIELD, tmp_path / "node")
    assert changed.downloaded and changed.path != first.path
    assert changed.path.read_bytes() == vit_l

    with pytest.raises(WeightsNotFoundError, match=r"renders/weights/nothing\.pth does not exist"):
        fetch("s3://renders/weights/nothing.pth", FIELD, tmp_path / "node")


def test_callers_of_a_node_download_once(bucket, tmp_path: Path):
    """Four callers at once (threads: each takes the node's file lock through its own open
    file, exactly as separate processes do) → one download, one complete file."""
    data = sam_bytes(768)  # 2.4 MB: the downloads would overlap without the lock
    bucket.put_object(Bucket="renders", Key="weights/big.pth", Body=data)
    uri = "s3://renders/weights/big.pth"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: fetch(uri, FIELD, tmp_path / "node"), range(4)))
    assert sorted(r.downloaded for r in results) == [False, False, False, True]
    assert len({r.path for r in results}) == 1 and results[0].path.read_bytes() == data


def test_models_check_reports_the_uri(bucket, tmp_path: Path, monkeypatch):
    from engine.models.check import check_models

    monkeypatch.setenv("AVATAR_CACHE_DIR", str(tmp_path / "node"))
    bucket.put_object(Bucket="renders", Key="weights/sam_vit_b_01ec64.pth", Body=sam_bytes(768))

    def sam_line(value: str, sam_type: str) -> tuple[bool, str]:
        config = load_config(None, preset="sd15", overrides=[
            f"model.sam_checkpoint={value}", f"model.sam_type={sam_type}",
            "background.mask_source=sam", "model.device=cpu", "model.dtype=float32",
        ])  # fmt: skip
        lines = {line.component: line for line in check_models(config)}
        return lines[FIELD].ok, lines[FIELD].text

    ok, text = sam_line("s3://renders/weights/sam_vit_b_01ec64.pth", "vit_b")
    assert ok and text.startswith("SAM vit_b, float32"), text
    assert "s3://renders/weights/sam_vit_b_01ec64.pth, etag:" in text and "fetched to" in text
    ok, text = sam_line("s3://renders/weights/sam_vit_b_01ec64.pth", "vit_h")
    assert not ok and text.endswith("fix: set model.sam_type=vit_b"), text
