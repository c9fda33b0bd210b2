"""What the executors run: the prepare stages and the batched frame chain of many renders.

Both executors call exactly these functions — :class:`~engine.core.inprocess.InProcessExecutor`
in this process, the Ray actors (``actors/``) in theirs — so a render's frames do not depend on
where it ran. Inputs and outputs are plain data (dicts, numpy arrays, :class:`AdapterPayload`,
:class:`~engine.background.PlateResult`) that pickle through Ray's object store.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.appearance.train import AdapterWeights
from engine.batching import BatchDenoiser, decode_frames, rows_per_frame
from engine.chain import FrameChain
from engine.config import ModelConfig, RenderConfig
from engine.core.encode import EncodedFrame, encode_frame, write_frame
from engine.core.faults import NonFiniteOutputError, classify
from engine.session import CharacterChain, SuppliedMasks
from engine.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class AdapterPayload:
    """A character's appearance LoRA, detached from any model."""

    name: str
    weights: AdapterWeights
    digest: str
    """sha256 of the tensors (:meth:`AdapterWeights.digest`)."""
    record: dict[str, Any]
    """Manifest entry (name, cache path, trained or cache hit)."""


@dataclass
class SessionSpec:
    """Everything a Sampler needs to denoise a render's frames (its per-render constants)."""

    config: dict[str, Any]
    """The render's RenderConfig as JSON."""
    keypoints: np.ndarray
    """(F, 18, 3) float32 poses at the render size."""
    prompt: str
    negative: str
    plate: np.ndarray | None
    """(H, W, 3) uint8 background plate, or None."""
    adapter: AdapterPayload | None
    masks: SuppliedMasks | None = None
    """The spec's masks read at the render size (a worker reads no mask file)."""
    out: Storage | None = None
    """The render's folder in a backend every node reaches: a Ray Sampler writes the frames
    there itself. None: the frames travel back encoded and the core's writers persist them."""


@dataclass
class FrameWork:
    """Frame ``index`` of ``render_id`` with the clean latents of frames t-1 and 0 (or None)."""

    render_id: str
    index: int
    previous: np.ndarray | None
    anchor: np.ndarray | None


@dataclass
class FrameOutcome:
    """A denoised frame, or the error that failed its render (others in the batch go on)."""

    render_id: str
    index: int
    latent: np.ndarray | None = None
    """(1, 4, h, w) float32 clean latent."""
    frame: np.ndarray | None = None
    pose_map: np.ndarray | None = None
    mask: np.ndarray | None = None
    error: str | None = None
    kind: str | None = None
    """``input`` or ``infra`` when ``error`` is set."""
    encoded: EncodedFrame | None = None
    """The frame's objects encoded by the worker (then ``frame``/``pose_map``/``mask`` are
    None): the core's writers only write them."""
    written: dict[str, tuple[str, int]] | None = None
    """The worker wrote the frame to the shared backend itself: {key: (sha256, size)}."""

    def encode(self) -> None:
        """Replace the frame's arrays by their encoded objects (on the worker)."""
        assert self.latent is not None and self.frame is not None and self.pose_map is not None
        self.encoded = encode_frame(self.index, self.frame, self.latent, self.pose_map, self.mask)
        self.frame = self.pose_map = self.mask = None

    def write(self, out: Storage) -> None:
        """Encode the frame and write it into its render's folder ``out`` (latent last); only
        its latent (the next frame's reference) and the digests travel back."""
        if self.encoded is None:
            self.encode()
        assert self.encoded is not None
        self.written = write_frame(out, self.encoded)
        self.encoded = None


def padding_policy(config: RenderConfig) -> str:
    """The Sampler's batch padding (``cluster.batch_padding``; ``none`` without
    ``cluster.deterministic_batches``)."""
    c = config.cluster
    return c.batch_padding if c.deterministic_batches else "none"


