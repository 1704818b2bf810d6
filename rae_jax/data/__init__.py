"""Data sources, transforms and deterministic, resumable, per-process iterators."""
