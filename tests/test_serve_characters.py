"""The service names character LoRAs from its allow-list only (ServeArgs.characters)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file
from serve_helpers import auth, body, make_args, make_client, wait_state

from tests import weights_layouts as wl


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_chain):
    root = tmp_path_factory.mktemp("characters")
    lora = root / "ada.safetensors"
    save_file(wl.kohya_lora(tiny_chain.parts.unet, None, seed=4, std=0.2), str(lora))
    args = make_args(root / "serve", characters={"ada": str(lora)})
    client, service = make_client(args, tiny_chain)
    yield client, service
    service.close()


def test_a_request_names_an_allowed_character_and_nothing_else(served):
    client, service = served
    assert client.get("/v1/info", headers=auth("alice")).json()["characters"] == ["ada"]
    bad = client.post("/v1/renders", json=body(character="/etc/passwd"), headers=auth("alice"))
    assert bad.status_code == 422 and "body.character" in bad.text
    r = client.post("/v1/renders", json=body(character="ada", seed=5), headers=auth("alice"))
    assert r.status_code == 202, r.text
    view = wait_state(client, r.json()["id"], "alice", {"done", "failed"})
    assert view["state"] == "done", view
    stored = service.record("alice", r.json()["id"]).id  # the store's id is tagged with the owner
    manifest = json.loads(service.store.files(stored).get("manifest.json"))
    assert '"imported": true' in json.dumps(manifest)
