"""The engine core (vLLM v1's split): scheduler + executor + durable store behind every front end.

    core = EngineCore(config, open_store(root, config), InProcessExecutor(config))
    render_id = core.submit(spec)          # from any thread, while another thread steps
    core.run_until_idle()                  # or: while True: core.step()
    core.get(render_id).state              # queued … rendering, encoding, done | failed | cancelled

``actors.executor.RayExecutor`` is the same interface on a Ray cluster.
"""

from engine.core.core import ConflictError, EngineCore, QueueFullError, UnknownRenderError
from engine.core.executor import Executor, InProcessExecutor
from engine.core.store import RenderRecord, RenderStore, check_id, new_id, open_store

__all__ = [
    "ConflictError",
    "EngineCore",
    "Executor",
    "InProcessExecutor",
    "QueueFullError",
    "RenderRecord",
    "RenderStore",
    "UnknownRenderError",
    "check_id",
    "new_id",
    "open_store",
]
