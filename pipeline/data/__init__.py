"""Data layer: sources, store, views, data-gate statistics."""
