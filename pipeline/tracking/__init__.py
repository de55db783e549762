"""Tracking: MLflow runs (``runs``) and the model registry with the only promotion to ``champion`` (``registry``)."""
