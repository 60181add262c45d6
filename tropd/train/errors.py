"""Errors a training run stops with (importable without loading torch models, so the CLI can catch them)."""


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient; the message names the step and likely cause."""
