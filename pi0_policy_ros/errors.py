"""One error hierarchy for the whole package.

Every message says what was expected and what was found, so that a user can fix the input
without reading the code.
"""


class Pi0PolicyError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(Pi0PolicyError):
    """A configuration value, preset name or parameter is invalid."""


class CheckpointError(Pi0PolicyError):
    """A checkpoint file or directory does not match what the configuration expects."""


class ObservationError(Pi0PolicyError):
    """An observation (image, joint state, prompt, stamp) cannot be used.

    kind: a short name of the cause (`missing_input`, `stale_observation`, ...), the key under
    which the control loop counts its holds in /diagnostics; "observation" when unspecified.
    """

    def __init__(self, message: str, kind: str = "observation") -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (str(self), self.kind)


class BagError(Pi0PolicyError):
    """An input bag cannot be replayed: unreadable, truncated, empty, or without what is needed."""
