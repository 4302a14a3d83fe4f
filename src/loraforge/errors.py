"""The one exception type users see.

Every message says what was wrong, where (file:line, key, tensor) and what to do.
The CLI prints it without a traceback and exits non-zero.
"""


class LoraforgeError(Exception):
    """A problem with the user's input or environment, explained for a person."""
