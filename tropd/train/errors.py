"""Errors a training run stops with (importable without loading torch models, so the CLI can catch them)."""


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient; the message names the step and likely cause."""


class NoStepTrainedError(NonFiniteTrainingError):
    """Every step a run took was skipped as non-finite: the student did not train. ``summary`` is the run's summary
    (also in ``summary.json``), for the caller to report before failing."""

    def __init__(self, message: str, summary: dict) -> None:
        super().__init__(message)
        self.summary = summary