def build_chain(model: ModelConfig | dict[str, Any]) -> FrameChain:
    """The resident frame-chain models of ``model`` (threads per ``model.threads`` if set)."""
    from engine.models.registry import build_components

    config = model if isinstance(model, ModelConfig) else ModelConfig.model_validate(model)
    return FrameChain(build_components(config), config.attention)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# -- prepare stages ------------------------------------------------------------------------------


def refine_stage(config: RenderConfig) -> dict[str, Any]:
    """The refined prompt (JSON) of a render; the core caches it in the storage backend
    (:mod:`engine.caches`), so no node keeps a cache of its own (unless ``refine.cache_dir``)."""
    from engine.method import refine_prompt

    return refine_prompt(config, node_cache=False).model_dump(mode="json")


def appearance_stage(
    chain: FrameChain,
    config: RenderConfig,
    refined: dict[str, Any],
    shared: Storage | None = None,
) -> AdapterPayload:
    """Get (train once, then cache) the character's appearance LoRA, or import
    ``appearance.lora`` (brought from elsewhere: no training). With a ``shared`` backend the
    cache is content-addressed there too (``cache/adapters/<key>/``): a node reuses the adapter
    another node trained."""
    if config.appearance.lora:
        return imported_adapter(chain, config)
    from engine.appearance import get_or_train_adapter
    from engine.appearance.cache import adapter_key
    from engine.method import cache_root
    from engine.refine import RefinedPrompt

    prompt = RefinedPrompt.model_validate(refined)
    key = adapter_key(chain.parts.name, prompt, config.appearance, sampler=config.sampler)
    folder = cache_root(config) / "adapters" / key
    if shared is not None:
        fetch_adapter(shared.sub(f"cache/adapters/{key}"), folder)
    adapter = get_or_train_adapter(
        chain, prompt, config.appearance, cache_root(config), sampler=config.sampler
    )
    if shared is not None and adapter.trained:
        publish_adapter(folder, shared.sub(f"cache/adapters/{key}"))
    record = {"name": adapter.name, "path": str(adapter.path), "trained": adapter.trained}
    if shared is not None:  # where every node finds it (the path above is the trainer's disk)
        record["shared"] = shared.sub(f"cache/adapters/{key}").uri
    return AdapterPayload(adapter.name, adapter.weights, adapter.weights.digest(), record)


def imported_adapter(chain: FrameChain, config: RenderConfig) -> AdapterPayload:
    """``appearance.lora`` read into :class:`AdapterWeights` (named by its tensors' digest)."""
    from engine.appearance.imported import import_lora, lora_location

    parts = chain.parts
    weights = import_lora(
        lora_location(str(config.appearance.lora), config.model),
        parts.unet,
        parts.text_encoder,
        text_encoder_2=parts.text_encoder_2,
        scale=config.appearance.lora_scale,
    )
    digest = weights.digest()
    name = f"lora_{digest[:12]}"
    weights.metadata.update(name=name, base_model=parts.name)
    record = {"name": name, "path": str(config.appearance.lora), "imported": True}
    return AdapterPayload(name, weights, digest, record)


def background_stage(
    chain: FrameChain,
    models: dict[str, Any],
    config: RenderConfig,
    refined: dict[str, Any],
    keypoints0: np.ndarray,
    adapter: AdapterPayload | None,
) -> Any:
    """The character's background plate (:class:`~engine.background.PlateResult`), its scene
    drawn with the character's LoRA. ``models`` caches the SAM / inpainting models per mask
    source across calls."""
    from engine.background import build_plate_models, make_plate
    from engine.refine import RefinedPrompt

    source = config.background.mask_source
    if source not in models:
        models[source] = build_plate_models(config, chain.parts)
    pipe, predictor = models[source]
    name = ensure_adapter(chain, adapter)
    return make_plate(
        chain,
        pipe,
        predictor,
        keypoints0,
        RefinedPrompt.model_validate(refined),
        config,
        seed=config.seed,
        adapter=name,
    )


