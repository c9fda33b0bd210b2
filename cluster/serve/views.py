"""The API's view of a stored render (what GET, list, submit and cancel answer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.serve.storage import OwnerIds
from cluster.serve.uploads import public_message
from engine.core import RenderRecord


def view(record: RenderRecord, root: Path) -> dict[str, Any]:
    """A store record as the API's RenderView (the owner's id; no server paths in ``error``)."""
    client_id = OwnerIds.client(record.id)
    base = f"/v1/renders/{client_id}"
    total, done = record.frames_total, record.frames_done
    progress = 1.0 if record.state == "done" else (done / total if total else 0.0)
    data = record.public()
    for key in ("owner", "fingerprint", "priority"):
        data.pop(key)
    spec = record.spec
    return {
        **data,
        "id": client_id,
        "error": public_message(record.error, root) if record.error else None,
        "prompt": str(spec.get("prompt") or ""),
        "width": int(spec.get("width") or 0),
        "height": int(spec.get("height") or 0),
        "progress": round(progress, 4),
        "links": {
            "self": base,
            "events": f"{base}/events",
            "cancel": f"{base}/cancel",
            "video": f"{base}/video",
            "contact_sheet": f"{base}/contact-sheet",
            "metrics": f"{base}/metrics",
            "frames": f"{base}/frames/",
        },
    }
