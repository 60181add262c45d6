"""The error an objective raises for inputs it cannot turn into a finite loss (NaN/inf, inconsistent top-k)."""


class NonFiniteInputError(ValueError):
    """An objective input holds NaN/inf (or an impossible value) at a loss-bearing position; the message names
    the input. The trainer skips such a step instead of stepping on a NaN loss."""