def fetch_adapter(remote: Storage, folder: Path) -> bool:
    """Copy a complete adapter folder from the shared cache into the local cache ``folder``
    (atomically: a temporary sibling renamed into place); False if the cache lacks it."""
    import shutil
    import tempfile

    from engine.appearance.adapter import ADAPTER_FILE, META_FILE, is_complete

    if is_complete(folder) or not remote.exists(META_FILE) or not remote.exists(ADAPTER_FILE):
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".fetch-{folder.name}-"))
    try:
        remote.get_dir("", tmp)
        os.replace(tmp, folder)
    except OSError:
        if not is_complete(folder):  # not another process that fetched it meanwhile
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def publish_adapter(folder: Path, remote: Storage) -> None:
    """Upload a trained adapter folder to the shared cache, its metadata file last (a reader
    takes a folder with both files as complete)."""
    from engine.appearance.adapter import META_FILE

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != META_FILE)
    for path in [*files, folder / META_FILE]:
        remote.put(path.relative_to(folder).as_posix(), path.read_bytes())


def ensure_adapter(chain: FrameChain, adapter: AdapterPayload | None) -> str | None:
    """Load ``adapter`` onto the chain's UNet (and text encoders) unless it is there; its name."""
    if adapter is None:
        return None
    from engine.appearance import activate, load_adapter, loaded_adapters, text_encoder_kwargs

    parts = chain.parts
    if adapter.name not in loaded_adapters(parts.unet):
        load_adapter(parts.unet, adapter.weights, adapter.name, **text_encoder_kwargs(parts))
        activate(parts.unet, None, **text_encoder_kwargs(parts))
    return adapter.name


# -- the Sampler -------------------------------------------------------------------------------


