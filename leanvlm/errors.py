"""Error types. A `UserError` is bad input: the CLI prints its one line and exits with code 2."""


class LeanVLMError(Exception):
    """Base class for every error leanvlm raises on purpose."""


class UserError(LeanVLMError, ValueError):
    """Bad input from a user or client: the message names the input and the fix."""


class TooLargeError(UserError):
    """Bad input that is too large (bytes, pixels): a server answers it with 413, not 400."""


class EngineError(LeanVLMError):
    """An engine directory that is missing, tampered with, or from an unknown format."""


class ShapeMismatchError(EngineError):
    """A graph produced an output whose shape differs from the reference's or the manifest's: the graph is
    wrong for this engine, whatever the numbers."""


class ToleranceError(EngineError):
    """A graph's outputs have the right shapes but differ from the reference by more than the precision's
    tolerance (or its kept indices disagree)."""
