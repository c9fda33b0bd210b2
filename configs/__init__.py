"""Data only: the YAML presets (tiny, small, sd15). Loaded by engine.config."""
