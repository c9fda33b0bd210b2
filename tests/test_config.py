"""Config loading: presets, spec merging, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, RenderConfig, apply_override, load_config, preset_names


def test_presets_load():
    assert {"tiny", "small", "sd15"} <= set(preset_names())
    for name in preset_names():
        config = load_config(None, preset=name)
        assert isinstance(config, RenderConfig)
        assert config.model.preset == name
    assert load_config(None, preset="tiny").width == 64


def test_spec_merges_over_preset_and_resolves_paths(tmp_path: Path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("prompt: a man dancing\nposes: sub/poses.json\nsampler:\n  steps: 7\n")
    config = load_config(spec, overrides=["sampler.guidance=3.5", "alignment.inter_frame=none"])
    assert config.prompt == "a man dancing"
    assert config.poses == (tmp_path / "sub" / "poses.json").resolve()
    assert config.sampler.steps == 7 and config.sampler.guidance == 3.5
    assert config.alignment.inter_frame == "none"
    assert config.width == 64  # from the tiny preset


def test_unknown_key_is_named(tmp_path: Path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("prompt: x\nsampler:\n  stepz: 4\n")
    with pytest.raises(ConfigError, match=r"sampler\.stepz: unknown key"):
        load_config(spec)
    with pytest.raises(ConfigError, match=r"colour: unknown key"):
        load_config(None, overrides=["colour=red"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("sampler.steps=0", "sampler.steps"),
        ("sampler.guidance=-1", "sampler.guidance"),
        ("width=65", "width"),
        ("chain.latent_strength=1.5", "chain.latent_strength"),
        ("alignment.inter_frame=magic", "alignment.inter_frame"),
        ("model.preset=huge", "model.preset"),
        ("sampler.steps=many", "sampler.steps"),
    ],
)
def test_out_of_range_values_name_the_key(override: str, key: str):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides=[override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sampler.steps", "not of the form key=value"),
        ("sampler..steps=3", "empty key segment"),
        ("width.x=3", "'width' is a value, not a section"),
    ],
)
def test_bad_override_syntax(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        apply_override({"width": 64}, override)


def test_cross_field_checks_name_both_values():
    with pytest.raises(ConfigError, match=r"model\.dtype='float16'.*model\.preset='tiny'"):
        load_config(None, overrides=["model.dtype=float16"])
    with pytest.raises(ConfigError, match=r"kv_previous or chain\.kv_anchor"):
        load_config(
            None,
            overrides=[
                "alignment.inter_frame=kv",
                "chain.kv_previous=false",
                "chain.kv_anchor=false",
            ],
        )


def test_missing_spec_fields_and_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="no 'prompt'"):
        load_config(None).require_spec()
    with pytest.raises(ConfigError, match="cannot read render spec"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config(None, preset="huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
