"""Prompt refinement: the template backend, and the openai backend against a local fake server.

The fake server is a real OpenAI-compatible HTTP endpoint (``POST /v1/chat/completions``) on
127.0.0.1, driven by a script of replies, so the real ``openai`` client is exercised end to end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from engine.config import DEFAULT_NEGATIVE, RefineConfig
from engine.refine import (
    PROMPT_VERSION,
    OpenAIRefiner,
    RefinedPrompt,
    RefineError,
    RefineRequest,
    TemplateRefiner,
    cache_key,
    make_refiner,
    refine,
)
from engine.refine.tables import FULL_TOKEN_BUDGET
from engine.refine.template import approx_clip_tokens

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "DANCING_AVATAR_TEST_KEY"
GOOD = {
    "clothes": "a flowing emerald green satin gown with a slit, silver heels",
    "face": "soft freckles, hazel eyes, a calm smile, long auburn hair in loose waves",
    "background": "moonlit rooftop garden with lanterns, city skyline, cool night light",
    "negative": "extra people, blurry",
}


def template(coarse: str, **parts: Any) -> RefinedPrompt:
    """The template refinement of ``coarse`` (no cache)."""
    return refine(coarse, config=RefineConfig(), cache_dir=None, **parts)


# ---------------------------------------------------------------------------------------------
# Template backend


def test_template_is_deterministic() -> None:
    prompt = "a woman in a red dress dancing on a beach at sunset"
    a, b = template(prompt), TemplateRefiner().refine(RefineRequest(coarse=prompt))
    assert a == b and a.source == "template"
    req = RefineRequest(coarse=prompt)
    assert cache_key(req, "template", "m") == cache_key(
        RefineRequest(coarse=prompt), "template", "x"
    )


def test_template_spec_example() -> None:
    r = template("a woman in a red dress dancing on a beach")
    assert r.clothes.startswith("a flowing red silk midi dress with thin straps, fitted waist")
    assert r.background.startswith("sunny sandy beach with turquoise sea and gentle waves")
    assert "detailed symmetric face" in r.face and "long soft wavy" in r.face
    assert r.full.startswith("a photo of sks person, a woman dancing, full body, wearing a flowing")
    assert r.negative.startswith(DEFAULT_NEGATIVE)


@pytest.mark.parametrize(
    ("coarse", "expected"),
    [
        ("a man in a blue shirt", ["a crisp blue cotton button-up shirt", "trousers"]),
        ("a girl in a yellow t-shirt", ["yellow cotton crew-neck t-shirt", "jeans"]),
        ("a woman in a black leather jacket", ["tailored black leather jacket", "t-shirt"]),
        ("a man in a navy suit", ["navy blue wool two-piece suit", "oxford shoes"]),
        ("a woman in a white kimono", ["white silk kimono", "geta sandals"]),
        ("a boy in a grey hoodie and black jeans", ["grey cotton fleece hoodie", "black slim-fit"]),
        ("a woman in a pleated pink skirt", ["pink chiffon knee-length skirt", "blouse"]),
        ("a man in a camel coat", ["camel wool overcoat", "knee boots"]),
        ("a woman in a long dark green velvet dress", ["a flowing dark green velvet midi dress"]),
        ("a man in a red and white striped shirt", ["red and white striped cotton button-up"]),
        ("two women in dresses", ["midi dress"]),
        ("a woman in an orange tank top", ["an orange ribbed cotton tank top"]),
        ("a man in a purple tshirt", ["purple cotton crew-neck t-shirt"]),
    ],
)
def test_template_garment_colour_material(coarse: str, expected: list[str]) -> None:
    clothes = template(coarse).clothes
    for text in expected:
        assert text in clothes


def test_template_outfit_completion() -> None:
    assert "button-up" not in template("a man in a white t-shirt").clothes
    hoodie = template("a man in a black hoodie").clothes
    assert "sweatpants" in hoodie and "sneakers" in hoodie
    dress = template("a woman in a red dress").clothes
    assert "jeans" not in dress and "t-shirt" not in dress
    boots = template("a woman in boots").clothes
    assert "t-shirt" in boots and "jeans" in boots and "ankle boots" in boots
    assert "sneakers" not in boots
    assert template("a woman in red").clothes.startswith("a fitted red cotton crew-neck t-shirt")


@pytest.mark.parametrize(
    ("scene", "expected"),
    [
        ("on a beach", "sandy beach"),
        ("on a street", "city street"),
        ("on stage", "theater stage"),
        ("in a studio", "photo studio"),
        ("in a dance studio", "ballet barre"),
        ("in a forest", "forest"),
        ("in the city", "skyscrapers"),
        ("in a park", "city park"),
        ("in a room", "cozy room"),
        ("in the living room", "sofa"),
        ("in a night club", "nightclub dance floor"),
    ],
)
def test_template_scene(scene: str, expected: str) -> None:
    r = template(f"a person dancing {scene}")
    assert expected in r.background and expected in r.full


def test_template_lighting() -> None:
    sunset = template("a man dancing on a beach at sunset").background
    assert "sandy beach" in sunset and "sunset light" in sunset and "soft daylight" not in sunset
    assert "at night" in template("a woman breakdancing on a street at night").background
    gym = template("a woman in neon green leggings in a gym")
    assert "neon green" in gym.clothes and "neon lighting" not in gym.background


def test_template_hair_face_and_subject() -> None:
    r = template("a blonde woman with curly hair and glasses, smiling, in a blue dress")
    assert "golden blonde" in r.face and "curly" in r.face and "round glasses" in r.face
    assert "warm genuine smile" in r.face and "blue" in r.clothes and "blonde" not in r.clothes
    red_hair = template("a woman with red hair in a blue dress")
    assert "copper red hair" in red_hair.face and "red" not in red_hair.clothes
    assert "bright green eyes" in template("a girl with green eyes").face
    assert "short" in template("a man dancing").face
    assert "long" in template("a woman dancing").face
    assert "bald head" in template("a bald man").face
    assert template("a ballerina spinning").full.startswith(
        "a photo of sks person, a ballerina spinning"
    )
    assert "dancing ballet" in template("a girl dancing ballet").full


def test_template_defaults_when_nothing_recognised() -> None:
    r = template("someone moving")
    assert r.clothes.startswith(
        "a fitted white cotton crew-neck t-shirt, blue slim-fit denim jeans"
    )
    assert "shoulder-length brown hair" in r.face
    assert r.background.startswith("clean photo studio")
    assert r.full.startswith("a photo of sks person, a person dancing, full body")


def test_template_parts_override_coarse() -> None:
    r = template("a woman in a red dress on a stage", clothes="green kimono", background="beach")
    assert "green silk kimono" in r.clothes and "dress" not in r.clothes
    assert "sandy beach" in r.background and "stage" not in r.background
    odd = template(
        "a woman", clothes="something shimmering", face="mysterious look", background="mars"
    )
    assert odd.clothes.startswith("something shimmering")
    assert odd.face.startswith("mysterious look")
    assert odd.background.startswith("mars")
    assert template("a woman", clothes="dark blue").clothes.startswith("a fitted dark blue cotton")
    assert template("a woman dressed in dark red").clothes.startswith("a fitted dark red cotton")


def test_identifier_and_stage_prompts() -> None:
    r = template("a man in a black suit dancing in a ballroom", identifier="ohwx")
    assert r.identifier == "ohwx" and r.full.startswith("a photo of ohwx person, a man dancing")
    assert r.frame_prompt == r.full
    body, face = r.appearance_prompts()
    assert body.startswith("a photo of ohwx person, full body") and r.clothes in body
    assert face.startswith("a photo of ohwx person, close-up portrait") and r.face in face
    assert r.background in r.background_prompt and "no people" in r.background_prompt
    assert "ohwx" not in r.background_prompt and "sks" not in r.full


def test_full_prompt_fits_clip_budget() -> None:
    r = template(
        "an old man with a beard and glasses, smiling, in a grey wool coat, plaid shirt, jeans "
        "and boots, walking in the snowy forest at dusk"
    )
    assert approx_clip_tokens(r.full) <= FULL_TOKEN_BUDGET
    assert r.clothes.split(",")[0] in r.full and r.face.split(",")[0] in r.full


def test_validation_errors() -> None:
    with pytest.raises(ValidationError, match="coarse prompt is empty"):
        RefineRequest(coarse="  ")
    with pytest.raises(ValidationError, match="one token"):
        RefineRequest(coarse="a woman", identifier="two words")
    good = template("a woman").model_dump()
    with pytest.raises(ValidationError, match="Extra inputs"):
        RefinedPrompt.model_validate({**good, "mood": "happy"})
    with pytest.raises(ValidationError, match="does not contain the identifier"):
        RefinedPrompt.model_validate({**good, "identifier": "zzz"})


def test_make_refiner() -> None:
    assert isinstance(make_refiner(RefineConfig()), TemplateRefiner)
    assert isinstance(make_refiner(RefineConfig(backend="openai")), OpenAIRefiner)


def test_import_is_light_and_hash_seed_independent() -> None:
    code = (
        "import sys, json, engine.refine as r\n"
        "bad = {'openai', 'ray', 'fastapi'} & set(sys.modules)\n"
        "assert not bad, bad\n"
        "p = r.refine('a blonde woman in a red dress on a beach', config=r.RefineConfig(), "
        "cache_dir=None)\n"
        "print(json.dumps([r.PROMPT_VERSION, p.full]))\n"
    ).replace("r.RefineConfig", "__import__('engine.config').config.RefineConfig")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    version, full = json.loads(out.stdout)
    assert version == PROMPT_VERSION
    assert full == template("a blonde woman in a red dress on a beach").full


# ---------------------------------------------------------------------------------------------
# Fake OpenAI-compatible server


@dataclass
class Step:
    """One scripted reply of the fake server."""

    status: int = 200
    content: str | None = None
    refusal: str | None = None
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeServer:
    """State shared with the handler threads: the script and the requests received."""

    url: str = ""
    steps: list[Step] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def script(self, *steps: Step) -> None:
        """Replace the script with ``steps``."""
        with self.lock:
            self.steps = list(steps)


def good(**overrides: str) -> Step:
    return Step(content=json.dumps({**GOOD, **overrides}))


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        fake = self.server.fake
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with fake.lock:
            headers = {k.lower(): v for k, v in self.headers.items()}
            fake.requests.append({"path": self.path, "headers": headers, "body": raw})
            step = fake.steps.pop(0) if fake.steps else Step(status=599)
        if step.delay_s:
            fake.stop.wait(step.delay_s)
        if self.path != "/v1/chat/completions":
            step = Step(status=404)
        if step.status == 200:
            message = {"role": "assistant", "content": step.content, "refusal": step.refusal}
            payload: dict[str, Any] = {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": 0,
                "model": "test-model",
                "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
            }
        else:
            payload = {"error": {"message": f"fake error {step.status}", "type": "test"}}
        data = json.dumps(payload).encode()
        self.send_response(step.status)
        for name, value in {"Content-Type": "application/json", **step.headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the client hung up (timeout test)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv(KEY_ENV, "test-key")
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.fake = FakeServer(url=f"http://127.0.0.1:{httpd.server_address[1]}/v1")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield httpd.fake
    httpd.fake.stop.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def config(fake: FakeServer, **overrides: Any) -> RefineConfig:
    values: dict[str, Any] = {
        "backend": "openai",
        "model": "test-model",
        "base_url": fake.url,
        "api_key_env": KEY_ENV,
        "timeout_s": 5.0,
        "max_retries": 3,
    }
    return RefineConfig(**{**values, **overrides})


def refiner(fake: FakeServer, delays: list[float] | None = None, **overrides: Any) -> OpenAIRefiner:
    sleep = delays.append if delays is not None else time.sleep
    return OpenAIRefiner(config(fake, **overrides), retry_base_delay_s=0.01, sleep=sleep)


REQUEST = RefineRequest(coarse="a woman in a green gown dancing on a rooftop at night")


def assert_clean(err: BaseException) -> None:
    """No client exception chained to ``err``: its traceback shows only engine frames."""
    text = "".join(traceback.format_exception(err))
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    assert "During handling" not in text and "site-packages" not in text


# ---------------------------------------------------------------------------------------------
# openai backend


def test_openai_good_reply(server: FakeServer) -> None:
    server.script(good(clothes="wearing  a flowing emerald green satin gown, silver heels."))
    r = refiner(server).refine(REQUEST.model_copy(update={"identifier": "ohwx"}))
    assert r.source == "openai" and r.identifier == "ohwx"
    assert r.clothes == "wearing a flowing emerald green satin gown, silver heels"
    assert r.face == GOOD["face"] and r.background == GOOD["background"]
    assert r.full.startswith(
        "a photo of ohwx person, a woman dancing, full body, wearing a flowing"
    )
    assert r.negative.startswith(DEFAULT_NEGATIVE) and r.negative.endswith("extra people")
    (req,) = server.requests
    body = json.loads(req["body"])
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == "Bearer test-key"
    assert body["model"] == "test-model" and body["response_format"] == {"type": "json_object"}
    system, user = body["messages"]
    assert all(f'"{key}"' in system["content"] for key in ("clothes", "face", "background"))
    assert json.loads(user["content"])["coarse_prompt"] == REQUEST.coarse


@pytest.mark.parametrize(
    ("step", "match"),
    [
        (Step(content='{"clothes": "red dress", '), "not valid JSON"),
        (Step(content="[1, 2]"), "not an object"),
        (
            Step(content=json.dumps({k: v for k, v in GOOD.items() if k != "background"})),
            "background: missing",
        ),
        (
            Step(content=json.dumps({"clothes": "x", "face": "y", "background": " "})),
            "background: is empty; negative: missing",
        ),
        (Step(content=None, refusal="I can't help with that."), "refused.*can't help"),
        (Step(content=""), "empty reply"),
    ],
    ids=["malformed", "not-object", "missing-key", "blank-and-missing", "refusal", "empty"],
)
def test_openai_bad_replies(server: FakeServer, step: Step, match: str) -> None:
    server.script(step)
    with pytest.raises(RefineError, match=match) as info:
        refiner(server).refine(REQUEST)
    assert len(server.requests) == 1  # content errors are not retried
    assert "refine.backend=template" in str(info.value)
    assert_clean(info.value)


def test_openai_retries_429(server: FakeServer) -> None:
    delays: list[float] = []
    server.script(Step(status=429, headers={"Retry-After": "0.05"}), good())
    assert refiner(server, delays).refine(REQUEST).source == "openai"
    assert len(server.requests) == 2 and delays == [0.05]


def test_openai_retries_500_twice(server: FakeServer) -> None:
    delays: list[float] = []
    server.script(Step(status=500), Step(status=503), good())
    assert refiner(server, delays).refine(REQUEST).clothes == GOOD["clothes"]
    assert len(server.requests) == 3 and delays == [0.01, 0.02]


def test_openai_always_500(server: FakeServer) -> None:
    delays: list[float] = []
    server.script(*[Step(status=500)] * 10)
    with pytest.raises(RefineError) as info:
        refiner(server, delays, max_retries=2).refine(REQUEST)
    message = str(info.value)
    assert "failed after 3 attempt(s): HTTP 500" in message and "fake error 500" in message
    assert server.url in message and "refine.fallback_to_template=true" in message
    assert len(server.requests) == 3 and delays == [0.01, 0.02]
    assert_clean(info.value)


def test_openai_auth_error_not_retried(server: FakeServer) -> None:
    server.script(Step(status=401), good())
    with pytest.raises(RefineError, match=f"rejected the API key from \\${KEY_ENV}") as info:
        refiner(server).refine(REQUEST)
    assert len(server.requests) == 1
    assert_clean(info.value)


def test_openai_timeout(server: FakeServer) -> None:
    server.script(Step(delay_s=2.0, content=json.dumps(GOOD)))
    start = time.monotonic()
    with pytest.raises(RefineError, match=r"no answer within refine.timeout_s=0.5 s") as info:
        refiner(server, [], timeout_s=0.5, max_retries=0).refine(REQUEST)
    assert time.monotonic() - start < 1.8
    assert_clean(info.value)


def test_openai_timeout_then_success(server: FakeServer) -> None:
    server.script(Step(delay_s=2.0, content=json.dumps(GOOD)), good())
    assert refiner(server, [], timeout_s=0.5, max_retries=1).refine(REQUEST).source == "openai"
    assert len(server.requests) == 2


def test_openai_unreachable(server: FakeServer) -> None:
    with socket.socket() as s:  # a free port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    delays: list[float] = []
    dead = refiner(server, delays, base_url=f"http://127.0.0.1:{port}/v1", max_retries=1)
    with pytest.raises(RefineError, match="connection failed") as info:
        dead.refine(REQUEST)
    assert f"127.0.0.1:{port}" in str(info.value) and delays == [0.01]
    assert_clean(info.value)


def test_openai_no_api_key(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(RefineError, match=f"environment variable {KEY_ENV} is not set"):
        refiner(server).refine(REQUEST)
    assert server.requests == []


def test_openai_package_missing(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(RefineError, match=r"pip install 'dancing-avatar\[openai\]'"):
        refiner(server).refine(REQUEST)


def test_openai_fallback_to_template(
    server: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.script(Step(status=500))
    cfg = config(server, max_retries=0, fallback_to_template=True)
    with caplog.at_level("WARNING", logger="engine.refine"):
        r = refine(REQUEST.coarse, config=cfg, cache_dir=tmp_path)
    assert r.source == "template-fallback"
    assert r.model_copy(update={"source": "template"}) == TemplateRefiner().refine(REQUEST)
    assert "using the template backend" in caplog.text and "HTTP 500" in caplog.text
    assert list(tmp_path.iterdir()) == []  # a fallback is never cached
    server.script(good())
    assert refine(REQUEST.coarse, config=cfg, cache_dir=tmp_path).source == "openai"


def test_cache_hit_avoids_server(server: FakeServer, tmp_path: Path) -> None:
    server.script(good(), good(face="short grey hair"), good())
    cfg = config(server)
    first = refine(REQUEST.coarse, config=cfg, cache_dir=tmp_path)
    again = refine(REQUEST.coarse, config=cfg, cache_dir=tmp_path)
    assert first == again and len(server.requests) == 1
    assert [p.suffix for p in tmp_path.iterdir()] == [".json"]  # no temp files left
    elsewhere = cfg.model_copy(update={"base_url": "http://127.0.0.1:9/v1"})
    assert refine(REQUEST.coarse, config=elsewhere, cache_dir=tmp_path) == first
    other = refine(REQUEST.coarse, config=cfg, cache_dir=tmp_path, identifier="ohwx")
    assert other.face == "short grey hair" and len(server.requests) == 2
    assert refine(REQUEST.coarse, config=cfg, cache_dir=None).source == "openai"  # no cache
    assert len(server.requests) == 3


def test_cache_corrupt_entry_is_a_miss(server: FakeServer, tmp_path: Path) -> None:
    server.script(good())
    cfg = config(server)
    path = tmp_path / f"{cache_key(REQUEST, 'openai', cfg.model)}.json"
    path.write_text("{not json")
    assert refine(REQUEST.coarse, config=cfg, cache_dir=tmp_path).source == "openai"
    assert len(server.requests) == 1
    assert RefinedPrompt.model_validate_json(path.read_text()).source == "openai"


def test_cache_template_backend(tmp_path: Path) -> None:
    r = refine("a man in a suit", config=RefineConfig(), cache_dir=tmp_path / "c")
    (entry,) = (tmp_path / "c").iterdir()
    assert RefinedPrompt.model_validate_json(entry.read_text()) == r
    assert cache_key(REQUEST, "template", "a") != cache_key(REQUEST, "openai", "a")
    assert cache_key(REQUEST, "openai", "a") != cache_key(REQUEST, "openai", "b")
