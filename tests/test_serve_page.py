"""The web page in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven
by selenium) against the in-process app on a local uvicorn (127.0.0.1), as a first-time user:
the token hint, a ``#token=`` link in the open tab, submit the example dance, progress to 100 %,
the video plays, prompts and thumbnails in the list, cancel and delete from it, the favicon.

Skips (with the reason) where chromium or chromedriver is missing:
``apt-get update && apt-get install -y chromium chromium-driver``.
Set ``AVATAR_SCREENSHOT=docs/serve.png`` to keep a screenshot of the page.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from serve_helpers import TOKENS, auth, body, make_args, make_client

pytest.importorskip("selenium")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs chromium + chromedriver: apt-get install -y chromium chromium-driver",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_chain):
    import uvicorn

    args = make_args(tmp_path_factory.mktemp("page"), set=["cluster.max_batch=2"])
    client, service = make_client(args, tiny_chain)
    port = free_port()
    config = uvicorn.Config(client.app, host="127.0.0.1", port=port, log_level="warning")
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http.started, "uvicorn did not start within 30 s"
    yield f"http://127.0.0.1:{port}", client
    http.should_exit = True
    thread.join(timeout=10)
    service.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=1280,1000"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout_s: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(condition, message=what)


def test_page_for_a_first_time_user(server, browser):
    """No token: the hint says where one comes from; a #token= link opened in the same tab
    later fills it in (hashchange); submit, watch, play; the list shows prompts and thumbnails;
    cancel and delete from the list; the favicon loads."""
    from selenium.webdriver.common.by import By

    url, client = server
    browser.get(url)
    browser.execute_script("localStorage.clear();")
    browser.get(url)
    hint = browser.find_element(By.ID, "token-hint")
    wait_for(browser, lambda d: hint.is_displayed(), 10, "the token hint shows without a token")
    assert "avatar serve" in hint.text
    browser.execute_script(f"location.hash = '#token={TOKENS['alice']}';")  # the tab stays open
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#example option"), 20,
             "example list loaded after #token=")  # fmt: skip
    assert not hint.is_displayed() and "token" not in browser.current_url
    browser.find_element(By.ID, "prompt").clear()
    browser.find_element(By.ID, "prompt").send_keys("a <b>robot</b> dancing")
    browser.find_element(By.ID, "steps").clear()
    browser.find_element(By.ID, "steps").send_keys("2")
    browser.find_element(By.ID, "submit").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "percent").text == "100 %", 120,
             "progress reaches 100 %")  # fmt: skip
    playing = ("const v = document.getElementById('video');"
               "return v.src !== '' && !v.paused && v.readyState >= 2 && v.currentTime > 0;")  # fmt: skip
    wait_for(browser, lambda d: d.execute_script(playing), 60, "the video element plays")
    assert browser.find_element(By.ID, "state").text == "done"
    row = "#renders tbody tr:first-child"
    thumb = f"const i = document.querySelector('{row} img.thumb'); return i && i.naturalWidth;"
    wait_for(browser, lambda d: d.execute_script(thumb), 20, "a thumbnail in the list")
    prompt = browser.execute_script(
        f"return document.querySelector('{row} td.prompt').textContent;"
    )
    assert prompt == "a <b>robot</b> dancing"  # shown as text, not markup
    favicon = "const done = arguments[0]; fetch('/favicon.ico').then(r => done(r.status));"
    assert browser.execute_async_script(favicon) == 200
    shot = os.environ.get("AVATAR_SCREENSHOT")
    if shot:
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(shot)

    # Another render (long: 48 frames, 20 steps) is cancelled, then deleted, from the list.
    long = client.post("/v1/renders", json={**body(frames=48), "steps": 20}, headers=auth("alice"))
    render_id = long.json()["id"]
    button = f"button[data-cancel='{render_id}']"
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, button), 20, "cancel button")
    # The list is redrawn every few seconds: find and click in one script (no stale element).
    browser.execute_script(f'document.querySelector("{button}").click();')
    state = f"const c = document.querySelector(\"tr[data-id='{render_id}'] td:nth-child(3)\");" \
            "return c ? c.textContent : null;"  # fmt: skip
    wait_for(browser, lambda d: d.execute_script(state) == "cancelled", 20,
             "the list shows the render cancelled")  # fmt: skip
    view = client.get(f"/v1/renders/{render_id}", headers=auth("alice")).json()
    assert view["state"] == "cancelled" and view["frames_done"] < 48
    browser.execute_script(
        f"document.querySelector(\"button[data-delete='{render_id}']\").click();"
    )
    gone = f"return document.querySelector(\"tr[data-id='{render_id}']\") === null;"
    wait_for(browser, lambda d: d.execute_script(gone), 20, "the deleted render leaves the list")
    assert client.get(f"/v1/renders/{render_id}", headers=auth("alice")).status_code == 404
