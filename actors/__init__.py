"""Ray actors holding resident models (thin wrappers over engine/)."""