class SamplerState:
    """A Sampler's per-render constants and its batched denoise.

    Sessions open lazily from their :class:`SessionSpec` (``spec_of(render_id)``), so a restarted
    Sampler needs nothing re-sent; adapters are reference-counted and removed from the UNet when
    no open session uses them.
    """

    def __init__(self, chain: FrameChain, max_batch: int, padding: str = "bucket"):
        self.chain = chain
        self.max_batch = max_batch
        self.padding = padding
        self.sessions: dict[str, CharacterChain] = {}
        self._adapters: dict[str, str | None] = {}
        self._outs: dict[str, Storage | None] = {}

    def open(self, render_id: str, spec: SessionSpec) -> CharacterChain:
        """Build the session of ``render_id`` (prompt embeddings with the character's text LoRA
        active, plate latent, adapter on the UNet)."""
        from engine.appearance import activate, text_encoder_kwargs

        parts = self.chain.parts
        name = ensure_adapter(self.chain, spec.adapter)
        activate(parts.unet, name, **text_encoder_kwargs(parts))  # text LoRAs for the prompt
        try:
            session = CharacterChain(
                self.chain,
                RenderConfig.model_validate(spec.config),
                spec.keypoints,
                prompt=spec.prompt,
                negative=spec.negative,
                plate=spec.plate,
                adapter=name,
                masks=spec.masks,
            )
        finally:
            activate(parts.unet, None, **text_encoder_kwargs(parts))
        self.sessions[render_id] = session
        self._adapters[render_id] = name
        self._outs[render_id] = spec.out
        return session

    def close(self, render_id: str) -> None:
        """Free a render's session, and its adapter when no other session uses it."""
        self.sessions.pop(render_id, None)
        self._outs.pop(render_id, None)
        name = self._adapters.pop(render_id, None)
        if name is not None and name not in self._adapters.values():
            from engine.appearance import remove_adapter, text_encoder_kwargs

            remove_adapter(self.chain.parts.unet, name, **text_encoder_kwargs(self.chain.parts))

    def adapters_in_use(self) -> set[str]:
        """Names of the adapters that open sessions use."""
        return {name for name in self._adapters.values() if name is not None}

    def memory(self) -> dict[str, int]:
        """Bytes held per open render (embeddings, plate and its latent, cached maps, adapter)."""
        out = {}
        for render_id, s in self.sessions.items():
            n = s.text.numel() * s.text.element_size()
            if s.plate is not None:
                n += s.plate.nbytes
            if s.plate_latent is not None:
                n += s.plate_latent.numel() * s.plate_latent.element_size()
            n += sum(a.nbytes for a in s._memo.values())
            out[render_id] = n
        return out

    def denoise(
        self, requests: list[FrameWork], spec_of: Callable[[str], SessionSpec]
    ) -> list[FrameOutcome]:
        """Denoise one batch; a render whose inputs fail (bad mask file, adapter that does not
        fit, non-finite output) gets an error outcome and the others go on. A fault of the
        batched forward itself (out of memory, …) raises."""
        outcomes: dict[int, FrameOutcome] = {}
        jobs, rows = [], []
        for i, r in enumerate(requests):
            try:
                session = self.sessions.get(r.render_id) or self.open(
                    r.render_id, spec_of(r.render_id)
                )
                jobs.append(session.job(r.index, _tensor(r.previous), _tensor(r.anchor)))
                rows.append(i)
            except Exception as e:  # this render alone
                outcomes[i] = _failed(r, e)
        if jobs:
            capacity = self.max_batch * rows_per_frame(jobs[0].settings.inter_frame)
            denoiser = BatchDenoiser(self.chain, pad_rows=capacity, padding=self.padding)  # type: ignore[arg-type]
            latents = denoiser.denoise(jobs)
            frames = decode_frames(self.chain, latents, self.padding, self.max_batch)  # type: ignore[arg-type]
            for i, latent, frame in zip(rows, latents, frames, strict=True):
                outcomes[i] = self._finish(requests[i], latent, frame)
        return [outcomes[i] for i in range(len(requests))]

    def deliver(self, outcomes: list[FrameOutcome]) -> None:
        """Encode each finished frame where it was made, and write it to its render's folder
        when the backend is shared (see :func:`deliver`)."""
        deliver(outcomes, self._outs.get)

    def _finish(self, r: FrameWork, latent: torch.Tensor, frame: np.ndarray | None) -> FrameOutcome:
        try:
            if not torch.isfinite(latent).all():
                raise NonFiniteOutputError(f"frame {r.index}: the model produced non-finite values")
            session = self.sessions[r.render_id]
            return FrameOutcome(
                r.render_id,
                r.index,
                latent=latent.float().cpu().numpy(),
                frame=session.finish(r.index, latent, frame),
                pose_map=session.pose_map(r.index),
                mask=session.mask(r.index),
            )
        except Exception as e:
            return _failed(r, e)


def deliver(
    outcomes: list[FrameOutcome],
    out_of: Callable[[str], Storage | None],
    threads: int = 8,
) -> None:
    """Encode a batch's finished frames and write each to its render's folder ``out_of(id)``
    when that is a shared backend (then only its latent and digests travel back), the frames
    side by side (PNG encoding and object-store PUTs release the GIL), so a batch costs about
    one frame's delivery. A frame that cannot be written becomes an infrastructure error."""

    def one(outcome: FrameOutcome) -> None:
        try:
            out = out_of(outcome.render_id)
            if out is not None:
                outcome.write(out)
            else:
                outcome.encode()
        except Exception as e:
            outcome.error, outcome.kind = f"writing frame {outcome.index}: {e}", "infra"

    todo = [o for o in outcomes if o.error is None]
    if len(todo) <= 1:
        for outcome in todo:
            one(outcome)
        return
    with ThreadPoolExecutor(min(threads, len(todo)), thread_name_prefix="deliver") as pool:
        list(pool.map(one, todo))


def _failed(r: FrameWork, e: BaseException) -> FrameOutcome:
    log.warning("render %s frame %d failed: %s", r.render_id, r.index, e)
    return FrameOutcome(r.render_id, r.index, error=f"{e}", kind=classify(e))


def _tensor(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(np.array(array))  # a writable copy


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds)."""
    start = time.perf_counter()
    return fn(), time.perf_counter() - start


def pid() -> int:
    return os.getpid()
