"""Typed configuration of a render, loaded from the YAML presets in ``configs/`` by one loader.

A render is described by one :class:`RenderConfig`: the preset (``configs/<name>.yaml``) gives
the model and defaults, a render spec YAML (prompt, poses, …) is merged on top, then dotted
``--set key=value`` overrides. Every model forbids unknown keys, so a typo is an error that names
the key, never a silently ignored setting.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.pose.extract import PoseExtractConfig

DEFAULT_NEGATIVE = (
    "lowres, bad anatomy, bad hands, extra limbs, missing fingers, blurry, deformed, "
    "watermark, text, cropped, worst quality"
)


class ConfigError(ValueError):
    """A configuration, spec or override is invalid; the message names the key and the fix."""


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Base):
    """Which diffusion components to build or load."""

    preset: Literal[
        "tiny", "small", "micro", "sd15", "sd15-random", "sdxl", "sdxl-random", "sdxl-tiny"
    ] = "tiny"
    """Model builder from the registry: random-weight ``tiny``/``small``, real ``sd15``,
    ``sd15-random`` (SD-1.5's architectures with random weights: real-size speed anywhere), real
    ``sdxl`` (SDXL + an SDXL OpenPose ControlNet), ``sdxl-random`` (SDXL's architectures, random
    weights) or ``sdxl-tiny`` (SDXL's structure at toy widths, for CPU tests)."""
    base: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """sd15: an SD-1.x checkpoint: hub id, diffusers folder, or one file in the original layout
    (``.safetensors`` / ``.ckpt``, e.g. a community fine-tune). Relative paths in a spec resolve
    against the spec's folder."""
    base_config: str | None = None
    """sd15: folder (or hub id) with the diffusers configs a single-file ``base`` is loaded
    against (``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``, optional ``tokenizer/``);
    None = SD-1.5's configs shipped in ``configs/models/sd15``."""
    controlnet: str = "lllyasviel/sd-controlnet-openpose"
    """sd15: the OpenPose ControlNet: hub id, folder, or one file (v1.0 ``control_sd15_*.pth``,
    v1.1 ``control_v11p_sd15_openpose.pth`` / ``.safetensors``)."""
    controlnet_config: str | None = None
    """sd15: folder (or hub id) with the ``config.json`` a single-file ``controlnet`` is loaded
    against; None = ``configs/models/sd15-controlnet-openpose``."""
    inpaint: str = "stable-diffusion-v1-5/stable-diffusion-inpainting"
    """sd15: SD inpainting checkpoint (background plate): hub id, folder, or one file."""
    inpaint_config: str | None = None
    """sd15: folder (or hub id) with ``unet/config.json`` for a single-file ``inpaint``;
    None = ``configs/models/sd15-inpainting``."""
    variant: str | None = None
    """sd15: weights variant of hub ids and folders (``fp16`` loads ``*.fp16.safetensors``); a
    component without that variant's files loads its plain ones, as diffusers pipelines do.
    None = the plain files (``.safetensors``, else ``.bin``)."""
    sam_checkpoint: str | None = None
    """sd15: Meta's segment-anything checkpoint (e.g. sam_vit_h_4b8939.pth) as a path or a URI
    (s3://…, gs://…, any fsspec protocol, https://…: fetched once per node, engine/models/remote.py),
    or a SAM in the transformers layout (a folder or hub id such as facebook/sam-vit-huge)."""
    sam_type: Literal["vit_b", "vit_l", "vit_h"] = "vit_h"
    """sd15: SAM variant matching ``sam_checkpoint``."""
    clip: str = "openai/clip-vit-large-patch14"
    """sd15: hub id or local directory of the CLIP model used by the metrics."""
    offline: bool = False
    """sd15: never touch the network, load only local directories or the hub cache."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Weights and activations dtype. ``float16`` needs a CUDA device (on a CPU it is refused
    when the models are built: it runs 9-44x slower there); ``bfloat16`` needs a device that
    supports it (CPUs do, CUDA from compute capability 8.0)."""
    device: str = "auto"
    """``auto`` (cuda if available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``."""
    seed: int = Field(default=0, ge=0)
    """Seed of the random-weight builders (``tiny``/``small``); ignored by ``sd15``."""
    backend: Literal["eager", "compile", "onnx", "tensorrt"] = "eager"
    """How the denoise step (ControlNet + UNet) runs (engine/accel): ``eager`` PyTorch,
    ``compile`` (torch.compile), ``onnx`` (exported graph on onnxruntime; the ``onnx`` extra) or
    ``tensorrt`` (engines built from that graph; the ``tensorrt`` extra and a CUDA GPU). An
    unavailable back-end is an error, never a silent fallback."""
    threads: int = Field(default=0, ge=0, le=1024)
    """CPU threads of torch (and onnxruntime) in this process; 0 = auto: half the usable cores,
    at least 1 (torch's default, all cores, collapses when other work shares them)."""
    attention: Literal["sdpa", "xformers", "eager"] = "sdpa"
    """Attention kernel of every attention layer (self and cross) of the UNet and ControlNet,
    through our processors (engine/attention.py): ``sdpa`` (torch), ``xformers`` (a CUDA GPU and
    the extra) or ``eager`` (written-out softmax attention, the reference)."""


class SamplerConfig(_Base):
    """The denoising loop of one frame."""

    steps: int = Field(default=20, ge=1, le=1000)
    """Number of denoising steps per frame."""
    guidance: float = Field(default=7.5, ge=1.0, le=50.0)
    """Classifier-free guidance scale (1 disables the unconditional pass)."""
    controlnet_scale: float = Field(default=1.0, ge=0.0, le=5.0)
    """Weight of the OpenPose ControlNet residuals."""
    eta: float = Field(default=0.0, ge=0.0, le=1.0)
    """DDIM eta (0 = deterministic DDIM, 1 = DDPM-like); ``ddim`` only."""
    scheduler: Literal["ddim", "dpmpp_2m"] = "ddim"
    """Sampler: ``ddim``, or ``dpmpp_2m`` (DPM-Solver++ 2M, diffusers'
    DPMSolverMultistepScheduler; comparable quality at about half the steps, see README "Speed")."""
    deep_cache: int = Field(default=0, ge=0, le=50)
    """DeepCache: the whole UNet runs every ``deep_cache``-th step, the steps between reuse its
    deep features and run only the shallow branch (engine/accel/deepcache.py); 0 or 1 = off.
    Opt-in: see README "Speed" for what it costs in fidelity. ``model.backend: eager`` only."""

    @model_validator(mode="after")
    def _eta_is_ddim_only(self) -> SamplerConfig:
        if self.eta > 0 and self.scheduler != "ddim":
            raise ValueError(
                f"sampler.eta={self.eta} applies to sampler.scheduler=ddim only; set eta: 0 "
                f"for {self.scheduler} (deterministic)"
            )
        return self


InterFrame = Literal["kv", "latent", "kv+latent", "none"]


class AlignmentConfig(_Base):
    """The paper's three alignment modules, each switchable for ablations."""

    intra_frame: bool = False
    """Per-character appearance LoRA (needs the appearance stage)."""
    background: bool = False
    """Background plate: latent blending + pixel composite outside the person region."""
    inter_frame: InterFrame = "latent"
    """How frame t is guided by frame t-1 and anchor frame 0 (``none`` = independent frames).
    Default ``latent``: measured on the tiny preset it cuts adjacent-frame L1 by 5× at half the
    cost of ``kv``, whose cross-frame attention has no measurable effect on random weights (see
    README, "Inter-frame alignment")."""


class ChainConfig(_Base):
    """Settings of the autoregressive frame chain (inter-frame alignment and compositing)."""

    kv_previous: bool = True
    """kv: self-attention also attends to the previous frame's keys/values."""
    kv_anchor: bool = True
    """kv: self-attention also attends to anchor frame 0's keys/values."""
    kv_include_self: bool = True
    """kv: keep the frame's own keys/values beside the references' (False = replace them, as
    Text2Video-Zero does with frame 0)."""
    latent_strength: float = Field(default=0.75, gt=0.0, le=1.0)
    """latent: fraction of the schedule re-noised when starting from frame t-1 (1 = pure noise)."""
    mask_dilate: float = Field(default=0.04, ge=0.0, le=0.5)
    """Person mask dilation as a fraction of the frame's shorter side."""
    mask_feather: float = Field(default=0.03, ge=0.0, le=0.5)
    """Person mask feather (blur) width as a fraction of the frame's shorter side."""
    blend_until: float = Field(default=1.0, ge=0.0, le=1.0)
    """Latent blending with the plate runs for this fraction of the denoising steps."""


class OutputConfig(_Base):
    """What a render writes besides the frames."""

    crf: int = Field(default=18, ge=0, le=51)
    """H.264 constant rate factor of video.mp4 (lower = better quality)."""
    contact_sheet: bool = True
    """Write contact_sheet.png (frames with pose overlay)."""
    contact_sheet_frames: int = Field(default=16, ge=1, le=256)
    """At most this many frames, evenly spaced, on the contact sheet."""


class LimitsConfig(_Base):
    """Guards against runaway inputs."""

    max_frames: int = Field(default=512, ge=1, le=100_000)
    """A pose sequence with more frames than this is rejected."""
    decode_isolated: bool = True
    """Decode visual pose inputs (videos, GIFs, images) in a child process bounded by
    ``decode_memory_mb`` and ``decode_timeout_s`` (engine.pose.isolated), never in this one."""
    decode_memory_mb: int = Field(default=3072, ge=512, le=1 << 20)
    """Address-space cap of the decoding child (MiB; Python, decoders and ffmpeg together)."""
    decode_timeout_s: float = Field(default=120.0, gt=0.0, le=86_400.0)
    """The decoding child is killed after this many seconds."""


class RefineConfig(_Base):
    """Prompt refinement (the paper's ChatGPT step)."""

    backend: Literal["template", "openai"] = "template"
    """``template`` (offline, deterministic) or ``openai`` (any OpenAI-compatible server)."""
    model: str = "gpt-4o-mini"
    """openai: chat model name."""
    base_url: str | None = None
    """openai: server URL (None = api.openai.com; e.g. http://127.0.0.1:8000/v1 for vLLM)."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: environment variable holding the API key."""
    timeout_s: float = Field(default=30.0, gt=0.0, le=600.0)
    """openai: per-request timeout in seconds."""
    max_retries: int = Field(default=3, ge=0, le=10)
    """openai: retries with exponential backoff on 429/5xx/timeouts."""
    fallback_to_template: bool = False
    """openai: on failure log a warning and use the template backend instead of raising."""
    cache_dir: Path | None = None
    """Where refinements are cached (None = <storage root>/cache/refine)."""


class AppearanceConfig(_Base):
    """Intra-frame alignment: a per-character appearance LoRA trained on synthesized references."""

    references: int = Field(default=4, ge=1, le=64)
    """K: how many reference images of the character are synthesized (canonical poses)."""
    rank: int = Field(default=4, ge=1, le=256)
    """LoRA rank of the UNet attention projections."""
    alpha: float = Field(default=4.0, gt=0.0)
    """LoRA alpha (scaling = alpha / rank)."""
    steps: int = Field(default=50, ge=1, le=100_000)
    """Optimizer steps."""
    learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0)
    """AdamW learning rate."""
    resolution: int = Field(default=64, ge=64, le=2048, multiple_of=8)
    """Training and reference image side in pixels."""
    batch_size: int = Field(default=1, ge=1, le=64)
    """Images per optimizer step."""
    seed: int = Field(default=0, ge=0)
    """Seed of reference synthesis and training."""
    train_text_encoder: bool = False
    """Also put LoRA on the text encoder's attention projections."""
    prior_preservation: bool = False
    """DreamBooth prior preservation: also train on class images without the identifier."""
    prior_weight: float = Field(default=1.0, ge=0.0)
    """Weight of the prior-preservation loss."""
    identifier: str = "sks"
    """Rare identifier token that names the character in prompts."""
    lora: str | None = None
    """Bring your own character: a LoRA file, folder or hub id (kohya ``.safetensors``, diffusers
    ``pytorch_lora_weights.safetensors``, or a peft folder with ``adapter_config.json``; UNet and
    text-encoder parts) used instead of training one (with ``alignment.intra_frame``). Its
    trigger word belongs in the prompt. Relative paths resolve against the spec's folder."""
    lora_scale: float = Field(default=1.0, ge=0.0, le=4.0)
    """Strength of ``lora`` (multiplies its alpha / rank scaling)."""


class BackgroundConfig(_Base):
    """Background alignment: one clean plate per character (SAM mask + inpainting)."""

    mask_source: Literal["sam", "pose"] = "sam"
    """Person mask for the plate: segment-anything prompted by the pose, or the pose body mask."""
    sam_min_iou: float = Field(default=0.3, ge=0.0, le=1.0)
    """A SAM mask whose IoU with the pose body mask is below this is not trusted."""
    fallback_to_pose: bool = True
    """On an untrusted SAM mask, warn and use the pose mask (else fail)."""
    mask_dilate: float = Field(default=0.04, ge=0.0, le=0.5)
    """Plate mask dilation as a fraction of the shorter side, before inpainting."""
    inpaint_steps: int = Field(default=20, ge=1, le=1000)
    """Denoising steps of the inpainting pipeline."""
    inpaint_guidance: float = Field(default=7.5, ge=1.0, le=50.0)
    """Guidance scale of the inpainting pipeline."""


Count = Annotated[int, Field(ge=1, le=4096)] | Literal["auto"]
"""An actor count: a number, or ``auto`` (sized from the cluster and the queue)."""


class ClusterConfig(_Base):
    """Actors of a Ray cluster render (actors/); ignored by in-process renders."""

    samplers: Count = 1
    """Sampler actors (frame chain models), each serving many characters; ``auto``: one per GPU
    the cluster has (``1 / sampler_gpus`` per GPU), growing with the queue up to
    ``max_samplers`` (asking Ray's autoscaler for GPUs) and shrinking when idle
    (engine/core/sizing.py)."""
    min_samplers: int = Field(default=1, ge=0, le=4096)
    """``samplers: auto``: fewest Samplers kept while nothing is left to render."""
    max_samplers: int = Field(default=64, ge=1, le=4096)
    """``samplers: auto``: most Samplers, whatever the queue."""
    sampler_idle_s: float = Field(default=120.0, ge=0.0, le=86_400.0)
    """An elastic pool's actor idle this long (no work in flight) while its pool is above the
    plan is released (its GPU goes back to the cluster)."""
    sampler_gpus: float = Field(default=0.0, ge=0.0, le=8.0)
    """GPUs per Sampler (fractions share a GPU; 0 on a CPU cluster)."""
    trainers: Count = 1
    """AppearanceTrainer actors (reference synthesis + LoRA training); ``auto``: sized from the
    renders waiting to be prepared, within the GPUs the Samplers leave."""
    trainer_gpus: float = Field(default=0.0, ge=0.0, le=8.0)
    """GPUs per AppearanceTrainer."""
    backgrounds: Count = 1
    """BackgroundWorker actors (scene + SAM + inpainting); ``auto`` as ``trainers``."""
    refiners: Count = 1
    """Refiner actors (CPU: prompt refinement); ``auto``: one per 32 renders being prepared,
    at most 4."""
    max_prepare_workers: int = Field(default=64, ge=1, le=4096)
    """``auto`` prepare pools: most trainers + background workers together."""
    gpu_wait_s: float = Field(default=600.0, ge=0.0, le=86_400.0)
    """An actor that got no GPU this long after it was started (the autoscaler could not add
    one) is given up and the pool planned without it (a cluster with no GPU at all fails at
    once)."""
    background_gpus: float = Field(default=0.0, ge=0.0, le=8.0)
    """GPUs per BackgroundWorker."""
    shared_models: bool = False
    """One copy of the base model per GPU: ``samplers`` DeviceWorkers (actors/devices.py), each
    running sampling, LoRA training and plate work on one resident model set, with the summed
    GPU shares of the three stages it replaces (at most 1), instead of a Sampler, an
    AppearanceTrainer and a BackgroundWorker with a model copy each. With ``samplers: auto``
    the DeviceWorkers are the elastic pool (one per GPU, engine/core/sizing.py); ``trainers``
    and ``backgrounds`` are then unused."""
    max_batch: int = Field(default=8, ge=1, le=256)
    """Most frames (of different characters) denoised in one Sampler batch."""
    batch_wait_s: float = Field(default=0.25, ge=0.0, le=60.0)
    """When fewer than max_batch frames are ready while characters are still being prepared,
    wait up to this long for them to join the batch (0 = never wait)."""
    max_preparing: Count = 2
    """Most characters in the prepare stages (refine/LoRA/plate) at once; ``auto``: twice the
    prepare pools' trainers + background workers (one render in work and one waiting for each;
    re-planned as they resize)."""
    deterministic_batches: bool = True
    """Pad batches as ``batch_padding`` says (False = never pad)."""
    batch_padding: Literal["none", "bucket", "max"] = "bucket"
    """How a Sampler batch is padded (engine/batching.py, padded_rows): ``bucket`` pads to the next
    of 1, 2, 4, 8, … rows (at most 2x compute; a frame is bit-identical whenever its batches fall
    in the same buckets), ``max`` pads every batch to max_batch frames (bit-identical whatever
    shares its batch, up to max_batch x the compute of a lone character), ``none`` never pads."""
    max_restarts: int = Field(default=3, ge=0, le=1000)
    """Restarts of a dead actor by Ray (a permanently dead actor is replaced by a new one)."""
    max_attempts: int = Field(default=3, ge=1, le=100)
    """Tries of one unit of work (a render's prepare stages, or one frame) after infrastructure
    faults (worker died, node lost, out of memory) before the render fails."""
    restart_wait_s: float = Field(default=300.0, ge=0.0, le=86_400.0)
    """How long a render's frames wait for lost workers (a node gone, an actor restarting)
    without spending ``max_attempts``; past it each further loss counts as an attempt."""
    max_queued: int = Field(default=1000, ge=1, le=1_000_000)
    """Most unfinished renders the engine core holds; a submission past it is refused."""
    max_unwritten_frames: int = Field(default=64, ge=1, le=100_000)
    """Most finished frames not yet durable in the storage backend (in flight to it or queued
    for the core's writers); past it the scheduler hands out no new batch, so the core's memory
    stays bounded whatever the cluster size."""
    writers: int = Field(default=4, ge=1, le=64)
    """The core's writer threads (frames made by workers that cannot reach the backend)."""
    loaders: int = Field(default=4, ge=1, le=64)
    """The core's loader threads: renders whose inputs are read (poses decoded, persisted frames
    found) side by side before they are scheduled."""


class StorageConfig(_Base):
    """Where renders' artefacts live (engine setting; the core's SQLite index stays local)."""

    uri: str | None = None
    """A local folder (None = the core's storage root) or an fsspec URI: s3://bucket/prefix,
    gs://bucket/prefix, or any installed fsspec protocol."""
    endpoint_url: str | None = None
    """s3:// only: the S3-compatible server (MinIO, Ceph, a local test server)."""
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """Keyword arguments of the fsspec filesystem (e.g. ``anon``, ``profile``); credentials
    should come from the environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS)."""
    shared: bool = False
    """A local folder that every node mounts at the same path (NFS, …): workers write their
    frames there themselves. Object stores are always shared."""


class RenderConfig(_Base):
    """Everything one render needs: the spec (prompt, poses, …) plus the engine settings."""

    prompt: str = ""
    """The coarse text prompt, e.g. "a woman in a red dress dancing on a beach"."""
    negative_prompt: str = DEFAULT_NEGATIVE
    """Negative prompt for classifier-free guidance."""
    poses: Path | None = None
    """Pose sequence: poses.json, OpenPose JSON (file or folder), a pose-map video/GIF/folder, or a
    driving RGB video/GIF/image folder of a person (poses extracted with MediaPipe Pose)."""
    pose_kind: Literal["auto", "skeleton", "rgb"] = "auto"
    """For a video/GIF/image ``poses``: auto (detect), skeleton (rendered pose maps) or rgb."""
    pose_extraction: PoseExtractConfig = Field(default_factory=PoseExtractConfig)
    """How poses are extracted from a driving RGB video (smoothing, gaps without a person)."""
    plate: Path | None = None
    """Optional background plate image; used when ``alignment.background`` is on."""
    masks: Path | None = None
    """Optional folder of per-frame person masks (PNG, white = person); default: from the poses."""
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    """Render seed; frame t uses a seed derived from (seed, t)."""
    fps: float | None = Field(default=None, gt=0.0, le=120.0)
    """Output fps; None keeps the pose sequence's fps (poses are resampled otherwise)."""
    width: int = Field(default=512, ge=64, le=2048, multiple_of=8)
    """Frame width in pixels (multiple of 8)."""
    height: int = Field(default=512, ge=64, le=2048, multiple_of=8)
    """Frame height in pixels (multiple of 8)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    alignment: AlignmentConfig = Field(default_factory=AlignmentConfig)
    chain: ChainConfig = Field(default_factory=ChainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    appearance: AppearanceConfig = Field(default_factory=AppearanceConfig)
    background: BackgroundConfig = Field(default_factory=BackgroundConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    metrics: bool = False
    """Score the finished render (``avatar metrics``) and write metrics.json / metrics.png."""
    cache_dir: Path | None = None
    """Root of the caches (refinements, adapters); None = $AVATAR_CACHE_DIR or ~/.cache/dancing-avatar."""

    @model_validator(mode="after")
    def _check_cross_fields(self) -> RenderConfig:
        if self.model.preset in ("tiny", "small", "micro") and self.model.dtype != "float32":
            raise ValueError(
                f"model.dtype={self.model.dtype!r} with model.preset={self.model.preset!r}: "
                "the tiny, small and micro presets run in float32; use model.dtype=float32"
            )
        if self.appearance.lora and not self.alignment.intra_frame:
            raise ValueError(
                f"appearance.lora={self.appearance.lora!r} drives the appearance only with "
                "alignment.intra_frame=true; set it (or drop appearance.lora)"
            )
        if self.sampler.deep_cache > 1 and self.model.backend != "eager":
            raise ValueError(
                f"sampler.deep_cache={self.sampler.deep_cache} runs on model.backend=eager only "
                f"(the {self.model.backend} graph runs the whole UNet); set sampler.deep_cache=0"
            )
        if (
            not (self.chain.kv_previous or self.chain.kv_anchor)
            and "kv" in self.alignment.inter_frame
        ):
            raise ValueError(
                f"alignment.inter_frame={self.alignment.inter_frame!r} needs chain.kv_previous or "
                "chain.kv_anchor to be true"
            )
        return self

    def require_spec(self) -> None:
        """Raise :class:`ConfigError` unless the spec fields a render needs are set."""
        if not self.prompt.strip():
            raise ConfigError("the render spec has no 'prompt': add prompt: \"...\" to the spec")
        if self.poses is None:
            raise ConfigError("the render spec has no 'poses': add poses: path/to/poses.json")


# ---------------------------------------------------------------------------------------------
# Loading


def preset_names() -> list[str]:
    """Names of the presets shipped in ``configs/``."""
    return sorted(
        p.name.removesuffix(".yaml") for p in _configs_dir().iterdir() if p.name.endswith(".yaml")
    )


def _configs_dir() -> Any:
    return resources.files("configs")


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    return data


def preset_dict(name: str) -> dict[str, Any]:
    """The raw mapping of preset ``name`` (``configs/<name>.yaml``)."""
    path = _configs_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return _read_yaml(path.read_text(), f"preset {name!r}")


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``top`` merged in (nested mappings merge, other values replace)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(
            f"override {override!r} is not of the form key=value (e.g. sampler.steps=4)"
        )
    key, _, raw = override.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"override {override!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section"
            )
        node = child
    node[parts[-1]] = value


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (check the spelling; see configs/tiny.yaml)")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def build_config(data: dict[str, Any], source: str = "config") -> RenderConfig:
    """Validate a merged mapping into a :class:`RenderConfig`, raising :class:`ConfigError`."""
    try:
        return RenderConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


WEIGHT_KEYS = {
    "model": (
        "base",
        "base_config",
        "controlnet",
        "controlnet_config",
        "inpaint",
        "inpaint_config",
        "sam_checkpoint",
        "clip",
    ),
    "appearance": ("lora",),
}
"""Spec keys that name weights: local paths among them resolve against the spec's folder."""


def resolve_weight_paths(data: dict[str, Any], folder: Path) -> None:
    """Make the relative local paths of :data:`WEIGHT_KEYS` in ``data`` absolute (in place),
    relative to ``folder``. A value is local when it is written as a path (``./``, ``../``, a
    weights suffix, not ``owner/name``), or when it or its first component exists in ``folder``
    (``weights/sd15`` next to the spec); other values stay hub ids."""
    from engine.models.sources import looks_local

    for section, keys in WEIGHT_KEYS.items():
        node = data.get(section)
        if not isinstance(node, dict):
            continue
        for key in keys:
            value = node.get(key)
            if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
                continue
            if "://" in value:  # a URI (s3://…, https://…): fetched, not a path
                continue
            first = Path(value).parts[0]
            local = looks_local(value) or (folder / value).exists() or (folder / first).is_dir()
            if local and not value.startswith("~"):
                node[key] = str((folder / value).resolve())


def load_config(
    spec: str | Path | None = None,
    *,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> RenderConfig:
    """Load preset → spec YAML → ``key=value`` overrides into one validated config.

    Args:
        spec: Path of a render spec YAML (or None for the preset alone). Relative paths inside it
            (poses, plate, masks, and model weights: :func:`resolve_weight_paths`) resolve
            against the spec's folder. A spec may name its preset
            with a top-level ``preset:`` key; the ``preset`` argument wins over it.
        preset: Preset name from ``configs/`` (default: the spec's, else ``tiny``).
        overrides: Dotted overrides such as ``sampler.steps=4`` or ``alignment.inter_frame=none``.
    """
    spec_data: dict[str, Any] = {}
    source = "config"
    if spec is not None:
        spec_path = Path(spec)
        try:
            text = spec_path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read render spec {spec_path}: {e.strerror}") from None
        spec_data = _read_yaml(text, str(spec_path))
        source = str(spec_path)
        for key in ("poses", "plate", "masks"):
            value = spec_data.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                spec_data[key] = str((spec_path.parent / value).resolve())
        resolve_weight_paths(spec_data, spec_path.parent)
    name = preset or spec_data.pop("preset", None) or "tiny"
    spec_data.pop("preset", None)
    data = deep_merge(preset_dict(str(name)), spec_data)
    for override in overrides:
        apply_override(data, override)
    return build_config(data, source)
