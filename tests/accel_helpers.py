"""Shared fixtures of the denoise-step tests: seeded random step inputs at the tiny preset's sizes."""

from __future__ import annotations

import torch

from engine.accel import StepInputs


def random_step_inputs(
    rows: int,
    seed: int,
    *,
    kv: bool = True,
    adapters: list[str | None] | None = None,
    refs: torch.Tensor | None = None,
) -> StepInputs:
    """``rows`` rows of tiny-sized inputs (latents 8x8, text 77x32, pose 64x64), seeded; random
    reference slots under ``kv`` unless ``refs`` is given; no adapters unless named."""
    g = torch.Generator().manual_seed(seed)
    if refs is None:
        refs = torch.randint(0, rows, (rows, 2), generator=g)
    return StepInputs(
        sample=torch.randn(rows, 4, 8, 8, generator=g),
        timestep=torch.randint(1, 999, (rows,), generator=g),
        text=torch.randn(rows, 77, 32, generator=g),
        pose=torch.rand(rows, 3, 64, 64, generator=g),
        control_scale=torch.rand(rows, 1, 1, 1, generator=g) + 0.5,
        ref_index=refs if kv else None,
        include_self=True,
        adapters=adapters or [None] * rows,
    )
