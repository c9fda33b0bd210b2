"""What each preset runs by default: sd15 the whole method, tiny the cheap demo defaults."""

from __future__ import annotations

from engine.config import load_config


def test_sd15_runs_the_whole_method_by_default():
    c = load_config(None, preset="sd15")
    assert c.alignment.intra_frame and c.alignment.background
    assert c.alignment.inter_frame != "none"
    assert c.background.mask_source == "sam"  # SAM + inpainting, as in the paper
    assert c.appearance.resolution == c.width == 512  # references at the frame size
    # Every module stays switchable for the ablations.
    off = load_config(
        None,
        preset="sd15",
        overrides=[
            "alignment.intra_frame=false",
            "alignment.background=false",
            "alignment.inter_frame=none",
        ],
    )
    assert (off.alignment.intra_frame, off.alignment.background) == (False, False)
    assert off.alignment.inter_frame == "none"


def test_tiny_keeps_cheap_defaults():
    c = load_config(None, preset="tiny")
    assert not c.alignment.intra_frame and not c.alignment.background
    assert c.alignment.inter_frame == "latent"
    assert c.cluster.batch_padding == "bucket"
