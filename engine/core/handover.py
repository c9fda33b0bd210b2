"""Background hand-overs of the engine core: loading a render's inputs before it is scheduled and
encoding its outputs after its last frame is durable.

Both run on their own threads so the stepping thread never decodes poses or encodes a video; each
hands its result back through a queue the core drains in :meth:`EngineCore.step` and rings the
core's doorbell. Loading is also where a cancelled render stops early (``cancelled``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.config import ModelConfig, RenderConfig
from engine.core.live import LiveRender, finalize, load_render
from engine.core.store import RenderStore

Loaded = tuple[str, LiveRender | BaseException]
"""(render id, its runtime state or the error that kept it from loading)."""
Finished = tuple[str, BaseException | None]
"""(render id, the error that kept its outputs from being written, or None)."""


def _drain(q: queue.Queue[Any]) -> Iterator[Any]:
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return


class RenderLoader:
    """Loads renders (inputs decoded, persisted frames found) on ``threads`` loader threads.

    Args:
        store: The durable store the renders live in.
        model: The engine's model settings (every render's ``model`` section).
        doorbell: Rung when a load finished.
        threads: Renders loaded side by side.
    """

    def __init__(
        self, store: RenderStore, model: ModelConfig, doorbell: threading.Event, threads: int = 1
    ):
        self._store, self._model, self._doorbell = store, model, doorbell
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="load")
        self._done: queue.Queue[Loaded] = queue.Queue()
        self.loading: set[str] = set()

    def admit(self, render_id: str, config: RenderConfig) -> None:
        """Start loading ``render_id`` (its result arrives through :meth:`take`)."""
        self.loading.add(render_id)
        store = self._store

        def ended() -> bool:  # cancelled or deleted while loading: stop decoding its poses
            record = store.get(render_id)
            return record is None or record.final

        def load() -> None:
            try:
                live = load_render(store, render_id, config, self._model, cancelled=ended)
                self._done.put((render_id, live))
            except BaseException as e:
                self._done.put((render_id, e))
            self._doorbell.set()

        self._pool.submit(load)

    def take(self) -> Iterator[Loaded]:
        """The loads that finished since the last call (no longer counted as loading)."""
        for render_id, live in _drain(self._done):
            self.loading.discard(render_id)
            yield render_id, live

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class RenderFinisher:
    """Encodes finished renders' outputs (video, contact sheet, manifest, metrics) on two
    threads, so the videos of renders that end together encode side by side (ffmpeg).

    Args:
        doorbell: Rung when a render's outputs are written (or failed).
    """

    def __init__(self, doorbell: threading.Event):
        self._doorbell = doorbell
        self.outputs: Callable[..., None] = finalize
        """Writes a render's outputs (:func:`~engine.core.live.finalize`; the scale benchmark
        measures the frame path without them)."""
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="finish")
        self._done: queue.Queue[Finished] = queue.Queue()
        self.finishing: set[str] = set()

    def finish(self, live: LiveRender, executor: str, memory: dict[str, Any]) -> None:
        """Write the outputs of ``live`` (every frame durable) in the background."""
        self.finishing.add(live.id)

        def run() -> None:
            try:
                self.outputs(live, executor=executor, memory=memory)
                self._done.put((live.id, None))
            except BaseException as e:
                self._done.put((live.id, e))
            self._doorbell.set()

        self._pool.submit(run)

    def take(self) -> Iterator[Finished]:
        """The renders whose outputs finished since the last call."""
        for render_id, error in _drain(self._done):
            self.finishing.discard(render_id)
            yield render_id, error

    def close(self) -> None:
        self._pool.shutdown(wait=True)
