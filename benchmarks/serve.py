"""Load benchmark of the HTTP service: N concurrent clients against a local Serve app.

Each client has its own token and submits its share of short tiny renders (Idempotency-Key per
submission, so retries after a fault can never duplicate a render), then follows each accepted
render to its end — half by polling, half over SSE. 429/503 answers are counted by code and
retried after Retry-After. Afterwards every accepted render must be done exactly once (one render
per key in the caller's list) with an intact video (probed frame count). Optional fault mid-run:

    --fault ingress   kill the ingress replica (Serve starts a new one)
    --fault sampler   SIGKILL the Sampler actor's process (Ray restarts it; the batch is retried)
    --fault restart   serve shutdown, then start the app again on the same store

    python -m benchmarks.serve --clients 50 --renders 200 [--fault restart]

Writes out/bench/serve[-FAULT].json: submit latency p50/p99, renders/min, accepted and
rejected by code, check results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from engine.pose import synthetic_dance


def _poses(frames: int) -> dict[str, Any]:
    seq = synthetic_dance(frames=frames, fps=8, width=512, height=512)
    return {"fps": 8, "width": 512, "height": 512,
            "frames": [[[round(float(v), 2) for v in j] for j in f] for f in seq.keypoints]}  # fmt: skip


class Run:
    def __init__(self, url: str, frames: int, deadline: float):
        self.url, self.frames, self.deadline = url, frames, deadline
        self.latency: list[float] = []
        self.codes: dict[str, int] = {}
        self.accepted: dict[str, tuple[str, str]] = {}  # key → (token, id)
        self.ends: dict[str, str] = {}
        self.transport_errors = 0

    def count(self, code: int | str) -> None:
        self.codes[str(code)] = self.codes.get(str(code), 0) + 1

    async def submit(self, client: httpx.AsyncClient, token: str, key: str, seed: int) -> str:
        body = {"prompt": "a dancer", "poses": _poses(self.frames), "steps": 2, "seed": seed}
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": key}
        while time.monotonic() < self.deadline:
            start = time.perf_counter()
            try:
                r = await client.post(f"{self.url}/v1/renders", json=body, headers=headers)
            except httpx.HTTPError:
                self.transport_errors += 1
                await asyncio.sleep(1.0)
                continue
            self.count(r.status_code)
            if r.status_code in (200, 202):
                self.latency.append(time.perf_counter() - start)
                self.accepted[key] = (token, r.json()["id"])
                return str(r.json()["id"])
            await asyncio.sleep(min(float(r.headers.get("retry-after", 1)), 5.0))
        raise TimeoutError(f"submission {key} not accepted before the deadline")

    async def follow(
        self, client: httpx.AsyncClient, token: str, render_id: str, sse: bool
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        last: str | None = None
        while time.monotonic() < self.deadline:
            try:
                if sse:
                    extra = {"Last-Event-ID": last} if last else {}
                    url = f"{self.url}/v1/renders/{render_id}/events"
                    async with client.stream("GET", url, headers={**headers, **extra}) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("id: "):
                                last = line[4:]
                            elif line == "event: end":
                                sse = False  # confirm the state by GET below
                                break
                r = await client.get(f"{self.url}/v1/renders/{render_id}", headers=headers)
                if r.status_code == 200 and r.json()["state"] in ("done", "failed", "cancelled"):
                    self.ends[render_id] = r.json()["state"]
                    return
            except httpx.HTTPError:
                self.transport_errors += 1
            await asyncio.sleep(0.5)

    async def client(self, index: int, token: str, count: int) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            for j in range(count):
                render_id = await self.submit(client, token, f"c{index}-{j}", index * 1000 + j)
                await self.follow(client, token, render_id, sse=(index + j) % 2 == 0)


def _fault(kind: str, args: Any) -> str:
    import ray

    from cluster.serve.local import start, stop

    if kind == "restart":
        stop()
        start(args, ready_timeout_s=300)
        return "serve shutdown + start"
    name = "avatar-sampler" if kind == "sampler" else "Ingress"
    found = [a for a in ray.util.list_named_actors(all_namespaces=True) if name in a["name"]]
    if not found:
        return f"no live {name} actor found"
    handle = ray.get_actor(found[0]["name"], namespace=found[0]["namespace"])
    if kind == "sampler":
        pid = ray.get(handle.pid.remote(), timeout=60)
        os.kill(pid, signal.SIGKILL)
        return f"SIGKILL Sampler pid {pid}"
    ray.kill(handle, no_restart=True)
    return f"killed ingress replica {found[0]['name']}"


def _verify(run: Run, root: Path) -> dict[str, Any]:
    from engine.video import probe_video

    ids = [rid for _, rid in run.accepted.values()]
    bad_video, not_done = [], []
    for rid in ids:
        if run.ends.get(rid) != "done":
            not_done.append((rid, run.ends.get(rid)))
            continue
        try:
            (folder,) = root.glob(f"*{rid}")  # the store id is the owner's tag + the id
            if probe_video(folder / "video.mp4")["frames"] != run.frames:
                bad_video.append(rid)
        except Exception:
            bad_video.append(rid)
    from engine.core import RenderStore

    store = RenderStore(root)
    rows = store.list(limit=1_000_000)
    store.close()
    return {
        "accepted_unique": len(set(ids)),
        "renders_in_store": len(rows),
        "duplicates": len(rows) - len(set(ids)),
        "not_done": not_done[:20],
        "not_done_count": len(not_done),
        "bad_videos": bad_video[:20],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serve", description=__doc__.split("\n")[0]
    )
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--renders", type=int, default=200)
    p.add_argument("--frames", type=int, default=2)
    p.add_argument("--max-queued", type=int, default=64)
    p.add_argument("--fault", choices=["none", "ingress", "sampler", "restart"], default="none")
    p.add_argument("--fault-at", type=float, default=20.0, help="seconds into the run")
    p.add_argument("--timeout", type=float, default=1200.0)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--out", type=Path, default=Path("out/bench"))
    a = p.parse_args(argv)
    from cluster.serve.config import ServeArgs
    from cluster.serve.local import start, stop

    root = (a.out / f"serve-{a.fault}-{int(time.time())}").resolve()
    tokens = [{"name": f"c{i}", "token": f"bench-token-{i}"} for i in range(a.clients)]
    args = ServeArgs(storage=root, port=a.port, tokens=tokens, set=[
        "sampler.steps=2", "output.contact_sheet=false", f"cluster.max_queued={a.max_queued}",
        "cluster.max_batch=8", f"cache_dir={root / 'cache'}"], poll_s=0.25)  # fmt: skip
    url = start(args, ready_timeout_s=300)
    run = Run(url, a.frames, time.monotonic() + a.timeout)
    share = [a.renders // a.clients + (i < a.renders % a.clients) for i in range(a.clients)]

    async def drive() -> str | None:
        tasks = [
            asyncio.create_task(run.client(i, f"bench-token-{i}", n)) for i, n in enumerate(share)
        ]
        fault = None
        if a.fault != "none":
            await asyncio.sleep(a.fault_at)
            fault = await asyncio.to_thread(_fault, a.fault, args)
        await asyncio.gather(*tasks, return_exceptions=True)
        return fault

    start_t = time.monotonic()
    fault = asyncio.run(drive())
    wall = time.monotonic() - start_t
    stop()
    checks = _verify(run, root)
    lat = sorted(run.latency)
    result = {
        "clients": a.clients, "renders": a.renders, "frames": a.frames, "fault": a.fault,
        "fault_action": fault, "wall_s": round(wall, 1),
        "renders_per_min": round(60 * sum(1 for s in run.ends.values() if s == "done") / wall, 1),
        "submit_p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
        "submit_p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
        "answers_by_code": run.codes, "transport_errors": run.transport_errors,
        "ends": {s: list(run.ends.values()).count(s) for s in set(run.ends.values())},
        "checks": checks, "storage": str(root),
    }  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"serve{'' if a.fault == 'none' else '-' + a.fault}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    ok = checks["duplicates"] == 0 and not checks["bad_videos"] and checks["not_done_count"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
