"""Error types. A `UserError` is bad input: the CLI prints its one line and exits with code 2."""


class LeanVLMError(Exception):
    """Base class for every error leanvlm raises on purpose."""


class UserError(LeanVLMError, ValueError):
    """Bad input from a user or client: the message names the input and the fix."""


class EngineError(LeanVLMError):
    """An engine directory that is missing, tampered with, or from an unknown format."""
