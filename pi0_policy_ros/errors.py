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


# An error message shows what a sender put in a message (an image encoding, joint names, a prompt),
# and a message field has no length limit: a fuzzer's 1000-character encoding and a JointState of
# 10000 names went whole into the log and /diagnostics. A text is cut after ECHO_TEXT_CHARS, a list
# once ECHO_LIST_CHARS are shown.
ECHO_TEXT_CHARS = 64
ECHO_LIST_CHARS = 160


def echo(value: object) -> str:
    """`value` as an error message shows it, bounded: repr(value) as long as that is short; a longer
    text as its start and its length ("'abc...' (1000 characters)"); a list of texts as its
    first items and a count ("['a', 'b'] and 9998 more"), each item cut as a text is."""
    if isinstance(value, str):
        if len(value) <= ECHO_TEXT_CHARS:
            return repr(value)
        return f"{value[:ECHO_TEXT_CHARS] + '...'!r} ({len(value)} characters)"
    if isinstance(value, list):
        shown: list[str] = []
        used = 0
        for item in value:
            text = echo(item)
            if shown and used + len(text) > ECHO_LIST_CHARS:
                break
            shown.append(text)
            used += len(text) + 2
        more = len(value) - len(shown)
        return f"[{', '.join(shown)}]" + (f" and {more} more" if more else "")
    return repr(value)
