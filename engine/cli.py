"""The ``avatar`` command line: render, metrics, poses convert, presets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from engine.config import ConfigError, load_config, preset_dict, preset_names

app = typer.Typer(
    help="Dancing Avatar: pose- and text-guided human motion video with an image diffusion model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
poses_app = typer.Typer(help="Pose sequences: convert between formats.", no_args_is_help=True)
app.add_typer(poses_app, name="poses")
models_app = typer.Typer(help="Model weights: check what a spec names.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by input or environment: reported as one message, never a traceback."""
    from engine.metrics.inputs import MetricsError
    from engine.metrics.pose_mse import PoseEstimatorError
    from engine.models.registry import WeightsNotFoundError
    from engine.pose import PoseError

    return (
        ConfigError,
        PoseError,
        WeightsNotFoundError,
        FileNotFoundError,
        MetricsError,
        PoseEstimatorError,
    )


@app.command()
def render(
    spec: Annotated[Path, typer.Argument(help="Render spec YAML (prompt, poses, seed, …).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    preset: Annotated[
        str | None, typer.Option(help="Preset from configs/ (default: the spec's, else tiny).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override, e.g. --set sampler.steps=4 (repeatable)."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue a render interrupted in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Render a video from a spec; prints the path of the video."""
    from engine.render import RenderError
    from engine.render import render as run_render

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(spec, preset=preset, overrides=set_ or [])
        result = run_render(config, out, resume=resume, progress=not quiet)
    except _user_errors() as e:
        _fail(str(e))
        return
    except RenderError as e:  # input faults exit 2 (fix the spec), infrastructure faults 1
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2 if e.kind == "input" else 1) from None
    per_frame = result.timings.get("chain", 0.0) / max(1, result.frames - result.resumed_from)
    typer.echo(f"rendered {result.frames} frames ({per_frame:.2f} s/frame) into {result.out_dir}")
    typer.echo(f"video: {result.video}")


@app.command()
def metrics(
    target: Annotated[
        Path, typer.Argument(help="A render folder, or an mp4 (give --poses and --prompt).")
    ],
    poses: Annotated[
        Path | None, typer.Option(help="Poses of the video (default: the render's manifest).")
    ] = None,
    prompt: Annotated[
        str | None, typer.Option(help="Prompt for text alignment (default: the manifest's).")
    ] = None,
    clip: Annotated[
        str | None,
        typer.Option(
            help="CLIP model: 'tiny' (random), a hub id or a folder (default: the render's "
            "preset; openai/clip-vit-large-patch14 for an mp4)."
        ),
    ] = None,
    estimator: Annotated[
        str,
        typer.Option(help="Pose MSE estimator: auto (mediapipe if installed), none, mediapipe."),
    ] = "auto",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder for an mp4 (default: its own)."),
    ] = None,
    micro: Annotated[
        bool | None,
        typer.Option(
            "--micro/--no-micro",
            help="Add the micro world's metrics (figure IoU, garment colour, scene, drift, "
            "background change; default: when the render's preset is micro, never for an mp4).",
        ),
    ] = None,
) -> None:
    """Score a video: writes metrics.json and metrics.png and prints the aggregate metrics."""
    from engine.metrics.plot import summary_table
    from engine.metrics.report import clip_for, score_render, score_video

    if estimator not in ("auto", "none", "mediapipe"):
        _fail(f"--estimator {estimator!r} is not one of: auto, none, mediapipe")
    try:
        scorer = clip_for(None, clip) if clip else None
        if target.is_file():
            out_dir = out or target.parent
            result = score_video(
                target, poses, out_dir, prompt, clip=scorer, estimator=estimator, micro=bool(micro)
            )
        elif target.is_dir():
            out_dir = target
            result = score_render(
                target, clip=scorer, estimator=estimator, prompt=prompt, poses=poses, micro=micro
            )
        else:
            _fail(f"{target}: no such render folder or video; check the path")
            return
    except _user_errors() as e:
        _fail(str(e))
        return
    typer.echo(summary_table(result))
    typer.echo(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'metrics.png'}")


@poses_app.command("convert")
def poses_convert(
    src: Annotated[
        Path,
        typer.Argument(
            help="poses.json, OpenPose JSON (file/folder), a pose-map video/GIF/folder, or an RGB "
            "video/GIF/image folder of a person (poses extracted with MediaPipe Pose)."
        ),
    ],
    dst: Annotated[Path, typer.Argument(help=".json → poses.json; .mp4/.gif/folder → pose maps.")],
    fps: Annotated[float | None, typer.Option(help="Resample to this fps.")] = None,
    width: Annotated[int | None, typer.Option(help="Rescale to this width (aspect kept).")] = None,
    height: Annotated[
        int | None, typer.Option(help="Rescale to this height (aspect kept).")
    ] = None,
    max_frames: Annotated[int, typer.Option(help="Reject longer sequences.")] = 512,
    input_fps: Annotated[
        float | None,
        typer.Option(help="fps of inputs that carry none (OpenPose JSON, image folders)."),
    ] = None,
    kind: Annotated[
        str,
        typer.Option(
            help="Visual input: auto (detect), skeleton (rendered OpenPose pose maps) or rgb "
            "(a video of a person)."
        ),
    ] = "auto",
    preview: Annotated[
        Path | None,
        typer.Option(help="Also write this .mp4: the poses drawn over the input video."),
    ] = None,
    smooth: Annotated[
        bool, typer.Option(help="RGB: One-Euro temporal smoothing of the joints.")
    ] = True,
    max_gap: Annotated[
        int, typer.Option(help="RGB: fill up to this many frames in a row with nobody detected.")
    ] = 12,
    on_missing: Annotated[
        str, typer.Option(help="RGB: longer runs without a person: error or empty.")
    ] = "error",
) -> None:
    """Convert a pose sequence between formats (and optionally resample it)."""
    from pydantic import ValidationError

    from engine.pose import convert_poses
    from engine.pose.extract import PoseExtractConfig

    if kind not in ("auto", "skeleton", "rgb"):
        _fail(f"--kind {kind!r} is not one of: auto, skeleton, rgb")
    try:
        extraction = PoseExtractConfig(
            smoothing=smooth,
            max_gap=max_gap,
            on_missing=on_missing,  # type: ignore[arg-type]
        )
    except ValidationError as e:
        _fail(f"invalid extraction option: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}")
        return
    try:
        seq = convert_poses(
            src,
            dst,
            fps=fps,
            width=width,
            height=height,
            max_frames=max_frames,
            input_fps=input_fps,
            kind=kind,  # type: ignore[arg-type]
            extraction=extraction,
            preview=preview,
        )
    except _user_errors() as e:
        _fail(str(e))
        return
    info = seq.info or {}
    how = f", {info['kind']}" if info.get("kind") else ""
    size = f"{seq.width}x{seq.height}"
    typer.echo(f"wrote {dst} ({len(seq.keypoints)} frames, {seq.fps:g} fps, {size}{how})")
    filled, empty = info.get("filled") or [], info.get("empty") or []
    if filled or empty:
        where = f" (frames {empty[:20]})" if empty else ""
        typer.echo(
            f"no person detected in {len(filled) + len(empty)} frames: {len(filled)} filled by "
            f"interpolation, {len(empty)} left empty{where}"
        )
    if preview is not None:
        typer.echo(f"preview: {preview}")


@models_app.command("check")
def models_check(
    spec: Annotated[
        Path | None, typer.Argument(help="Render spec YAML (default: the preset).")
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="Preset from configs/ (default: the spec's, else tiny).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override, e.g. --set model.base=model.safetensors."),
    ] = None,
) -> None:
    """Say per component what the spec's weights are (kind, architecture, dtype, size) without
    loading them; one line per problem with the fix. Exit 1 when there is a problem."""
    from engine.models.check import check_models

    try:
        lines = check_models(load_config(spec, preset=preset, overrides=set_ or []))
    except _user_errors() as e:
        _fail(str(e))
        return
    for line in lines:
        typer.secho(str(line), fg=None if line.ok else typer.colors.RED)
    if not all(line.ok for line in lines):
        raise typer.Exit(code=1)


@app.command()
def presets() -> None:
    """List the model presets in configs/."""
    for name in preset_names():
        data = preset_dict(name)
        model = data.get("model", {})
        typer.echo(
            f"{name:8s} model={model.get('preset', name)} {data.get('width', '?')}x{data.get('height', '?')} "
            f"steps={data.get('sampler', {}).get('steps', '?')} device={model.get('device', 'auto')}"
        )


def main() -> None:
    """Entry point for ``python -m engine.cli``."""
    app()


if __name__ == "__main__":
    main()
